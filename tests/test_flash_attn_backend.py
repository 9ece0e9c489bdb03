"""The flash_attn backend: its argument mapping checked on CPU (pure functions, and the whole forward
through stand-in FlashAttention modules that implement the library's documented semantics), and the real
library against the reference backend on a GPU."""

import math
import sys
import types

import pytest
import torch

import kvlayout as kvl
from kvlayout.backends import flash_attn_backend as fab
from kvlayout.backends.torch_ref import TorchBackend
from kvlayout.errors import BackendUnavailableError, UnsupportedFeatureError
from paged_case import paged_case

REF = TorchBackend()


def make_case(rng, *, hq=4, hkv=2, d=16, bs=4, reqs=((7, 1), (3, 1), (0, 9), (5, 6), (0, 0), (4, 5)),
              dtype=torch.float16, device="cpu", cross=False, pad=0):
    """A cache holding every request's history in random block order, the step's metadata and queries
    (plus ``pad`` rows no request owns). With ``cross`` the layer is a cross-layer view beside a layer of
    large values, so reading the wrong layer shows."""
    return paged_case(rng, hq=hq, hkv=hkv, d=d, bs=bs, reqs=reqs, dtype=dtype, device=device, cross=cross,
                      pad=pad)


def rel_err(x, ref):
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


# ---------------------------------------------------------------- pure mapping functions

@pytest.mark.parametrize("cross", [False, True])
def test_nhd_views_are_strided_views_of_the_packed_cache(rng, cross):
    cache, _, _ = make_case(rng, hkv=3, d=8, bs=4, cross=cross)
    b, h, n, c = cache.shape
    d = c // 2
    k, v = fab.nhd_views(cache)
    assert k.shape == v.shape == (b, n, h, d)
    block_stride = cache.stride(0)
    assert block_stride == (2 if cross else 1) * h * n * 2 * d
    assert k.stride() == v.stride() == (block_stride, 2 * d, n * 2 * d, 1)
    assert k.data_ptr() == cache.data_ptr()
    assert v.data_ptr() == cache.data_ptr() + d * cache.element_size()
    blk, tok, head = 2, 3, 1
    assert torch.equal(k[blk, tok, head], cache[blk, head, tok, :d])
    assert torch.equal(v[blk, tok, head], cache[blk, head, tok, d:])


def fa_visible(q_len, s_len, causal, left, right, unbounded):
    """FlashAttention's documented rule: query i (bottom-right aligned, at ``i + s - q``) sees key j when
    ``pos - left <= j <= pos + right``; causal means ``right = 0``."""
    pos = torch.arange(q_len).view(-1, 1) + s_len - q_len
    j = torch.arange(s_len).view(1, -1)
    vis = torch.ones(q_len, s_len, dtype=torch.bool)
    if causal:
        right = 0
    if left is not unbounded and left is not None and left >= 0:
        vis &= j >= pos - left
    if right is not unbounded and right is not None and right >= 0:
        vis &= j <= pos + right
    return vis


@pytest.mark.parametrize("gen", ["fa2", "fa3", "fa4"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 3, 8])
def test_window_mapping_matches_our_window_semantics(gen, causal, window):
    g = fab.GENERATIONS[gen]
    p = kvl.AttentionParams(4, 2, 16, causal=causal, sliding_window=window)
    left, right = fab.window_size(g, p)
    if window is not None:
        assert left == window - 1
        assert right == (0 if causal else (None if gen == "fa4" else -1))
    unbounded = None if gen == "fa4" else -1
    for q_len, s_len in ((1, 9), (5, 5), (4, 11)):
        pos = torch.arange(q_len).view(-1, 1) + s_len - q_len
        j = torch.arange(s_len).view(1, -1)
        ours = torch.ones(q_len, s_len, dtype=torch.bool)
        if causal:
            ours &= j <= pos
        if window is not None:
            ours &= j > pos - window
        assert torch.equal(fa_visible(q_len, s_len, causal, left, right, unbounded), ours)


