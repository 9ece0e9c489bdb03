"""The connector faces a network: each attack is refused. Unauthenticated peers learn nothing, notes and
read confirmations are bound to the hold's token, a read that outlived its hold is never a success, and
engines serving different models refuse each other."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from kvlayout.connectors import handshake as hs
from kvlayout.connectors import wire
from kvlayout.connectors.auth import mac
from kvlayout.connectors.nixl_api import nixl_installed
from kvlayout.errors import KVLayoutError
from nixl_engine_proc import build_cache
from test_nixl_connector import pages, run_until

pytestmark = pytest.mark.skipif(not nixl_installed(), reason="needs nixl")
SECRET = b"s" * 32


def connector(seed: int, **kw):
    from kvlayout.connectors import NixlConnector
    plan, caches = build_cache(4, 32, seed)
    kw.setdefault("handshake_timeout_s", 2.0)
    return NixlConnector(caches, specs=plan.specs, engine_id=f"e{seed}", **kw), caches


def drain(conn, seconds=2.0):
    """Poll ``conn`` for a while; returns the holds it released."""
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        out += conn.poll().released
        if out:
            return out
        time.sleep(0.005)
    return out


def raw_exchange(address: str, *messages) -> list:
    host, port = address.rsplit(":", 1)
    replies = []
    with socket.create_connection((host, int(port)), timeout=5) as s:
        for m in messages:
            hs.send_message(s, m, time.monotonic() + 5)
            replies.append(hs.recv_message(s, time.monotonic() + 5))
    return replies


def test_authenticated_engines_move_bytes_and_release_the_hold():
    p, src = connector(1, secret=SECRET)
    d, dst = connector(2, secret=SECRET)
    with p, d:
        params = p.hold_blocks("a1", [3, 4, 9])
        d.start_load("a1", params["engine"], params["block_ids"], [10, 11, 12], hold_token=params["hold_token"])
        finished, failed = run_until(d, ["a1"], timeout=20)
        assert finished == {"a1"}, failed
        assert torch.equal(pages(dst)[:, [10, 11, 12]], pages(src)[:, [3, 4, 9]])
        (rel,) = drain(p)
        assert rel.ok and rel.request_id == "a1"
        assert p.stats["confirms_valid"] == 1 and p.stats["handshakes_served"] == 1


def test_an_unauthenticated_peer_learns_nothing():
    """No secret, a wrong secret, or a forged hello: the answer is "refused" and nothing else: no record,
    no NIXL metadata, no field names or values."""
    p, _ = connector(1, secret=SECRET)
    with p:
        hello = hs.make_hello(p.record)
        (reply,) = raw_exchange(p.address, hello)                     # skips the challenge
        assert reply == hs.REFUSED
        challenge, reply = raw_exchange(p.address, {"type": "auth", "nonce": b"n" * 32},
                                        {**hello, "proof": b"x" * 32})   # answers it without the key
        assert set(challenge) == {"type", "nonce", "proof"} and reply == hs.REFUSED
        welcome, reason = hs.request_welcome(p.address, p.record, 2.0, key=b"w" * 32)
        assert welcome is None and "could not prove the shared secret" in reason
        welcome, reason = hs.request_welcome(p.address, p.record, 2.0)    # no secret at all
        assert welcome is None and reason.endswith("refused by the remote engine: refused")
        deadline = time.monotonic() + 3     # the wrong-key client hangs up after the challenge: "dropped"
        while p.stats.get("handshakes_dropped", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        st = p.stats
        assert st["handshakes_unauthenticated"] == 3 and st["handshakes_dropped"] == 1 and "handshakes_served" not in st
        d, _ = connector(2)                                            # a decode engine without the secret
        with d:
            d.start_load("x", p.address, [1], [1], hold_token="00" * 16)
            finished, failed = run_until(d, ["x"], timeout=10)
            assert "refused" in failed["x"] and "dtype" not in failed["x"]


def test_a_fake_server_cannot_harvest_the_clients_record():
    """The server proves the secret first: a listener without it gets no hello from a client with one."""
    server = socket.create_server(("127.0.0.1", 0))
    got = []

    def fake():
        conn, _ = server.accept()
        with conn:
            got.append(hs.recv_message(conn, time.monotonic() + 5))
            hs.send_message(conn, {"type": "challenge", "nonce": b"n" * 32, "proof": b"p" * 32}, time.monotonic() + 5)
            try:
                got.append(hs.recv_message(conn, time.monotonic() + 2))
            except Exception:                                        # noqa: BLE001: the client hung up
                pass
    import threading
    t = threading.Thread(target=fake)
    t.start()
    p, _ = connector(1, secret=SECRET)
    with p, server:
        welcome, reason = hs.request_welcome(f"127.0.0.1:{server.getsockname()[1]}", p.record, 3.0, key=SECRET)
        t.join(5)
    assert welcome is None and "could not prove" in reason
    assert [m["type"] for m in got] == ["auth"]                      # the record never left the client


def confirmation(rid: str, token: bytes, blocks) -> dict:
    import msgpack
    return {"type": "confirm", "r": rid, "a": "me", "b": blocks,
            "m": mac(token, "confirm", rid, "me", msgpack.packb(blocks, use_bin_type=True))}


def test_notes_and_confirmations_need_the_holds_token(monkeypatch):
    """A forged "gave up" note, a note claiming success, and confirmations with a wrong token or for a
    request never held leave the hold in place; only the token holder's confirmation releases it."""
    p, _ = connector(1, secret=SECRET)
    with p:
        params = p.hold_blocks("h", [5], timeout_s=30)
        forged = {"agent-x": [wire.encode_notif("h", False, b"f" * 32),
                              wire.encode_notif("h", True, mac(bytes.fromhex(params["hold_token"]), "note", "h", "1"))]}
        monkeypatch.setattr(p._agent, "get_new_notifs", lambda: forged)
        assert p.poll().released == [] and p.stats["forged_notes"] == 2 and p.stats["holds"] == 1
        monkeypatch.setattr(p._agent, "get_new_notifs", lambda: {})
        token = bytes.fromhex(params["hold_token"])
        wrong = confirmation("h", b"t" * 16, [5])
        never = confirmation("nope", token, [5])
        unheld = confirmation("h", token, [5, 6])                      # read a block the hold never had
        assert [hs.confirm_read(p.address, m, 2.0) for m in (wrong, never, unheld)][2][:2] == \
            (False, "block 6 was read but request 'h' never held it here")
        assert p.poll().released == [] and p.stats["holds"] == 1 and p.stats["confirms_refused"] == 3
        good = confirmation("h", token, [5])
        assert hs.confirm_read(p.address, good, 2.0)[:2] == (True, "")
        (rel,) = p.poll().released
        assert rel.ok and p.stats["holds"] == 0
        assert hs.confirm_read(p.address, good, 2.0)[0] is False     # once released, never again


