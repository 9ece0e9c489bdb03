"""The triton backend against the reference, on the CPU through Triton's interpreter (fp16/fp32: the
interpreter's bf16 dot is not trustworthy). Small shapes: every kernel program is interpreted in Python."""


import dataclasses
import pytest
import torch

from kvlayout import (AttentionParams, AttentionSpec, KVLayoutError, ScheduledRequest, UnsupportedFeatureError,
                      allocate_kv_cache, build_attention_metadata, get_attention_backend, order_decodes_first,
                      plan_kv_cache)
from kvlayout.backends import available_backends, triton_backend
from kvlayout.backends.torch_ref import TorchBackend
from kvlayout.kernels import interpreting
from kvlayout.kernels.unified import unified_attention
from kvlayout.ops import copy_blocks as ops_copy_blocks
from kvlayout.kernels.decode import SplitWorkspace, choose_num_splits, decode_config, split_kv_decode
from kvlayout.cache_ops import write_kv as ref_write_kv
from kvlayout.specs import is_fp8

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not interpreting(),
                                reason="CPU interpreter tests (the GPU has tests/test_triton_gpu.py)")

REF = TorchBackend()
TOL = {torch.float32: 1e-4, torch.float16: 1e-2}
# (cached, new) per request; decodes first. Lengths at page boundaries of 4 and 16, a one-token
# sequence, a chunked prefill and a fresh prefill.
MIXED = [(3, 1), (0, 1), (15, 1), (16, 1), (7, 1), (0, 11), (12, 9), (4, 4)]


@pytest.fixture(scope="module")
def backend():
    return get_attention_backend("triton", "cpu")


def rand(rng, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=rng) * scale).to(dtype)


def make_cache(rng, num_blocks, h_kv, page, d, kv_dtype, scale=1.0):
    kv = rand(rng, num_blocks, h_kv, page, 2 * d, scale=scale)
    return kv.to(kv_dtype)


