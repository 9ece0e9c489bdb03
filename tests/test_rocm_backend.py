"""The rocm backend (2-D paged decode + prefix-prefill Triton kernels) against the reference backend: under
Triton's CPU interpreter on small fp16/fp32 shapes, and in bf16/fp16/fp8 on a GPU."""

import pytest
import torch

import kvlayout as kvl
from kvlayout.backends import get_attention_backend
from kvlayout.backends.rocm_backend import RocmBackend, step_plan
from kvlayout.kernels.rocm import decode_partition_size, prefill_tiles, rocm_config, vector_width
from kvlayout.backends.torch_ref import TorchBackend
from kvlayout.errors import KVLayoutError, UnsupportedFeatureError
from paged_case import paged_case

ROCM = RocmBackend()
REF = TorchBackend()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)

# decodes first (one at a page boundary, a one-token prompt), then prefills: a fresh prompt, chunked
# prefills (one ending on a page boundary), a request with nothing new, a one-token chunk
MIXED = ((19, 1), (15, 1), (0, 1), (0, 21), (5, 11), (0, 0), (16, 16), (30, 1), (9, 3))


def make_case(rng, *, hq=4, hkv=2, d=64, bs=4, reqs=MIXED, dtype=torch.float16, q_dtype=None, device=DEV,
              cross=False, pad=0, per_head=False):
    """A cache holding every request's history in random block order, the step's metadata, queries (plus
    ``pad`` rows no request owns) and fp8 scales. With ``cross`` the layer is a cross-layer view next to a
    layer of large values, so reading the wrong layer shows."""
    cache, meta, q = paged_case(rng, hq=hq, hkv=hkv, d=d, bs=bs, reqs=reqs, dtype=dtype, device=device,
                                cross=cross, pad=pad, q_dtype=q_dtype or (torch.float16 if dtype in FP8 else dtype),
                                other_fill=100.0)
    scales = {}
    if dtype in FP8:
        n = hkv if per_head else 1
        scales = {"k_scale": (torch.rand(n, generator=rng) + 0.5).to(device),
                  "v_scale": (torch.rand(n, generator=rng) + 0.5).to(device)}
    return cache, meta, q, scales


def rel_err(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def check(rng, *, causal=True, window=None, cap=None, sinks=False, partition_size=None, tol=None, **case):
    cache, meta, q, scales = make_case(rng, **case)
    hq, d = q.shape[1], q.shape[2]
    p = kvl.AttentionParams(hq, cache.shape[1], d, causal=causal, sliding_window=window, logits_soft_cap=cap)
    s = torch.randn(hq, generator=rng).to(q.device) if sinks else None
    before = cache.clone()
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=q.device)
    res = ROCM.forward(q, cache, meta, p, sinks=s, out=out, lse=lse, partition_size=partition_size, **scales)
    ref, ref_lse = REF.forward(q, cache, meta, p, sinks=s, return_lse=True, **scales)
    assert res[0] is out and res[1] is lse
    assert not out.isnan().any() and not lse.isnan().any()
    err = rel_err(out, ref)
    assert err < (tol or TOL[q.dtype]), err
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert torch.allclose(lse[fin], ref_lse[fin], atol=1e-3, rtol=1e-3)
    assert torch.equal(cache.view(torch.uint8), before.view(torch.uint8))
    return err


# ---------------------------------------------------------------- host-side decisions

def test_prefill_tiles_cover_every_prefill_token_once():
    qsl = torch.tensor([0, 1, 2, 2, 19, 19, 52, 53], dtype=torch.int32)
    tiles = prefill_tiles(qsl, 2, 16)
    assert tiles.tolist() == [[3, 0], [3, 16], [5, 0], [5, 16], [5, 32], [6, 0]]
    assert prefill_tiles(qsl, 7, 16).shape == (0, 2)


