"""kvlayout.ops: each Triton kernel (the CPU interpreter here, the GPU where there is one) against the PyTorch
reference and against attention computed densely in float64; bad input refused with the cache untouched."""

import math
import random

import pytest
import torch

import kvlayout as kvl
from kvlayout import ops
from kvlayout.backends.torch_ref import dense_attention
from kvlayout.errors import KVLayoutError, UnsupportedFeatureError

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def randn(shape, rng, dtype, scale=1.0):
    return (torch.randn(shape, generator=rng) * scale).to(device=DEV, dtype=dtype)


# ---------------------------------------------------------------------------------------------- prefill

def prefill_case(rng, *, page, ctx, new, h, h_kv, d, dtype, spare_pages=0):
    """A batch whose requests own distinct pages in random order; unused block-table entries are -1."""
    pages = [math.ceil((c + n) / page) + spare_pages for c, n in zip(ctx, new)]
    width = max(pages + [1])
    nb = sum(pages) + 3
    perm = torch.randperm(nb, generator=rng).tolist()
    bt = torch.full((len(ctx), width), -1, dtype=torch.int32)
    for r, p in enumerate(pages):
        bt[r, :p] = torch.tensor([perm.pop() for _ in range(p)], dtype=torch.int32)
    cache = randn((nb, h_kv, page, 2 * d), rng, dtype)
    t = sum(new)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0).tolist()), dtype=torch.int32)
    return dict(q=randn((t, h, d), rng, dtype), k_new=randn((t, h_kv, d), rng, dtype),
                v_new=randn((t, h_kv, d), rng, dtype), kv_cache=cache, cu_seqlens_q=cu.to(DEV),
                cache_seqlens=torch.tensor(ctx, dtype=torch.int32, device=DEV), block_table=bt.to(DEV))


def written_mask(case):
    """Bool [blocks, N] of the slots the append writes."""
    nb, _, n, _ = case["kv_cache"].shape
    slots = ops.ref.append_slots(case["cu_seqlens_q"].cpu(), case["cache_seqlens"].cpu(),
                                 case["block_table"].cpu(), n)
    mask = torch.zeros(nb * n, dtype=torch.bool)
    mask[slots] = True
    return mask.view(nb, n)