def test_fa2_refuses_block_sizes_that_are_not_multiples_of_256(rng):
    cache, _, _ = make_case(rng, bs=16, d=16)
    problems = fab.layout_problems(fab.GENERATIONS["fa2"], *fab.nhd_views(cache))
    assert len(problems) == 1 and "multiple of 256" in problems[0] and "16" in problems[0]
    for gen in ("fa3", "fa4"):
        assert fab.layout_problems(fab.GENERATIONS[gen], *fab.nhd_views(cache)) == []
    big, _, _ = make_case(rng, bs=256, d=8, hkv=1, hq=1, reqs=((300, 1),))
    assert fab.layout_problems(fab.GENERATIONS["fa2"], *fab.nhd_views(big)) == []


@pytest.mark.parametrize("gen", ["fa2", "fa3", "fa4"])
def test_misaligned_views_are_refused_not_copied(gen):
    g = fab.GENERATIONS[gen]
    bs = g.block_size_multiple if g.block_size_multiple > 1 else 4
    # head size 4 in fp16: V starts 8 bytes into each 16-byte row, so the V view is misaligned
    kv = torch.zeros(3, 2, bs, 8, dtype=torch.float16)
    problems = fab.layout_problems(g, *fab.nhd_views(kv))
    assert len(problems) == 1 and "V view" in problems[0] and "8 B past" in problems[0]
    assert ("would copy" in problems[0]) == (gen == "fa4")
    # an aligned head size, but the layer starts 2 bytes into the buffer (a storage offset)
    raw = torch.zeros(3 * 2 * bs * 32 + 8, dtype=torch.float16)
    kv = raw.as_strided((3, 2, bs, 32), (2 * bs * 32, bs * 32, 32, 1), 1)
    problems = fab.layout_problems(g, *fab.nhd_views(kv))
    assert len(problems) == 2 and all("2 B past" in p for p in problems)
    # a block stride that is not a multiple of 16 bytes
    kv = raw.as_strided((3, 2, bs, 32), (2 * bs * 32 + 1, bs * 32, 32, 1), 0)
    problems = fab.layout_problems(g, *fab.nhd_views(kv))
    assert problems and f"{(2 * bs * 32 + 1) * 2} B" in problems[0]
    aligned = torch.zeros(3, 2, bs, 32, dtype=torch.float16)
    assert fab.layout_problems(g, *fab.nhd_views(aligned)) == []


def test_plan_calls_fa4_one_varlen_call_over_the_views(rng):
    cache, meta, q = make_case(rng, pad=3)
    k, v = fab.nhd_views(cache)
    p = kvl.AttentionParams(4, 2, 16, sliding_window=5, logits_soft_cap=30.0)
    sinks = torch.zeros(4)
    [call] = fab.plan_calls(fab.GENERATIONS["fa4"], q, k, v, meta, p, sinks, True)
    t = meta.num_actual_tokens
    assert (call.fn, call.t0, call.t1) == ("flash_attn_varlen_func", 0, t)
    qa, ka, va = call.args
    assert qa.shape[0] == t and qa.data_ptr() == q.data_ptr()
    assert ka is k and va is v
    kw = call.kwargs
    assert kw["page_table"] is meta.block_table and kw["seqused_k"] is meta.seq_lens
    assert kw["cu_seqlens_q"] is meta.query_start_loc
    assert (kw["max_seqlen_q"], kw["max_seqlen_k"]) == (meta.max_query_len, meta.max_seq_len)
    assert kw["window_size"] == (4, 0) and kw["softcap"] == 30.0 and kw["causal"] is True
    assert kw["learnable_sink"] is sinks and kw["return_lse"] is True and kw["softmax_scale"] == p.scale


