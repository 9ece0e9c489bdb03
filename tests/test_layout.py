"""Layout resolver and planner: grouping by page size, cross-layer strides, conflicts that name both
sides, and the overlap check (hybrid models on a page pool: tests/test_hybrid_pool.py)."""

import dataclasses
import json

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
    with pytest.raises(LayoutConflictError, match="hybrid model"):
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


def test_mamba_only_model():
    m = mamba()
    plan = kvl.plan_kv_cache({"m0": m, "m1": m}, 1 << 20)
    (g,) = plan.groups
    assert g.block_size is None and g.num_tokens is None
    assert g.page_size_bytes == m.state_bytes and g.padding_bytes == 0
    assert g.num_blocks == (1 << 20) // (2 * m.state_bytes)


def test_plan_json_and_describe_report_the_numbers():
    plan = kvl.plan_kv_cache({"a": attn(h=2, d=16, bs=4), "b": attn(h=4, d=16, bs=4)}, 4 << 20, backend="torch")
    d = json.loads(plan.to_json(context_tokens=100))
    g0, g1 = plan.groups
    assert d["memory_bytes"] == 4 << 20 and d["allocated_bytes"] == plan.nbytes
    jg = d["groups"][0]
    assert (jg["page_size_bytes"], jg["block_size"], jg["num_blocks"], jg["num_tokens"]) == \
        (g0.page_size_bytes, g0.block_size, g0.num_blocks, g0.num_tokens)
    assert jg["kinds"] == {"attention": 1} and d["pool"] is None
    cap = d["capacity"]
    assert cap["context_tokens"] == 100 and cap["attention_block_size"] == 4
    assert cap["max_tokens_one_request"] == g0.num_tokens == g1.num_tokens
    assert cap["concurrent_requests"] == g0.num_blocks // 25
    assert d["layers"]["a"]["shape"][1:] == [2, 4, 32]
    text = plan.describe(context_tokens=100)
    assert f"{g0.num_blocks:,}" in text and f"{g0.num_tokens:,} tokens" in text
    assert f"{cap['concurrent_requests']:,} concurrent requests of 100 tokens" in text