def dense_prefill(case, causal, cap, scale):
    """Float64 attention built from the inputs alone (prefix gathered from the original pages)."""
    cache, d = case["kv_cache"], case["q"].shape[2]
    n = cache.shape[2]
    outs, lses = [], []
    cu, ctx, bt = case["cu_seqlens_q"].tolist(), case["cache_seqlens"].tolist(), case["block_table"].cpu()
    for r in range(len(ctx)):
        q0, q1 = cu[r], cu[r + 1]
        if q1 == q0:
            continue
        pos = torch.arange(ctx[r])
        old = cache[bt[r, pos // n].long().to(DEV), :, (pos % n).to(DEV)].double()
        k = torch.cat([old[..., :d], case["k_new"][q0:q1].double()])
        v = torch.cat([old[..., d:], case["v_new"][q0:q1].double()])
        o, l = dense_attention(case["q"][q0:q1].double(), k, v, scale, q_offset=ctx[r], causal=causal,
                               soft_cap=cap or None)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def run_prefill_and_check(case, dtype, *, causal=True, cap=None, impl=None, shared=None):
    original = case["kv_cache"].clone()
    ref_cache = original.clone()
    scale = 1.0 / math.sqrt(case["q"].shape[2])
    out = torch.full_like(case["q"], float("nan"))                  # poisoned: every element must be written
    lse = torch.full(case["q"].shape[:2], float("nan"), device=DEV)
    got, got_lse = ops.paged_prefill_with_append(**case, causal=causal, logits_soft_cap=cap, out=out, lse=lse,
                                                 impl=impl, shared_block_ids=shared)
    assert got is out and got_lse is lse
    want, want_lse = ops.paged_prefill_with_append(**{**case, "kv_cache": ref_cache}, causal=causal,
                                                   logits_soft_cap=cap, impl="torch", return_lse=True,
                                                   shared_block_ids=shared)
    exact, exact_lse = dense_prefill({**case, "kv_cache": original}, causal, cap, scale)
    assert torch.isfinite(got).all() and torch.isfinite(got_lse).all()
    assert rel_err(got, want) < TOL[dtype] and rel_err(got, exact) < TOL[dtype]
    assert rel_err(got_lse, exact_lse) < 1e-4
    # the appended slots hold exactly k_new / v_new (same as the reference), and nothing else changed
    assert torch.equal(case["kv_cache"], ref_cache)
    keep = ~written_mask(case).to(DEV)
    assert torch.equal(case["kv_cache"].permute(0, 2, 1, 3)[keep], original.permute(0, 2, 1, 3)[keep])


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("page", [1, 4, 16])
def test_paged_prefill_with_append_matches_reference(rng, dtype, page):
    """Prefixes not page-aligned (5, 17), aligned (16), empty (0), one token; appends that cross page
    boundaries; a request with no new tokens; GQA 4:2."""
    case = prefill_case(rng, page=page, ctx=[5, 0, 16, 1, 3], new=[7, 3, 9, 1, 0], h=4, h_kv=2, d=32, dtype=dtype)
    run_prefill_and_check(case, dtype)


@pytest.mark.parametrize("causal,cap", [(False, None), (True, 3.0), (False, 0.0)])
def test_paged_prefill_variants_mqa(rng, causal, cap):
    """Non-causal, soft-cap, soft-cap 0 (off); one KV head for all query heads; spare pages in the table."""
    case = prefill_case(rng, page=8, ctx=[13, 2], new=[11, 6], h=3, h_kv=1, d=16, dtype=torch.float32,
                        spare_pages=2)
    run_prefill_and_check(case, torch.float32, causal=causal, cap=cap)


def test_fork_partial_page_then_append_both(rng):
    """copy_blocks forks a sequence whose last page is partly filled; both branches then append in one
    call, sharing the full prefix page read-only; each branch sees only its own tokens."""
    page, d, h_kv, h = 4, 16, 2, 4
    dt = torch.float16
    cache = randn((8, h_kv, page, 2 * d), rng, dt)
    ops.copy_blocks(cache, [1], [5])                                  # fork: page 1 (2 of 4 slots used) -> 5
    bt = torch.tensor([[0, 1, 2], [0, 5, 6]], dtype=torch.int32, device=DEV)
    case = dict(q=randn((6, h, d), rng, dt), k_new=randn((6, h_kv, d), rng, dt), v_new=randn((6, h_kv, d), rng, dt),
                kv_cache=cache, cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32, device=DEV),
                cache_seqlens=torch.tensor([6, 6], dtype=torch.int32, device=DEV), block_table=bt)
    run_prefill_and_check(case, dt, shared=[0])
    assert torch.equal(cache[1, :, 2:5, :d], case["k_new"][:3].transpose(0, 1)[:, :2])   # A's tokens in A's page
    assert torch.equal(cache[5, :, 2:5, :d], case["k_new"][3:].transpose(0, 1)[:, :2])   # B's in B's copy


def _with(c, **changes):
    return {**c, **changes}


def _bt(c, edit):
    bt = c["block_table"].clone()
    edit(bt)
    return bt


def _lens(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEV)


def _share_prefix(bt):
    bt[1, :2] = bt[0, :2]


def _share_append(bt):
    bt[1, :4] = bt[0, :4]


def _page_at(value):
    def edit(bt):
        bt[0, 1] = value
    return edit


# (name, edit): each edit makes one input of the base case (ctx [5, 6], new [3, 7], page 4, 24 slots a row) bad
BAD_PREFILL = [
    ("page id too large", lambda c: _with(c, block_table=_bt(c, _page_at(10_000)))),
    ("page id negative", lambda c: _with(c, block_table=_bt(c, _page_at(-1)))),
    ("capacity overflow", lambda c: _with(c, cache_seqlens=_lens(5, 18))),
    ("H not a multiple of H_kv", lambda c: _with(c, q=c["q"][:, :3])),
    ("k_new shape", lambda c: _with(c, k_new=c["k_new"][:, :1])),
    ("v_new dtype", lambda c: _with(c, v_new=c["v_new"].double())),
    ("cu_seqlens_q[0] != 0", lambda c: _with(c, cu_seqlens_q=c["cu_seqlens_q"] + 1)),
    ("cu_seqlens_q[-1] != T", lambda c: _with(c, q=c["q"][:-1], k_new=c["k_new"][:-1], v_new=c["v_new"][:-1])),
    ("cu_seqlens_q decreasing", lambda c: _with(c, cu_seqlens_q=_lens(0, 12, 10))),
    ("negative cache length", lambda c: _with(c, cache_seqlens=_lens(-1, 6))),
    ("float block table", lambda c: _with(c, block_table=c["block_table"].float())),
    ("two requests append into one slot", lambda c: _with(c, cache_seqlens=_lens(5, 5),
                                                          block_table=_bt(c, _share_append))),
    ("append into another request's prefix", lambda c: _with(c, cache_seqlens=_lens(5, 8),
                                                             block_table=_bt(c, _share_prefix))),
]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("name", [n for n, _ in BAD_PREFILL])
def test_paged_prefill_refuses_bad_input_cache_unchanged(rng, name, impl):
    case = prefill_case(rng, page=4, ctx=[5, 6], new=[3, 7], h=4, h_kv=2, d=8, dtype=torch.float32, spare_pages=2)
    bad = dict(BAD_PREFILL)[name](case)
    before = bad["kv_cache"].clone()
    with pytest.raises(KVLayoutError):
        ops.paged_prefill_with_append(**bad, impl=impl)
    assert torch.equal(bad["kv_cache"], before)


def test_shared_prefix_pages_are_allowed(rng):
    """The good twin of the refusals above: two requests read one full prefix page, append to their own."""
    case = prefill_case(rng, page=4, ctx=[4, 4], new=[3, 5], h=4, h_kv=2, d=8, dtype=torch.float32)
    case["block_table"][1, 0] = case["block_table"][0, 0]
    with pytest.raises(KVLayoutError, match="shared_block_ids"):        # undeclared sharing is a scheduler bug
        ops.paged_prefill_with_append(**case)
    run_prefill_and_check(case, torch.float32, shared=[int(case["block_table"][0, 0])])


@pytest.mark.parametrize("cap", [-1.0, float("nan"), "3"])
def test_soft_cap_below_zero_refused(rng, cap):
    case = prefill_case(rng, page=4, ctx=[2], new=[2], h=2, h_kv=2, d=8, dtype=torch.float32)
    before = case["kv_cache"].clone()
    with pytest.raises(KVLayoutError, match="logits_soft_cap"):
        ops.paged_prefill_with_append(**case, logits_soft_cap=cap)
    assert torch.equal(case["kv_cache"], before)


# ------------------------------------------------------------------------------------------ masked prefill

def masked_exact(q, k, v, valid, causal, scale):
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float64, device=q.device)
    for b, n in enumerate(valid.tolist()):
        if n:
            o, l = dense_attention(q[b, :n].double(), k[b, :n].double(), v[b, :n].double(), scale, q_offset=0,
                                   causal=causal)
            out[b, :n], lse[b, :n] = o, l
    return out, lse


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("h,h_kv,causal", [(4, 2, False), (3, 3, True), (2, 1, False)])
def test_masked_sequence_prefill(rng, dtype, h, h_kv, causal):
    """valid_lens of 0, full, mixed and 1; GQA; padded rows 0 with LSE -inf, no NaN anywhere."""
    b, s, d = 4, 19, 16
    q, k, v = randn((b, s, h, d), rng, dtype), randn((b, s, h_kv, d), rng, dtype), randn((b, s, h_kv, d), rng, dtype)
    k[2, 7:] = float("nan")                                           # padding must never be read into the result
    v[2, 7:] = float("nan")
    valid = torch.tensor([0, s, 7, 1], dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    got, lse = ops.masked_sequence_prefill(q, k, v, valid, causal=causal, out=out, return_lse=True)
    want, want_lse = masked_exact(q, k, v, valid, causal, 1.0 / math.sqrt(d))
    assert not got.isnan().any() and not lse.isnan().any()
    assert rel_err(got, want) < TOL[dtype]
    live = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), live) and rel_err(lse[live], want_lse[live]) < 1e-4
    assert (got[0] == 0).all() and (got[2, 7:] == 0).all()
    ref = ops.masked_sequence_prefill(q, k, v, valid, causal=causal, impl="torch")
    assert rel_err(got, ref) < TOL[dtype]


