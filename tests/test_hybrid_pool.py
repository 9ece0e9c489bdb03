"""Hybrid models on the two-level page pool: grouping, true views, honest capacity (checked by filling the
pool), a randomized ownership property test with sentinels written through the layer views, refusals that
change nothing, and attention over a hybrid plan on every CPU backend against a dense float64 reference."""

import numpy as np
import pytest
import torch

import kvlayout as kvl
from kvlayout import hf_config as hf
from kvlayout.errors import KVLayoutError, LayoutConflictError
from kvlayout.hybrid import choose_num_slots, group_hybrid_layers
from kvlayout.page_pool import PagePool, PoolExhaustedError
from kvlayout.reference import dense_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def attn(h=2, d=8, dtype=torch.float32, bs=4, **kw):
    return kvl.AttentionSpec(num_kv_heads=h, head_size=d, dtype=dtype, block_size=bs, **kw)


def mamba(conv_dim=64, heads=4, head_dim=8, d_state=16):
    return kvl.MambaSpec(states={"conv": ((conv_dim, 3), torch.bfloat16),
                                 "ssm": ((heads, head_dim, d_state), torch.float32)})


def small_hybrid(memory=1 << 20, **attn_kw):
    """2 attention + 4 Mamba layers of two kinds: slots of 2, groups attention, mamba-a, mamba-b, mamba-a."""
    a = attn(**attn_kw)
    specs = {"l0.attn": a, "l1.mix": mamba(), "l2.mix": mamba(heads=2), "l3.attn": a,
             "l4.mix": mamba(), "l5.mix": mamba(heads=2), "l6.mix": mamba(), "l7.mix": mamba()}
    return kvl.plan_kv_cache(specs, memory)


# ---------------------------------------------------------------- grouping and views

@pytest.mark.parametrize("counts, slots", [((4, 24), 4), ((4, 28), 4), ((44, 44), 44), ((12, 36), 12),
                                           ((5, 12), 1), ((4, 30), 2), ((6, 30), 6), ((1, 7), 1), ((3,), 3)])
def test_group_size(counts, slots):
    assert choose_num_slots(list(counts)) == slots


def test_groups_hold_one_kind_and_equal_sizes():
    plan = small_hybrid()
    geo = plan.layout.pool
    assert geo.num_slots == 2 and geo.num_pages % geo.large_page_pages == 0
    names = [g.layer_names for g in plan.groups]
    assert names == [("l0.attn", "l3.attn"), ("l1.mix", "l4.mix"), ("l2.mix", "l5.mix"), ("l6.mix", "l7.mix")]
    for g in plan.groups:
        assert len(set(g.kinds)) == 1 and g.pooled
        assert g.pages_per_block == (1 if g.block_size else geo.large_page_pages)
        assert g.num_blocks == geo.num_pages // g.pages_per_block
    assert plan.nbytes == geo.nbytes <= 1 << 20
    assert plan.groups[0].block_size == 4                          # the engine's block size, not raised


def test_views_tell_the_truth_and_slots_alias():
    """Attention block b of slot j is small page b of slot j; state block q is small pages [qk, qk+k)."""
    plan = small_hybrid()
    geo = plan.layout.pool
    k, page = geo.large_page_pages, geo.page_bytes
    cache = kvl.allocate_kv_cache(plan)
    (buf,) = cache.buffers
    base = buf.data_ptr()
    for lay in plan.layout.layers:
        view = cache[lay.name]
        g = plan.groups[lay.group]
        assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        assert view.shape[0] == g.num_blocks
        for b in (0, 1, g.num_blocks - 1):
            start = view[b].data_ptr() - base
            assert start == lay.index_in_group * geo.slot_bytes + b * g.pages_per_block * page
            assert view[b].is_contiguous() and view[b].numel() * view.element_size() == lay.block_bytes
    # the same small page seen as attention block 3*k and as the first bytes of state block 3
    a, m = cache["l3.attn"], cache["l4.mix"]                      # both slot 1
    assert a[3 * k].data_ptr() == m[3].data_ptr()


