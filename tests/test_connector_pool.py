"""The NIXL connector over a hybrid page pool: a request's attention pages and its state pages move between
engines by group, with bytes equal and every other byte untouched; pull and push, with digests; TP 1 -> 2
with head slices and replicated (differently padded) states; ids that would reach the wrong group refused."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import kvlayout as kvl
from kvlayout.connectors.nixl_api import nixl_installed
from kvlayout.errors import KVLayoutError
from kvlayout.page_pool import PagePool

pytestmark = pytest.mark.skipif(not nixl_installed(), reason="needs nixl")
SECRET = b"q" * 32
STATES = {"conv": ((64, 3), torch.float16), "ssm": ((4, 8, 32), torch.float32)}     # 4,480 B: > one page


def specs(heads: int, sharded_tp: int = 0) -> dict:
    """2 attention + 4 Mamba layers: groups 0 (attention), 1 (l1, l2) and 2 (l4, l5) of 2 slots. With
    ``sharded_tp`` the Mamba2-like states are cut by TP as a model's are (``sharded_states``)."""
    a = kvl.AttentionSpec(heads, 16, torch.float16, 16)
    m = sharded_states(sharded_tp) if sharded_tp else kvl.MambaSpec(STATES)
    return {"l0.attn": a, "l1.mamba": m, "l2.mamba": m, "l3.attn": a, "l4.mamba": m, "l5.mamba": m}