def test_decode_partition_size():
    # enough (sequence, kv head) programs: no partitions; short contexts: none either
    assert decode_partition_size(64, 8, 4096, 64, 132) == 0
    assert decode_partition_size(1, 8, 256, 64, 132) == 0
    part = decode_partition_size(1, 8, 131072, 64, 132)
    assert part % 64 == 0 and 131072 / part <= 64
    assert -(-2 * 132 // 8) <= -(-131072 // part) <= 64
    part = decode_partition_size(4, 2, 1000, 64, 132)
    assert part % 64 == 0 and part >= 128 and -(-1000 // part) >= 2


def test_vector_width_honours_the_strides():
    assert vector_width(torch.zeros(3, 2, 4, 128, dtype=torch.float16)) == 8
    assert vector_width(torch.zeros(3, 2, 4, 128, dtype=torch.float8_e4m3fn)) == 16
    odd = torch.zeros(3 * 2 * 4 * 128 + 64, dtype=torch.float16).as_strided((3, 2, 4, 128), (2 * 4 * 128 + 4, 512, 128, 1))
    assert vector_width(odd) == 1


# ---------------------------------------------------------------- the kernels against the reference

@pytest.mark.parametrize("dtype,bs", [(torch.float32, 4), (torch.float16, 16), (torch.float16, 32),
                                      (torch.float32, 12), (torch.float16, 48)])
def test_mixed_batch(rng, dtype, bs):
    check(rng, dtype=dtype, bs=bs, pad=2)


@pytest.mark.parametrize("causal,window,cap,sinks", [
    (False, None, None, False), (True, 5, None, False), (False, 7, None, False), (True, None, 10.0, True),
    (True, 20, 30.0, True)])
def test_features(rng, causal, window, cap, sinks):
    check(rng, causal=causal, window=window, cap=cap, sinks=sinks, dtype=torch.float32)


@pytest.mark.parametrize("hq,hkv,d", [(4, 1, 64), (3, 3, 80), (2, 1, 96)])
def test_gqa_mqa_and_padded_head_sizes(rng, hq, hkv, d):
    check(rng, hq=hq, hkv=hkv, d=d, dtype=torch.float16, bs=8)


@pytest.mark.parametrize("dtype,per_head", [(torch.float8_e4m3fn, False), (torch.float8_e5m2, True)])
def test_fp8_cache_with_scales(rng, dtype, per_head):
    check(rng, dtype=dtype, per_head=per_head, bs=16, window=9)


def test_cross_layer_view(rng):
    check(rng, cross=True, dtype=torch.float16, bs=16)


@pytest.mark.parametrize("tiles,window,sinks", [(1, None, False), (2, 12, True), (1, 40, True)])
def test_decode_partitions_merged_by_lse(rng, tiles, window, sinks):
    # long decodes (some partitions past a short sequence's end, or before the window: empty) + a prefill;
    # partitions of 1 or 2 key tiles (16 keys a tile in the interpreter, 64 on a GPU)
    block_n = rocm_config(64, 4, DEV == "cpu").block_n
    reqs = ((4 * block_n + 6, 1), (3, 1), (3 * block_n - 1, 1), (0, 5))
    check(rng, reqs=reqs, window=window and window * block_n // 16, sinks=sinks, partition_size=tiles * block_n,
          dtype=torch.float32, hkv=1, hq=2)


def test_automatic_partitions_are_used_for_few_long_decodes(rng):
    cache, meta, q, _ = make_case(rng, reqs=((90, 1),), hkv=1, hq=2)
    cfg = rocm_config(64, 2, True)
    if DEV == "cpu":
        assert decode_partition_size(1, 1, 91, cfg.block_n, 8) > 0
    check(rng, reqs=((90, 1), (33, 1)), hkv=1, hq=2, dtype=torch.float32)


@pytest.mark.parametrize("reqs", [((5, 1), (0, 1)), ((0, 7), (3, 2)), ((4, 0), (0, 0))])
def test_empty_decode_or_prefill_part(rng, reqs):
    cache, meta, q, _ = make_case(rng, reqs=reqs, pad=1)
    p = kvl.AttentionParams(4, 2, 64)
    out, lse = ROCM.forward(q, cache, meta, p, return_lse=True)
    ref, ref_lse = REF.forward(q, cache, meta, p, return_lse=True)
    assert rel_err(out, ref) < 3e-3 if ref.norm() > 0 else torch.equal(out, ref)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))