def test_padded_attention_stride_when_pages_differ():
    """Two attention specs with different pages: the smaller one keeps its own shape under a larger stride."""
    specs = {"a": attn(h=1), "b": attn(h=2), "m": mamba()}
    plan = kvl.plan_kv_cache(specs, 1 << 20)
    geo = plan.layout.pool
    lay = plan.layout.layer("a")
    assert lay.block_bytes == specs["a"].page_size_bytes < lay.block_stride_bytes == geo.page_bytes
    cache = kvl.allocate_kv_cache(plan)
    assert cache["a"].stride(0) * 4 == geo.page_bytes and tuple(cache["a"].shape[1:]) == (1, 4, 16)


def test_hybrid_refuses_cross_layer():
    with pytest.raises(LayoutConflictError, match="hybrid model"):
        kvl.plan_kv_cache({"a": attn(), "m": mamba()}, 1 << 20, cross_layer=True)


def test_budget_too_small_for_one_request():
    with pytest.raises(KVLayoutError, match="too small for one request"):
        kvl.plan_kv_cache({"a": attn(), "m": mamba()}, 4096)


# ---------------------------------------------------------------- capacity

def _fill(plan, context):
    """Admit requests of ``context`` tokens until the pool refuses one; returns how many fit."""
    pool = PagePool(plan)
    n = 0
    while True:
        try:
            for g in plan.groups:
                pool.allocate(g.index, -(-context // g.block_size) if g.block_size else 1)
        except PoolExhaustedError:
            return n
        n += 1


@pytest.mark.parametrize("context", [1, 4, 5, 64, 333])
@pytest.mark.parametrize("memory", [300_000, 1 << 20])
def test_capacity_is_what_the_pool_serves(context, memory):
    plan = small_hybrid(memory)
    cap = plan.capacity(context)
    assert cap.concurrent_requests == _fill(plan, context)
    pool = PagePool(plan)
    for g in plan.groups:
        if not g.block_size:
            pool.allocate(g.index, 1)
    pool.allocate(0, -(-cap.max_tokens_one_request // 4))         # the longest request fits, and fills the pool
    assert pool.num_free_blocks(0) == 0
    with pytest.raises(PoolExhaustedError):
        pool.allocate(0, 1)


def test_dense_capacity_unchanged():
    specs = hf.specs_from_hf_config(hf.load_hf_config("llama-3.1-8b"), block_size=16)
    cap = kvl.plan_kv_cache(specs, 40 << 30).capacity(8192)
    assert cap.max_tokens_one_request == 327_680 and cap.concurrent_requests == 40
    assert cap.padding_bytes_per_request == 0


@pytest.mark.parametrize("model, ssm, at_least", [("nemotron-h-8b", "float32", 180), ("jamba-v0.1", "bfloat16", 297),
                                                  ("jamba-v0.1", "float32", 284)])
def test_shipped_hybrids_at_full_capacity(model, ssm, at_least):
    """40 GiB, bf16 KV, block 16: vLLM's hybrid manager serves 180 (Nemotron-H, block 1,040) and 297 (Jamba,
    bf16 state, block 80) concurrent 8K requests."""
    specs = hf.specs_from_hf_config(hf.load_hf_config(model), block_size=16, mamba_ssm_dtype=ssm)
    plan = kvl.plan_kv_cache(specs, 40 << 30)
    cap = plan.capacity(8192)
    assert cap.attention_block_size == 16 and cap.concurrent_requests >= at_least
    assert cap.max_tokens_one_request >= 2_600_000
    attention = [g for g in plan.groups if g.block_size]
    assert len(attention) == 1 and attention[0].num_layers == 4


# ---------------------------------------------------------------- the property test

def _sentinel_check(plan, cache, live):
    """Every live allocation still reads its own sentinel through every layer view of its group."""
    for (gi, ids), value in live.items():
        for name in plan.groups[gi].layer_names:
            view = cache[name]
            block = view[list(ids)]
            if view.dtype == torch.int8:
                block = block.view(torch.int32)
            assert bool((block == value).all()), f"{name}: blocks {ids} of group {gi} lost sentinel {value}"


def test_randomized_ownership_and_no_leak(monkeypatch):
    """Tens of thousands of allocate/free calls across groups and page levels; each owner writes its own
    sentinel through its layer views; every owner's bytes are checked along the way and at the end, the
    independent bookkeeping never sees two owners of one small page, and nothing leaks."""
    # new state pages are zeroed by torch here: the Triton zero kernel (tests/test_allocation.py) costs 8 ms a
    # call under the CPU interpreter, and this test makes thousands of them
    zero_blocks = kvl.ops.zero_blocks
    monkeypatch.setattr(kvl.ops, "zero_blocks", lambda *a, **k: zero_blocks(*a, **{**k, "impl": "torch"}))
    plan = small_hybrid(1 << 19)
    geo = plan.layout.pool
    k = geo.large_page_pages
    cache = kvl.allocate_kv_cache(plan)
    pool = PagePool(plan, order=np.random.default_rng(5).permutation(geo.num_large_pages).tolist(), cache=cache)
    rng = np.random.default_rng(0)
    live: dict = {}
    pages_of: dict = {}                        # small page -> allocation key (independent of the pool)
    counter = 0
    n_ops = 20000
    for op in range(n_ops):
        gi = int(rng.integers(len(plan.groups)))
        g = plan.groups[gi]
        if live and rng.random() < 0.45:
            key = list(live)[int(rng.integers(len(live)))]
            pool.free(key[0], list(key[1]))
            del live[key]
            for p in [p for p, owner in pages_of.items() if owner == key]:
                del pages_of[p]
            continue
        n = int(rng.integers(1, 6)) if g.block_size else 1
        try:
            ids = tuple(pool.allocate(gi, n))
        except PoolExhaustedError:
            continue
        counter += 1
        key = (gi, ids)
        if not g.block_size:                  # a state page starts zeroed
            for name in g.layer_names:
                assert not cache[name][list(ids)].any()
        small = [p for b in ids for p in range(b * g.pages_per_block, (b + 1) * g.pages_per_block)]
        clash = [p for p in small if p in pages_of]
        assert not clash, f"page {clash[0]} given to {key} while {pages_of[clash[0]]} holds it"
        pages_of.update(dict.fromkeys(small, key))
        live[key] = counter
        for name in g.layer_names:
            view = cache[name]
            (view.view(torch.int32) if view.dtype == torch.int8 else view)[list(ids)] = counter
        if op % 2000 == 0:
            _sentinel_check(plan, cache, live)
            assert sum(pool.num_used_blocks(i) * plan.groups[i].pages_per_block for i in range(len(plan.groups))) \
                == len(pages_of)
    _sentinel_check(plan, cache, live)
    assert counter > n_ops // 3
    for key in list(live):
        pool.free(key[0], list(key[1]))
    assert (pool.owner_of_pages() < 0).all()
    assert pool.num_free_blocks(0) == geo.num_pages and all(
        pool.num_free_blocks(g.index) == geo.num_large_pages for g in plan.groups if not g.block_size)
    assert pool.allocate(1, geo.num_large_pages)                   # every large page is whole again


# ---------------------------------------------------------------- refusals

def test_pool_refusals_change_nothing():
    plan = small_hybrid()
    pool = PagePool(plan)
    a = pool.allocate(0, 3)
    s = pool.allocate(1, 2)
    k = plan.layout.pool.large_page_pages
    snapshot = pool.owner_of_pages()
    cases = [
        (lambda: pool.free(0, [s[0] * k]), r"block \d+ of group 0 \(attention\) \(pool page \d+\) is a state page of group 1"),
        (lambda: pool.free(1, [a[0] // k]), r"group 1 \(mamba\)"),
        (lambda: pool.free(0, a + a[:1]), "listed twice"),
        (lambda: pool.free(0, [10 ** 9]), "not a block of group 0"),
        (lambda: pool.free(0, [-1]), "not a block of group 0"),
        (lambda: pool.free(0, [1.5]), "integers"),
        (lambda: pool.free(7, a), "group 7 does not exist"),
        (lambda: pool.allocate(1, 10 ** 6), "cannot allocate"),
        (lambda: pool.allocate(0, -1), ">= 0"),
        (lambda: pool.num_free_tokens(1), "holds states"),
    ]
    for call, words in cases:
        with pytest.raises(KVLayoutError, match=words):
            call()
        assert np.array_equal(pool.owner_of_pages(), snapshot)
    pool.free(0, a[:1])
    with pytest.raises(KVLayoutError, match="is free"):
        pool.free(0, a[:1])
    with pytest.raises(KVLayoutError, match="permutation"):
        PagePool(plan, order=[0, 0])
    with pytest.raises(KVLayoutError, match="not allocated from this plan"):
        PagePool(plan, cache=kvl.allocate_kv_cache(small_hybrid()))


def test_metadata_refuses_blocks_the_group_does_not_hold():
    plan = small_hybrid()
    pool = PagePool(plan)
    k = plan.layout.pool.large_page_pages
    mine = pool.allocate(0, 2)
    state = pool.allocate(1, 1)
    freed = pool.allocate(0, 1)
    pool.free(0, freed)
    ok = kvl.build_attention_metadata([kvl.ScheduledRequest(0, 8, mine)], plan, group=0, pool=pool)
    assert ok.block_table[0, :2].tolist() == mine
    bad = {
        "is free": [mine[0], freed[0]],
        "is a state page of group 1": [mine[0], state[0] * k],
    }
    for words, ids in bad.items():
        with pytest.raises(KVLayoutError, match=words):
            kvl.build_attention_metadata([kvl.ScheduledRequest(0, 8, ids)], plan, group=0, pool=pool)
    with pytest.raises(KVLayoutError, match="holds recurrent states"):
        kvl.build_attention_metadata([kvl.ScheduledRequest(0, 1, state)], plan, group=1, pool=pool)


# ---------------------------------------------------------------- attention over a hybrid plan

def _gpu_backends():
    if not torch.cuda.is_available():
        return []
    from kvlayout.registry import available_backends
    return [pytest.param(n, marks=pytest.mark.gpu) for n, why in available_backends("cuda").items() if why is None]


@pytest.mark.parametrize("backend", ["torch", "triton", "rocm"])
@pytest.mark.parametrize("hq, hkv", [(4, 2), (2, 1)])
def test_attention_layers_of_a_hybrid_plan(backend, hq, hkv):
    run_hybrid_attention(backend, hq, hkv, d=64, bs=4, dtype=torch.float32, tol=1e-4)


@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_attention_layers_of_a_hybrid_plan(backend):
    run_hybrid_attention(backend, 32, 8, d=128, bs=16, dtype=torch.bfloat16, tol=1e-2)


def run_hybrid_attention(backend, hq, hkv, *, d, bs, dtype, tol):
    """Requests hold pool pages in scrambled order; state pages (other groups, same bytes) hold huge values,
    so a kernel that strays shows. Each attention layer appends and attends; checked against dense float64
    attention over the gathered history, with every state byte and every other slot left untouched."""
    torch.manual_seed(0)
    specs = {"l0.attn": attn(h=hkv, d=d, bs=bs, dtype=dtype), "l1.mix": mamba(), "l2.mix": mamba(),
             "l3.attn": attn(h=hkv, d=d, bs=bs, dtype=dtype)}
    plan = kvl.plan_kv_cache(specs, 64 * 2 * specs["l0.attn"].page_size_bytes, backend=None)
    cache = kvl.allocate_kv_cache(plan, DEV)
    geo = plan.layout.pool
    pool = PagePool(plan, order=np.random.default_rng(1).permutation(geo.num_large_pages).tolist(), cache=cache)
    reqs = [(19, 1), (0, 1), (4, 4), (0, 9), (7, 0), (15, 1), (2 * bs - 1, 1), (bs, bs + 3)]   # page boundaries
    sched, state_ids = [], []
    for c, n in reqs:
        ids = pool.allocate(0, max(-(-(c + n) // bs), 1))
        state_ids += pool.allocate(1, 1)
        sched.append(kvl.ScheduledRequest(c, n, ids))
    for name in ("l1.mix", "l2.mix"):                                      # the requests' states: huge values
        cache[name].view(torch.float32)[state_ids] = 3.0e4
    for name in ("l0.attn", "l3.attn"):
        used = sorted({i for r in sched for i in r.block_ids})
        cache[name][used] = torch.randn((len(used),) + tuple(cache[name].shape[1:]), device=DEV).to(dtype)
    meta = kvl.build_attention_metadata(sched, plan, DEV, group=0, pool=pool)
    be = kvl.get_attention_backend(backend, DEV)
    total = meta.num_actual_tokens
    for name in ("l0.attn", "l3.attn"):
        layer = kvl.AttentionLayer(layer_name=name, spec=plan.specs[name], num_heads=hq)
        layer.bind_kv_cache(cache[name])
        before = cache.buffers[0].clone()
        q = torch.randn(total, hq, d, device=DEV, dtype=dtype)
        k = torch.randn(total, hkv, d, device=DEV, dtype=dtype)
        v = torch.randn(total, hkv, d, device=DEV, dtype=dtype)
        hist = cache[name].clone()
        out = layer.attend(q, k, v, meta, be)
        at = 0
        for r in sched:
            c, n = r.num_computed_tokens, r.num_new_tokens
            if n == 0:
                continue
            kv = hist[r.block_ids].transpose(1, 2).reshape(-1, hkv, 2 * d)[:c].double()
            kk = torch.cat([kv[..., :d], k[at:at + n].double()])
            vv = torch.cat([kv[..., d:], v[at:at + n].double()])
            ref, _ = dense_attention(q[at:at + n].double(), kk, vv, d ** -0.5, q_offset=c)
            err = float((out[at:at + n].double() - ref).norm() / ref.norm())
            assert err < tol, (backend, name, err)
            at += n
        changed = (cache.buffers[0] != before).nonzero().squeeze(1)
        lay = plan.layout.layer(name)
        slots = meta.slot_mapping.cpu()
        allowed = set()
        tok_bytes = 2 * d * dtype.itemsize
        for s in slots.tolist():
            b, t = divmod(s, bs)
            for h in range(hkv):
                start = lay.byte_offset + b * lay.block_stride_bytes + (h * bs + t) * tok_bytes
                allowed.update(range(start, start + tok_bytes))
        assert set(changed.tolist()) <= allowed
        for name in ("l1.mix", "l2.mix"):
            assert bool((cache[name].view(torch.float32)[state_ids] == 3.0e4).all())


@pytest.mark.parametrize("model, tp", [("nemotron-h-8b", 2), ("nemotron-h-8b", 4), ("jamba-v0.1", 2)])
def test_shipped_state_rows_say_how_tp_cut_them(model, tp):
    """Each state's tp_rows give exactly the rows a rank holds, so a connector can slice it between TP sizes."""
    full = hf.specs_from_hf_config(hf.load_hf_config(model))
    part = hf.specs_from_hf_config(hf.load_hf_config(model), tp_size=tp)
    for name, spec in part.items():
        if not isinstance(spec, kvl.MambaSpec):
            continue
        for state, (shape, _) in spec.states.items():
            blocks = spec.tp_rows[state]
            assert sum(n // tp if sharded else n for n, sharded in blocks) == shape[0]
            assert sum(n for n, _ in blocks) == full[name].states[state][0][0]
