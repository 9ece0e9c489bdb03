"""Allocation and binding: every view aliases the one raw buffer with true strides; writes land in
exactly the bytes they should; zero_blocks; Mamba state slices."""

import pytest
import torch

import kvlayout as kvl
from kvlayout.errors import KVLayoutError

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]
H, D, BS, L, NB = 2, 8, 4, 3, 6


def attn(dtype=torch.float32, h=H, d=D, bs=BS):
    return kvl.AttentionSpec(num_kv_heads=h, head_size=d, dtype=dtype, block_size=bs)


def mamba(heads=4, conv_dim=20):
    return kvl.MambaSpec(states={"conv": ((conv_dim, 3), torch.bfloat16), "ssm": ((heads, 4, 8), torch.float32),
                                 "extra": ((5,), torch.float16)})


def uniform_cache(dtype, cross):
    specs = {f"l{i}": attn(dtype) for i in range(L)}
    layout = kvl.resolve_kv_cache_layout(specs, NB, cross_layer=cross)
    return specs, kvl.allocate_kv_cache(layout)


def random_bytes(t: torch.Tensor, rng) -> None:
    t.copy_(torch.randint(-128, 128, t.shape, generator=rng, dtype=torch.int8))


def independent_bytes(buffer, dtype, cross):
    """The group buffer as (L, B, H, N, 2D*item) bytes, built by reshaping, not from the layout."""
    item = dtype.itemsize
    if cross:
        return buffer.view(NB, L, H, BS, 2 * D * item).transpose(0, 1)
    return buffer.view(L, NB, H, BS, 2 * D * item)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("cross", [False, True])
def test_views_alias_the_buffer_with_true_strides(dtype, cross):
    specs, cache = uniform_cache(dtype, cross)
    (buf,) = cache.buffers
    assert buf.dtype == torch.int8 and buf.numel() == L * NB * specs["l0"].page_size_bytes
    for name, view in cache.items():
        lay = cache.layout.layer(name)
        assert view.dtype == dtype and tuple(view.shape) == (NB, H, BS, 2 * D)
        assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        assert view.stride() == lay.strides and view.storage_offset() == lay.storage_offset
        assert view.data_ptr() - buf.data_ptr() == lay.byte_offset
        assert view[1].data_ptr() - view[0].data_ptr() == lay.block_stride_bytes
        assert lay.block_stride_bytes == (L if cross else 1) * specs[name].page_size_bytes
        assert not view.is_contiguous() or not cross


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("part", ["k", "v", "k_nhd"])
def test_write_through_kv_view_lands_only_in_its_bytes(dtype, cross, part, rng):
    specs, cache = uniform_cache(dtype, cross)
    (buf,) = cache.buffers
    random_bytes(buf, rng)
    before = buf.clone()
    li = int(torch.randint(L, (1,), generator=rng))
    blocks = torch.randperm(NB, generator=rng)[:3]
    packed = cache[f"l{li}"]
    k_view, v_view = packed[..., :D], packed[..., D:]
    values = torch.randn(3, H, BS, D, generator=rng).to(dtype)
    if part == "k":
        k_view[blocks] = values
    elif part == "v":
        v_view[blocks] = values
    else:                                          # NHD view: (B, N, H, D)
        k_nhd = k_view.transpose(1, 2)
        assert k_nhd.data_ptr() == k_view.data_ptr()
        k_nhd[blocks] = values.transpose(1, 2)
    # the packed tensor sees the write
    half = slice(None, D) if part != "v" else slice(D, None)
    assert torch.equal(packed[blocks][..., half].view(torch.int8), values.view(torch.int8))
    # the independently-reshaped bytes hold it, at the expected place
    raw = independent_bytes(buf, dtype, cross)
    item = dtype.itemsize
    byte_half = slice(None, D * item) if part != "v" else slice(D * item, None)
    assert torch.equal(raw[li, blocks][..., byte_half], values.view(torch.int8).reshape(3, H, BS, D * item))
    # and nowhere else in the buffer
    mask = torch.zeros_like(buf, dtype=torch.bool)
    independent_bytes(mask, dtype, cross)[li, blocks, :, :, byte_half] = True
    assert torch.equal(buf[~mask], before[~mask])


def test_layers_of_different_groups_do_not_share_buffers():
    specs = {"a": attn(h=2), "b": attn(h=4), "m": mamba()}
    layout = kvl.resolve_kv_cache_layout(specs, {0: 3, 1: 5, 2: 7})
    cache = kvl.allocate_kv_cache(layout)
    assert len(cache.buffers) == 3
    for name, view in cache.items():
        g = layout.layer(name).group
        assert view.untyped_storage().data_ptr() == cache.buffers[g].untyped_storage().data_ptr()
        assert cache.buffers[g].numel() == layout.groups[g].nbytes
    assert cache["m"].dtype == torch.int8 and tuple(cache["m"].shape) == (7, 1, 1, specs["m"].page_size_bytes)