def test_plan_calls_fa2_splits_decodes_from_prefills(rng):
    cache, meta, q = make_case(rng)
    k, v = fab.nhd_views(cache)
    p = kvl.AttentionParams(4, 2, 16, causal=False)
    dec, pre = fab.plan_calls(fab.GENERATIONS["fa2"], q, k, v, meta, p, None, False)
    nd = meta.num_decodes
    assert nd == 2
    assert (dec.fn, dec.t0, dec.t1, dec.lse_layout) == ("flash_attn_with_kvcache", 0, 2, "b_h_1")
    assert dec.args[0].shape == (2, 1, 4, 16)
    assert torch.equal(dec.kwargs["block_table"], meta.block_table[:nd])
    assert torch.equal(dec.kwargs["cache_seqlens"], meta.seq_lens[:nd])
    assert dec.kwargs["window_size"] == (-1, -1) and dec.kwargs["causal"] is False
    assert (pre.fn, pre.t0, pre.t1) == ("flash_attn_varlen_func", 2, meta.num_actual_tokens)
    _, _, _, cu_q, cu_k, max_q, max_k = pre.args
    seq = meta.seq_lens_cpu[nd:].tolist()
    assert cu_k.tolist() == [0] + torch.tensor(seq).cumsum(0).tolist()
    assert cu_q.tolist() == (meta.query_start_loc_cpu[nd:] - 2).tolist()
    assert (max_q, max_k) == (meta.max_query_len, meta.max_seq_len)
    assert torch.equal(pre.kwargs["block_table"], meta.block_table[nd:])
    # the per-step offsets are made once and shared by every layer
    _, pre2 = fab.plan_calls(fab.GENERATIONS["fa2"], q, k, v, meta, p, None, False)
    assert pre2.args[4] is cu_k


def test_plan_calls_nothing_scheduled(rng):
    cache, meta, q = make_case(rng, reqs=((4, 0), (0, 0)))
    p = kvl.AttentionParams(4, 2, 16)
    for gen in fab.GENERATIONS.values():
        assert fab.plan_calls(gen, q, *fab.nhd_views(cache), meta, p, None, True) == []


# ---------------------------------------------------------------- whole forward through stand-in modules

def _fa_attend(q, k, v, scale, causal, window, softcap, sink, unbounded):
    """FlashAttention's semantics for one request: q [Q, H, D] over k, v [S, Hk, D] (float64)."""
    nq, h, _ = q.shape
    s = k.shape[0]
    g = h // k.shape[1]
    k, v = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    sc = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if softcap:
        sc = softcap * torch.tanh(sc / softcap)
    vis = fa_visible(nq, s, causal, window[0], window[1], unbounded)
    sc = sc.masked_fill(~vis, -math.inf)
    if sink is not None:
        sc = torch.cat([sc, sink.double().view(h, 1, 1).expand(h, nq, 1)], -1)
    lse = torch.logsumexp(sc, -1)
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(sc - lse[..., None]), 0.0)[..., :s]
    return torch.einsum("hqk,khd->qhd", p, v), lse


def _pages(cache, table_row, n):
    bs = cache.shape[1]
    ids = table_row[: -(-n // bs)].long()
    return cache[ids].reshape(-1, *cache.shape[2:])[:n]


class Recorder:
    def __init__(self, cache):
        self.cache, self.calls = cache, []

    def check_views(self, k, v):
        """The library must get the NHD views themselves: same memory, same strides, no copy."""
        ek, ev = fab.nhd_views(self.cache)
        assert (k.data_ptr(), v.data_ptr(), k.stride(), v.stride()) == (ek.data_ptr(), ev.data_ptr(),
                                                                         ek.stride(), ev.stride())


def fake_fa4(rec):
    def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                               max_seqlen_k=None, seqused_k=None, page_table=None, softmax_scale=None,
                               causal=False, window_size=(None, None), learnable_sink=None, softcap=0.0,
                               return_lse=False):
        rec.check_views(k, v)
        rec.calls.append("fa4")
        out = torch.zeros(q.shape, dtype=torch.float64)
        lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
        for r in range(page_table.shape[0]):
            a, b = int(cu_seqlens_q[r]), int(cu_seqlens_q[r + 1])
            n = int(seqused_k[r])
            if b > a:
                o, l = _fa_attend(q[a:b], _pages(k, page_table[r], n), _pages(v, page_table[r], n), softmax_scale,
                                  causal, window_size, softcap, learnable_sink, None)
                out[a:b], lse[a:b] = o, l.T
        return out.to(q.dtype), (lse.T.float().contiguous() if return_lse else None)
    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)