def test_masked_prefill_refuses_bad_input():
    q = torch.zeros(2, 5, 4, 8, device=DEV)
    k = torch.zeros(2, 5, 2, 8, device=DEV)
    ok = torch.tensor([5, 0], dtype=torch.int32, device=DEV)
    for args, match in [((q, k, k, torch.tensor([6, 0], dtype=torch.int32, device=DEV)), "valid_lens"),
                        ((q, k, k, torch.tensor([-1, 0], dtype=torch.int32, device=DEV)), "valid_lens"),
                        ((q, k, k, ok[:1]), "valid_lens"),
                        ((q, k[:, :, :1].expand(2, 5, 3, 8), k, ok), "heads"),
                        ((q, k[:1], k, ok), "like q"),
                        ((q, k.half(), k, ok), "float16")]:
        with pytest.raises(KVLayoutError, match=match):
            ops.masked_sequence_prefill(*args)


# ------------------------------------------------------------------------------------------------- merge

def split_states(rng, t, h, d, k, dtype):
    """Attention of ``t`` queries over keys cut into ``k`` disjoint parts (some empty): per-part outputs
    and natural-log LSEs, plus the attention over all keys in float64."""
    n_keys = 24
    q = torch.randn(t, h, d, generator=rng, dtype=torch.float64)
    kk = torch.randn(n_keys, h, d, generator=rng, dtype=torch.float64)
    vv = torch.randn(n_keys, h, d, generator=rng, dtype=torch.float64)
    cuts = sorted(random.Random(int(torch.randint(1 << 30, (1,), generator=rng))).choices(range(n_keys + 1), k=k - 1))
    bounds = [0] + cuts + [n_keys]
    vs, ss = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            o, l = dense_attention(q, kk[a:b], vv[a:b], 0.3, q_offset=n_keys, causal=False)
        else:                                                         # empty part: garbage values, LSE -inf
            o, l = torch.full((t, h, d), float("nan"), dtype=torch.float64), torch.full((t, h), float("-inf"),
                                                                                          dtype=torch.float64)
        vs.append(o)
        ss.append(l)
    full, full_lse = dense_attention(q, kk, vv, 0.3, q_offset=n_keys, causal=False)
    v = torch.stack(vs, 1).to(DEV, dtype)
    s = torch.stack(ss, 1).to(DEV, torch.float32)
    return v, s, full.to(DEV), full_lse.to(DEV)


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("base", ["e", "2"])
def test_merge_states_one_to_eight(rng, k, base):
    v, s, full, full_lse = split_states(rng, 5, 3, 16, k, torch.float32)
    f = 1.0 if base == "e" else 1.0 / math.log(2.0)
    s = s * f
    out, lse = ops.merge_states(v, s, lse_base=base)
    assert rel_err(out, full) < 1e-5 and rel_err(lse, full_lse * f) < 1e-5
    ref_out, ref_lse = ops.merge_states(v, s, lse_base=base, impl="torch")
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
    if k > 1:                                                         # in place: into the first state's slot
        v0, s0 = v[:, 0], s[:, 0]
        ops.merge_states(v, s, lse_base=base, out=v0, lse_out=s0)
        assert rel_err(v0, full) < 1e-5 and rel_err(s0, full_lse * f) < 1e-5


