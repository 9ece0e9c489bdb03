"""Push mode: the decode engine grants blocks, the prefill engine WRITEs them and its note rides on the write.
Bytes equal and nothing left reserved; heterogeneous TP both ways; a grant that expires is revoked before its
blocks are free (a write can never land in blocks the engine reused); misdirected bytes fail the digests;
forged notes and revokes change nothing."""

from __future__ import annotations

import time

import pytest
import torch

from kvlayout.connectors import handshake as hs
from kvlayout.connectors import wire
from kvlayout.connectors.nixl_api import nixl_installed
from kvlayout.errors import KVLayoutError
from nixl_engine_proc import build_cache
from test_nixl_connector import pages

pytestmark = pytest.mark.skipif(not nixl_installed(), reason="needs nixl")
SECRET = b"p" * 32
HEAD_BYTES = 1024                      # 16 tokens x 2*16 content x 2 B


def connector(seed: int, heads: int = 4, tp_rank: int = 0, tp_size: int = 1, **kw):
    from kvlayout.connectors import NixlConnector
    plan, caches = build_cache(heads, 32, seed)
    kw.setdefault("handshake_timeout_s", 2.0)
    kw.setdefault("secret", SECRET)
    return NixlConnector(caches, specs=plan.specs, engine_id=f"e{seed}", tp_rank=tp_rank, tp_size=tp_size,
                         **kw), caches


def settle(conns, want, timeout=20.0):
    """Poll every connector until ``want`` (a set of (connector index, field, request id)) all happened."""
    seen, out = set(), {}
    deadline = time.monotonic() + timeout
    while not want <= seen:
        assert time.monotonic() < deadline, f"still waiting for {sorted(want - seen)}; got {out}"
        for i, c in enumerate(conns):
            ev = c.poll()
            for f in ("finished", "pushed"):
                for rid in getattr(ev, f):
                    seen.add((i, f, rid))
            for f in ("failed", "push_failed"):
                for rid, why in getattr(ev, f).items():
                    seen.add((i, f, rid))
                    out[(i, f, rid)] = why
        time.sleep(0.002)
    return out


@pytest.mark.parametrize("digests", [False, True])
def test_push_moves_bytes_and_releases_everything(digests):
    p, src = connector(1, digests=digests)
    d, dst = connector(2, digests=digests)
    before = pages(dst).clone()
    with p, d:
        grant = d.grant_blocks("r1", [10, 3, 21], p.address)
        p.start_push("r1", grant, [7, 8, 30])
        settle([p, d], {(0, "pushed", "r1"), (1, "finished", "r1")})
        assert torch.equal(pages(dst)[:, [10, 3, 21]], pages(src)[:, [7, 8, 30]])
        others = torch.ones(32, dtype=torch.bool)
        others[[10, 3, 21]] = False
        assert torch.equal(pages(dst)[:, others], before[:, others])
        assert d.stats["grants"] == 0 and p.stats["pushes_in_flight"] == 0
        assert d.stats.get("forged_notes", 0) == 0
        # kinds apart: only the attention layers
        grant = d.grant_blocks("r2", {"attention": [5]}, p.address)
        p.start_push("r2", grant, {"attention": [6]})
        settle([p, d], {(0, "pushed", "r2"), (1, "finished", "r2")})
        assert torch.equal(pages(dst)[[0, 2], 5], pages(src)[[0, 2], 6])
        assert torch.equal(pages(dst)[[1, 3], 5], before[[1, 3], 5])


def test_push_between_tp_sizes():
    """TP1 -> TP2 (one writer, each decode rank grants its heads) and TP2 -> TP1 (two writers into one grant;
    the replicated Mamba states come from rank 0 only)."""
    p, src = connector(1)
    ranks = [connector(10 + r, heads=2, tp_rank=r, tp_size=2) for r in (0, 1)]
    try:
        for r, (c, _) in enumerate(ranks):
            p.start_push(f"a{r}", c.grant_blocks("a", [4, 5], p.address), [1, 2])
        settle([p] + [c for c, _ in ranks], {(0, "pushed", "a0"), (0, "pushed", "a1"), (1, "finished", "a"),
                                            (2, "finished", "a")})
        for r, (_, caches) in enumerate(ranks):
            span = slice(2 * r * HEAD_BYTES, (2 * r + 2) * HEAD_BYTES)
            for li in (0, 2):
                assert torch.equal(pages(caches)[li, [4, 5]], pages(src)[li, [1, 2]][:, span])
            for li in (1, 3):
                assert torch.equal(pages(caches)[li, [4, 5], :1216], pages(src)[li, [1, 2], :1216])
        d, dst = connector(2, digests=False)
        with d:
            grant = d.grant_blocks("b", [9], [c.address for c, _ in ranks])
            for c, _ in ranks:
                c.start_push("b", grant, [3])
            settle([d] + [c for c, _ in ranks], {(0, "finished", "b"), (1, "pushed", "b"), (2, "pushed", "b")})
            for r, (_, caches) in enumerate(ranks):
                span = slice(2 * r * HEAD_BYTES, (2 * r + 2) * HEAD_BYTES)
                for li in (0, 2):
                    assert torch.equal(pages(dst)[li, 9][span], pages(caches)[li, 3])
            for li in (1, 3):
                assert torch.equal(pages(dst)[li, 9, :1216], pages(ranks[0][1])[li, 3, :1216])
    finally:
        p.close()
        for c, _ in ranks:
            c.close()


