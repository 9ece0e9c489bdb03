"""Layer specs from a Hugging Face model config, read through transformers' own config classes.

``specs_from_hf_config`` takes a ``config.json`` dict (or a transformers config object) and returns one
spec per cache-owning layer, keyed by layer name. With transformers installed (the ``hf`` extra), the dict
becomes that family's config class first (``AutoConfig.for_model``): attribute maps (GPT-2's ``n_head``),
defaults, nested ``text_config`` (multimodal models: the text decoder is planned) and ``layer_types``
are then exactly what the family's authors keep. Without transformers, a dict is read by the standard
field names alone.

Per layer, ``layer_types`` (or the family's block pattern) decides the cache it owns:

- ``full_attention`` / ``sliding_attention``: an ``AttentionSpec`` (window from ``sliding_window``); MLA
  families (``kv_lora_rank``) an ``MLASpec`` instead; multi-query through ``num_key_value_heads``;
- ``linear_attention``: a state page (``MambaSpec``) shaped by the family: Mamba1 (conv + ``d_inner x
  d_state``), Mamba2 (conv over ``heads*head_dim + 2*groups*d_state`` + ``heads x head_dim x d_state``),
  gated delta-net (Qwen3-Next, Qwen3.5, Olmo-hybrid: conv over ``2*k_dim + v_dim`` + ``v_heads x k_head x
  v_head``), Kimi delta attention (conv over q, k, v + ``heads x head_dim x head_dim``), MiniMax lightning
  attention (``heads x head_dim x head_dim``);
- ``hybrid`` (Falcon-H1, Zamba2): attention and a Mamba2 state in the same layer;
- ``mlp`` / ``moe``: nothing; layers that reuse another layer's KV (Gemma-3n ``num_kv_shared_layers``) own
  nothing either.

Conv states keep ``kernel - 1`` columns, in the model's dtype; SSM / recurrent states use
``mamba_ssm_dtype``. Anything else (chunked attention, unknown layer types or families whose state is
not modelled) is refused in one line naming the model type and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from .errors import KVLayoutError
from .specs import AttentionSpec, KVCacheSpec, MambaSpec, MLASpec, parse_dtype
from .tp import kv_head_range

SHIPPED_DIR = "configs"
ATTENTION_KINDS = ("full_attention", "sliding_attention")
NO_CACHE_KINDS = ("mlp", "moe")
# counts checked before transformers sees them (some families divide by them while building the config)
COUNT_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim",
                "n_layer", "n_head", "n_embd")


def _shipped_dir() -> Path:
    """The ``configs`` folder beside this module. Found from this file, not through ``import kvlayout``:
    with an editable install, a folder named ``kvlayout`` in the current directory (a checkout's default
    name) can make ``kvlayout`` a namespace package whose folder holds no ``configs``."""
    return Path(__file__).resolve().parent / SHIPPED_DIR


def shipped_models() -> list[str]:
    """Names of the model configs shipped with kvlayout (``kvlayout plan NAME``)."""
    return sorted(p.name[:-5] for p in _shipped_dir().iterdir() if p.name.endswith(".json"))


def load_hf_config(name_or_path: Union[str, Path]) -> dict:
    """A shipped model name (see ``shipped_models()``), a ``config.json`` path, or a folder holding one;
    returns the JSON object. Files that are not a JSON object are refused in one line."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        key = str(name_or_path).lower()
        if key not in shipped_models():
            raise KVLayoutError(f"{name_or_path!r} is neither a config.json path nor a shipped model; "
                                f"shipped: {', '.join(shipped_models())}")
        path = _shipped_dir() / (key + ".json")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KVLayoutError(f"{path} is not a JSON config ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise KVLayoutError(f"{path} holds a JSON {type(cfg).__name__}, not an object of config fields")
    return cfg


# ------------------------------------------------------------------------------------ reading configs

class _DictConfig:
    """A config dict read by attribute, for when transformers is not installed: missing fields are None."""

    def __init__(self, cfg: dict):
        self._cfg = cfg

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._cfg.get(name)


def text_config(cfg: Union[dict, Any]):
    """The config of the model's text decoder, read through transformers when it is installed."""
    if isinstance(cfg, dict):
        model_type = cfg.get("model_type")
        try:
            from transformers import AutoConfig
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        except ImportError:
            cfg = _DictConfig(cfg.get("text_config") or cfg)
        else:
            if model_type is None:
                raise KVLayoutError("the config has no model_type; add the family's model_type "
                                    "(e.g. \"llama\") so it can be read by that family's config class")
            if model_type not in CONFIG_MAPPING:
                raise KVLayoutError(f"model_type {model_type!r} is not known to the installed transformers; "
                                    f"upgrade transformers or check the config")
            for name in COUNT_FIELDS:
                v = cfg.get(name)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    raise KVLayoutError(f"{model_type}: {name} must be a positive integer, got {v!r}")
            fields = {k: v for k, v in cfg.items() if k != "model_type"}
            try:
                cfg = AutoConfig.for_model(model_type, **fields)
            except Exception as e:      # noqa: BLE001: any malformed field; transformers raises many types
                raise KVLayoutError(f"{model_type}: transformers cannot read this config: "
                                    f"{' '.join(str(e).split())[:300] or type(e).__name__}") from None
    if hasattr(cfg, "get_text_config"):
        return cfg.get_text_config(decoder=True)
    return cfg


def _field(cfg, *names, default=None, required: bool = True, model_type: str = "?"):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    if default is not None or not required:
        return default
    raise KVLayoutError(f"{model_type}: the config has no {' / '.join(names)}")


def _int_field(cfg, *names, model_type: str, minimum: int = 1, **kw) -> int:
    v = _field(cfg, *names, model_type=model_type, **kw)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise KVLayoutError(f"{model_type}: {names[0]} must be an integer >= {minimum}, got {v!r}")
    return v


def _per_rank(total: int, tp_size: int, what: str, replicate: bool = False) -> int:
    """What one rank holds of ``total``; ``replicate``: fewer than ranks is one replicated copy each
    (``kvlayout.tp.kv_head_range``)."""
    if total % tp_size == 0 or (replicate and tp_size % total == 0):
        return kv_head_range(0, tp_size, total)[1]
    raise KVLayoutError(f"{what} ({total}) cannot be split over tensor-parallel size {tp_size}")


def _model_dtype(cfg) -> torch.dtype:
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "bfloat16"
    return d if isinstance(d, torch.dtype) else parse_dtype(str(d).replace("torch.", ""))


def layer_kinds(cfg, model_type: str) -> list[str]:
    """The cache kind of every layer: ``layer_types`` where the config has it (Nemotron-H's
    ``hybrid_override_pattern`` otherwise), else full attention everywhere."""
    n = _int_field(cfg, "num_hidden_layers", "n_layer", "num_layers", model_type=model_type)
    kinds = getattr(cfg, "layer_types", None)
    pattern = getattr(cfg, "hybrid_override_pattern", None)
    if kinds is None and isinstance(pattern, str):
        table = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
        bad = sorted(set(pattern) - set(table))
        if bad:
            raise KVLayoutError(f"{model_type}: hybrid_override_pattern has unknown symbols {bad}")
        kinds = [table[c] for c in pattern]
    if kinds is None:
        return ["full_attention"] * n
    kinds = list(kinds)
    if len(kinds) != n:
        raise KVLayoutError(f"{model_type}: layer_types has {len(kinds)} entries for {n} layers")
    return kinds


# --------------------------------------------------------------------------------------- state pages

def _mamba1(c, mt, tp, model_dtype, ssm_dtype, d_inner, d_state, d_conv) -> MambaSpec:
    inner = _per_rank(d_inner, tp, f"{mt} mamba intermediate size")
    return MambaSpec(states={"conv": ((inner, d_conv - 1), model_dtype), "ssm": ((inner, d_state), ssm_dtype)},
                     tp_rows={"conv": ((d_inner, True),), "ssm": ((d_inner, True),)})


def _mamba2(c, mt, tp, model_dtype, ssm_dtype, heads, head_dim, groups, d_state, d_conv) -> MambaSpec:
    h = _per_rank(heads, tp, f"{mt} mamba heads")
    g = _per_rank(groups, tp, f"{mt} mamba groups", replicate=True)
    conv_dim = h * head_dim + 2 * g * d_state
    states = {"conv": ((conv_dim, d_conv - 1), model_dtype), "ssm": ((h, head_dim, d_state), ssm_dtype)}
    if groups % tp and groups > 1:       # each group on several ranks: not a plain split, so not sliced
        return MambaSpec(states=states)
    bc = (groups * d_state, groups % tp == 0)            # B and C rows: split with the groups, or replicated
    return MambaSpec(states=states, tp_rows={"conv": ((heads * head_dim, True), bc, bc), "ssm": ((heads, True),)})


def _gated_delta(c, mt, tp, model_dtype, ssm_dtype) -> MambaSpec:
    i = lambda *n: _int_field(c, *n, model_type=mt)          # noqa: E731
    nk = _per_rank(i("linear_num_key_heads"), tp, f"{mt} linear_num_key_heads")
    nv = _per_rank(i("linear_num_value_heads"), tp, f"{mt} linear_num_value_heads")
    dk, dv, kernel = i("linear_key_head_dim"), i("linear_value_head_dim"), i("linear_conv_kernel_dim")
    qk, v = (nk * tp * dk, True), (nv * tp * dv, True)
    return MambaSpec(states={"conv": ((2 * nk * dk + nv * dv, kernel - 1), model_dtype),
                             "ssm": ((nv, dk, dv), ssm_dtype)},
                     tp_rows={"conv": (qk, qk, v), "ssm": ((nv * tp, True),)})


def _lightning(c, mt, tp, model_dtype, ssm_dtype) -> MambaSpec:
    heads = _int_field(c, "num_attention_heads", model_type=mt)
    head_dim = getattr(c, "head_dim", None) or _int_field(c, "hidden_size", model_type=mt) // heads
    return MambaSpec(states={"kv": ((_per_rank(heads, tp, f"{mt} heads"), head_dim, head_dim), ssm_dtype)},
                     tp_rows={"kv": ((heads, True),)})


def _kimi_delta(c, mt, tp, model_dtype, ssm_dtype) -> MambaSpec:
    heads = _per_rank(_int_field(c, "linear_num_heads", model_type=mt), tp, f"{mt} linear_num_heads")
    d, kernel = _int_field(c, "linear_head_dim", model_type=mt), _int_field(c, "linear_conv_kernel_dim", model_type=mt)
    qkv = (heads * tp * d, True)
    return MambaSpec(states={"conv": ((3 * heads * d, kernel - 1), model_dtype), "ssm": ((heads, d, d), ssm_dtype)},
                     tp_rows={"conv": (qkv, qkv, qkv), "ssm": ((heads * tp, True),)})


def _ints(c, mt, *names) -> list[int]:
    return [_int_field(c, *n.split("|"), model_type=mt) for n in names]


# model_type -> (cfg, model_type, tp, model dtype, ssm dtype) -> the state page of one linear layer
STATE_READERS: dict[str, Callable[..., MambaSpec]] = {
    "mamba": lambda c, mt, *a: _mamba1(c, mt, *a, *_ints(c, mt, "intermediate_size", "state_size", "conv_kernel")),
    "falcon_mamba": lambda c, mt, *a: _mamba1(c, mt, *a, *_ints(c, mt, "intermediate_size", "state_size",
                                                                   "conv_kernel")),
    "jamba": lambda c, mt, *a: _mamba1(c, mt, *a, _int_field(c, "mamba_expand", model_type=mt)
                                       * _int_field(c, "hidden_size", model_type=mt),
                                       *_ints(c, mt, "mamba_d_state", "mamba_d_conv")),
    "mamba2": lambda c, mt, *a: _mamba2(c, mt, *a, *_ints(c, mt, "num_heads", "head_dim", "n_groups", "state_size",
                                                          "conv_kernel")),
    "nemotron_h": lambda c, mt, *a: _mamba2(c, mt, *a, *_ints(c, mt, "mamba_num_heads", "mamba_head_dim", "n_groups",
                                                              "ssm_state_size", "conv_kernel")),
    "zamba2": lambda c, mt, *a: _mamba2(c, mt, *a, *_ints(c, mt, "n_mamba_heads", "mamba_headdim", "mamba_ngroups",
                                                          "mamba_d_state", "mamba_d_conv")),
    "qwen3_next": _gated_delta, "qwen3_5_text": _gated_delta, "qwen3_5_moe_text": _gated_delta,
    "olmo_hybrid": _gated_delta,
    "zamba": lambda c, mt, *a: _mamba1(c, mt, *a, _int_field(c, "mamba_expand", model_type=mt)
                                       * _int_field(c, "hidden_size", model_type=mt),
                                       *_ints(c, mt, "mamba_d_state", "mamba_d_conv")),
    "minimax": _lightning,
    "kimi_linear": _kimi_delta,
}
for _mt in ("bamba", "granitemoehybrid", "falcon_h1"):
    STATE_READERS[_mt] = lambda c, mt, *a: _mamba2(c, mt, *a, *_ints(c, mt, "mamba_n_heads", "mamba_d_head",
                                                                     "mamba_n_groups", "mamba_d_state",
                                                                     "mamba_d_conv"))


# ------------------------------------------------------------------------------------------- specs

def specs_from_hf_config(cfg: Union[dict, Any], kv_dtype: Union[str, torch.dtype] = "auto", block_size: int = 16,
                         tp_size: int = 1, mamba_ssm_dtype: Union[str, torch.dtype] = "float32"
                         ) -> dict[str, KVCacheSpec]:
    """One spec per cache-owning layer of the model's text decoder, for one tensor-parallel rank, keyed by
    layer name (``model.layers.{i}.self_attn`` for KV, ``model.layers.{i}.mixer`` for state pages)."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise KVLayoutError(f"tp_size must be a positive integer, got {tp_size!r}")
    if not isinstance(cfg, dict) and not hasattr(cfg, "to_dict"):
        raise KVLayoutError(f"a model config must be a dict or a transformers config, got {type(cfg).__name__}")
    outer_type = cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)
    c = text_config(cfg)
    try:
        return _specs(c, outer_type, kv_dtype, block_size, tp_size, mamba_ssm_dtype)
    except KVLayoutError:
        raise
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as e:
        mt = getattr(c, "model_type", None) or outer_type or "?"
        raise KVLayoutError(f"{mt}: cannot read the config ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None


def _specs(c, outer_type, kv_dtype, block_size: int, tp_size: int, mamba_ssm_dtype) -> dict[str, KVCacheSpec]:
    mt = getattr(c, "model_type", None) or outer_type or "?"
    model_dtype = _model_dtype(c)
    dtype = model_dtype if kv_dtype in (None, "auto") else parse_dtype(kv_dtype)
    ssm_dtype = parse_dtype(mamba_ssm_dtype)
    kinds = layer_kinds(c, mt)
    unknown = sorted(set(kinds) - set(ATTENTION_KINDS) - set(NO_CACHE_KINDS) - {"linear_attention", "hybrid"})
    if unknown:
        raise KVLayoutError(f"{mt}: layer_types {unknown} are not supported"
                            + ("; no backend computes chunk-local attention" if "chunked_attention" in unknown
                               else ""))
    if getattr(c, "index_head_dim", None):
        raise KVLayoutError(f"{mt}: the sparse-attention indexer key cache (index_head_dim) is not supported")
    per_layer = getattr(c, "per_layer_config", None)          # heterogeneous models (Gemma 4): a config a layer
    uniform = None if per_layer is not None or not any(k in ATTENTION_KINDS + ("hybrid",) for k in kinds) \
        else _attention_specs(c, mt, dtype, block_size, tp_size)
    state = None
    if any(k in ("linear_attention", "hybrid") for k in kinds):
        reader = STATE_READERS.get(mt)
        if reader is None:
            raise KVLayoutError(f"{mt}: layer_types 'linear_attention' (a recurrent state) is not modelled for "
                                f"this family; supported: {', '.join(sorted(STATE_READERS))}")
        state = reader(c, mt, tp_size, model_dtype, ssm_dtype)
    shared_from = len(kinds) - (getattr(c, "num_kv_shared_layers", None) or 0)
    specs: dict[str, KVCacheSpec] = {}
    for i, kind in enumerate(kinds):
        if kind in ATTENTION_KINDS + ("hybrid",) and i < shared_from:
            make = uniform or _attention_specs(per_layer[i], mt, dtype, block_size, tp_size)
            specs[f"model.layers.{i}.self_attn"] = make(kind)
        if kind in ("linear_attention", "hybrid"):
            specs[f"model.layers.{i}.mixer"] = state
    return specs


def _attention_specs(c, mt: str, dtype: torch.dtype, block_size: int, tp_size: int
                     ) -> Callable[[str], KVCacheSpec]:
    """The spec maker of the model's attention layers: ``kind -> spec``."""
    rank = getattr(c, "kv_lora_rank", None)
    if rank:
        rope = _int_field(c, "qk_rope_head_dim", model_type=mt)
        mla = MLASpec(rank, rope, dtype, block_size)                       # latents are replicated over TP
        return lambda kind: mla
    heads = _int_field(c, "num_attention_heads", "n_head", model_type=mt)
    kv_heads = _int_field(c, "num_key_value_heads", default=heads, model_type=mt)
    if heads % kv_heads:
        raise KVLayoutError(f"{mt}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_size = getattr(c, "head_dim", None) or getattr(c, "attention_head_dim", None)
    if head_size is None:
        hidden = _int_field(c, "hidden_size", "n_embd", model_type=mt)
        if hidden % heads:
            raise KVLayoutError(f"{mt}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; "
                                f"give head_dim")
        head_size = hidden // heads
    _per_rank(heads, tp_size, "num_attention_heads")
    cap = getattr(c, "attn_logit_softcapping", None)
    base = dict(num_kv_heads=_per_rank(kv_heads, tp_size, "num_key_value_heads", replicate=True),
                head_size=int(head_size), dtype=dtype, block_size=block_size, logits_soft_cap=cap or None)
    window = getattr(c, "sliding_window", None)
    if getattr(c, "use_sliding_window", True) is False:
        window = None
    has_types = getattr(c, "layer_types", None) is not None
    full, sliding = AttentionSpec(**base), AttentionSpec(sliding_window=window, **base)

    def make(kind: str) -> KVCacheSpec:
        if kind == "sliding_attention" or (not has_types and window):
            if not window:
                raise KVLayoutError(f"{mt}: a sliding_attention layer but no sliding_window in the config")
            return sliding
        return full
    return make