def test_merge_states_many_heads_and_states(rng):
    """40 heads of D=80 (a head size that is not a power of two) in 16 and 3 states."""
    for k in (16, 3):
        v, s, full, full_lse = split_states(rng, 3, 40, 80, k, torch.float32)
        out, lse = ops.merge_states(v, s)
        assert rel_err(out, full) < 1e-5 and rel_err(lse, full_lse) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_state_two_with_mixed_bases(rng, dtype):
    """State a from a base-e backend, state b from a base-2 one; result in either base; in place into a."""
    v, s, full, full_lse = split_states(rng, 6, 4, 32, 2, dtype)
    s_a, s_b = s[:, 0].clone(), s[:, 1] / math.log(2.0)
    for out_base, f in (("e", 1.0), ("2", 1.0 / math.log(2.0))):
        out, lse = ops.merge_state(v[:, 0], s_a, v[:, 1], s_b, lse_base=("e", "2"), out_lse_base=out_base)
        assert rel_err(out, full) < TOL[dtype] and rel_err(lse, full_lse * f) < 1e-5
    v_a = v[:, 0].clone()
    ops.merge_state(v_a, s_a, v[:, 1], s_b, lse_base=("e", "2"), out=v_a, lse_out=s_a)
    assert rel_err(v_a, full) < TOL[dtype] and rel_err(s_a, full_lse) < 1e-5


