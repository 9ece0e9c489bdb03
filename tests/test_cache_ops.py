"""write_kv -> gather_kv round trips for every dtype (fp8 with scales), -1 slots, copy_blocks."""

import math

import pytest
import torch

import kvlayout as kvl
from kvlayout.errors import KVLayoutError

PLAIN = [torch.float32, torch.bfloat16, torch.float16]
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
H, D, BS, NB = 3, 8, 4, 12
LENGTHS = [1, BS - 1, BS, BS + 1, 2 * BS, 3 * BS - 1]


def make_cache(dtype, n_layers=1, cross=False, h=H):
    specs = {f"l{i}": kvl.AttentionSpec(h, D, dtype, BS) for i in range(n_layers)}
    return kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout(specs, NB, cross_layer=cross))


def slots_for(block_ids, length, start=0):
    return torch.tensor([block_ids[p // BS] * BS + p % BS for p in range(start, length)], dtype=torch.int64)


def fp8_roundtrip(x, scale, dtype):
    """What the cache must hand back: x / scale rounded to ``dtype``, times scale (per KV head or tensor)."""
    s = scale.view(1, -1, 1).float()
    return ((x.float() / s).to(dtype).double() * s.double()).float()


@pytest.mark.parametrize("dtype", PLAIN)
@pytest.mark.parametrize("length", LENGTHS)
def test_roundtrip_plain_dtypes(dtype, length, rng):
    cache = make_cache(dtype)["l0"]
    ids = torch.randperm(NB, generator=rng)[: -(-length // BS)].tolist()
    k = torch.randn(length, H, D, generator=rng).to(dtype)
    v = torch.randn(length, H, D, generator=rng).to(dtype)
    kvl.write_kv(cache, k, v, slots_for(ids, length))
    gk, gv = kvl.gather_kv(cache, ids, length)
    assert gk.dtype == dtype and torch.equal(gk, k) and torch.equal(gv, v)
    gk64, _ = kvl.gather_kv(cache, ids, length, dtype=torch.float64)
    assert gk64.dtype == torch.float64 and torch.equal(gk64, k.double())
    # the packed page holds K then V for each (head, token)
    p = length - 1
    assert torch.equal(cache[ids[p // BS], :, p % BS], torch.cat([k[p], v[p]], dim=-1))


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("length", [1, BS, BS + 1, 3 * BS - 1])
def test_roundtrip_fp8_with_scales(dtype, per_head, length, rng):
    cache = make_cache(dtype)["l0"]
    ids = torch.randperm(NB, generator=rng)[: -(-length // BS)].tolist()
    if per_head:      # very different magnitudes per head: a wrong head-to-scale pairing shows up at once
        mags = torch.tensor([0.01, 1.0, 30.0])
        k_scale, v_scale = mags / 8, mags / 4
    else:
        mags = torch.ones(H)
        k_scale, v_scale = torch.tensor([0.25]), torch.tensor([0.5])
    k = torch.randn(length, H, D, generator=rng) * mags.view(1, H, 1)
    v = torch.randn(length, H, D, generator=rng).bfloat16() * mags.view(1, H, 1).bfloat16()
    kvl.write_kv(cache, k, v, slots_for(ids, length), k_scale, v_scale)
    gk, gv = kvl.gather_kv(cache, ids, length, k_scale, v_scale)
    assert gk.dtype == torch.float32
    assert torch.equal(gk, fp8_roundtrip(k, k_scale, dtype))
    assert torch.equal(gv, fp8_roundtrip(v.float(), v_scale, dtype))
    # and the error is what the format allows (relative half-ulp plus the subnormal step)
    mant, sub = (3, 2.0 ** -9) if dtype == torch.float8_e4m3fn else (2, 2.0 ** -16)
    ks = k_scale.view(1, -1, 1).expand_as(k)
    assert ((gk - k).abs() <= k.abs() * 2.0 ** -(mant + 1) + ks * sub).all()
    gk_bf16, _ = kvl.gather_kv(cache, ids, length, k_scale, v_scale, dtype=torch.bfloat16)
    assert gk_bf16.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_saturates_instead_of_overflowing(dtype):
    cache = make_cache(dtype)["l0"]
    k = torch.full((2, H, D), 1e9)
    k[1] = -1e9
    kvl.write_kv(cache, k, k.clone(), torch.tensor([0, 5]), torch.tensor([2.0]), torch.tensor([2.0]))
    gk, _ = kvl.gather_kv(cache, [0, 1], BS + 2, torch.tensor([2.0]), torch.tensor([2.0]))
    top = torch.finfo(dtype).max * 2.0
    assert torch.isfinite(gk).all()
    assert (gk[0] == top).all() and (gk[5] == -top).all()


@pytest.mark.parametrize("dtype", PLAIN + FP8)
def test_write_skips_minus_one_and_touches_only_its_slots(dtype, rng):
    caches = make_cache(dtype, n_layers=2)
    cache = caches["l1"]
    (buf,) = caches.buffers
    buf.copy_(torch.randint(-128, 128, buf.shape, generator=rng, dtype=torch.int8))
    before = buf.clone()
    t = 10
    slots = torch.randperm(NB * BS, generator=rng)[:t]
    slots[torch.randperm(t, generator=rng)[:4]] = -1
    src = torch.randn(t, H, D, generator=rng)
    k, v = (src, 2 * src) if dtype in FP8 else (src.to(dtype), (2 * src).to(dtype))
    kvl.write_kv(cache, k, v, slots.to(torch.int32))
    expected = before.clone()
    exp_view = kvl.allocation.layer_view(expected, caches.layout.layer("l1"))
    for i, s in enumerate(slots.tolist()):             # the plain Python meaning of slot_mapping
        if s >= 0:
            exp_view[s // BS, :, s % BS, :D] = k[i].to(dtype)
            exp_view[s // BS, :, s % BS, D:] = v[i].to(dtype)
    assert torch.equal(buf, expected)


def test_slot_mapping_longer_than_tokens_is_cut(rng):
    cache = make_cache(torch.float32)["l0"]
    k = torch.randn(2, H, D, generator=rng)
    kvl.write_kv(cache, k, k, torch.tensor([3, 4, 5, 6]))     # padded slot_mapping (CUDA-graph style)
    assert torch.equal(cache[0, :, 3, :D], k[0]) and torch.equal(cache[1, :, 0, :D], k[1])
    assert not cache[1, :, 1:].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_roundtrip_through_cross_layer_views(dtype, rng):
    caches = make_cache(dtype, n_layers=3, cross=True)
    assert caches.layout.cross_layer
    (buf,) = caches.buffers
    length = 2 * BS + 1
    ids = torch.randperm(NB, generator=rng)[:3].tolist()
    written = {}
    for name in ("l0", "l1", "l2"):
        k = torch.randn(length, H, D, generator=rng).to(torch.bfloat16)
        v = torch.randn(length, H, D, generator=rng).to(torch.bfloat16)
        scale = torch.tensor([0.5]) if dtype != torch.bfloat16 else None
        kvl.write_kv(caches[name], k, v, slots_for(ids, length), scale, scale)
        written[name] = (k, v, scale)
    for name, (k, v, scale) in written.items():
        gk, gv = kvl.gather_kv(caches[name], ids, length, scale, scale, dtype=torch.float32)
        if scale is None:
            assert torch.equal(gk, k.float()) and torch.equal(gv, v.float())
        else:
            assert torch.equal(gk, fp8_roundtrip(k.float(), scale, dtype))
            assert torch.equal(gv, fp8_roundtrip(v.float(), scale, dtype))
    # blocks never written are still zero in every layer
    untouched = [b for b in range(NB) if b not in ids]
    assert not buf.view(NB, -1)[untouched].any()


def test_chunked_writes_equal_one_write(rng):
    a, b = make_cache(torch.float16)["l0"], make_cache(torch.float16)["l0"]
    ids = torch.randperm(NB, generator=rng)[:3].tolist()
    k = torch.randn(11, H, D, generator=rng).half()
    kvl.write_kv(a, k, -k, slots_for(ids, 11))
    for lo, hi in ((0, 3), (3, 4), (4, 11)):
        kvl.write_kv(b, k[lo:hi], -k[lo:hi], slots_for(ids, hi, lo))
    assert torch.equal(a, b)


@pytest.mark.parametrize("cross", [False, True])
def test_copy_blocks_on_kvcache_copies_every_layer(cross, rng):
    caches = make_cache(torch.bfloat16, n_layers=3, cross=cross)
    (buf,) = caches.buffers
    buf.copy_(torch.randint(-128, 128, buf.shape, generator=rng, dtype=torch.int8))
    before = {n: t.clone() for n, t in caches.items()}
    src, dst = [2, 5, 7], [5, 9, 0]             # 5 is both read and written: the old contents move
    kvl.copy_blocks(caches, src, dst)
    for name, t in caches.items():
        exp = before[name].clone()
        exp[dst] = before[name][src]
        assert torch.equal(t.view(torch.int8), exp.view(torch.int8))


def test_copy_blocks_on_one_tensor_copies_only_that_layer(rng):
    caches = make_cache(torch.float32, n_layers=2, cross=True)
    (buf,) = caches.buffers
    buf.copy_(torch.randn(buf.numel() // 4, generator=rng).view(torch.int8))
    before = {n: t.clone() for n, t in caches.items()}
    kvl.copy_blocks(caches["l1"], torch.tensor([1, 3]), torch.tensor([4, 1]))
    exp = before["l1"].clone()
    exp[[4, 1]] = before["l1"][[1, 3]]
    assert torch.equal(caches["l1"], exp) and torch.equal(caches["l0"], before["l0"])
    kvl.copy_blocks(caches["l1"], [], [])                    # nothing to copy is fine
    assert torch.equal(caches["l1"], exp)


@pytest.mark.parametrize("dtype", FP8)
def test_copy_blocks_on_one_fp8_tensor(dtype, rng):
    caches = make_cache(dtype, n_layers=2)
    (buf,) = caches.buffers
    buf.copy_(torch.randint(-100, 100, buf.shape, generator=rng, dtype=torch.int8))
    before = {n: t.view(torch.int8).clone() for n, t in caches.items()}
    kvl.copy_blocks(caches["l0"], [2, 5], [7, 0])
    exp = before["l0"].clone()
    exp[[7, 0]] = before["l0"][[2, 5]]
    assert torch.equal(caches["l0"].view(torch.int8), exp)
    assert torch.equal(caches["l1"].view(torch.int8), before["l1"])


def test_write_kv_refuses_slot_mapping_on_another_device():
    cache = make_cache(torch.float32)["l0"]
    k = torch.randn(2, H, D)
    slots = torch.tensor([0, 1], device="meta")
    with pytest.raises(KVLayoutError, match="slot_mapping is on meta"):
        kvl.write_kv(cache, k, k, slots)


def test_copy_blocks_on_mamba_pages(rng):
    spec = kvl.MambaSpec(states={"ssm": ((2, 3, 4), torch.float32)})
    caches = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout({"m": spec}, 5))
    caches["m"].copy_(torch.randint(-128, 128, caches["m"].shape, generator=rng, dtype=torch.int8))
    before = caches["m"].clone()
    kvl.copy_blocks(caches, [0], [4])
    assert torch.equal(caches["m"][4], before[0]) and torch.equal(caches["m"][:4], before[:4])


def test_gather_kv_checks():
    cache = make_cache(torch.float32)["l0"]
    with pytest.raises(KVLayoutError, match="do not fit in 2 blocks"):
        kvl.gather_kv(cache, [0, 1], 2 * BS + 1)
    with pytest.raises(KVLayoutError, match=f"block id {NB} is out of range"):
        kvl.gather_kv(cache, [0, NB], 2)
    with pytest.raises(KVLayoutError, match="4-D packed cache"):
        kvl.gather_kv(cache[0], [0], 1)


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_special_values_store_the_same_bytes_on_every_path(dtype):
    """NaN stays NaN, +-inf and out-of-range values saturate to the largest finite value, identically
    through the PyTorch write and the Triton write (the interpreter on CPU)."""
    from kvlayout.kernels.write import write_kv as triton_write_kv
    top = torch.finfo(dtype).max
    values = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 1.0, top, -top])
    k = values.view(-1, 1, 1).expand(-1, H, D).contiguous()
    slots = torch.arange(values.numel())
    stored = []
    for write in (kvl.write_kv, triton_write_kv):
        cache = make_cache(dtype)["l0"]
        write(cache, k, k.clone(), slots, torch.tensor([1.0]), torch.tensor([1.0]))
        stored.append(cache.clone())
    assert torch.equal(stored[0].view(torch.uint8), stored[1].view(torch.uint8))
    got = stored[0][0, 0, :, 0].float().tolist() + stored[0][1, 0, :, 0].float().tolist()
    assert math.isnan(got[0]) and got[1:8] == [top, -top, top, -top, 1.0, top, -top]


def test_two_tokens_for_one_slot_are_refused_and_nothing_is_written(rng):
    """One write_kv writes each slot at most once: a repeated slot is refused (which token would land is
    not defined on every device), before any byte changes."""
    cache = make_cache(torch.float32)["l0"]
    before = cache.clone()
    k = torch.randn(3, H, D, generator=rng)
    with pytest.raises(KVLayoutError, match="slot 5 .* more than one token"):
        kvl.write_kv(cache, k, k, torch.tensor([4, 5, 5]))
    assert torch.equal(cache, before)
    kvl.write_kv(cache, k, k, torch.tensor([4, -1, -1]))       # -1 (skip) may repeat
    assert torch.equal(cache[1, :, 0, :D], k[0])
