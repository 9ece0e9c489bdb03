"""Layer specs from a Hugging Face ``config.json``: dense and sliding-window attention, soft-capped
attention (Gemma-2), MLA (DeepSeek-V2/V3) and hybrid attention + Mamba2 (Nemotron-H)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch

from .errors import KVLayoutError
from .specs import AttentionSpec, KVCacheSpec, MambaSpec, MLASpec, parse_dtype

SHIPPED_DIR = "configs"


def _shipped_dir() -> Path:
    """The ``configs`` folder beside this module. Found from this file, not through ``import kvlayout``:
    with an editable install, a folder named ``kvlayout`` in the current directory (a checkout's default
    name) can make ``kvlayout`` a namespace package whose folder holds no ``configs``."""
    return Path(__file__).resolve().parent / SHIPPED_DIR


def shipped_models() -> list[str]:
    """Names of the model configs shipped with kvlayout (``kvlayout plan NAME``)."""
    return sorted(p.name[:-5] for p in _shipped_dir().iterdir() if p.name.endswith(".json"))


def load_hf_config(name_or_path: Union[str, Path]) -> dict:
    """A shipped model name (see ``shipped_models()``), a ``config.json`` path, or a folder holding one."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise KVLayoutError(f"{path} is not valid JSON: {e}") from None
    key = str(name_or_path).lower()
    if key in shipped_models():
        return json.loads((_shipped_dir() / (key + ".json")).read_text())
    raise KVLayoutError(f"{name_or_path!r} is neither a config.json path nor a shipped model; "
                        f"shipped: {', '.join(shipped_models())}")


def _per_rank(total: int, tp_size: int, what: str, replicate: bool = False) -> int:
    if total % tp_size == 0:
        return total // tp_size
    if replicate and tp_size % total == 0:
        return 1                       # fewer KV heads than ranks: each rank keeps one (replicated)
    raise KVLayoutError(f"{what} ({total}) cannot be split over tensor-parallel size {tp_size}")


def _model_dtype(cfg: dict) -> torch.dtype:
    return parse_dtype(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")


def specs_from_hf_config(cfg: dict, kv_dtype: Union[str, torch.dtype] = "auto", block_size: int = 16,
                         tp_size: int = 1, mamba_ssm_dtype: Union[str, torch.dtype] = "float32"
                         ) -> dict[str, KVCacheSpec]:
    """One spec per cache-owning layer of the model, for one tensor-parallel rank, keyed by layer name."""
    if not isinstance(tp_size, int) or tp_size < 1:
        raise KVLayoutError(f"tp_size must be a positive integer, got {tp_size!r}")
    model_dtype = _model_dtype(cfg)
    dtype = model_dtype if kv_dtype in (None, "auto") else parse_dtype(kv_dtype)
    model_type = cfg.get("model_type", "")
    n_layers = cfg["num_hidden_layers"]
    if model_type in ("deepseek_v2", "deepseek_v3") or cfg.get("kv_lora_rank"):
        spec = MLASpec(cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], dtype, block_size)
        return {f"model.layers.{i}.self_attn": spec for i in range(n_layers)}   # latents are replicated
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_size = cfg.get("head_dim") or cfg.get("attention_head_dim") or cfg["hidden_size"] // heads
    _per_rank(heads, tp_size, "num_attention_heads")
    attn = dict(num_kv_heads=_per_rank(kv_heads, tp_size, "num_key_value_heads", replicate=True),
                head_size=head_size, dtype=dtype, block_size=block_size,
                logits_soft_cap=cfg.get("attn_logit_softcapping"))
    if model_type == "nemotron_h":
        return _nemotron_h(cfg, attn, tp_size, model_dtype, parse_dtype(mamba_ssm_dtype))
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    specs = {}
    for i in range(n_layers):
        if model_type == "gemma2":
            layer_window = window if i % 2 == 0 else None          # even layers slide, odd are global
        elif "layer_types" in cfg:
            layer_window = window if cfg["layer_types"][i] == "sliding_attention" else None
        else:
            layer_window = window
        specs[f"model.layers.{i}.self_attn"] = AttentionSpec(sliding_window=layer_window, **attn)
    return specs


def _nemotron_h(cfg: dict, attn: dict, tp_size: int, model_dtype: torch.dtype, ssm_dtype: torch.dtype
                ) -> dict[str, KVCacheSpec]:
    pattern = cfg["hybrid_override_pattern"]
    if len(pattern) != cfg["num_hidden_layers"]:
        raise KVLayoutError(f"hybrid_override_pattern has {len(pattern)} entries for "
                            f"{cfg['num_hidden_layers']} layers")
    m_heads = _per_rank(cfg["mamba_num_heads"], tp_size, "mamba_num_heads")
    groups = _per_rank(cfg["n_groups"], tp_size, "n_groups")
    d_state = cfg["ssm_state_size"]
    conv_dim = m_heads * cfg["mamba_head_dim"] + 2 * groups * d_state
    mamba = MambaSpec(states={"conv": ((conv_dim, cfg["conv_kernel"] - 1), model_dtype),
                              "ssm": ((m_heads, cfg["mamba_head_dim"], d_state), ssm_dtype)})
    specs: dict[str, KVCacheSpec] = {}
    for i, kind in enumerate(pattern):
        if kind == "M":
            specs[f"backbone.layers.{i}.mixer"] = mamba
        elif kind == "*":
            specs[f"backbone.layers.{i}.mixer"] = AttentionSpec(**attn)
    return specs