def test_merge_all_empty_rows_give_zero():
    v = torch.full((2, 3, 2, 8), float("nan"), device=DEV)
    s = torch.full((2, 3, 2), float("-inf"), device=DEV)
    s[1, 2, 1], v[1, 2, 1] = 0.5, 1.0
    out, lse = ops.merge_states(v, s)
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()
    assert (out[1, 1] == 1).all() and lse[1, 1] == 0.5 and (out[1, 0] == 0).all()


def test_merge_refuses_bad_input():
    v, s = torch.zeros(2, 3, 4, device=DEV), torch.zeros(2, 3, device=DEV)
    with pytest.raises(KVLayoutError, match="lse_base"):
        ops.merge_state(v, s, v, s, lse_base="10")
    with pytest.raises(KVLayoutError, match="float32"):
        ops.merge_state(v, s.half(), v, s)
    with pytest.raises(KVLayoutError, match="differ"):
        ops.merge_state(v, s, v[:1], s[:1])
    with pytest.raises(KVLayoutError, match="at least one"):
        ops.merge_states(torch.zeros(2, 0, 3, 4, device=DEV), torch.zeros(2, 0, 3, device=DEV))


# ---------------------------------------------------------------------------------------------- page ops

def hybrid_cache(cross, nb=9):
    specs = {"a0": kvl.AttentionSpec(2, 8, torch.float16, 4), "a1": kvl.AttentionSpec(2, 8, torch.float16, 4),
             "m0": kvl.MLASpec(12, 4, torch.bfloat16, 4),
             "z0": kvl.MambaSpec(states={"conv": ((6, 3), torch.bfloat16), "ssm": ((2, 4, 3), torch.float32)}),
             "z1": kvl.MambaSpec(states={"conv": ((6, 3), torch.bfloat16), "ssm": ((2, 4, 3), torch.float32)})}
    cache = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout(specs, nb, cross_layer=cross), device=DEV)
    for buf in cache.buffers:
        buf.copy_(torch.randint(-128, 128, buf.shape, dtype=torch.int8))
    return cache


def _assign(t, src, dst):
    t = t.clone()
    t[list(dst)] = t[list(src)].clone()
    return t