def test_step_plan_made_once_per_step(rng):
    cache, meta, q, _ = make_case(rng)
    cfg = rocm_config(64, 2, DEV == "cpu")
    plan = step_plan(meta, cfg.block_m)
    assert step_plan(meta, cfg.block_m) is plan
    assert plan.decode_max_seq_len == 20
    assert plan.tiles.device.type == meta.device.type


# ---------------------------------------------------------------- refusals before any work

def test_refusals(rng):
    cache, meta, q, _ = make_case(rng, reqs=((3, 1), (0, 4)))
    p = kvl.AttentionParams(4, 2, 64)
    out = torch.full_like(q, 5.0)
    with pytest.raises(KVLayoutError, match="q must be"):
        ROCM.forward(q[:, :2], cache, meta, p, out=out)
    with pytest.raises(KVLayoutError, match="multiple of the key tile"):
        ROCM.forward(q, cache, meta, p, out=out, partition_size=rocm_config(64, 2, DEV == "cpu").block_n + 1)
    with pytest.raises(KVLayoutError, match="sinks must be"):
        ROCM.forward(q, cache, meta, p, out=out, sinks=torch.zeros(3, device=q.device))
    assert bool((out == 5.0).all())
    bad, meta48, q48, _ = make_case(rng, d=48, reqs=((3, 1),))
    with pytest.raises(UnsupportedFeatureError, match="head size 48"):
        ROCM.forward(q48, bad, meta48, kvl.AttentionParams(4, 2, 48))
    assert not ROCM.capabilities.problems(kvl.AttentionSpec(2, 64, torch.float16, 12))   # any page size
    assert ROCM.capabilities.name == "rocm" and ROCM.capabilities.lse_base == "e"


def test_registered():
    assert get_attention_backend("rocm", DEV).name == "rocm"


# ---------------------------------------------------------------- GPU, real sizes

GPU_MIXED = ((4000, 1), (511, 1), (16, 1), (0, 1), (0, 700), (1000, 300), (0, 0), (63, 65), (2048, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d,hq,hkv,bs", [
    (torch.bfloat16, 128, 32, 8, 16), (torch.bfloat16, 64, 8, 8, 32), (torch.bfloat16, 80, 16, 2, 16),
    (torch.float16, 96, 12, 4, 64), (torch.bfloat16, 256, 8, 1, 16), (torch.bfloat16, 128, 8, 2, 1),
    (torch.bfloat16, 128, 8, 2, 256)])
def test_gpu_mixed_batch(rng, dtype, d, hq, hkv, bs):
    err = check(rng, reqs=GPU_MIXED, dtype=dtype, d=d, hq=hq, hkv=hkv, bs=bs, pad=5)
    print(f"rocm {dtype} d={d} {hq}/{hkv} page {bs}: rel err {err:.2e}")


@pytest.mark.gpu
@pytest.mark.parametrize("causal,window,cap,sinks,cross", [
    (False, None, None, False, True), (True, 256, None, True, False), (True, None, 30.0, False, False),
    (False, 100, 50.0, True, False)])
def test_gpu_features(rng, causal, window, cap, sinks, cross):
    check(rng, reqs=GPU_MIXED, dtype=torch.bfloat16, d=128, hq=16, hkv=4, bs=16, causal=causal, window=window,
          cap=cap, sinks=sinks, cross=cross)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,per_head", [(torch.float8_e4m3fn, True), (torch.float8_e5m2, False)])
def test_gpu_fp8(rng, dtype, per_head):
    check(rng, reqs=GPU_MIXED, dtype=dtype, q_dtype=torch.bfloat16, per_head=per_head, d=128, hq=16, hkv=4,
          bs=16, tol=1e-2)


@pytest.mark.gpu
def test_gpu_long_decodes_use_partitions(rng):
    reqs = ((20000, 1), (7000, 1), (33, 1))
    assert decode_partition_size(3, 2, 20001, rocm_config(128, 2, False).block_n, 132) > 0
    check(rng, reqs=reqs, dtype=torch.bfloat16, d=128, hq=8, hkv=2, bs=16, window=5000, sinks=True)
    check(rng, reqs=reqs, dtype=torch.bfloat16, d=128, hq=8, hkv=2, bs=16)
