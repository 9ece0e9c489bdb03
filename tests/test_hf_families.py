"""Every causal-LM family transformers knows is planned from its own config class, or refused in one line;
per family, bytes per token and state bytes per layer match a formula written here from the config."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.auto.configuration_auto import CONFIG_MAPPING           # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES   # noqa: E402

from kvlayout import plan_kv_cache                                               # noqa: E402
from kvlayout.cli.commands import main                                           # noqa: E402
from kvlayout.errors import KVLayoutError                                        # noqa: E402
from kvlayout.hf_config import specs_from_hf_config, text_config                 # noqa: E402
from kvlayout.specs import AttentionSpec, MambaSpec, MLASpec                     # noqa: E402

BF16, FP32 = 2, 4


def _config(model_type: str, **changes):
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CONFIG_MAPPING[model_type](**changes)


def test_every_causal_lm_config_class_plans_or_is_refused_in_one_line():
    """The list comes from transformers itself. A config class transformers cannot build with its own
    defaults is skipped (counted); every other one is planned (1 GiB) or refused with one line."""
    planned, refused, unbuildable = [], [], []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            cfg = _config(model_type).to_dict()
        except Exception:                                            # noqa: BLE001: transformers' own defaults
            unbuildable.append(model_type)
            continue
        try:
            specs = specs_from_hf_config(cfg)
            plan_kv_cache(specs, 1 << 30)
            planned.append(model_type)
        except KVLayoutError as e:
            assert "\n" not in str(e), (model_type, str(e))
            refused.append(model_type)
    print(f"planned {len(planned)}, refused {len(refused)}, unbuildable by transformers {len(unbuildable)}: "
          f"refused {refused}")
    assert len(planned) >= 150 and len(unbuildable) <= 3


def kv(layers: int, kv_heads: int, head_dim: int, elem: int = BF16) -> int:
    """Bytes per token of ``layers`` attention layers: K and V of every KV head."""
    return layers * 2 * kv_heads * head_dim * elem


def attn_layers(c) -> int:
    return sum(t in ("full_attention", "sliding_attention", "hybrid") for t in c.layer_types)


def state_layers(c) -> int:
    return sum(t in ("linear_attention", "hybrid") for t in c.layer_types)


def mamba1(d_inner, d_state, d_conv) -> int:
    return d_inner * (d_conv - 1) * BF16 + d_inner * d_state * FP32


def mamba2(heads, head_dim, groups, d_state, d_conv) -> int:
    return (heads * head_dim + 2 * groups * d_state) * (d_conv - 1) * BF16 + heads * head_dim * d_state * FP32


# model_type: (a small variant's fields, formula(text config) -> (KV bytes per token, state bytes, state layers))
FAMILIES = {
    "llama": ({"num_key_value_heads": 2, "num_hidden_layers": 3},
              lambda c: (kv(c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads), 0, 0)),
    "qwen3": ({"num_hidden_layers": 5, "head_dim": 64},
              lambda c: (kv(c.num_hidden_layers, c.num_key_value_heads, c.head_dim), 0, 0)),
    "gemma2": ({"num_hidden_layers": 4}, lambda c: (kv(c.num_hidden_layers, c.num_key_value_heads, c.head_dim), 0, 0)),
    "gpt2": ({"n_layer": 3, "n_head": 4, "n_embd": 64}, lambda c: (kv(c.n_layer, c.n_head, c.n_embd // c.n_head), 0, 0)),
    "falcon": ({"num_hidden_layers": 2, "multi_query": True},                  # multi-query: one KV head
               lambda c: (kv(c.num_hidden_layers, 1, c.hidden_size // c.num_attention_heads), 0, 0)),
    "gemma3n_text": ({"num_hidden_layers": 10, "num_kv_shared_layers": 4,
                      "layer_types": ["sliding_attention"] * 4 + ["full_attention"] + ["sliding_attention"] * 5},
                     lambda c: (kv(c.num_hidden_layers - c.num_kv_shared_layers, c.num_key_value_heads,
                                   c.head_dim), 0, 0)),
    "deepseek_v3": ({"num_hidden_layers": 3, "kv_lora_rank": 128},
                    lambda c: (c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * BF16, 0, 0)),
    "mamba": ({"num_hidden_layers": 3, "state_size": 8},
              lambda c: (0, mamba1(c.intermediate_size, c.state_size, c.conv_kernel), c.num_hidden_layers)),
    "jamba": ({"num_hidden_layers": 8, "attn_layer_period": 4, "attn_layer_offset": 2},
              lambda c: (kv(attn_layers(c), c.num_key_value_heads, c.hidden_size // c.num_attention_heads),
                         mamba1(c.mamba_expand * c.hidden_size, c.mamba_d_state, c.mamba_d_conv), state_layers(c))),
    "mamba2": ({"num_hidden_layers": 2, "num_heads": 16, "hidden_size": 512, "head_dim": 64},
               lambda c: (0, mamba2(c.num_heads, c.head_dim, c.n_groups, c.state_size, c.conv_kernel),
                          c.num_hidden_layers)),
    "nemotron_h": ({"hybrid_override_pattern": "M-M*-M-", "num_hidden_layers": 7},
                   lambda c: (kv(attn_layers(c), c.num_key_value_heads, c.head_dim),
                              mamba2(c.mamba_num_heads, c.mamba_head_dim, c.n_groups, c.ssm_state_size,
                                     c.conv_kernel), state_layers(c))),
    "bamba": ({"num_hidden_layers": 4, "attn_layer_indices": [1]},
              lambda c: (kv(attn_layers(c), c.num_key_value_heads, c.hidden_size // c.num_attention_heads),
                         mamba2(c.mamba_n_heads, c.mamba_d_head, c.mamba_n_groups, c.mamba_d_state, c.mamba_d_conv),
                         state_layers(c))),
    "falcon_h1": ({"num_hidden_layers": 3},                                     # attention and Mamba2 in every layer
                  lambda c: (kv(c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads),
                             mamba2(c.mamba_n_heads, c.mamba_d_head, c.mamba_n_groups, c.mamba_d_state,
                                    c.mamba_d_conv), c.num_hidden_layers)),
    "zamba2": ({}, lambda c: (kv(attn_layers(c), c.num_key_value_heads, c.head_dim),
                              mamba2(c.n_mamba_heads, c.mamba_headdim, c.mamba_ngroups, c.mamba_d_state,
                                     c.mamba_d_conv), state_layers(c))),
    "qwen3_next": ({"num_hidden_layers": 8},
                   lambda c: (kv(attn_layers(c), c.num_key_value_heads, c.head_dim),
                              (2 * c.linear_num_key_heads * c.linear_key_head_dim
                               + c.linear_num_value_heads * c.linear_value_head_dim) * (c.linear_conv_kernel_dim - 1)
                              * BF16 + c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim
                              * FP32, state_layers(c))),
    "minimax": ({"num_hidden_layers": 4},
                lambda c: (kv(attn_layers(c), c.num_key_value_heads, c.hidden_size // c.num_attention_heads),
                           c.num_attention_heads * (c.hidden_size // c.num_attention_heads) ** 2 * FP32,
                           state_layers(c))),
    "kimi_linear": ({}, lambda c: (attn_layers(c) * (c.kv_lora_rank + c.qk_rope_head_dim) * BF16,
                                   3 * c.linear_num_heads * c.linear_head_dim * (c.linear_conv_kernel_dim - 1) * BF16
                                   + c.linear_num_heads * c.linear_head_dim ** 2 * FP32, state_layers(c))),
}


def _aligned(n: int) -> int:
    return -(-n // 16) * 16


@pytest.mark.parametrize("variant", ["defaults", "small"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_bytes_match_the_formula(model_type, variant):
    fields, formula = FAMILIES[model_type]
    cfg = _config(model_type, **(fields if variant == "small" else {}))
    specs = specs_from_hf_config(cfg.to_dict())
    c = text_config(cfg.to_dict())
    want_kv, want_state, want_state_layers = formula(c)
    token_specs = [s for s in specs.values() if not isinstance(s, MambaSpec)]
    states = [s for s in specs.values() if isinstance(s, MambaSpec)]
    assert sum(s.page_size_bytes for s in token_specs) // 16 == want_kv
    assert len(states) == want_state_layers
    for s in states:        # each state starts 16-byte aligned, so the page is at most 15 bytes a state longer
        raw = sum(math.prod(shape) * torch.empty(0, dtype=dt).element_size() for shape, dt in s.states.values())
        assert raw == want_state and s.state_bytes <= _aligned(raw) + 16 * len(s.states)
    assert all(isinstance(s, (AttentionSpec, MLASpec)) for s in token_specs)


def test_sliding_windows_and_soft_caps_follow_layer_types():
    c = _config("gemma2", num_hidden_layers=4)
    specs = list(specs_from_hf_config(c.to_dict()).values())
    assert [s.sliding_window for s in specs] == [c.sliding_window if t == "sliding_attention" else None
                                                  for t in c.layer_types]
    assert all(s.logits_soft_cap == c.attn_logit_softcapping for s in specs)
    qwen = _config("qwen2", num_hidden_layers=2, use_sliding_window=False, sliding_window=128)
    assert all(s.sliding_window is None for s in specs_from_hf_config(qwen.to_dict()).values())


def test_multimodal_configs_plan_their_text_decoder():
    for model_type in ("gemma3", "qwen2_vl", "mllama"):
        cfg = _config(model_type).to_dict()
        specs = specs_from_hf_config(cfg)
        text = text_config(cfg)
        assert len(specs) >= 1 and all(s.num_kv_heads == text.num_key_value_heads for s in specs.values())


@pytest.mark.parametrize("model_type, match", [("llama4_text", "chunked"), ("rwkv", "num_attention_heads"),
                                               ("recurrent_gemma", "not modelled")])
def test_unsupported_families_are_refused_naming_type_and_field(model_type, match):
    with pytest.raises(KVLayoutError, match=match) as e:
        specs_from_hf_config(_config(model_type).to_dict())
    assert model_type.split("_")[0] in str(e.value) and "\n" not in str(e.value)


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("name, make, match", [
    ("binary", lambda p: _write(p, bytes(range(256))), "not a JSON config"),
    ("json list", lambda p: _write(p, b"[1, 2]"), "JSON list"),
    ("empty object", lambda p: _write(p, b"{}"), "no model_type"),
    ("string for an int", lambda p: _write(p, json.dumps({"model_type": "llama", "num_attention_heads": "32"})
                                           .encode()), "num_attention_heads"),
    ("zero heads", lambda p: _write(p, json.dumps({"model_type": "llama", "num_attention_heads": 0}).encode()),
     "num_attention_heads must be a positive integer"),
    ("unknown family", lambda p: _write(p, json.dumps({"model_type": "no-such-family"}).encode()),
     "not known to the installed transformers"),
])
def test_garbage_configs_give_one_line_and_exit_2(tmp_path, capsys, name, make, match):
    path = make(tmp_path / "config.json")
    assert main(["plan", path]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_absurd_memory_is_refused(capsys):
    assert main(["plan", "llama-3.1-8b", "--memory", "1e30"]) == 2
    err = capsys.readouterr().err
    assert "int32 block ids" in err and err.count("\n") == 1