def sharded_states(tp: int) -> kvl.MambaSpec:
    """Mamba2 over 4 heads of 8 and 2 groups of d_state 8, conv kernel 4: conv rows x | B | C = 32 | 16 | 16,
    ssm (4, 8, 8); TP splits the heads and the groups."""
    return kvl.MambaSpec(states={"conv": ((64 // tp, 3), torch.float16), "ssm": ((4 // tp, 8, 8), torch.float32)},
                         tp_rows={"conv": ((32, True), (16, True), (16, True)), "ssm": ((4, True),)})


def engine(seed: int, heads: int = 4, tp_rank: int = 0, tp_size: int = 1, device: str = "cpu", sharded: bool = False,
           **kw):
    from kvlayout.connectors import NixlConnector
    s = specs(heads, tp_size if sharded else 0)
    page = s["l0.attn"].page_size_bytes
    plan = kvl.plan_kv_cache(s, 2 * 48 * page)
    caches = kvl.allocate_kv_cache(plan, device)
    gen = torch.Generator().manual_seed(seed)
    caches.buffers[0].copy_(torch.randint(-128, 128, caches.buffers[0].shape, dtype=torch.int8, generator=gen))
    kw.setdefault("handshake_timeout_s", 2.0)
    conn = NixlConnector(caches, specs=plan.specs, engine_id=f"h{seed}", secret=SECRET, tp_rank=tp_rank,
                         tp_size=tp_size, **kw)
    return conn, plan, caches


def settle(conns, want, timeout=20.0):
    seen, why = set(), {}
    deadline = time.monotonic() + timeout
    while not want <= seen:
        assert time.monotonic() < deadline, f"still waiting for {sorted(want - seen)}; got {why}"
        for i, c in enumerate(conns):
            ev = c.poll()
            for f in ("finished", "pushed"):
                seen.update((i, f, rid) for rid in getattr(ev, f))
            for f in ("failed", "push_failed"):
                for rid, reason in getattr(ev, f).items():
                    seen.add((i, f, rid))
                    why[(i, f, rid)] = reason
                    assert (i, f, rid) in want, f"{f} {rid}: {reason}"
        time.sleep(0.002)
    return why


def request_ids(plan, seed):
    """A request's blocks from the pool in scrambled order: 3 attention pages and one state per Mamba group."""
    geo = plan.layout.pool
    pool = PagePool(plan, order=np.random.default_rng(seed).permutation(geo.num_large_pages).tolist())
    return {g.index: pool.allocate(g.index, 3 if g.block_size else 1) for g in plan.groups}


def block_bytes(caches, plan, name, ids, span=None):
    """The bytes of blocks ``ids`` of layer ``name`` (the state bytes only, for a Mamba layer)."""
    view = caches[name]
    rows = view[list(ids)].reshape(len(ids), -1).view(torch.int8) if view.dtype != torch.int8 else \
        view[list(ids)].reshape(len(ids), -1)
    spec = plan.specs[name]
    if isinstance(spec, kvl.MambaSpec):
        rows = rows[:, :spec.state_bytes]
    return rows if span is None else rows[:, span]


def touched_bytes(plan, caches, ids) -> torch.Tensor:
    """A mask of the buffer bytes the blocks ``ids`` ({group: ids}) cover, in every layer of their groups."""
    mask = torch.zeros(caches.buffers[0].numel(), dtype=torch.bool, device=caches.buffers[0].device)
    for gi, blocks in ids.items():
        for lay in plan.layout.group_layers(gi):
            for b in blocks:
                start = lay.byte_offset + b * lay.block_stride_bytes
                mask[start:start + lay.block_bytes] = True
    return mask


def check_moved(pplan, src, remote, dplan, dst, local, before):
    """Every layer's blocks ``local`` (per group) equal the source's ``remote``; every other byte is as before."""
    for lay in pplan.layout.layers:
        g = lay.group
        assert torch.equal(block_bytes(dst, dplan, lay.name, local[g]), block_bytes(src, pplan, lay.name, remote[g]))
    untouched = ~touched_bytes(dplan, dst, local)
    assert torch.equal(dst.buffers[0][untouched], before[untouched])


def test_pool_layout_is_what_the_test_needs():
    plan = kvl.plan_kv_cache(specs(4), 2 * 48 * 4096)
    assert [g.layer_names for g in plan.groups] == [("l0.attn", "l3.attn"), ("l1.mamba", "l2.mamba"),
                                                    ("l4.mamba", "l5.mamba")]
    assert plan.layout.pool.large_page_pages == 2


CUDA = pytest.param("cuda", True, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                              reason="needs CUDA")])


@pytest.mark.parametrize("device, digests", [("cpu", False), ("cpu", True), CUDA])
def test_pull_moves_attention_and_state_pages_by_group(device, digests):
    p, pplan, src = engine(1, digests=digests, device=device)
    d, dplan, dst = engine(2, digests=digests, device=device)
    before = dst.buffers[0].clone()
    remote, local = request_ids(pplan, 1), request_ids(dplan, 2)
    with p, d:
        params = p.hold_blocks("r", remote)
        assert params["block_ids"] == {str(g): ids for g, ids in remote.items()}
        d.start_load("r", params["engine"], params["block_ids"], local, hold_token=params["hold_token"])
        assert not settle([d], {(0, "finished", "r")})
        check_moved(pplan, src, remote, dplan, dst, local, before)
        deadline = time.monotonic() + 5
        while p.stats["holds"] and time.monotonic() < deadline:
            p.poll()
            time.sleep(0.002)
        assert p.stats["holds"] == 0


def test_push_moves_a_hybrid_request():
    p, pplan, src = engine(3)
    d, dplan, dst = engine(4)
    before = dst.buffers[0].clone()
    remote, local = request_ids(pplan, 3), request_ids(dplan, 4)
    with p, d:
        grant = d.grant_blocks("w", local, p.address)
        p.start_push("w", grant, remote)
        assert not settle([p, d], {(0, "pushed", "w"), (1, "finished", "w")})
        check_moved(pplan, src, remote, dplan, dst, local, before)


def test_tp1_to_tp2_slices_heads_and_replicates_padded_states():
    """Each TP-2 decode rank reads its two heads of every attention page and the whole state of every state
    page (the state pages are padded differently: 2 small pages of 4 KiB vs 3 of 2 KiB)."""
    p, pplan, src = engine(5)
    ranks = [engine(20 + r, heads=2, tp_rank=r, tp_size=2) for r in (0, 1)]
    assert ranks[0][1].layout.pool.large_page_pages == 3
    remote = request_ids(pplan, 5)
    try:
        for r, (d, dplan, dst) in enumerate(ranks):
            local = request_ids(dplan, 30 + r)
            params = p.hold_blocks(f"t{r}", remote)
            d.start_load(f"t{r}", params["engine"], params["block_ids"], local, hold_token=params["hold_token"])
            assert not settle([d], {(0, "finished", f"t{r}")})
            head = 16 * 32 * 2                                       # one head of one 16-token page
            for lay in pplan.layout.layers:
                g = lay.group
                span = slice(2 * r * head, (2 * r + 2) * head) if lay.kind == "attention" else None
                assert torch.equal(block_bytes(dst, dplan, lay.name, local[g]),
                                   block_bytes(src, pplan, lay.name, remote[g], span))
    finally:
        p.close()
        for d, _, _ in ranks:
            d.close()


def _global_rows(caches, plan, name, block, rank, tp):
    """``(conv rows, ssm heads)`` of state block ``block`` of layer ``name`` as {global row: bytes}."""
    spec = plan.specs[name]
    page = caches[name][block].reshape(-1)
    out = {}
    conv, ssm = spec.slices()
    x, g = 32 // tp, 16 // tp
    rows = page[conv.byte_offset:conv.byte_offset + conv.nbytes].view(-1, 6)       # 3 fp16 per row
    for i in range(rows.shape[0]):
        part, j = (0, i) if i < x else ((1, i - x) if i < x + g else (2, i - x - g))
        out[("conv", (0, 32, 48)[part] + rank * (x, g, g)[part] + j)] = rows[i]
    heads = page[ssm.byte_offset:ssm.byte_offset + ssm.nbytes].view(-1, 8 * 8 * 4)
    for i in range(heads.shape[0]):
        out[("ssm", rank * (4 // tp) + i)] = heads[i]
    return out


def test_tp_sliced_states_move_between_tp_sizes():
    """States that TP cut by rows (x | B | C of a Mamba2 conv, SSM heads): TP 1 -> 2 gives each rank exactly
    its rows, TP 2 -> 1 assembles every row from both ranks; the pages' padding is not moved."""
    p, pplan, src = engine(40, sharded=True)
    ranks = [engine(50 + r, heads=2, tp_rank=r, tp_size=2, sharded=True) for r in (0, 1)]
    d1, d1plan, d1caches = engine(60, sharded=True)
    state_layers = [n for n in pplan.specs if "mamba" in n]
    try:
        remote = request_ids(pplan, 40)
        for r, (d, dplan, dst) in enumerate(ranks):
            local = request_ids(dplan, 70 + r)
            params = p.hold_blocks(f"s{r}", remote)
            d.start_load(f"s{r}", params["engine"], params["block_ids"], local, hold_token=params["hold_token"])
            assert not settle([d], {(0, "finished", f"s{r}")})
            for name in state_layers:
                g = dplan.layout.layer(name).group
                got = _global_rows(dst, dplan, name, local[g][0], r, 2)
                want = _global_rows(src, pplan, name, remote[g][0], 0, 1)
                assert len(got) == 32 + 2 and all(torch.equal(v, want[k]) for k, v in got.items())
        # TP 2 -> 1: the decode engine reads from both ranks (rank 0 first: the primary)
        ids = [request_ids(dplan, 80 + r) for r, (_, dplan, _) in enumerate(ranks)]
        ids[1] = ids[0]                                     # the same ids on both ranks, as one engine's scheduler
        params = [c.hold_blocks("back", ids[0]) for c, _, _ in ranks]
        local = request_ids(d1plan, 90)
        d1.start_load("back", [q["engine"] for q in params], params[0]["block_ids"], local,
                      hold_token=[q["hold_token"] for q in params])
        assert not settle([d1], {(0, "finished", "back")})
        for name in state_layers:
            g = d1plan.layout.layer(name).group
            got = _global_rows(d1caches, d1plan, name, local[g][0], 0, 1)
            want = {}
            for r, (_, dplan, dst) in enumerate(ranks):
                want.update(_global_rows(dst, dplan, name, ids[0][g][0], r, 2))
            assert len(got) == 64 + 4 and set(got) == set(want)
            assert all(torch.equal(v, want[k]) for k, v in got.items())
    finally:
        for c in [p, d1] + [c for c, _, _ in ranks]:
            c.close()


def test_ids_that_would_reach_the_wrong_group_are_refused():
    p, pplan, _ = engine(7)
    with p:
        with pytest.raises(KVLayoutError, match="hybrid page pool.*group: ids"):
            p.hold_blocks("a", [1, 2])                             # one sequence for every layer
        with pytest.raises(KVLayoutError, match="span several groups"):
            p.hold_blocks("b", {"attention": [1], "mamba": [2]})    # two Mamba groups: name them
        with pytest.raises(KVLayoutError, match="not both"):
            p.hold_blocks("c", {0: [1], "mamba": [2]})
        with pytest.raises(KVLayoutError, match="no group 9"):
            p.hold_blocks("d", {0: [1], 9: [2]})
        n_states = pplan.groups[1].num_blocks
        with pytest.raises(KVLayoutError, match="out of range"):
            p.hold_blocks("e", {1: [n_states]})                    # a state id past the large pages
        params = p.hold_blocks("f", {0: [1, 2], 1: [0]})
        assert params["block_ids"] == {"0": [1, 2], "1": [0]}
        assert p.hold_blocks("g", {"attention": [3]})["block_ids"] == {"attention": [3]}
    with pytest.raises(KVLayoutError, match="canary_block is not available on a hybrid page pool"):
        engine(8, canary_block=0)


def test_state_spans_worked_example():
    from kvlayout.connectors.topology import state_spans
    states = (("conv", (8, 3), "float16", 16, ((8, True), (4, False))),)
    remote = (("conv", (12, 3), "float16", 0, ((8, True), (4, False))),)
    assert state_spans(states, remote, (1, 2), (0, 1), primary=True) == [(16, 24, 24), (40, 48, 24)]
    assert state_spans(states, remote, (1, 2), (0, 1), primary=False) == [(16, 24, 24)]
