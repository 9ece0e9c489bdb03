"""Layout resolver and planner: grouping by page size, hybrid page unification, cross-layer strides,
conflicts that name both sides, and the overlap check."""

import dataclasses
import json
import math

import pytest
import torch

import kvlayout as kvl
from kvlayout import hf_config as hf
from kvlayout.errors import BackendUnavailableError, KVLayoutError, LayoutConflictError
from kvlayout.layout import check_no_overlap, group_by_page_size


def attn(h=2, d=8, dtype=torch.float32, bs=4, **kw):
    return kvl.AttentionSpec(num_kv_heads=h, head_size=d, dtype=dtype, block_size=bs, **kw)


def mamba(conv_dim=64, conv_k=3, heads=4, head_dim=8, d_state=16, conv_dtype=torch.bfloat16, ssm_dtype=torch.float32):
    return kvl.MambaSpec(states={"conv": ((conv_dim, conv_k), conv_dtype),
                                 "ssm": ((heads, head_dim, d_state), ssm_dtype)})


def caps(name="limited", **kw):
    base = dict(kv_dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
                q_dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
                features=frozenset({"non_causal", "sliding_window", "soft_cap", "sinks", "lse", "mla"}))
    base.update(kw)
    return kvl.BackendCapabilities(name=name, **base)


# ---------------------------------------------------------------- grouping and per-layer layout