def fake_fa3(rec):
    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, page_table=None,
                                cu_seqlens_q=None, max_seqlen_q=None, softmax_scale=None, causal=False,
                                window_size=(-1, -1), softcap=0.0, return_softmax_lse=False):
        rec.check_views(k_cache, v_cache)
        rec.calls.append("fa3")
        out = torch.zeros(q.shape, dtype=torch.float64)
        lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
        for r in range(page_table.shape[0]):
            a, b = int(cu_seqlens_q[r]), int(cu_seqlens_q[r + 1])
            n = int(cache_seqlens[r])
            if b > a:
                o, l = _fa_attend(q[a:b], _pages(k_cache, page_table[r], n), _pages(v_cache, page_table[r], n),
                                  softmax_scale, causal, window_size, softcap, None, -1)
                out[a:b], lse[a:b] = o, l.T
        out = out.to(q.dtype)
        return (out, lse.T.float().contiguous(), None, None) if return_softmax_lse else out
    return types.SimpleNamespace(flash_attn_with_kvcache=flash_attn_with_kvcache)


def fake_fa2(rec):
    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                return_softmax_lse=False):
        rec.check_views(k_cache, v_cache)
        assert k_cache.shape[1] % 256 == 0
        rec.calls.append("fa2-decode")
        out = torch.zeros(q.shape, dtype=torch.float64)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), -math.inf, dtype=torch.float64)
        for r in range(q.shape[0]):
            n = int(cache_seqlens[r])
            o, l = _fa_attend(q[r], _pages(k_cache, block_table[r], n), _pages(v_cache, block_table[r], n),
                              softmax_scale, causal, window_size, softcap, None, -1)
            out[r], lse[r] = o, l
        out = out.to(q.dtype)
        return (out, lse.float()) if return_softmax_lse else out

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               return_attn_probs=False, block_table=None):
        rec.check_views(k, v)
        assert k.shape[1] % 256 == 0
        rec.calls.append("fa2-varlen")
        out = torch.zeros(q.shape, dtype=torch.float64)
        lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
        for r in range(block_table.shape[0]):
            a, b = int(cu_seqlens_q[r]), int(cu_seqlens_q[r + 1])
            n = int(cu_seqlens_k[r + 1] - cu_seqlens_k[r])
            if b > a:
                o, l = _fa_attend(q[a:b], _pages(k, block_table[r], n), _pages(v, block_table[r], n),
                                  softmax_scale, causal, window_size, softcap, None, -1)
                out[a:b], lse[a:b] = o, l.T
        out = out.to(q.dtype)
        return (out, lse.T.float().contiguous(), None) if return_attn_probs else out
    return types.SimpleNamespace(flash_attn_with_kvcache=flash_attn_with_kvcache,
                                 flash_attn_varlen_func=flash_attn_varlen_func)


FAKES = {"fa2": fake_fa2, "fa3": fake_fa3, "fa4": fake_fa4}


@pytest.fixture
def stand_in(monkeypatch):
    """Install a stand-in module for a generation; returns ``(backend, recorder)``."""
    def install(gen, cache):
        rec = Recorder(cache)
        monkeypatch.setitem(sys.modules, fab.GENERATIONS[gen].module, FAKES[gen](rec))
        fab._import_generation.cache_clear()
        return fab.FlashAttnBackend(generation=gen), rec
    yield install
    fab._import_generation.cache_clear()


CASES = [  # (causal, window, softcap, sinks, hq, hkv)
    (True, None, None, False, 4, 2),
    (False, None, None, False, 4, 1),
    (True, 3, None, False, 4, 4),
    (False, 5, 20.0, False, 2, 1),
    (True, 6, None, True, 4, 2),
]