def test_allocate_zeroed_and_rejects_non_plans():
    plan = kvl.plan_kv_cache({"a": attn()}, 4096)
    cache = kvl.allocate_kv_cache(plan)
    assert not cache.buffers[0].any()
    assert isinstance(cache, dict) and set(cache) == {"a"}
    with pytest.raises(KVLayoutError, match="KVCachePlan or KVCacheLayout"):
        kvl.allocate_kv_cache({"a": attn()})


@pytest.mark.parametrize("cross", [False, True])
def test_zero_blocks_zeroes_every_layer_of_the_group_only(cross, rng):
    specs = {"a0": attn(), "a1": attn(), "a2": attn(), "other": attn(h=4)}
    layout = kvl.resolve_kv_cache_layout(specs, NB, cross_layer=cross)
    cache = kvl.allocate_kv_cache(layout)
    for b in cache.buffers:
        random_bytes(b, rng)
    before = [b.clone() for b in cache.buffers]
    ids = torch.randperm(NB, generator=rng)[:2]
    keep = torch.tensor([i for i in range(NB) if i not in ids.tolist()])
    kvl.zero_blocks(cache, ids.tolist(), group=0)
    raw = independent_bytes(cache.buffers[0], torch.float32, cross)
    raw_before = independent_bytes(before[0], torch.float32, cross)
    assert not raw[:, ids].any()
    assert torch.equal(raw[:, keep], raw_before[:, keep])
    assert torch.equal(cache.buffers[1], before[1])            # the other group is untouched
    kvl.zero_blocks(cache, torch.tensor([keep[0]]), group=1)
    assert not cache["other"][keep[0]].view(torch.int8).any()
    assert torch.equal(cache["other"][ids].view(torch.int8), before[1].view(NB, -1)[ids].view_as(
        cache["other"][ids].view(torch.int8)))


def test_zero_blocks_with_no_ids_is_a_no_op(rng):
    _, cache = uniform_cache(torch.float32, False)
    random_bytes(cache.buffers[0], rng)
    before = cache.buffers[0].clone()
    kvl.zero_blocks(cache, [])
    kvl.zero_blocks(cache, torch.empty(0, dtype=torch.int64))
    assert torch.equal(cache.buffers[0], before)