def test_a_read_that_outlives_its_hold_fails(monkeypatch):
    """The decode engine stalls past the prefill's hold timeout; the prefill releases the blocks; the
    read then completes: the load fails with the reason, it is never reported finished."""
    p, _ = connector(1, secret=SECRET)
    d, _ = connector(2, secret=SECRET)
    with p, d:
        params = p.hold_blocks("late", [7, 8], timeout_s=0.5)
        real = d._agent.check_xfer_state
        resume = time.monotonic() + 1.0
        monkeypatch.setattr(d._agent, "check_xfer_state",
                            lambda h: "PROC" if time.monotonic() < resume else real(h))
        d.start_load("late", params["engine"], params["block_ids"], [1, 2], hold_token=params["hold_token"])
        (rel,) = drain(p, 3.0)                                         # the prefill gives the blocks back
        assert not rel.ok and "timed out" in rel.reason
        finished, failed = run_until(d, ["late"], timeout=10)
        assert not finished and "not valid" in failed["late"] and "another request" in failed["late"]
        assert p.stats["confirms_refused"] == 1


def test_engines_serving_different_models_refuse_each_other():
    p, _ = connector(1, secret=SECRET, model_id="llama-3.1-8b@abc")
    d, _ = connector(2, secret=SECRET, model_id="llama-3.1-8b@def")
    with p, d:
        d.start_load("m", p.address, [1], [1], hold_token="00" * 16)
        finished, failed = run_until(d, ["m"], timeout=10)
        assert "model_id" in failed["m"] and "@abc" in failed["m"]    # the peer proved the secret: details ok