@pytest.mark.parametrize("gen", ["fa3", "fa4", "fa2"])
@pytest.mark.parametrize("causal,window,cap,sinks,hq,hkv", CASES)
def test_forward_through_stand_in_matches_reference(rng, stand_in, gen, causal, window, cap, sinks, hq, hkv):
    g = fab.GENERATIONS[gen]
    if sinks and not g.sinks:
        pytest.skip(f"{gen} has no sinks")
    bs = 256 if gen == "fa2" else 4
    reqs = ((300, 1), (255, 1), (0, 7), (254, 4), (0, 0), (3, 2)) if gen == "fa2" else \
        ((7, 1), (3, 1), (0, 9), (5, 6), (0, 0), (4, 5))
    cache, meta, q = make_case(rng, hq=hq, hkv=hkv, d=8, bs=bs, reqs=reqs, pad=2)
    backend, rec = stand_in(gen, cache)
    p = kvl.AttentionParams(hq, hkv, 8, causal=causal, sliding_window=window, logits_soft_cap=cap)
    s = torch.randn(hq, generator=rng) if sinks else None
    out, lse = backend.forward(q, cache, meta, p, sinks=s, return_lse=True)
    ref, ref_lse = REF.forward(q, cache, meta, p, sinks=s, return_lse=True)
    assert rec.calls == (["fa2-decode", "fa2-varlen"] if gen == "fa2" else [gen])
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    assert rel_err(out, ref) < 2e-3
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert torch.allclose(lse[fin], ref_lse[fin], atol=1e-4)
    # into caller buffers, poisoned first: every row is written (pad rows: 0 and -inf)
    o_buf = torch.full_like(q, float("nan"))
    l_buf = torch.full(q.shape[:2], float("nan"))
    res = backend.forward(q, cache, meta, p, sinks=s, out=o_buf, lse=l_buf)
    assert res[0] is o_buf and res[1] is l_buf
    assert torch.equal(o_buf, out) and torch.equal(l_buf.isfinite(), fin)


def test_forward_refuses_before_calling_the_library(rng, stand_in):
    cache, meta, q = make_case(rng, bs=16, d=16, reqs=((3, 1), (0, 5)))
    backend, rec = stand_in("fa2", cache)
    p = kvl.AttentionParams(4, 2, 16)
    out = torch.full_like(q, 7.0)
    with pytest.raises(UnsupportedFeatureError, match="multiple of 256"):
        backend.forward(q, cache, meta, p, out=out)
    cache, meta, q = make_case(rng, bs=256, d=16, reqs=((3, 1), (0, 5)))
    out = torch.full_like(q, 7.0)
    with pytest.raises(UnsupportedFeatureError, match="sinks"):
        backend.forward(q, cache, meta, p, sinks=torch.zeros(4), out=out)
    assert rec.calls == [] and bool((out == 7.0).all())
    assert "sinks" not in backend.capabilities.features and backend.capabilities.block_size_multiple == 256


def test_write_kv_matches_the_reference_writer(rng, stand_in):
    cache, meta, q = make_case(rng, reqs=((3, 1), (0, 6)))
    backend, _ = stand_in("fa4", cache)
    k = torch.randn(meta.num_actual_tokens, 2, 16, generator=rng).half()
    v = torch.randn(meta.num_actual_tokens, 2, 16, generator=rng).half()
    slots = meta.slot_mapping.clone()
    slots[2] = -1
    want = cache.clone()
    kvl.write_kv(want, k, v, slots)
    backend.write_kv(cache, k, v, slots)
    assert torch.equal(cache, want)