def make_meta(rng, lens, page, num_blocks):
    """Requests of ``lens`` [(cached, new)] with block ids drawn in random order from the whole cache."""
    perm = torch.randperm(num_blocks, generator=rng).tolist()
    reqs, used = [], 0
    for cached, new in lens:
        nb = -(-(cached + new) // page)
        reqs.append(ScheduledRequest(cached, new, perm[used:used + nb]))
        used += nb
    assert used <= num_blocks
    reqs = [reqs[i] for i in order_decodes_first(reqs)]
    return build_attention_metadata(reqs, page, num_blocks=num_blocks)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def check_lse(lse, ref_lse):
    both_inf = torch.isinf(lse) & torch.isinf(ref_lse) & (lse < 0) & (ref_lse < 0)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    assert (lse - ref_lse).abs().masked_fill(both_inf, 0).max().item() < 1e-3


def run_case(backend, rng, *, lens=MIXED, h_kv=2, group=2, d=64, page=4, q_dtype=torch.float32,
             kv_dtype=None, sinks=False, scales=None, lse=True, extra_blocks=3, **param_kw):
    kv_dtype = kv_dtype or q_dtype
    need = sum(-(-(c + n) // page) for c, n in lens)
    num_blocks = need + extra_blocks
    kv = make_cache(rng, num_blocks, h_kv, page, d, kv_dtype, scale=0.5 if is_fp8(kv_dtype) else 1.0)
    meta = make_meta(rng, lens, page, num_blocks)
    h = h_kv * group
    params = AttentionParams(h, h_kv, d, **param_kw)
    q = rand(rng, meta.num_actual_tokens, h, d, dtype=q_dtype)
    kw = {}
    if sinks:
        kw["sinks"] = rand(rng, h)
    if scales == "head":
        kw["k_scale"], kw["v_scale"] = torch.rand(h_kv, generator=rng) + 0.5, torch.rand(h_kv, generator=rng) + 0.5
    elif scales == "tensor":
        kw["k_scale"], kw["v_scale"] = torch.tensor([0.7]), torch.tensor([1.3])
    ref, ref_lse = REF.forward(q, kv, meta, params, return_lse=True, **kw)
    out = torch.full_like(q, float("nan"))
    lse_buf = torch.full(q.shape[:2], float("nan")) if lse else None
    res = backend.forward(q, kv, meta, params, out=out, lse=lse_buf, **kw)
    got, got_lse = res if lse else (res, None)
    assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any(), "rows left unwritten"
    assert rel_err(got, ref) < TOL[q_dtype], rel_err(got, ref)
    if lse:
        check_lse(got_lse, ref_lse)
    return meta


FEATURES = {
    "causal-fp32": dict(),
    "noncausal-fp16": dict(q_dtype=torch.float16, causal=False),
    "window-fp32": dict(sliding_window=5),
    "window-noncausal-fp16": dict(q_dtype=torch.float16, sliding_window=6, causal=False),
    "softcap-fp16": dict(q_dtype=torch.float16, logits_soft_cap=2.5),
    "sinks-window-fp32": dict(sinks=True, sliding_window=7),
    "fp8e4m3-head-scales-fp16": dict(q_dtype=torch.float16, kv_dtype=torch.float8_e4m3fn, scales="head"),
    "fp8e5m2-tensor-scale-fp32": dict(kv_dtype=torch.float8_e5m2, scales="tensor", sinks=True),
}


@pytest.mark.parametrize("case", list(FEATURES))
def test_mixed_batch_features(backend, rng, case):
    run_case(backend, rng, **FEATURES[case])


@pytest.mark.parametrize("page", [1, 2, 3, 16, 48, 256, 1040])
def test_block_sizes(backend, rng, page):
    run_case(backend, rng, page=page, lens=[(0, 1), (page, 1), (2 * page - 1 if page > 1 else 5, 1), (page, 3)],
             extra_blocks=2)


@pytest.mark.parametrize("d,h_kv,group", [(80, 1, 4), (96, 2, 3), (256, 1, 1), (128, 1, 8)])
def test_head_sizes_and_groups(backend, rng, d, h_kv, group):
    """80 and 96 run padded to 128 inside the kernel; num_kv_heads == 1 (MQA); a group of 3 pads to 4."""
    run_case(backend, rng, d=d, h_kv=h_kv, group=group, lens=[(5, 1), (8, 1), (3, 6)], q_dtype=torch.float16)


def test_decode_only_and_prefill_only(backend, rng):
    meta = run_case(backend, rng, lens=[(0, 1), (4, 1), (9, 1), (33, 1)], sinks=True)
    assert meta.num_prefills == 0
    meta = run_case(backend, rng, lens=[(0, 6), (8, 5), (3, 17)], causal=False)
    assert meta.num_decodes == 0


def test_zero_length_request_and_padding_rows(backend, rng):
    """A request with no new tokens is skipped; q rows past the scheduled tokens get 0 and LSE -inf."""
    kv = make_cache(rng, 8, 2, 4, 64, torch.float32)
    meta = make_meta(rng, [(5, 1), (4, 0), (2, 3)], 4, 8)
    params = AttentionParams(4, 2, 64)
    q = rand(rng, meta.num_actual_tokens + 3, 4, 64)
    out, lse = backend.forward(q, kv, meta, params, out=torch.full_like(q, float("nan")), return_lse=True)
    ref, ref_lse = REF.forward(q, kv, meta, params, return_lse=True)
    assert rel_err(out, ref) < 1e-4 and torch.equal(out[-3:], torch.zeros_like(out[-3:]))
    check_lse(lse, ref_lse)


def test_two_launch_route(backend, rng, monkeypatch):
    """The route the GPU takes for long prefills: split-KV decode for the decodes, unified for the rest."""
    monkeypatch.setattr(triton_backend, "split_decodes", lambda *a: True)
    run_case(backend, rng, sinks=True, sliding_window=9)


def test_one_plan_per_step_serves_every_layer(backend, rng):
    """Layers of a step share the plan (route, settings, slices, split-KV workspace); each is still correct,
    and a layer of another shape gets a plan of its own."""
    meta = make_meta(rng, [(1200, 1), (700, 1), (33, 1)], 4, 600)
    params = AttentionParams(4, 2, 64)
    layers = [make_cache(rng, 600, 2, 4, 64, torch.float32) for _ in range(3)]
    q = rand(rng, meta.num_actual_tokens, 4, 64)
    for kv in layers:
        out = backend.forward(q, kv, meta, params, out=torch.full_like(q, float("nan")))
        assert rel_err(out, REF.forward(q, kv, meta, params)) < 1e-4
    plans = meta.step_state.states(triton_backend.TritonStepPlan)
    assert len(plans) == 1 and plans[0].num_decodes == 3 and plans[0].num_splits > 1
    wide = AttentionParams(8, 2, 64)
    q8 = rand(rng, meta.num_actual_tokens, 8, 64)
    assert rel_err(backend.forward(q8, layers[0], meta, wide), REF.forward(q8, layers[0], meta, wide)) < 1e-4
    assert len(meta.step_state.states(triton_backend.TritonStepPlan)) == 2


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("splits", [1, 2, 7])
def test_split_kv_decode(rng, splits, fused):
    """More splits than key tiles leaves empty splits; preallocated out, LSE and workspace are filled; the
    merge in the decode launch (fused) and in its own launch agree, and the arrival counters end at 0."""
    h_kv, group, d, page = 2, 4, 64, 4
    lens = [(39, 1), (0, 1), (6, 1)]
    kv = make_cache(rng, 16, h_kv, page, d, torch.float32)
    meta = make_meta(rng, lens, page, 16)
    params = AttentionParams(h_kv * group, h_kv, d, sliding_window=33, logits_soft_cap=4.0)
    q = rand(rng, 3, h_kv * group, d)
    sinks = rand(rng, h_kv * group)
    ref, ref_lse = REF.forward(q, kv, meta, params, sinks=sinks, return_lse=True)
    out, lse = torch.full_like(q, float("nan")), torch.full((3, h_kv * group), float("nan"))
    ws = SplitWorkspace(torch.full((3, h_kv * group, 8, d), float("nan")),
                        torch.full((3, h_kv * group, 8), float("nan")), torch.zeros(3, h_kv, dtype=torch.int32))
    cfg = dataclasses.replace(decode_config(d, 4, True), fused_merge=fused)
    for _ in range(2):                       # a second launch on the same workspace sees zeroed counters
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        got, got_lse = split_kv_decode(q, kv, meta.query_start_loc, meta.seq_lens, meta.block_table, params,
                                       max_seq_len=meta.max_seq_len, num_splits=splits, sinks=sinks, out=out,
                                       lse=lse, workspace=ws if splits > 1 else None, config=cfg)
        assert got is out and got_lse is lse
        assert rel_err(out, ref) < 1e-4
        check_lse(lse, ref_lse)
        assert not ws.arrivals.any()


def test_choose_num_splits():
    assert choose_num_splits(256, 8, 512, 132) == 1                # plenty of programs already
    assert choose_num_splits(1, 8, 131072, 132) > 16                # one long sequence: split it
    assert choose_num_splits(1, 8, 600, 132) == 1                   # too short to split
    assert 1 <= choose_num_splits(64, 8, 4096, 132) <= 8


def test_unified_one_launch_for_mixed_batch(rng):
    """Decodes, chunked prefills and fresh prefills in a single launch of the unified kernel."""
    kv = make_cache(rng, 40, 2, 4, 64, torch.float16)
    meta = make_meta(rng, MIXED, 4, 40)
    params = AttentionParams(4, 2, 64)
    q = rand(rng, meta.num_actual_tokens, 4, 64, dtype=torch.float16)
    out = torch.full_like(q, float("nan"))
    unified_attention(q, kv, out, meta.query_start_loc, meta.seq_lens, meta.block_table, params,
                      num_tokens=meta.num_actual_tokens, max_query_len=meta.max_query_len)
    assert meta.num_decodes > 0 and meta.num_prefills > 0
    assert rel_err(out, REF.forward(q, kv, meta, params)) < 1e-2


def test_cross_layer_views(backend, rng):
    """Per-layer views of a cross-layer allocation (block stride L*page, storage offset): write, attend."""
    spec = AttentionSpec(num_kv_heads=2, head_size=64, dtype=torch.float16, block_size=4)
    plan = plan_kv_cache({f"l{i}": spec for i in range(3)}, 3 * 12 * spec.page_size_bytes, backend="triton",
                         cross_layer=True)
    caches = allocate_kv_cache(plan, "cpu")
    view = caches["l1"]
    assert view.stride(0) == 3 * view[0].numel() and view.storage_offset() > 0
    nb = view.shape[0]
    meta = make_meta(rng, [(6, 1), (0, 1), (3, 5)], 4, nb)
    k, v = rand(rng, meta.num_actual_tokens, 2, 64, dtype=torch.float16), rand(rng, meta.num_actual_tokens, 2, 64, dtype=torch.float16)
    for name in ("l0", "l2"):
        caches[name].copy_(rand(rng, *view.shape, dtype=torch.float16))
    view.copy_(rand(rng, *view.shape, dtype=torch.float16))
    before = {n: caches[n].clone() for n in ("l0", "l2")}
    backend.write_kv(view, k, v, meta.slot_mapping)
    expect = view.clone()
    ref_write_kv(expect, k, v, meta.slot_mapping)
    assert torch.equal(view, expect)
    assert all(torch.equal(caches[n], before[n]) for n in before), "write_kv reached another layer"
    params = AttentionParams(8, 2, 64)
    q = rand(rng, meta.num_actual_tokens, 8, 64, dtype=torch.float16)
    assert rel_err(backend.forward(q, view, meta, params), REF.forward(q, view, meta, params)) < 1e-2


@pytest.mark.parametrize("kv_dtype,scales", [(torch.float16, None), (torch.float32, None),
                                             (torch.float8_e4m3fn, "head"), (torch.float8_e5m2, "tensor")])
def test_write_kv_matches_reference(backend, rng, kv_dtype, scales):
    h, page, d, nb, t = 2, 4, 80, 7, 13
    base = make_cache(rng, nb, h, page, d, kv_dtype)
    src_dtype = torch.float16 if kv_dtype == torch.float16 else torch.float32
    qkv = rand(rng, t, 3 * h * d, dtype=src_dtype, scale=4.0)            # k, v as strided slices
    k, v = qkv[:, h * d:2 * h * d].view(t, h, d), qkv[:, 2 * h * d:].view(t, h, d)
    slots = torch.randperm(nb * page, generator=rng)[:t]
    slots[[2, 7]] = -1
    ks = vs = None
    if scales == "head":
        ks, vs = torch.rand(h, generator=rng) + 0.5, torch.rand(h, generator=rng) + 0.5
    elif scales == "tensor":
        ks, vs = torch.tensor([0.05]), torch.tensor([2.0])            # 0.05 pushes k past fp8's range
    got, want = base.clone(), base.clone()
    backend.write_kv(got, k, v, slots, ks, vs)
    ref_write_kv(want, k, v, slots, ks, vs)
    as_bits = (lambda x: x.view(torch.uint8)) if is_fp8(kv_dtype) else (lambda x: x)
    assert torch.equal(as_bits(got), as_bits(want))


def test_write_kv_refuses_bad_input(backend, rng):
    kv = make_cache(rng, 4, 2, 4, 64, torch.float16)
    before = kv.clone()
    k = rand(rng, 3, 2, 64, dtype=torch.float16)
    for bad in (dict(slots=torch.tensor([0, 16, 1])), dict(slots=torch.tensor([0, -2, 1])),
                dict(k=rand(rng, 3, 2, 64)), dict(k=rand(rng, 3, 1, 64, dtype=torch.float16))):
        with pytest.raises(KVLayoutError):
            backend.write_kv(kv, bad.get("k", k), k, bad.get("slots", torch.tensor([0, 1, 2])))
    assert torch.equal(kv, before)


def copy_blocks(cache, src, dst):
    """The block copy through the Triton page kernels."""
    ops_copy_blocks(cache, src, dst, impl="triton")


def test_copy_blocks(rng):
    kv = make_cache(rng, 6, 2, 4, 64, torch.float8_e4m3fn)
    want = kv.clone()
    want[4], want[1] = want[0], want[3]
    copy_blocks(kv, [0, 3], [4, 1])
    assert torch.equal(kv.view(torch.uint8), want.view(torch.uint8))
    for src, dst in (([0], [6]), ([0, 1], [2, 2]), ([0], [1, 2])):
        with pytest.raises(KVLayoutError):
            copy_blocks(kv, src, dst)
    assert torch.equal(kv.view(torch.uint8), want.view(torch.uint8)), "a refused copy changed the cache"
    want[1], want[2] = want[0].clone(), want[1].clone()   # a destination that is also a source: reads come first
    copy_blocks(kv, [0, 1], [1, 2])
    assert torch.equal(kv.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("cross", [False, True])
def test_copy_blocks_whole_group(rng, cross):
    spec = AttentionSpec(num_kv_heads=1, head_size=64, dtype=torch.float16, block_size=2)
    plan = plan_kv_cache({"a": spec, "b": spec}, 2 * 5 * spec.page_size_bytes, cross_layer=cross)
    caches = allocate_kv_cache(plan, "cpu")
    for t in caches.values():
        t.copy_(rand(rng, *t.shape, dtype=torch.float16))
    want = {n: t.clone() for n, t in caches.items()}
    for t in want.values():
        t[3] = t[1]
    copy_blocks(caches, [1], [3])
    assert all(torch.equal(caches[n], want[n]) for n in caches)


def test_capabilities_and_availability(backend):
    assert available_backends("cpu")["triton"] is None
    assert "CUDA" in triton_backend.TritonBackend.unavailable_reason(torch.device("cuda"))
    caps = backend.capabilities
    assert caps.lse_base == "e" and {"sinks", "fp8_kv", "lse", "cross_layer"} <= caps.features
    with pytest.raises(UnsupportedFeatureError, match="head_size 48"):
        backend.check_spec("x", AttentionSpec(num_kv_heads=1, head_size=48, dtype=torch.float16))
    assert caps.block_sizes is None            # any page: the kernels look pages up per tile (tiles.tile_rows)
    backend.check_spec("x", AttentionSpec(num_kv_heads=1, head_size=64, dtype=torch.float16, block_size=1040))


def test_forward_refuses_bad_input_before_launch(backend, rng):
    kv = make_cache(rng, 8, 2, 4, 64, torch.float16)
    meta = make_meta(rng, [(3, 1), (2, 4)], 4, 8)
    params = AttentionParams(4, 2, 64)
    q = rand(rng, meta.num_actual_tokens, 4, 64, dtype=torch.float16)
    out = torch.full_like(q, 7.0)
    bad = [
        dict(q=q[:, :2]),                                              # wrong head count
        dict(q=q[:3]),                                                 # fewer tokens than scheduled
        dict(q=q.float()),                                             # q dtype differs from the cache
        dict(q=q.transpose(1, 2).contiguous().transpose(1, 2)),      # head dim not contiguous
        dict(params=AttentionParams(4, 1, 64)),                        # KV heads differ from the cache
        dict(sinks=torch.zeros(3)),
        dict(lse=torch.zeros(meta.num_actual_tokens, 4, dtype=torch.float16)),
        dict(out=torch.zeros(2, 4, 64, dtype=torch.float16)),
        dict(k_scale=torch.ones(1)),                                   # scales on a 16-bit cache
        dict(kv=kv[:, :, :2]),                                         # block size differs from metadata
    ]
    for b in bad:
        with pytest.raises(KVLayoutError):
            backend.forward(b.get("q", q), b.get("kv", kv), meta, b.get("params", params), out=b.get("out", out),
                            sinks=b.get("sinks"), lse=b.get("lse"), k_scale=b.get("k_scale"))
        assert torch.equal(out, torch.full_like(q, 7.0)), f"{list(b)} was refused after writing"
