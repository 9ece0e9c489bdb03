"""Persistent, padded step metadata (``StepBuffers``): the same attention and the same cache writes as the
unpadded step on every backend that serves padded steps, pages no real request owns left byte-identical,
and what does not fit refused before anything is written."""

from __future__ import annotations

import pytest
import torch

import kvlayout as kvl
from kvlayout.backends import get_attention_backend
from kvlayout.errors import KVLayoutError, UnsupportedFeatureError
from kvlayout.step_buffers import StepBuffers

HQ, H, D, BS = 4, 2, 64, 4
BACKENDS = ("torch", "triton", "rocm")


class Attn(kvl.AttentionLayer, torch.nn.Module):
    pass


def world(rng, reqs, num_blocks=24):
    """A layer over a random cache and a schedule of ``(computed, new)`` requests in random block order."""
    spec = kvl.AttentionSpec(H, D, torch.float32, BS)
    cache = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout({"l": spec}, num_blocks))["l"]
    cache.copy_(torch.randn(cache.shape, generator=rng))
    ids = torch.randperm(num_blocks, generator=rng).tolist()
    sched, at = [], 0
    for c, n in reqs:
        k = -(-(c + n) // BS)
        sched.append(kvl.ScheduledRequest(c, n, ids[at:at + k]))
        at += k
    layer = Attn(layer_name="l", spec=spec, num_heads=HQ)
    layer.bind_kv_cache(cache)
    return layer, cache, sched, ids[at:]


def step_inputs(rng, rows):
    return (torch.randn(rows, HQ, D, generator=rng), torch.randn(rows, H, D, generator=rng),
            torch.randn(rows, H, D, generator=rng))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# (requests, padded requests, padded tokens, decode_only): page-boundary lengths, a one-token prefill, a
# request of no new token, 0 cached tokens
CASES = [
    ([(3, 1), (4, 1), (0, 1)], 4, 4, True),
    ([(7, 1)], 8, 8, True),
    ([(4, 1), (5, 1), (0, 6), (8, 4)], 6, 16, False),
    ([(0, 9)], 3, 12, False),
    ([(3, 1), (0, 1), (2, 3), (6, 0)], 5, 9, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reqs, num_reqs, num_tokens, decode_only", CASES)
def test_a_padded_step_equals_the_unpadded_one(rng, backend, reqs, num_reqs, num_tokens, decode_only):
    be = get_attention_backend(backend, "cpu")
    layer, cache, sched, free = world(rng, reqs)
    total = sum(n for _, n in reqs)
    q, k, v = step_inputs(rng, num_tokens)
    free_pages = cache[free].clone()
    ref_cache = cache.clone()
    ref_layer = Attn(layer_name="l", spec=layer.kv_spec, num_heads=HQ)
    ref_layer.bind_kv_cache(ref_cache)
    ref = ref_layer.attend(q[:total], k[:total], v[:total],
                           kvl.build_attention_metadata(sched, BS, num_blocks=cache.shape[0]), "torch")

    bufs = StepBuffers(BS, num_blocks=cache.shape[0], max_num_reqs=8, max_num_tokens=16, max_blocks_per_request=6)
    meta = bufs.build(sched, num_reqs=num_reqs, num_tokens=num_tokens, decode_only=decode_only)
    assert meta.padded.num_reqs == len(reqs) and meta.padded.num_tokens == total
    assert (meta.num_reqs, meta.num_actual_tokens) == (num_reqs, num_tokens)
    assert meta.max_seq_len == 6 * BS
    assert meta.slot_mapping[total:].eq(-1).all()
    out = layer.attend(q, k, v, meta, be)
    assert out.shape == q.shape
    if total:
        assert rel_err(out[:total], ref) < 1e-4
    assert torch.equal(cache, ref_cache)                  # the same slots written, nothing else
    assert torch.equal(cache[free], free_pages)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("reqs, num_reqs, num_tokens, decode_only", CASES)
def test_building_from_a_block_table_equals_building_from_block_ids(rng, device, reqs, num_reqs, num_tokens,
                                                                   decode_only):
    """``build_from_table`` (rows gathered on the device from a persistent ``BlockTable``) writes the same
    padded metadata as ``build`` from the requests' block ids; padding rows name no block."""
    _, cache, sched, _ = world(rng, reqs)
    nb = cache.shape[0]
    bufs = StepBuffers(BS, num_blocks=nb, max_num_reqs=8, max_num_tokens=16, max_blocks_per_request=6,
                       device=device)
    table = kvl.BlockTable(BS, num_blocks=nb, max_num_reqs=10, max_blocks_per_request=6, device=device)
    table.add("other", [])                                 # rows in the table are not the step's order
    for i in reversed(range(len(sched))):
        table.add(i, sched[i].block_ids)
    ref = bufs.build(sched, num_reqs=num_reqs, num_tokens=num_tokens, decode_only=decode_only)
    ref = [t.clone() for t in (ref.query_start_loc, ref.seq_lens, ref.block_table, ref.slot_mapping)] + [ref]
    meta = bufs.build_from_table(table, list(range(len(sched))), [r.num_computed_tokens for r in sched],
                                 [r.num_new_tokens for r in sched], num_reqs=num_reqs, num_tokens=num_tokens,
                                 decode_only=decode_only)
    assert meta.is_validated and bufs.owns(meta) and not ref[-1].is_validated
    for got, want in zip((meta.query_start_loc, meta.seq_lens, meta.block_table, meta.slot_mapping), ref):
        assert torch.equal(got, want)
    assert (meta.padded.num_reqs, meta.padded.num_tokens) == (ref[-1].padded.num_reqs, ref[-1].padded.num_tokens)
    assert (meta.num_decodes, meta.max_query_len, meta.max_seq_len) == \
        (ref[-1].num_decodes, ref[-1].max_query_len, ref[-1].max_seq_len)


def test_building_from_a_block_table_refuses_what_does_not_fit(rng):
    bufs = StepBuffers(BS, num_blocks=24, max_num_reqs=4, max_num_tokens=4, max_blocks_per_request=6)
    table = kvl.BlockTable(BS, num_blocks=24, max_num_reqs=4, max_blocks_per_request=6)
    table.add("a", [3, 7])
    good = bufs.build_from_table(table, ["a"], [5], [1], num_reqs=2, num_tokens=2, decode_only=True)
    narrow = kvl.BlockTable(BS, num_blocks=24, max_num_reqs=4, max_blocks_per_request=5)
    narrow.add("a", [3, 7])
    for call, match in [
        (lambda: bufs.build_from_table(narrow, ["a"], [5], [1], num_reqs=2, num_tokens=2), "does not match"),
        (lambda: bufs.build_from_table(table, ["b"], [5], [1], num_reqs=2, num_tokens=2), "no row"),
        (lambda: bufs.build_from_table(table, ["a"], [7], [3], num_reqs=2, num_tokens=2), "append blocks"),
        (lambda: bufs.build_from_table(table, ["a"], [5], [2], num_reqs=1, num_tokens=2, decode_only=True),
         "not one"),
        (lambda: bufs.build_from_table("table", ["a"], [5], [1], num_reqs=2, num_tokens=2), "BlockTable"),
    ]:
        with pytest.raises(KVLayoutError, match=match):
            call()
    assert good.is_validated                              # a refused build wrote nothing


def test_the_worked_example():
    bufs = StepBuffers(16, num_blocks=64, max_num_reqs=4, max_num_tokens=4, max_blocks_per_request=8)
    sched = [kvl.ScheduledRequest(16, 1, [5, 9]), kvl.ScheduledRequest(4, 1, [2]),
             kvl.ScheduledRequest(39, 1, [7, 1, 3])]
    meta = bufs.build(sched, num_reqs=4, num_tokens=4, decode_only=True)
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 3]
    assert meta.seq_lens.tolist() == [17, 5, 40, 0]
    assert meta.slot_mapping.tolist() == [9 * 16, 2 * 16 + 4, 3 * 16 + 7, -1]
    assert meta.block_table[3].tolist() == [0] * 8
    assert (meta.num_decodes, meta.num_actual_tokens, meta.max_query_len, meta.max_seq_len) == (4, 4, 1, 128)


def test_buffers_keep_their_addresses_and_older_metadata_is_refused(rng):
    layer, cache, sched, _ = world(rng, [(3, 1), (5, 1)])
    bufs = StepBuffers(BS, num_blocks=cache.shape[0], max_num_reqs=4, max_num_tokens=4, max_blocks_per_request=4)
    first = bufs.build(sched, num_reqs=4, num_tokens=4, decode_only=True)
    ptrs = [t.data_ptr() for t in (first.query_start_loc, first.seq_lens, first.block_table, first.slot_mapping)]
    assert first.is_validated and bufs.owns(first)
    second = bufs.build(sched[:1], num_reqs=4, num_tokens=4, decode_only=True)
    assert [t.data_ptr() for t in (second.query_start_loc, second.seq_lens, second.block_table,
                                   second.slot_mapping)] == ptrs
    assert second.is_validated and not first.is_validated
    q, k, v = step_inputs(rng, 4)
    before = cache.clone()
    with pytest.raises(KVLayoutError, match="changed after it was built"):
        layer.attend(q, k, v, first, "torch")
    assert torch.equal(cache, before)


@pytest.mark.parametrize("reqs, kwargs, match", [
    ([(3, 1)] * 3, dict(num_reqs=2, num_tokens=4), "more than the 2 requests"),
    ([(0, 5)], dict(num_reqs=2, num_tokens=4), "more than the 2 requests and 4 tokens"),
    ([(0, 5)], dict(num_reqs=9, num_tokens=4), "exceed the buffers"),
    ([(3, 1), (0, 2)], dict(num_reqs=2, num_tokens=3, decode_only=True), "schedules 2 tokens, not one"),
    ([(3, 1)], dict(num_reqs=2, num_tokens=3, decode_only=True), "as many tokens as requests"),
    ([(30, 1)], dict(num_reqs=2, num_tokens=2), "less than the 8 blocks"),
    ([(3, 1)], dict(num_reqs=0, num_tokens=2), "num_reqs"),
])
def test_what_does_not_fit_is_refused_and_the_buffers_keep_the_last_step(rng, reqs, kwargs, match):
    _, cache, sched, _ = world(rng, reqs, num_blocks=40)
    bufs = StepBuffers(BS, num_blocks=cache.shape[0], max_num_reqs=8, max_num_tokens=8, max_blocks_per_request=4)
    good = bufs.build([kvl.ScheduledRequest(2, 1, [0])], num_reqs=2, num_tokens=2)
    with pytest.raises(KVLayoutError, match=match):
        bufs.build(sched, **kwargs)
    assert good.is_validated                              # a refused build wrote nothing


def test_buffer_sizes_are_checked():
    with pytest.raises(KVLayoutError, match="max_blocks_per_request"):
        StepBuffers(BS, num_blocks=8, max_num_reqs=2, max_num_tokens=2, max_blocks_per_request=9)
    with pytest.raises(KVLayoutError, match="max_num_tokens"):
        StepBuffers(BS, num_blocks=8, max_num_reqs=2, max_num_tokens=0, max_blocks_per_request=2)
    with pytest.raises(KVLayoutError, match="num_blocks"):
        StepBuffers(BS, max_num_reqs=2, max_num_tokens=2, max_blocks_per_request=2)


def test_a_backend_without_padded_steps_refuses_them(rng):
    from kvlayout.backends.torch_ref import TorchBackend
    from kvlayout.capabilities import BackendCapabilities

    class Plain(TorchBackend):
        name = "plain"
        capabilities = BackendCapabilities(name="plain", kv_dtypes=frozenset({torch.float32}),
                                           q_dtypes=frozenset({torch.float32}))

    layer, cache, sched, _ = world(rng, [(3, 1)])
    bufs = StepBuffers(BS, num_blocks=cache.shape[0], max_num_reqs=2, max_num_tokens=2, max_blocks_per_request=2)
    meta = bufs.build(sched, num_reqs=2, num_tokens=2, decode_only=True)
    q, k, v = step_inputs(rng, 2)
    before = cache.clone()
    with pytest.raises(UnsupportedFeatureError, match="padded_steps"):
        layer.attend(q, k, v, meta, Plain())
    assert torch.equal(cache, before)


def test_building_under_inference_mode(rng):
    layer, cache, sched, _ = world(rng, [(3, 1), (0, 2)])
    bufs = StepBuffers(BS, num_blocks=cache.shape[0], max_num_reqs=4, max_num_tokens=4, max_blocks_per_request=4)
    with torch.inference_mode():
        meta = bufs.build(sched, num_reqs=3, num_tokens=4)
        q, k, v = step_inputs(rng, 4)
        layer.attend(q, k, v, meta, "torch")
    assert meta.is_validated


def test_padded_metadata_is_not_revalidated_by_hand(rng):
    _, cache, sched, _ = world(rng, [(3, 1)])
    bufs = StepBuffers(BS, num_blocks=cache.shape[0], max_num_reqs=2, max_num_tokens=2, max_blocks_per_request=2)
    meta = bufs.build(sched, num_reqs=2, num_tokens=2, decode_only=True)
    with pytest.raises(KVLayoutError, match="StepBuffers.build"):
        kvl.validate_attention_metadata(meta)