def test_fp8_and_unsupported_head_sizes_are_refused(rng, stand_in):
    cache, meta, q = make_case(rng, d=12, reqs=((3, 1),))
    backend, rec = stand_in("fa4", cache)
    with pytest.raises(UnsupportedFeatureError, match="head size 12"):
        backend.forward(q, cache, meta, kvl.AttentionParams(4, 2, 12))
    assert torch.float8_e4m3fn not in backend.capabilities.kv_dtypes
    problems = backend.capabilities.problems(kvl.AttentionSpec(2, 128, torch.float8_e4m3fn, 16))
    assert problems and "float8" in problems[0]


def test_generation_detection_reports_why(monkeypatch):
    fab._import_generation.cache_clear()
    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace())
    mod, why = fab._import_generation("fa3")
    assert mod is None and "has no flash_attn_with_kvcache" in why

    def old_kvcache(q, k_cache, v_cache, cache_seqlens=None, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, return_softmax_lse=False):
        pass
    monkeypatch.setitem(sys.modules, "flash_attn_interface",
                        types.SimpleNamespace(flash_attn_with_kvcache=old_kvcache))
    fab._import_generation.cache_clear()
    mod, why = fab._import_generation("fa3")
    assert mod is None and "page_table" in why
    monkeypatch.setenv(fab.VERSION_ENV, "7")
    with pytest.raises(BackendUnavailableError, match="expected 2, 3 or 4"):
        fab._candidates()
    monkeypatch.setenv(fab.VERSION_ENV, "fa4")
    assert fab._candidates() == ("fa4",)
    fab._import_generation.cache_clear()
    if not torch.cuda.is_available():
        reason = fab.FlashAttnBackend.unavailable_reason(torch.device("cpu"))
        assert "CUDA" in reason
        with pytest.raises(BackendUnavailableError):
            fab.FlashAttnBackend()


# ---------------------------------------------------------------- the real library on a GPU

def _gpu_backend():
    reason = fab.FlashAttnBackend.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"no FlashAttention here: {reason}")
    return fab.FlashAttnBackend()


GPU_CASES = [  # (causal, window, softcap, sinks, hq, hkv, d, cross)
    (True, None, None, False, 8, 2, 128, False),
    (False, None, None, False, 8, 2, 128, True),
    (True, 40, None, False, 8, 2, 128, False),
    (True, None, 30.0, False, 4, 4, 64, False),
    (True, None, None, True, 8, 1, 128, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("causal,window,cap,sinks,hq,hkv,d,cross", GPU_CASES)
def test_gpu_matches_reference(rng, causal, window, cap, sinks, hq, hkv, d, cross):
    backend = _gpu_backend()
    gen = backend.generation
    if sinks and not gen.sinks:
        pytest.skip(f"{gen.name} has no sinks")
    bs = max(16, gen.block_size_multiple)
    reqs = ((1000, 1), (bs - 1, 1), (0, 1), (3 * bs, 1), (0, 2 * bs), (bs + 5, 77), (0, 0), (250, bs))
    cache, meta, q = make_case(rng, hq=hq, hkv=hkv, d=d, bs=bs, reqs=reqs, dtype=torch.bfloat16, device="cuda",
                               cross=cross, pad=3)
    p = kvl.AttentionParams(hq, hkv, d, causal=causal, sliding_window=window, logits_soft_cap=cap)
    s = torch.randn(hq, generator=rng).cuda() if sinks else None
    before = cache.clone()
    o_buf = torch.full_like(q, float("nan"))
    out, lse = backend.forward(q, cache, meta, p, sinks=s, out=o_buf, return_lse=True)
    ref, ref_lse = REF.forward(q, cache, meta, p, sinks=s, return_lse=True)
    assert out is o_buf and not out.isnan().any()
    err = rel_err(out, ref)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    lse_err = float((lse[fin] - ref_lse[fin]).abs().max())
    print(f"{gen.name} causal={causal} window={window} cap={cap} sinks={sinks} G={hq // hkv} d={d} "
          f"cross={cross}: rel err {err:.2e}, max |dLSE| {lse_err:.2e}")
    assert err < 1e-2 and lse_err < 2e-2
    assert torch.equal(cache, before)