def test_binding_beyond_loopback_needs_a_secret(monkeypatch):
    with pytest.raises(KVLayoutError, match="without a shared secret"):
        connector(1, host="0.0.0.0")
    c, _ = connector(1, host="0.0.0.0", allow_unauthenticated=True)
    c.close()
    monkeypatch.setenv("KVLAYOUT_CONNECTOR_SECRET", "e" * 32)
    c, _ = connector(1, host="0.0.0.0")                                # the secret from the environment
    with c:
        assert c._key == b"e" * 32
    with pytest.raises(KVLayoutError, match="at least 16 bytes"):
        connector(1, secret=b"short")


def test_idle_and_trickling_connections_do_not_starve_handshakes():
    """300 idle connections and 16 that trickle one byte a second are held open while 30 legitimate
    handshakes run: at least 99% of them (here: all) succeed."""
    import threading
    p, _ = connector(1, secret=SECRET)
    host, port = p.address.rsplit(":", 1)
    stop = threading.Event()
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(300)]

    def trickle():
        with socket.create_connection((host, int(port)), timeout=5) as s:
            while not stop.is_set():
                try:
                    s.send(b"K")
                except OSError:
                    return
                stop.wait(1.0)
    tricklers = [threading.Thread(target=trickle, daemon=True) for _ in range(16)]
    for t in tricklers:
        t.start()
    results = []

    def legit():
        w, reason = hs.request_welcome(p.address, p.record, 5.0, key=SECRET)
        results.append(w is not None or reason)
    try:
        with p:
            workers = [threading.Thread(target=legit) for _ in range(30)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(15)
    finally:
        stop.set()
        for s in idle:
            s.close()
    assert sum(r is True for r in results) >= 0.99 * 30 and len(results) == 30, (p.stats, results[:2])


def test_ipv6_and_an_advertised_address():
    c, _ = connector(1, host="::1")
    with c:
        assert c.address.startswith("[::1]:")
        welcome, reason = hs.request_welcome(c.address, c.record, 2.0)
        assert welcome is not None, reason
    c, _ = connector(1, host="0.0.0.0", secret=SECRET, advertise_host="127.0.0.1")
    with c:                                                           # bound everywhere, advertised as asked
        assert c.address == f"127.0.0.1:{c._server.port}"
        assert c.hold_blocks("x", [1])["engine"] == c.address
        assert hs.request_welcome(c.address, c.record, 2.0, key=SECRET)[0] is not None


# ---- end-to-end integrity: digests -------------------------------------------------------------------------

def load_one(p, d, rid, remote, local, engines=None, tokens=None):
    if engines is None:
        params = p.hold_blocks(rid, remote)
        engines, tokens = params["engine"], params["hold_token"]
    d.start_load(rid, engines, remote, local, hold_token=tokens)
    return run_until(d, [rid], timeout=20)


def test_digests_pass_equal_bytes_and_fail_a_corrupted_block():
    p, src = connector(1, secret=SECRET, digests=True)
    d, dst = connector(2, secret=SECRET, digests=True)
    with p, d:
        finished, failed = load_one(p, d, "ok", [3, 4, 9], [10, 11, 12])
        assert finished == {"ok"}, failed
        assert torch.equal(pages(dst)[:, [10, 11, 12]], pages(src)[:, [3, 4, 9]])
        params = p.hold_blocks("bad", [5, 6])
        pages(src)[2, 6, 1100] ^= 0x10                    # block 6 of layer 2 changes after it was digested
        d.start_load("bad", params["engine"], [5, 6], [20, 21], hold_token=params["hold_token"])
        finished, failed = run_until(d, ["bad"], timeout=20)
        assert not finished and "digest mismatch in head slot 1 of local block 21" in failed["bad"], failed
        params = p.hold_blocks("mamba", {"attention": [7], "mamba": [8]})
        pages(src)[3, 8, 100] ^= 0x01                     # a Mamba state byte
        finished, failed = load_one(p, d, "mamba", {"attention": [7], "mamba": [8]},
                                    {"attention": [30], "mamba": [31]}, params["engine"], params["hold_token"])
        assert "local block 31 (mamba layers)" in failed["mamba"], failed
        pages(src)[1, 14, 1300] ^= 0x01                  # Mamba page padding: copied, but only the state is digested
        finished, failed = load_one(p, d, "pad", {"mamba": [14]}, {"mamba": [15]})
        assert finished == {"pad"}, failed


def test_digests_follow_head_slices_between_tp_sizes():
    """TP2 -> TP1: each prefill rank digests its 2 heads; the decode engine compares each half with the rank
    it came from, and a corrupted head on rank 1 is named by its local head slot."""
    from kvlayout.connectors import NixlConnector
    ranks = []
    for r in (0, 1):
        plan, caches = build_cache(2, 32, 10 + r)
        ranks.append((NixlConnector(caches, specs=plan.specs, engine_id=f"t{r}", tp_rank=r, tp_size=2,
                                    secret=SECRET, digests=True, handshake_timeout_s=2.0), caches))
    d, dst = connector(2, secret=SECRET, digests=True)
    try:
        holds = [c.hold_blocks("h", [1, 2]) for c, _ in ranks]
        engines, tokens = [h["engine"] for h in holds], [h["hold_token"] for h in holds]
        finished, failed = load_one(None, d, "h", [1, 2], [5, 6], engines, tokens)
        assert finished == {"h"}, failed
        holds = [c.hold_blocks("x", [3]) for c, _ in ranks]
        pages(ranks[1][1])[0, 3, 1500] ^= 0x04            # rank 1's second head (global head 3)
        finished, failed = load_one(None, d, "x", [3], [7], [h["engine"] for h in holds],
                                    [h["hold_token"] for h in holds])
        assert "head slot 3 of local block 7" in failed["x"], failed
    finally:
        d.close()
        for c, _ in ranks:
            c.close()


def test_a_decode_engine_that_wants_digests_fails_loads_without_them():
    p, _ = connector(1, secret=SECRET)
    d, _ = connector(2, secret=SECRET, digests=True)
    with p, d:
        finished, failed = load_one(p, d, "n", [3], [4])
        assert "digests=True" in failed["n"], failed


# ---- the geometry canary ---------------------------------------------------------------------------------

def test_the_canary_passes_a_true_layout_and_fails_a_mismatched_one():
    p, src = connector(1, secret=SECRET, canary_block=31)
    d, dst = connector(2, secret=SECRET, canary_block=31)
    with p, d:
        finished, failed = load_one(p, d, "ok", [3, 4], [5, 6])
        assert finished == {"ok"} and d.stats["canaries_ok"] == 1, failed
        assert torch.equal(pages(dst)[:, [5, 6]], pages(src)[:, [3, 4]])
        with pytest.raises(KVLayoutError, match="canary block"):
            p.hold_blocks("c", [31])
        with pytest.raises(KVLayoutError, match="canary block"):
            d.start_load("c", p.address, [1], [31], hold_token="00" * 16)
    p, _ = connector(3, secret=SECRET, canary_block=20)
    d, _ = connector(4, secret=SECRET)
    with p, d:
        p._server.welcome["regions"][2][3] += 4096      # layer 2's block stride announced wrong
        finished, failed = load_one(p, d, "bad", [3], [5])
        assert "geometry canary mismatch in layer(s) ['l2.attn']" in failed["bad"], failed
        assert d.stats["canaries_failed"] == 1 and d.stats.get("loads_finished", 0) == 0