def test_group_blocks_view_shares_memory():
    for cross in (False, True):
        _, cache = uniform_cache(torch.bfloat16, cross)
        v = cache.group_blocks_view(0)
        assert v.data_ptr() == cache.buffers[0].data_ptr()
        assert tuple(v.shape) == ((NB, L * v.shape[-1] // L) if cross else (L, NB, v.shape[-1]))


# ---------------------------------------------------------------- binding

class Attn(kvl.AttentionLayer, torch.nn.Module):
    pass


class MLA(kvl.MLALayer, torch.nn.Module):
    pass


class Mixer(kvl.MambaLayer, torch.nn.Module):
    pass


@pytest.mark.parametrize("cross", [False, True])
def test_bind_attention_layers_keep_k_and_v_views(cross, rng):
    specs, cache = uniform_cache(torch.bfloat16, cross)
    layers = {n: Attn(layer_name=n, spec=s, num_heads=2 * H) for n, s in specs.items()}
    kvl.bind_kv_cache(layers, cache)
    for name, layer in layers.items():
        assert layer.kv_cache is cache[name]
        assert layer.k_cache.data_ptr() == cache[name].data_ptr()
        assert layer.v_cache.data_ptr() == cache[name].data_ptr() + D * 2
        assert layer.k_cache.stride() == cache[name].stride()
    x = torch.randn(H, BS, D, generator=rng).to(torch.bfloat16)
    layers["l1"].v_cache[2] = x
    assert torch.equal(cache["l1"][2, :, :, D:], x)
    assert not cache["l0"].view(torch.int8).any() and not cache["l2"].view(torch.int8).any()


def test_bind_mla_layer():
    spec = kvl.MLASpec(16, 8, torch.float16, BS)
    cache = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout({"mla": spec}, NB))
    layer = MLA(layer_name="mla", spec=spec, num_heads=4, scale=0.1)
    kvl.bind_kv_cache({"mla": layer}, cache)
    assert layer.latent_cache is cache["mla"] and tuple(layer.latent_cache.shape) == (NB, 1, BS, 24)


def test_bind_rejects_mismatches():
    specs, cache = uniform_cache(torch.float32, False)
    layers = {n: Attn(layer_name=n, spec=s, num_heads=H) for n, s in specs.items()}
    with pytest.raises(KVLayoutError, match=r"no cache for layer\(s\) \['x'\]"):
        kvl.bind_kv_cache({**layers, "x": layers["l0"]}, cache)
    with pytest.raises(KVLayoutError, match=r"no layer for cache\(s\) \['l2'\]"):
        kvl.bind_kv_cache({k: v for k, v in layers.items() if k != "l2"}, cache)
    with pytest.raises(KVLayoutError, match="no bind_kv_cache"):
        kvl.bind_kv_cache({**layers, "l0": object()}, cache)
    wrong = Attn(layer_name="w", spec=attn(h=4), num_heads=4)
    with pytest.raises(KVLayoutError, match="expects a cache of shape"):
        wrong.bind_kv_cache(cache["l0"])
    with pytest.raises(KVLayoutError, match="expects a torch.bfloat16 cache"):
        Attn(layer_name="w", spec=attn(torch.bfloat16), num_heads=2).bind_kv_cache(cache["l0"])
    assert all(layer.kv_cache is None for layer in layers.values())   # nothing got half-bound


# ---------------------------------------------------------------- Mamba state slices

def _hybrid_cache(rng):
    specs = {"attn0": attn(h=2, d=16, bs=4), "mix1": mamba(heads=4), "mix2": mamba(heads=2, conv_dim=7)}
    plan = kvl.plan_kv_cache(specs, 256 << 10)
    cache = kvl.allocate_kv_cache(plan)
    random_bytes(cache.buffers[0], rng)
    mixers = {n: Mixer(layer_name=n, spec=plan.specs[n]) for n in ("mix1", "mix2")}
    for n, m in mixers.items():
        m.bind_kv_cache(cache[n])
    return plan, cache, mixers


def test_mamba_states_aligned_disjoint_inside_their_page(rng):
    """In the page pool each state layer's block is one large page of its slot; its states sit aligned and
    disjoint inside the state bytes of that page (other groups' layers may use the same bytes, but only
    for pages the pool gives them: tests/test_hybrid_pool.py)."""
    plan, cache, mixers = _hybrid_cache(rng)
    (buf,) = cache.buffers
    base = buf.data_ptr()
    geo = plan.layout.pool
    for name, m in mixers.items():
        lay = plan.layout.layer(name)
        g = plan.groups[lay.group]
        spec = plan.specs[name]
        assert spec.page_size_bytes == g.pages_per_block * geo.page_bytes >= spec.state_bytes
        assert lay.block_stride_bytes == spec.page_size_bytes and lay.byte_offset % geo.slot_bytes == 0
        assert set(m.states) == {"conv", "ssm", "extra"}
        owner = torch.zeros(buf.numel(), dtype=torch.int32)   # how many states claim each byte of this layer
        for sl in spec.slices():
            view = m.states[sl.name]
            assert view.dtype == sl.dtype and tuple(view.shape) == (g.num_blocks,) + sl.shape
            assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            for b in range(g.num_blocks):
                off = view[b].data_ptr() - base
                page = lay.byte_offset + b * lay.block_stride_bytes
                assert off % 16 == 0 and view[b].data_ptr() % 16 == 0
                assert page <= off and off + sl.nbytes <= page + spec.state_bytes
                assert view[b].is_contiguous()
                owner[off:off + sl.nbytes] += 1
        assert int(owner.max()) == 1                             # no two states of a layer overlap


def test_mamba_state_write_touches_only_its_bytes(rng):
    plan, cache, mixers = _hybrid_cache(rng)
    (buf,) = cache.buffers
    before = buf.clone()
    ssm = mixers["mix2"].states["ssm"]
    b = int(torch.randint(plan.group_of("mix2").num_blocks, (1,), generator=rng))
    ssm[b] = torch.randn(ssm.shape[1:], generator=rng)
    off = ssm[b].data_ptr() - buf.data_ptr()
    changed = torch.nonzero(buf != before).squeeze(1)
    assert changed.numel() > 0 and int(changed.min()) >= off and int(changed.max()) < off + ssm[b].numel() * 4
    assert torch.equal(buf[off:off + ssm[b].numel() * 4].view(torch.float32).view(ssm.shape[1:]), ssm[b])


def test_zero_blocks_resets_mamba_state(rng):
    plan, cache, mixers = _hybrid_cache(rng)
    for name in mixers:
        kvl.zero_blocks(cache, [1, 3], group=plan.group_of(name).index)
    for m in mixers.values():
        for view in m.states.values():
            assert not view[[1, 3]].any()
            assert view[[0, 2]].view(-1).any()


def test_mamba_state_views_reject_wrong_pages():
    spec = mamba()
    good = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout({"m": spec}, 3))["m"]
    assert set(kvl.mamba_state_views(good, spec)) == {"conv", "ssm", "extra"}
    with pytest.raises(KVLayoutError, match="Mamba pages must be int8"):
        kvl.mamba_state_views(good.view(torch.uint8), spec)
    with pytest.raises(KVLayoutError, match="Mamba pages must be int8"):
        kvl.mamba_state_views(good[..., :-16], spec)
    with pytest.raises(KVLayoutError, match="needs a MambaSpec"):
        Mixer(layer_name="m", spec=attn())