def snapshot_layers(cache, names):
    return {n: cache[n].clone() for n in names}


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_copy_and_zero_blocks_every_page_kind(cross, impl):
    """Attention, MLA and Mamba pages; a whole group at once (every layer) and one layer's tensor;
    a copy whose source is also another pair's destination."""
    cache = hybrid_cache(cross)
    for g, group in enumerate(cache.layout.groups):
        names = group.layer_names
        for target in [cache, cache[names[-1]]]:
            touched = names if target is cache else names[-1:]
            before = snapshot_layers(cache, names)
            ops.copy_blocks(target, [2, 7, 2, 4], [4, 1, 8, 2], group=g, impl=impl)
            for n in names:
                want = _assign(before[n], [2, 7, 2, 4], [4, 1, 8, 2]) if n in touched else before[n]
                assert torch.equal(cache[n].view(torch.int8), want.view(torch.int8)), (g, n)
            ops.zero_blocks(target, [0, 5], group=g, impl=impl)
            for n in names:
                if n in touched:
                    assert (cache[n][[0, 5]].view(torch.int8) == 0).all()
                    assert torch.equal(cache[n][1:5].view(torch.int8), _assign(before[n], [2, 7, 2, 4], [4, 1, 8, 2])
                                       [1:5].view(torch.int8))


COMPACT_CASES = {
    "dense prefix from sorted live blocks": ([1, 3, 4, 6, 8], None),
    "shift down by one (one long chain)": ([1, 2, 3, 4, 5, 6, 7, 8], None),
    "swaps": ([1, 0, 3, 2, 5, 4], None),
    "one long cycle": ([1, 2, 3, 4, 5, 6, 7, 8, 0], None),
    "random order, explicit dst": ([8, 0, 5, 3, 6], [0, 5, 8, 2, 3]),
}


@pytest.mark.parametrize("name", list(COMPACT_CASES))
@pytest.mark.parametrize("staging_pages", [0, 4, 100])
def test_compact_overlapping_moves(name, staging_pages):
    """Moves whose destinations are other moves' sources (chains, swaps, cycles) land as one simultaneous
    move, on a whole group and on one layer; staging of 0 pages forces one move per round."""
    src, dst = COMPACT_CASES[name]
    dst = list(range(len(src))) if dst is None else dst
    cache = hybrid_cache(cross=name.startswith("random"))
    for g, group in enumerate(cache.layout.groups):
        names = group.layer_names
        page = cache.layout.groups[g].page_size_bytes * len(names)
        before = snapshot_layers(cache, names)
        ops.compact(cache, src, None if name != "random order, explicit dst" else dst, group=g,
                    max_staging_bytes=staging_pages * page)
        for n in names:
            assert torch.equal(cache[n].view(torch.int8), _assign(before[n], src, dst).view(torch.int8)), (g, n)
        layer = cache[names[0]]
        before = layer.clone()
        ops.compact(layer, src, dst, max_staging_bytes=staging_pages * page)
        assert torch.equal(layer.view(torch.int8), _assign(before, src, dst).view(torch.int8))


def test_compact_plan_random_moves():
    """The round plan, simulated on a list of pages: equal to one simultaneous move, no direct move reads a
    page its round writes, at most round_moves moves per round and round_moves + 2 staging pages."""
    rnd = random.Random(0)
    for _ in range(2000):
        nb = rnd.randint(1, 14)
        n = rnd.randint(0, nb)
        src, dst, k = rnd.sample(range(nb), n), rnd.sample(range(nb), n), rnd.randint(1, 5)
        plan = ops.plan_compact(src, dst, k)
        assert plan.staging_blocks <= k + 2
        mem, aux = list(range(nb)), [None] * plan.staging_blocks
        for r in plan.rounds:
            assert len(r.direct) + len(r.staged) <= k
            for frm, slot in r.stage:
                aux[slot] = mem[frm]
            written = {to for _, to in r.direct + r.staged}
            assert not written & {frm for frm, _ in r.direct}
            new = list(mem)
            for frm, to in r.direct:
                new[to] = mem[frm]
            for slot, to in r.staged:
                new[to] = aux[slot]
            mem = new
        want = list(range(nb))
        for s, d in zip(src, dst):
            want[d] = s
        assert mem == want


