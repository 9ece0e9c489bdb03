"""The persistent block table: the same metadata as ``build_attention_metadata`` for the same schedule,
rows updated incrementally (append, remove, a freed row reused), and every id checked when a request gets
it, with a refused call changing nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvlayout as kvl
from kvlayout.block_table import BlockTable
from kvlayout.errors import KVLayoutError

BS, NB = 4, 64


def same_metadata(a, b):
    n = a.num_reqs
    assert n == b.num_reqs and a.num_actual_tokens == b.num_actual_tokens
    assert a.query_start_loc.tolist() == b.query_start_loc.tolist()
    assert a.seq_lens.tolist() == b.seq_lens.tolist()
    assert a.slot_mapping.tolist() == b.slot_mapping.tolist()
    for r in range(n):
        k = -(-int(a.seq_lens[r]) // BS)
        assert a.block_table[r, :k].tolist() == b.block_table[r, :k].tolist()
    assert (a.num_decodes, a.max_query_len, a.max_seq_len) == (b.num_decodes, b.max_query_len, b.max_seq_len)


@pytest.mark.parametrize("device", ["cpu", "cpu-staged", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_steps_match_the_builder_as_rows_grow_and_are_reused(rng, device, monkeypatch):
    """Random steps (decode-only and mixed, rows growing, removed and reused) against the builder; staged
    as on a GPU too (staging copied, changed entries scattered into the device table in chunks, the step's
    rows gathered), on the CPU and on CUDA (pinned staging)."""
    gen = np.random.default_rng(int(torch.randint(1 << 30, (1,), generator=rng)))
    monkeypatch.setattr("kvlayout.block_table.SYNC_CHUNK", 2)      # a step that adds 3+ blocks copies them in chunks
    table = BlockTable(BS, num_blocks=NB, max_num_reqs=6, max_blocks_per_request=10,
                       device=device.removesuffix("-staged"), staged=True if device.endswith("staged") else None)
    assert table.staged == (device != "cpu")
    free = list(gen.permutation(NB))
    held = {}                                   # request -> (tokens in cache, blocks)
    next_id = 0
    for step in range(40):
        while len(held) < 5 and gen.random() < 0.6:
            rid = f"r{next_id}"
            next_id += 1
            table.add(rid)
            held[rid] = [0, []]
        sched = []
        for rid, (c, blocks) in held.items():
            new = 1 if c and gen.random() < 0.7 else int(gen.integers(0, 9))
            new = min(new, 10 * BS - c)
            need = -(-(c + new) // BS) - len(blocks)
            if need > len(free):
                continue
            got = [int(free.pop()) for _ in range(need)]
            table.append(rid, got)
            blocks += got
            sched.append((rid, c, new))
        sched.sort(key=lambda s: s[2] != 1)
        meta = table.build([s[0] for s in sched], [s[1] for s in sched], [s[2] for s in sched])
        ref = kvl.build_attention_metadata([kvl.ScheduledRequest(c, n, held[r][1]) for r, c, n in sched], BS,
                                           num_blocks=NB)
        same_metadata(meta, ref)
        for rid, c, n in sched:
            held[rid][0] = c + n
        for rid in [r for r, (c, _) in held.items() if c >= 6 * BS and gen.random() < 0.5]:
            assert table.remove(rid) == held[rid][1]
            free += held.pop(rid)[1]


def test_attention_over_the_tables_metadata_equals_the_builders(rng):
    spec = kvl.AttentionSpec(2, 16, torch.float32, BS)
    cache = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout({"l": spec}, NB))["l"]
    cache.copy_(torch.randn(cache.shape, generator=rng))
    backend = kvl.get_attention_backend("torch")
    table = BlockTable(BS, num_blocks=NB, max_num_reqs=4, max_blocks_per_request=8)
    ids = torch.randperm(NB, generator=rng).tolist()
    table.add("a", ids[:3])
    table.add("b", ids[3:4])
    table.add("c", ids[4:9])
    sched = [("a", 9, 1), ("b", 0, 4), ("c", 13, 6)]
    meta = table.build(*zip(*sched))
    ref = kvl.build_attention_metadata([kvl.ScheduledRequest(9, 1, ids[:3]), kvl.ScheduledRequest(0, 4, ids[3:4]),
                                        kvl.ScheduledRequest(13, 6, ids[4:9])], BS, num_blocks=NB)
    q = torch.randn(11, 4, 16, generator=rng)
    params = kvl.AttentionParams(4, 2, 16)
    assert torch.equal(backend.forward(q, cache, meta, params), backend.forward(q, cache, ref, params))
    older = meta
    table.build(["a"], [9], [1])
    assert not older.is_validated                  # the buffers moved on


@pytest.mark.parametrize("call, match", [
    (lambda t: t.add("a", [1]), "already has a row"),
    (lambda t: t.add("x", [0]), "already in request 'a'"),
    (lambda t: t.append("a", [5, 5]), "listed twice"),
    (lambda t: t.append("a", [NB]), "out of range"),
    (lambda t: t.append("a", [-1]), "out of range"),
    (lambda t: t.append("a", list(range(10, 20))), "rows hold 4"),
    (lambda t: t.append("a", [1.5]), "integers"),
    (lambda t: t.append("nobody", [7]), "no row"),
    (lambda t: t.remove("nobody"), "no row"),
    (lambda t: t.append_many(["a", "b"], [[5], [5]]), "listed twice"),
    (lambda t: t.append_many(["a", "b"], [[5], [0]]), "request 'b': block 0 is already in request 'a'"),
    (lambda t: t.append_many(["a", "b"], [[5], [NB]]), "request 'b': block id 64 is out of range"),
    (lambda t: t.append_many(["a", "b"], [[5], [7, 7]]), "request 'b': a block id is listed twice"),
    (lambda t: t.append_many(["a", "b"], [[5, 6, 7], [8]]), "rows hold 4"),
    (lambda t: t.append_many(["a", "a"], [[5], [6]]), "'a' is listed twice"),
    (lambda t: t.append_many(["a", "nobody"], [[5], [6]]), "no row"),
    (lambda t: t.append_many(["a", "b"], [[5]]), "one list per request"),
    (lambda t: t.append_many(["a", "b"], [[5], ["x"]]), "integers"),
    (lambda t: t.append_many(["a", "b"], [[5], [True]]), "integers"),
    (lambda t: t.append("a", [True]), "integers"),
    (lambda t: t.build(["a", "a"], [1, 1], [1, 1]), "listed twice"),
    (lambda t: t.build(["a"], [8], [1]), "append blocks first"),
    (lambda t: t.build(["a"], [1], [-1]), ">= 0"),
    (lambda t: t.build(["a"], [1], [1, 2]), "one count of each"),
    (lambda t: t.build(["zz"], [1], [1]), "no row"),
])
def test_bad_calls_are_refused_and_change_nothing(call, match):
    t = BlockTable(BS, num_blocks=NB, max_num_reqs=3, max_blocks_per_request=4)
    t.add("a", [0, 1])
    t.add("b", [2])
    with pytest.raises(KVLayoutError, match=match):
        call(t)
    assert t.block_ids("a") == [0, 1] and t.block_ids("b") == [2] and len(t) == 2
    t.add("c")
    with pytest.raises(KVLayoutError, match="holds 3 requests already"):
        t.add("d")


def test_append_many_equals_appending_one_request_at_a_time(rng):
    gen = np.random.default_rng(int(torch.randint(1 << 30, (1,), generator=rng)))
    one = BlockTable(BS, num_blocks=NB, max_num_reqs=8, max_blocks_per_request=8, staged=True)
    many = BlockTable(BS, num_blocks=NB, max_num_reqs=8, max_blocks_per_request=8, staged=True)
    free = [int(b) for b in gen.permutation(NB)]
    for t in (one, many):
        for r in range(6):
            t.add(r)
    for _ in range(5):
        rids = [int(r) for r in gen.permutation(6)[:int(gen.integers(1, 7))]]
        new = [[free.pop() for _ in range(int(gen.integers(0, 3)))] for _ in rids]
        for r, ids in zip(rids, new):
            one.append(r, ids)
        many.append_many(rids, new)
        assert all(one.block_ids(r) == many.block_ids(r) for r in range(6))
        assert torch.equal(one.sync_rows(), many.sync_rows())
    many.append_many([], [])


def test_the_pool_is_checked():
    spec = kvl.AttentionSpec(2, 16, torch.float32, BS)
    plan = kvl.plan_kv_cache({"l": spec}, 16 * spec.page_size_bytes)
    pool = kvl.PagePool(plan)
    g = plan.attention_group().index
    table = BlockTable(plan, max_num_reqs=2, max_blocks_per_request=4, pool=pool)
    ids = pool.allocate(g, 2)
    table.add("a", ids)
    free = next(b for b in range(16) if b not in ids)
    with pytest.raises(KVLayoutError, match=str(free)):
        table.append("a", [free])
    assert table.block_ids("a") == list(ids)
