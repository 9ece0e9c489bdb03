"""The few fields of a Hugging Face Llama-style ``config.json`` that the model runner needs, checked, and
the rotary inverse frequencies they imply (default, linear and Llama-3 scaling)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import KVLayoutError
from ..hf_config import load_hf_config

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; ``rope_type`` is one of ``SUPPORTED_ROPE_TYPES``."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, rotary, GQA attention, SwiGLU MLP."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    eos_token_id: Optional[int] = None
    hf: Optional[dict] = None          # the raw config, for the layer specs

    @classmethod
    def from_hf(cls, config: Union[dict, str, Path]) -> "ModelConfig":
        """Read a ``config.json`` dict, a path to one (or its folder), or a shipped model name."""
        cfg = dict(config) if isinstance(config, dict) else load_hf_config(config)
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise KVLayoutError(f"model_type {model_type!r} is not a Llama-style decoder this runner builds; "
                                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise KVLayoutError(f"config.json lacks {', '.join(missing)}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise KVLayoutError(f"hidden_act {act!r} is not supported; the SwiGLU MLP uses silu")
        if cfg.get("pretraining_tp", 1) != 1:
            raise KVLayoutError("pretraining_tp != 1 is not supported")
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise KVLayoutError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=kv_heads,
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope=_rope_from_hf(cfg),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
            initializer_range=float(cfg.get("initializer_range", 0.02)),
            eos_token_id=eos[0] if isinstance(eos, list) and eos else eos, hf=cfg)


def _rope_from_hf(cfg: dict) -> RopeConfig:
    """Old configs: ``rope_theta`` + ``rope_scaling``; newer ones: ``rope_parameters`` holding both."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise KVLayoutError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if float(merged.get("partial_rotary_factor", 1.0)) != 1.0:
        raise KVLayoutError("partial_rotary_factor != 1 is not supported")
    return RopeConfig(
        theta=theta, rope_type=rope_type, factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings",
                                                        cfg.get("max_position_embeddings", 8192))))


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies ``[head_dim / 2]`` float32, with the config's scaling applied."""
    if head_dim % 2:
        raise KVLayoutError(f"rotary embeddings need an even head_dim, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Wavelengths longer than context/low_freq_factor are stretched by `factor`, shorter than
        # context/high_freq_factor kept, and the band between blended linearly in context/wavelength.
        ctx = rope.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        long_wave, short_wave = ctx / rope.low_freq_factor, ctx / rope.high_freq_factor
        blend = (ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - blend) * inv_freq / rope.factor + blend * inv_freq
        out = torch.where(wavelen > long_wave, inv_freq / rope.factor, inv_freq)
        middle = (wavelen >= short_wave) & (wavelen <= long_wave)
        return torch.where(middle, blended, out)
    return inv_freq