@pytest.mark.parametrize("call", [
    lambda c: ops.copy_blocks(c, [0, 99], [1, 2]),
    lambda c: ops.copy_blocks(c, [0, 1], [2, 2]),
    lambda c: ops.copy_blocks(c, [0, 1], [2]),
    lambda c: ops.zero_blocks(c, [-1]),
    lambda c: ops.compact(c, [3, 3]),
    lambda c: ops.compact(c, [3, 4], [0, 0]),
    lambda c: ops.compact(c, [3, 4], [0, 9]),
    lambda c: ops.compact(c, [3], group=7),
    lambda c: ops.zero_blocks(c["a0"].transpose(1, 2), [0]),
    lambda c: ops.copy_blocks(c, [0], [1], impl="cuda"),
], ids=["src out of range", "dst twice", "length mismatch", "negative id", "compact src twice", "compact dst twice",
        "compact dst out of range", "no such group", "block not contiguous", "unknown impl"])
def test_page_ops_refuse_bad_input_cache_unchanged(call):
    cache = hybrid_cache(cross=False)
    before = [b.clone() for b in cache.buffers]
    with pytest.raises(KVLayoutError):
        call(cache)
    assert all(torch.equal(a, b) for a, b in zip(cache.buffers, before))


# -------------------------------------------------------------------------------------------- impl choice

@pytest.mark.skipif(DEV == "cuda", reason="interpreter rule")
def test_bf16_attention_under_the_interpreter_uses_the_reference(rng):
    case = prefill_case(rng, page=4, ctx=[3], new=[2], h=2, h_kv=1, d=16, dtype=torch.bfloat16)
    with pytest.raises(UnsupportedFeatureError, match="bf16"):
        ops.paged_prefill_with_append(**case, impl="triton")
    ref_cache = case["kv_cache"].clone()
    got = ops.paged_prefill_with_append(**case)                        # picks the reference
    want = ops.paged_prefill_with_append(**{**case, "kv_cache": ref_cache}, impl="torch")
    assert torch.equal(got, want) and torch.equal(case["kv_cache"], ref_cache)


# ---------------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page", [16, 64])
def test_gpu_paged_prefill_real_sizes(rng, dtype, page):
    case = prefill_case(rng, page=page, ctx=[1000, 0, 4095, 257], new=[512, 128, 1, 300], h=32, h_kv=8, d=128,
                        dtype=dtype)
    run_prefill_and_check(case, dtype)
    case = prefill_case(rng, page=page, ctx=[77, 3000], new=[200, 64], h=8, h_kv=1, d=64, dtype=dtype)
    run_prefill_and_check(case, dtype, causal=False, cap=30.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_masked_prefill_and_merge_real_sizes(rng, dtype):
    b, s, h, h_kv, d = 4, 512, 16, 4, 128
    q, k, v = randn((b, s, h, d), rng, dtype), randn((b, s, h_kv, d), rng, dtype), randn((b, s, h_kv, d), rng, dtype)
    valid = torch.tensor([0, s, 300, 1], dtype=torch.int32, device=DEV)
    got = ops.masked_sequence_prefill(q, k, v, valid)
    want, _ = masked_exact(q, k, v, valid, False, 1.0 / math.sqrt(d))
    assert not got.isnan().any() and rel_err(got, want) < TOL[dtype]
    vv, ss, full, full_lse = split_states(rng, 64, 32, 128, 8, dtype)
    out, lse = ops.merge_states(vv, ss)
    assert rel_err(out, full) < TOL[dtype] and rel_err(lse, full_lse) < 1e-5