def test_an_expired_grant_is_revoked_before_its_blocks_are_free():
    """The writer never pushes: the grant expires, the decode engine revokes it, the writer then refuses a
    late push of that grant, and only then is the request reported failed."""
    p, _ = connector(1)
    d, dst = connector(2)
    before = pages(dst).clone()
    with p, d:
        grant = d.grant_blocks("late", [4], p.address, timeout_s=0.3)
        why = settle([p, d], {(1, "failed", "late")})
        assert "timed out" in why[(1, "failed", "late")] and "no write can land" in why[(1, "failed", "late")]
        with pytest.raises(KVLayoutError, match="revoked"):
            p.start_push("late", grant, [1])
        assert torch.equal(pages(dst), before)


def test_a_stalled_write_is_cancelled_before_the_grant_fails(monkeypatch):
    """The write never completes: at the grant's deadline the decode engine asks the writer to revoke; the
    writer answers "pending" while its write is live, cancels it, and only then does either side fail."""
    p, _ = connector(1)
    d, _ = connector(2)
    with p, d:
        real = p._agent.check_xfer_state
        monkeypatch.setattr(p._agent, "check_xfer_state", lambda h: "PROC")
        grant = d.grant_blocks("s", [4], p.address, timeout_s=1.0)
        p.start_push("s", {**grant, "expires_in_s": 60.0}, [1])     # the writer's clock would wait longer
        events = {}
        deadline = time.monotonic() + 20
        while "d" not in events:
            assert time.monotonic() < deadline
            ep, ed = p.poll(), d.poll()
            if "s" in ep.push_failed:
                events["p"] = (time.monotonic(), ep.push_failed["s"])
            if "s" in ed.failed:
                events["d"] = (time.monotonic(), ed.failed["s"])
            time.sleep(0.002)
        assert "revoked" in events["p"][1] and events["p"][0] <= events["d"][0]
        monkeypatch.setattr(p._agent, "check_xfer_state", real)


def test_misdirected_bytes_fail_the_digests(monkeypatch):
    p, _ = connector(1, digests=True)
    d, _ = connector(2, digests=True)
    with p, d:
        make = p._agent.make_prepped_xfer
        monkeypatch.setattr(p._agent, "make_prepped_xfer",
                            lambda op, l, li, r, ri, notif_msg=b"": make(op, l, li, r, ri[::-1].copy(), notif_msg=notif_msg))
        grant = d.grant_blocks("m", [4, 5], p.address)
        p.start_push("m", grant, [1, 2])                     # block 1 lands in 5, block 2 in 4
        why = settle([p, d], {(0, "pushed", "m"), (1, "failed", "m")})
        assert "digest mismatch" in why[(1, "failed", "m")]


def test_forged_notes_and_revokes_change_nothing():
    """A connected peer without the grant's token: its "written" note and its revoke are refused, and the
    grant still completes when the real writer pushes."""
    p, _ = connector(1)
    d, _ = connector(2)
    with p, d:
        p.start_push("warm", d.grant_blocks("warm", [3], p.address), [2])      # p now has d's NIXL metadata
        settle([p, d], {(0, "pushed", "warm"), (1, "finished", "warm")})
        grant = d.grant_blocks("f", [4], p.address)
        forged = wire.encode_push_note("f", p.address, True, (0, 4), True, b"", b"x" * 32)
        p._agent.send_notif(p._peers[d.address].agent_name, forged)
        deadline = time.monotonic() + 5
        while d.stats.get("forged_notes", 0) == 0:
            assert time.monotonic() < deadline and not d.poll().finished
            time.sleep(0.005)
        reply = hs.side_request(p.address, {"type": "revoke", "r": "f", "a": d.address, "m": b"y" * 32,
                                            "k": b"z" * 32}, 2.0)
        assert reply["valid"] is False                       # no proof: nothing recorded
        p.start_push("f", grant, [1])                         # so the grant is still good
        settle([p, d], {(0, "pushed", "f"), (1, "finished", "f")})


def test_bad_push_arguments_are_refused_before_anything_starts():
    p, _ = connector(1)
    d, _ = connector(2)
    with p, d:
        grant = d.grant_blocks("g", [4, 5], p.address)
        for bad, match in [({**grant, "grant_token": "00"}, "grant_token"), ({**grant, "extra": 1}, "keys"),
                           ({**grant, "expires_in_s": -1}, "positive"), ("grant", "keys")]:
            with pytest.raises(KVLayoutError, match=match):
                p.start_push("g", bad, [1, 2])
        with pytest.raises(KVLayoutError, match="local but"):
            p.start_push("g", grant, [1])
        with pytest.raises(KVLayoutError, match="out of range"):
            p.start_push("g", grant, [1, 99])
        with pytest.raises(KVLayoutError, match="still receiving"):
            d.grant_blocks("g2", [5, 6], p.address)
        with pytest.raises(KVLayoutError, match="still receiving"):
            d.hold_blocks("g3", [4])
        with pytest.raises(KVLayoutError, match="repeat"):
            d.grant_blocks("g4", [7, 7], p.address)
        assert p.stats["pushes_in_flight"] == 0 and d.stats["grants"] == 1
