"""A minimal Llama-style decoder whose attention modules are kvlayout attention layers.

Module and parameter names follow Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj``
...), so its safetensors files load as they are. ``forward`` runs one engine step: the step's flattened
tokens, their positions and the step's ``AttentionMetadata``; every attention layer appends its K/V to
its own view of the paged cache and attends over it through the backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KVLayoutError
from ..hf_config import specs_from_hf_config
from ..layers import AttentionLayer
from ..metadata import AttentionMetadata
from .model_config import ModelConfig, rope_inv_freq
from ..specs import AttentionSpec


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` by ``cos``/``sin`` ``[T, D]`` (the two halves of the head form the pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class Attention(AttentionLayer, nn.Module):
    """GQA self-attention over the layer's packed cache view."""

    def __init__(self, cfg: ModelConfig, layer_name: str, spec: AttentionSpec):
        super().__init__(layer_name=layer_name, spec=spec, num_heads=cfg.num_heads)
        h, hk, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hk * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hk * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.attention_bias)
        self.shape_q, self.shape_kv = (h, d), (hk, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                backend, validate: bool = True) -> torch.Tensor:
        t = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(t, *self.shape_q), cos, sin)
        k = apply_rotary(self.k_proj(x).view(t, *self.shape_kv), cos, sin)
        v = self.v_proj(x).view(t, *self.shape_kv)
        out = self.attend(q, k, v, meta, backend, validate=validate)
        return self.o_proj(out.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_name: str, spec: AttentionSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_name, spec)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, meta, backend, validate=True):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, backend, validate)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    def __init__(self, cfg: ModelConfig, specs: dict[str, AttentionSpec]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, name, specs[name]) for name in specs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaModel(nn.Module):
    """``model`` (embeddings, decoder layers, final norm) and ``lm_head``, named as in Hugging Face."""

    def __init__(self, cfg: ModelConfig, kv_dtype: torch.dtype = torch.float32, block_size: int = 16):
        super().__init__()
        self.config = cfg
        if cfg.hf is not None:            # the shared reader: sliding windows etc. come from the config
            specs = specs_from_hf_config(cfg.hf, kv_dtype=kv_dtype, block_size=block_size)
        else:
            specs = {f"model.layers.{i}.self_attn": AttentionSpec(cfg.num_kv_heads, cfg.head_dim, kv_dtype, block_size)
                     for i in range(cfg.num_layers)}
        expected = [f"model.layers.{i}.self_attn" for i in range(cfg.num_layers)]
        if list(specs) != expected or not all(isinstance(s, AttentionSpec) for s in specs.values()):
            raise KVLayoutError("the config does not describe one attention layer per decoder layer")
        self.kv_specs = specs
        self.model = DecoderStack(cfg, specs)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # float32 always: not a buffer, so .to(dtype) leaves it alone; moved to the input's device on use.
        self.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim)

    def attention_layers(self) -> dict[str, Attention]:
        """``{layer name: attention module}``, what ``bind_kv_cache`` takes."""
        return {layer.self_attn.layer_name: layer.self_attn for layer in self.model.layers}

    def init_random(self, seed: int) -> "LlamaModel":
        """Seeded random weights: normal(0, initializer_range) matrices, zero biases, unit norms."""
        gen = torch.Generator().manual_seed(seed)
        std = self.config.initializer_range
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        return self

    def load_safetensors(self, path: Union[str, Path]) -> "LlamaModel":
        """Load Hugging Face weights: a ``.safetensors`` file, or a folder with ``model.safetensors`` or
        ``model.safetensors.index.json`` shards. Names and shapes must match exactly."""
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise KVLayoutError(f'loading weights needs safetensors ({e}); pip install "kvlayout[hf]"') from None

        path = Path(path)
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                paths = [path / f for f in files]
            else:
                paths = [path / "model.safetensors"]
        else:
            paths = [path]
        for p in paths:
            if not p.is_file():
                raise KVLayoutError(f"no safetensors file at {p}")
        state = {}
        for p in paths:
            state.update(load_file(str(p)))
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state) - ({"lm_head.weight"} if self.config.tie_word_embeddings else set()))
        extra = sorted(set(state) - set(own))
        bad_shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                      for k in set(state) & set(own) if state[k].shape != own[k].shape]
        if missing or extra or bad_shapes:
            raise KVLayoutError(f"weights in {path} do not fit the config: missing {missing[:5]}, "
                                f"unexpected {extra[:5]}, shape mismatches {bad_shapes[:5]}")
        with torch.no_grad():
            for k, t in state.items():
                own[k].copy_(t)
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, backend,
                all_logits: bool = False, validate: bool = True) -> torch.Tensor:
        """Run the step's tokens (``input_ids``, ``positions`` ``[T]``). Returns logits ``[num_reqs, V]``
        of each request's last scheduled token, or ``[T, V]`` for every token with ``all_logits``.
        ``validate=False`` skips the attention layers' per-call checks (no host syncs)."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise KVLayoutError(f"input_ids and positions must be 1-D of one length, got "
                                f"{tuple(input_ids.shape)} and {tuple(positions.shape)}")
        if input_ids.shape[0] != meta.num_actual_tokens:
            raise KVLayoutError(f"{input_ids.shape[0]} tokens given, the metadata schedules {meta.num_actual_tokens}")
        x = self.model.embed_tokens(input_ids)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        freqs = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, meta, backend, validate)
        if not all_logits:
            x = x[meta.query_start_loc[1:].long() - 1]
        return self.lm_head(self.model.norm(x))


def build_model(config: Union[ModelConfig, dict, str, Path], *, weights: Union[str, Path, None] = None,
                seed: int = 0, dtype: torch.dtype = torch.float32, block_size: int = 16,
                device: Union[str, torch.device] = "cpu") -> LlamaModel:
    """A ``LlamaModel`` from a config (``ModelConfig``, ``config.json`` dict or path, shipped name) with
    weights from ``weights`` (safetensors) or seeded random ones, in ``dtype`` on ``device``."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_hf(config)
    model = LlamaModel(cfg, kv_dtype=dtype, block_size=block_size)
    if weights is not None:
        model.load_safetensors(weights)
    else:
        model.init_random(seed)
    return model.to(device=device, dtype=dtype).eval()