def test_group_by_page_size_keeps_first_seen_order():
    specs = {"l0": attn(h=2), "l1": attn(h=4), "l2": attn(h=2, sliding_window=8), "l3": attn(h=4),
             "l4": kvl.MLASpec(48, 16, torch.float32, 4)}        # 4*64*4 = 1024 B = page of attn(h=4)
    assert attn(h=4).page_size_bytes == specs["l4"].page_size_bytes
    assert group_by_page_size(specs) == [["l0", "l2"], ["l1", "l3", "l4"]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("cross", [False, True])
def test_layer_layout_matches_independent_view(dtype, cross):
    n_layers, n_blocks = 3, 5
    spec = attn(h=2, d=8, dtype=dtype, bs=4)
    specs = {f"layer{i}": spec for i in range(n_layers)}
    layout = kvl.resolve_kv_cache_layout(specs, n_blocks, cross_layer=cross)
    assert len(layout.groups) == 1
    g = layout.groups[0]
    assert g.cross_layer is cross and g.num_blocks == n_blocks and g.block_size == 4
    assert g.nbytes == n_layers * n_blocks * spec.page_size_bytes
    page_elems = spec.page_size_bytes // dtype.itemsize
    buf = torch.zeros(g.nbytes, dtype=torch.int8).view(dtype)
    for li, lay in enumerate(layout.layers):
        assert lay.shape == (n_blocks, 2, 4, 16) and lay.dtype == dtype and lay.group == 0
        assert lay.block_bytes == spec.page_size_bytes
        if cross:       # (B, L, H, N, C): a block of every layer is one span
            ref = buf.view(n_blocks, n_layers, 2, 4, 16)[:, li]
            assert lay.block_stride_bytes == n_layers * spec.page_size_bytes
            assert lay.byte_offset == li * spec.page_size_bytes
        else:           # (L, B, H, N, C): one contiguous region per layer
            ref = buf.view(n_layers, n_blocks, 2, 4, 16)[li]
            assert lay.block_stride_bytes == spec.page_size_bytes
            assert lay.byte_offset == li * n_blocks * spec.page_size_bytes
        assert lay.strides == ref.stride()
        assert lay.storage_offset == ref.storage_offset()
        assert lay.strides[0] == (n_layers if cross else 1) * page_elems
        assert lay.storage_offset * dtype.itemsize == lay.byte_offset


def test_mla_and_mamba_shapes():
    m = mamba()
    specs = {"mla": kvl.MLASpec(32, 16, torch.bfloat16, 8), "m": m}
    layout = kvl.resolve_kv_cache_layout(specs, {0: 3, 1: 7})
    mla, mam = layout.layer("mla"), layout.layer("m")
    assert mla.shape == (3, 1, 8, 48) and mla.kind == "mla" and mla.dtype == torch.bfloat16
    assert mam.shape == (7, 1, 1, m.page_size_bytes) and mam.kind == "mamba" and mam.dtype == torch.int8
    assert mam.strides == (m.page_size_bytes, m.page_size_bytes, m.page_size_bytes, 1)
    assert layout.groups[1].block_size is None and layout.groups[1].num_tokens is None
    assert layout.groups[0].num_tokens == 24
    with pytest.raises(KVLayoutError, match="no layer named 'nope'.*mla, m"):
        layout.layer("nope")


def test_layout_is_frozen():
    layout = kvl.resolve_kv_cache_layout({"a": attn()}, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.groups[0].num_blocks = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.layers[0].strides = (1, 1, 1, 1)


def test_connector_wish_gives_cross_layer_and_false_keeps_it_off():
    specs = {"a": attn(), "b": attn()}
    wish = kvl.ConnectorWishes("nixl", cross_layer=True)
    assert kvl.resolve_kv_cache_layout(specs, 4, connector=wish).cross_layer
    assert not kvl.resolve_kv_cache_layout(specs, 4, connector=kvl.ConnectorWishes("x")).cross_layer
    single = kvl.resolve_kv_cache_layout({"a": attn()}, 4, cross_layer=True)
    assert not single.cross_layer                     # one layer: nothing to interleave


# ---------------------------------------------------------------- conflicts name both sides

@pytest.mark.parametrize("spec,backend,words", [
    (attn(dtype=torch.float8_e4m3fn), caps(), ["float8_e4m3fn", "not supported"]),
    (attn(bs=8), caps(block_sizes=frozenset({16, 32})), ["block_size 8", "one of 16, 32"]),
    (attn(bs=8), caps(block_size_multiple=16), ["multiple of 16"]),
    (attn(d=96), caps(head_sizes=frozenset({64, 128})), ["head_size 96"]),
    (attn(sliding_window=4), caps(features=frozenset()), ["sliding window"]),
    (attn(logits_soft_cap=30.0), caps(features=frozenset()), ["soft-cap"]),
    (attn(has_sinks=True), caps(features=frozenset()), ["sinks"]),
    (attn(kind="encoder"), caps(features=frozenset()), ["non-causal"]),
    (kvl.MLASpec(16, 16, torch.float32, 4), caps(features=frozenset()), ["MLA"]),
])
def test_backend_conflict_names_layer_and_backend(spec, backend, words):
    with pytest.raises(LayoutConflictError) as e:
        kvl.resolve_kv_cache_layout({"model.layers.3.attn": spec}, 4, backend=backend)
    msg = str(e.value)
    for w in ["'model.layers.3.attn'", "'limited'"] + words:
        assert w in msg, msg


def test_connector_block_size_conflict_names_both():
    with pytest.raises(LayoutConflictError, match=r"'layer0' has block_size 4 .*'nixl' needs block_size 16"):
        kvl.resolve_kv_cache_layout({"layer0": attn(bs=4)}, 4, connector=kvl.ConnectorWishes("nixl", block_size=16))


def test_cross_layer_conflicts_name_both_sides():
    specs = {"a": attn(), "b": attn()}
    with pytest.raises(LayoutConflictError, match="cross_layer=False.*'nixl'"):
        kvl.resolve_kv_cache_layout(specs, 4, connector=kvl.ConnectorWishes("nixl", cross_layer=True),
                                    cross_layer=False)
    with pytest.raises(LayoutConflictError, match="cross_layer=True.*'limited'"):
        kvl.resolve_kv_cache_layout(specs, 4, backend=caps(), cross_layer=True)
    # same page size, different block formats: 2 heads x 8 vs 1 head x 16
    odd = {"a": attn(h=2, d=8), "b": attn(h=1, d=16)}
    assert odd["a"].page_size_bytes == odd["b"].page_size_bytes
    with pytest.raises(LayoutConflictError, match="'a'.*'b'.*cross_layer=False"):
        kvl.resolve_kv_cache_layout(odd, 4, cross_layer=True)
    assert not kvl.resolve_kv_cache_layout(odd, 4).cross_layer


def test_connector_wish_skips_groups_that_cannot_be_cross_layer():
    """A connector's wish (cross_layer=None) applies where the group allows it: a group of mixed formats
    keeps one region per layer instead of failing, and a uniform group still gets the cross-layer allocation."""
    wish = kvl.ConnectorWishes("nixl", cross_layer=True)
    specs = {"a0": attn(h=2, d=8), "b0": attn(h=1, d=16), "x0": attn(h=4), "x1": attn(h=4)}
    layout = kvl.resolve_kv_cache_layout(specs, 4, connector=wish)
    mixed, uniform = layout.groups
    assert mixed.layer_names == ("a0", "b0") and not mixed.cross_layer
    assert uniform.layer_names == ("x0", "x1") and uniform.cross_layer
    check_no_overlap(layout)
    hybrid = {"a0": attn(h=2, d=16, bs=4), "m1": mamba(heads=6), "a2": attn(h=2, d=16, bs=4)}
    assert not kvl.plan_kv_cache(hybrid, 4 << 20, connector=wish).groups[0].cross_layer
    with pytest.raises(LayoutConflictError, match="identical block formats"):
        kvl.plan_kv_cache(hybrid, 4 << 20, connector=wish, cross_layer=True)


def test_same_page_different_block_sizes_conflict():
    specs = {"a": attn(h=2, bs=8), "b": attn(h=4, bs=4)}
    assert specs["a"].page_size_bytes == specs["b"].page_size_bytes
    with pytest.raises(LayoutConflictError, match=r"'a' \(block_size 8\) and 'b' \(block_size 4\)"):
        kvl.resolve_kv_cache_layout(specs, 4)


@pytest.mark.parametrize("num_blocks", [0, -3, 2.5, True, {1: 4}])
def test_bad_num_blocks(num_blocks):
    with pytest.raises(KVLayoutError, match="num_blocks for group 0"):
        kvl.resolve_kv_cache_layout({"a": attn()}, num_blocks)


def test_no_specs_and_bad_spec():
    with pytest.raises(KVLayoutError, match="no layer specs"):
        kvl.resolve_kv_cache_layout({}, 4)
    with pytest.raises(KVLayoutError, match="not a KV-cache spec"):
        kvl.resolve_kv_cache_layout({"a": "attention"}, 4)


# ---------------------------------------------------------------- overlap check

@pytest.mark.parametrize("cross", [False, True])
def test_overlap_check_catches_shifted_layer(cross):
    layout = kvl.resolve_kv_cache_layout({"a": attn(), "b": attn(), "c": attn()}, 6, cross_layer=cross)
    check_no_overlap(layout)                                   # the real layout is clean
    b = layout.layer("b")
    shifted = dataclasses.replace(b, byte_offset=b.byte_offset - 8)  # 8 B into layer a's bytes
    bad = dataclasses.replace(layout, layers=(layout.layers[0], shifted, layout.layers[2]))
    with pytest.raises(LayoutConflictError, match="layers 'a' and 'b' overlap"):
        check_no_overlap(bad)


def test_overlap_check_catches_out_of_buffer_and_fat_blocks():
    layout = kvl.resolve_kv_cache_layout({"a": attn(), "b": attn()}, 4)
    last = layout.layers[1]
    past = dataclasses.replace(last, byte_offset=last.byte_offset + 8)
    with pytest.raises(LayoutConflictError, match="outside the group's buffer"):
        check_no_overlap(dataclasses.replace(layout, layers=(layout.layers[0], past)))
    fat = dataclasses.replace(layout.layers[0], block_bytes=layout.layers[0].block_bytes + 4)
    with pytest.raises(LayoutConflictError, match="'a'.*larger than the block stride"):
        check_no_overlap(dataclasses.replace(layout, layers=(fat, layout.layers[1])))


# ---------------------------------------------------------------- planner

def test_plan_groups_by_page_size_and_splits_budget_by_tokens():
    specs = {"l0": attn(h=2), "l1": attn(h=4), "l2": attn(h=2, sliding_window=16), "l3": attn(h=4)}
    budget = 1 << 20
    plan = kvl.plan_kv_cache(specs, budget, backend="torch")
    assert [g.layer_names for g in plan.groups] == [("l0", "l2"), ("l1", "l3")]
    assert plan.nbytes <= budget
    # every group holds the same number of tokens (up to one block of rounding)
    per_token = sum(specs[n].token_bytes for n in specs)
    tokens = budget // per_token
    for g in plan.groups:
        assert g.block_size == 4 and tokens - 4 < g.num_tokens <= tokens
        assert g.nbytes == g.num_blocks * g.page_size_bytes * 2
        assert g.padding_bytes == 0 and g.kinds == ("attention", "attention")
    assert plan.group_of("l3").index == 1
    assert plan.layout.backend == "torch" and plan.adjustments == ()


def test_plan_mla_only_model():
    spec = kvl.MLASpec(512, 64, torch.bfloat16, 64)
    plan = kvl.plan_kv_cache({f"l{i}": spec for i in range(4)}, 64 << 20)
    (g,) = plan.groups
    assert g.num_blocks == (64 << 20) // (4 * spec.page_size_bytes)
    assert plan.attention_group() is g


def test_plan_memory_too_small():
    specs = {"a": attn(h=8, d=128, dtype=torch.bfloat16, bs=16)}
    page = specs["a"].page_size_bytes
    assert kvl.plan_kv_cache(specs, page).groups[0].num_blocks == 1
    with pytest.raises(KVLayoutError, match="too small for one block"):
        kvl.plan_kv_cache(specs, page - 1)


@pytest.mark.parametrize("budget", [0, -1, 1.5e9, True, "1G"])
def test_plan_bad_budget(budget):
    with pytest.raises(KVLayoutError, match="memory_bytes"):
        kvl.plan_kv_cache({"a": attn()}, budget)


def test_plan_unknown_backend_name():
    with pytest.raises(BackendUnavailableError, match="unknown attention backend 'nope'.*torch"):
        kvl.plan_kv_cache({"a": attn()}, 1 << 20, backend="nope")
    with pytest.raises(KVLayoutError, match="backend must be"):
        kvl.plan_kv_cache({"a": attn()}, 1 << 20, backend=42)


def _expected_block(need, token_bytes, bs, allowed=lambda b: True):
    """Smallest multiple of ``bs`` whose page covers ``need`` bytes and the backend allows."""
    block = bs * max(1, math.ceil(need / (token_bytes * bs)))
    while not allowed(block):
        block += bs
    return block


def test_hybrid_raises_attention_block_and_pads_mamba():
    a, m_small, m_big = attn(h=2, d=16, bs=4), mamba(heads=2), mamba(heads=6)
    specs = {"attn0": a, "mix1": m_small, "attn2": a, "mix3": m_big}
    plan = kvl.plan_kv_cache(specs, 8 << 20)
    need = m_big.state_bytes
    block = _expected_block(need, a.token_bytes, 4)
    page = block * a.token_bytes
    assert page >= need and (block - 4) * a.token_bytes < need
    assert len(plan.groups) == 1
    (g,) = plan.groups
    assert g.block_size == block and g.page_size_bytes == page
    assert plan.specs["attn0"].block_size == block and plan.specs["attn2"].block_size == block
    for name in ("mix1", "mix3"):
        s = plan.specs[name]
        assert s.page_size_bytes == page and s.state_bytes == specs[name].state_bytes
        assert s.slices() == specs[name].slices()
    assert g.padding_bytes_per_page == (page - m_small.state_bytes) + (page - m_big.state_bytes)
    assert g.padding_bytes == g.padding_bytes_per_page * g.num_blocks
    assert any(f"raised 4 -> {block}" in n for n in plan.adjustments)
    assert any("padded" in n for n in plan.adjustments)
    assert plan.nbytes <= 8 << 20
    assert g.kinds == ("attention", "mamba", "attention", "mamba")


def test_hybrid_respects_backend_block_sizes():
    a, m = attn(h=2, d=16, bs=16), mamba(heads=6)
    allowed = frozenset({16, 64, 256, 1024})
    plan = kvl.plan_kv_cache({"a": a, "m": m}, 64 << 20, backend=caps(block_sizes=allowed))
    block = _expected_block(m.state_bytes, a.token_bytes, 16, lambda b: b in allowed)
    assert plan.groups[0].block_size == block and block in allowed
    assert plan.specs["m"].page_size_bytes == block * a.token_bytes


def test_hybrid_impossible_block_size_names_both_layers():
    with pytest.raises(LayoutConflictError, match="'m'.*'a'.*'limited'"):
        kvl.plan_kv_cache({"a": attn(bs=16), "m": mamba()}, 1 << 30, backend=caps(block_sizes=frozenset({16})))


def test_hybrid_attention_layers_with_different_pages_conflict():
    specs = {"a": attn(h=2, bs=4), "b": attn(h=4, bs=4), "m": mamba()}
    with pytest.raises(LayoutConflictError, match="'a'.*'b'.*one page size"):
        kvl.plan_kv_cache(specs, 1 << 30)


def test_mamba_only_model():
    m = mamba()
    plan = kvl.plan_kv_cache({"m0": m, "m1": m}, 1 << 20)
    (g,) = plan.groups
    assert g.block_size is None and g.num_tokens is None
    assert g.page_size_bytes == m.state_bytes and g.padding_bytes == 0
    assert g.num_blocks == (1 << 20) // (2 * m.state_bytes)


def test_plan_json_and_describe_report_the_numbers():
    plan = kvl.plan_kv_cache({"a": attn(h=2, d=16, bs=4), "m": mamba(heads=6)}, 4 << 20, backend="torch")
    d = json.loads(plan.to_json())
    (g,) = plan.groups
    assert d["memory_bytes"] == 4 << 20 and d["allocated_bytes"] == plan.nbytes
    jg = d["groups"][0]
    assert (jg["page_size_bytes"], jg["block_size"], jg["num_blocks"], jg["num_tokens"], jg["padding_bytes"]) == \
        (g.page_size_bytes, g.block_size, g.num_blocks, g.num_tokens, g.padding_bytes)
    assert jg["kinds"] == {"attention": 1, "mamba": 1}
    assert d["layers"]["m"]["dtype"] == "int8" and d["layers"]["a"]["shape"][1:] == [2, g.block_size, 32]
    text = plan.describe()
    assert f"{g.num_blocks:,}" in text and f"{g.num_tokens:,}" in text and "1 attention, 1 mamba" in text


def test_shipped_hybrid_config_plans_one_page_size():
    cfg = hf.load_hf_config("nemotron-h-8b")
    specs = hf.specs_from_hf_config(cfg, block_size=16)
    pattern = cfg["hybrid_override_pattern"]
    assert sum(isinstance(s, kvl.MambaSpec) for s in specs.values()) == pattern.count("M")
    assert sum(isinstance(s, kvl.AttentionSpec) for s in specs.values()) == pattern.count("*")
    plan = kvl.plan_kv_cache(specs, 8 << 30, backend="torch")
    # facts from the config: conv state (heads*head_dim + 2*groups*d_state, k-1) bf16, ssm fp32
    conv_bytes = (cfg["mamba_num_heads"] * cfg["mamba_head_dim"] + 2 * cfg["n_groups"] * cfg["ssm_state_size"]) \
        * (cfg["conv_kernel"] - 1) * 2
    ssm_bytes = cfg["mamba_num_heads"] * cfg["mamba_head_dim"] * cfg["ssm_state_size"] * 4
    need = math.ceil(conv_bytes / 16) * 16 + ssm_bytes
    token_bytes = cfg["num_key_value_heads"] * 2 * cfg["attention_head_dim"] * 2
    block = _expected_block(need, token_bytes, 16)
    (g,) = plan.groups
    assert g.block_size == block and g.page_size_bytes == block * token_bytes
    assert g.num_layers == pattern.count("M") + pattern.count("*")
    assert g.padding_bytes_per_page == pattern.count("M") * (block * token_bytes - need)
    assert plan.nbytes <= 8 << 30 and g.num_blocks == (8 << 30) // (g.num_layers * g.page_size_bytes)
