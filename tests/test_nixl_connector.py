"""NIXL connector: topology, handshake and two-process transfers on 127.0.0.1 (CPU), one VRAM test (GPU)."""

import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

import kvlayout as kvl
from kvlayout.connectors import handshake as hs
from kvlayout.connectors import record, wire
from kvlayout.connectors.block_ids import as_block_ids
from kvlayout.connectors.nixl_api import nixl_installed
from kvlayout.connectors.descriptors import TransferPlan, coalesce
from kvlayout.connectors.regions import Region, layer_regions
from kvlayout.connectors.schema import HandshakeError
from kvlayout.connectors.topology import pair_regions
from kvlayout.errors import KVLayoutError

sys.path.insert(0, str(Path(__file__).parent))
from nixl_engine_proc import build_cache, model_specs  # noqa: E402

HELPER = str(Path(__file__).parent / "nixl_engine_proc.py")
HAVE_NIXL = nixl_installed()
needs_nixl = pytest.mark.skipif(not HAVE_NIXL, reason="needs the nixl package (pip install kvlayout[nixl])")
PREFILL_SEED, DECODE_SEED, TP2_SEEDS = 11, 22, (31, 32)
HEAD_BYTES = 16 * 2 * 16 * 2            # block_size * 2*head_size * fp16 itemsize: one head slot of a block


# ------------------------------------------------------------------------------------------- helpers

class Engine:
    """An engine subprocess (tests/nixl_engine_proc.py) driven by JSON lines, with hard timeouts."""

    def __init__(self, tmp: Path, **cfg):
        self.log_path = tmp / f"{cfg['engine_id']}.log"
        self.proc = subprocess.Popen([sys.executable, HELPER, json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(self.log_path, "w"),
                                     env=dict(os.environ, UCX_NET_DEVICES="lo"))
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.address = None

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(b"@@"):
                self.lines.put(json.loads(line[2:]))

    def _next(self, timeout):
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise AssertionError(f"engine gave no answer in {timeout} s; log:\n{self.log_path.read_text()[-3000:]}")

    def ready(self, timeout=90):
        if self.address is None:
            self.address = self._next(timeout)["address"]
        return self

    def call(self, timeout=30, **cmd):
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        out = self._next(timeout)
        assert "error" not in out, out["error"]
        return out

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def close(self):
        try:
            if self.proc.poll() is None:
                self.call(timeout=10, cmd="exit")
        finally:
            self.kill()


NO_TOKEN = "00" * 16                  # a well-formed hold token no engine gave out


def run_until(conn, request_ids, timeout=30.0):
    """Poll ``conn`` until every id finished or failed; returns (finished set, failed dict)."""
    want, finished, failed = set(request_ids), set(), {}
    deadline = time.monotonic() + timeout
    while not want <= finished | set(failed):
        assert time.monotonic() < deadline, f"unresolved after {timeout} s: {sorted(want - finished - set(failed))[:5]}"
        ev = conn.poll()
        finished.update(ev.finished)
        failed.update(ev.failed)
        time.sleep(0.001)
    return finished, failed


def pages(caches):
    """``(layers, blocks, page bytes)`` byte view of a one-group cache (layer-major layout)."""
    return caches.group_blocks_view(0)


ATTN, MAMBA = [0, 2], [1, 3]           # layer indices of the test model


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Three engine processes started together: P1 (TP1, 4 heads) and the two ranks of a TP2 engine."""
    if not HAVE_NIXL:
        pytest.skip("needs nixl")
    tmp = tmp_path_factory.mktemp("engines")
    procs = {"P1": Engine(tmp, engine_id="P1", seed=PREFILL_SEED, heads=4)}
    for r in (0, 1):
        procs[f"T{r}"] = Engine(tmp, engine_id=f"T{r}", heads=2, tp_rank=r, tp_size=2, seed=TP2_SEEDS[r])
    try:
        yield {k: e.ready() for k, e in procs.items()}
    finally:
        for e in procs.values():
            e.close()


@pytest.fixture(scope="module")
def prefill(engines):
    return engines["P1"]


@pytest.fixture(scope="module")
def tp2(engines):
    return [engines["T0"], engines["T1"]]


@pytest.fixture(scope="module")
def expected():
    """The prefill engine's cache contents, rebuilt here from the same seed."""
    return pages(build_cache(4, 256, PREFILL_SEED)[1])


@pytest.fixture(scope="module")
def decode():
    if not HAVE_NIXL:
        pytest.skip("needs nixl")
    from kvlayout.connectors import NixlConnector
    plan, caches = build_cache(4, 256, DECODE_SEED)
    conn = NixlConnector(caches, specs=plan.specs, engine_id="D", load_timeout_s=10, handshake_timeout_s=2,
                         telemetry=True)
    yield conn
    conn.close()


# ---------------------------------------------------------------------------------- topology (no NIXL)

def test_regions_come_from_strides_and_offsets():
    plan, caches = build_cache(4, 32, 0)
    regions = layer_regions(caches)
    buf = caches.buffers[0]
    for lay, r in zip(caches.layout.layers, regions):
        t = caches[lay.name]
        assert r.layers == (lay.name,) and r.kind == lay.kind and r.num_blocks == 32
        assert r.base == buf.data_ptr() + lay.byte_offset == t.data_ptr()
        assert r.block_len == lay.block_bytes == 4096 and r.block_stride == lay.block_stride_bytes
        assert r.num_heads == (4 if lay.kind == "attention" else 1)
    assert len(_self_plan(regions).pairs) == 4                 # one pair per layer

    specs = {f"l{i}": kvl.AttentionSpec(2, 16, torch.float16, 16) for i in range(3)}
    cross = kvl.allocate_kv_cache(kvl.plan_kv_cache(specs, 3 * 2048 * 10, cross_layer=True))
    per_layer = layer_regions(cross)
    assert [r.block_stride for r in per_layer] == [3 * 2048] * 3
    assert [r.base - per_layer[0].base for r in per_layer] == [0, 2048, 4096]
    ((one, _),) = _self_plan(per_layer).pairs                   # one per cross-layer allocation
    assert (one.base, one.block_len, one.block_stride, one.num_blocks) == (cross.buffers[0].data_ptr(), 6144, 6144, 10)

    bad = kvl.KVCache(caches.layout, caches.buffers, {**caches, "l0.attn": caches["l0.attn"].transpose(1, 2)})
    with pytest.raises(KVLayoutError, match="contiguous"):
        layer_regions(bad)


def _self_plan(regions):
    """Pair regions with a same-format remote at another address (start 1<<40), whole blocks."""
    remote = {r.layers[0]: Region(r.layers, r.kind, 0, r.base + (1 << 40), r.block_len, r.block_stride, r.num_blocks,
                                  r.num_heads) for r in regions}
    starts = {r.layers[0]: 0 for r in regions}
    return TransferPlan(pair_regions(regions, remote, starts, starts))


def _runs(local, remote):
    """Start indices of the runs of id pairs that are adjacent on both sides."""
    brk = np.concatenate([[True], (np.diff(local) != 1) | (np.diff(remote) != 1)])
    return np.flatnonzero(brk)


def test_coalescing_reduces_descriptor_counts():
    rng = np.random.default_rng(0)
    _, caches = build_cache(4, 64, 0)
    plan = _self_plan(layer_regions(caches))
    contiguous = as_block_ids(np.arange(8, 24), "t"), as_block_ids(np.arange(40, 56), "t")
    la, ra, ln = plan.descriptors(*contiguous)
    assert la.size == 4 and (ln == 16 * 4096).all()           # one descriptor per layer for 16 adjacent blocks
    assert plan.indices(*contiguous)[0].size == 64
    local, remote = rng.permutation(64)[:16], rng.permutation(64)[:16]
    runs = _runs(local, remote)
    assert plan.descriptors(as_block_ids(local, "t"), as_block_ids(remote, "t"))[0].size == 4 * len(runs)
    split = as_block_ids([1, 2, 3, 10, 11], "t"), as_block_ids([5, 6, 7, 20, 21], "t")
    assert plan.descriptors(*split)[0].size == 4 * 2
    reversed_ = as_block_ids([3, 2, 1], "t"), as_block_ids([7, 6, 5], "t")
    assert plan.descriptors(*reversed_)[0].size == 4 * 3

    # cross-layer: one descriptor for all layers and 16 adjacent blocks
    specs = {f"l{i}": kvl.AttentionSpec(4, 16, torch.float16, 16) for i in range(4)}
    cross = kvl.allocate_kv_cache(kvl.plan_kv_cache(specs, 4 * 4096 * 64, cross_layer=True))
    cplan = _self_plan(layer_regions(cross))
    assert len(cplan.pairs) == 1 and cplan.descriptors(*contiguous)[0].size == 1
    assert cplan.indices(*contiguous)[0].size == 16
    per_layer = kvl.allocate_kv_cache(kvl.plan_kv_cache(specs, 4 * 4096 * 64))     # mixed: pairs layer by layer
    mixed = TransferPlan(pair_regions(layer_regions(cross), {r.layers[0]: r for r in layer_regions(per_layer)},
                                      {n: 0 for n in specs}, {n: 0 for n in specs}))
    assert len(mixed.pairs) == 4 and mixed.descriptors(*contiguous)[0].size == 4 * 16

    # the older layout (K and V separate regions per layer) needs twice the per-layer count
    kv_split = [Region(r.layers, r.kind, 0, r.base + half * 64 * 2048, 2048, 2048, 64)
                for r in layer_regions(caches) for half in (0, 1)]
    old = TransferPlan([(r, Region(r.layers, r.kind, 0, r.base + (1 << 40), 2048, 2048, 64)) for r in kv_split])
    assert old.descriptors(*contiguous)[0].size == 8
    assert old.descriptors(as_block_ids(local, "t"), as_block_ids(remote, "t"))[0].size == 8 * len(runs)

    la, ra, ln = coalesce(np.array([0, 10, 30]), np.array([100, 110, 120]), np.array([10, 10, 10]))
    assert la.tolist() == [0, 30] and ra.tolist() == [100, 120] and ln.tolist() == [20, 10]


def test_head_slices_for_heterogeneous_tp():
    _, pre = build_cache(4, 16, 0)                              # TP1: heads 0..3
    _, dec = build_cache(2, 16, 0)                              # TP2 ranks: 2 heads each
    pre_r = {r.layers[0]: r for r in layer_regions(pre)}
    dec_r = layer_regions(dec)
    state = {"l1.mamba": 1216, "l3.mamba": 1216}
    for rank in (0, 1):
        starts = {r.layers[0]: 2 * rank for r in dec_r}
        pairs = pair_regions(dec_r, pre_r, starts, {n: 0 for n in pre_r}, replicated_len=state)
        by = {lp.layers[0]: (lp, rp) for lp, rp in pairs}
        lp, rp = by["l0.attn"]
        assert rp.base == pre_r["l0.attn"].base + 2 * rank * HEAD_BYTES and rp.block_len == 2 * HEAD_BYTES
        assert rp.block_stride == 4 * HEAD_BYTES and lp.block_len == lp.block_stride == 2 * HEAD_BYTES
        lp, rp = by["l1.mamba"]                                # replicated: the states, not the padding
        assert lp.block_len == rp.block_len == 1216 and rp.base == pre_r["l1.mamba"].base
    # the other way (TP2 -> TP1): the TP1 rank reads heads 0-1 from rank 0 and 2-3 from rank 1
    dec_named = {r.layers[0]: r for r in dec_r}
    pre_list = layer_regions(pre)
    for rank in (0, 1):
        pairs = pair_regions(pre_list, dec_named, {n: 0 for n in pre_r}, {n: 2 * rank for n in dec_named},
                             replicated=rank == 0, replicated_len=state)
        lp, rp = pairs[0]
        assert lp.base == pre_r["l0.attn"].base + 2 * rank * HEAD_BYTES and lp.block_len == 2 * HEAD_BYTES
        assert {p[0].kind for p in pairs} == ({"attention", "mamba"} if rank == 0 else {"attention"})
    plan = TransferPlan(pair_regions(dec_r, pre_r, {r.layers[0]: 2 for r in dec_r}, {n: 0 for n in pre_r},
                                     replicated_len=state))
    ids = as_block_ids([0, 1, 2], "t")
    assert plan.descriptors(ids, ids)[0].size == 4 * 3           # partial blocks never merge across blocks

    mla = {"m0": kvl.MLASpec(32, 16, torch.float16, 16)}
    a = kvl.allocate_kv_cache(kvl.plan_kv_cache(mla, 1536 * 8))
    (ra,) = layer_regions(a)
    assert pair_regions([ra], {"m0": ra}, {}, {}) == [(ra, ra)]          # replicated: whole blocks
    assert pair_regions([ra], {"m0": ra}, {}, {}, replicated=False) == []


# --------------------------------------------------------------------------------- handshake (no NIXL)

def _record(**kw):
    heads, dtype, bs = kw.pop("heads", 4), kw.pop("dtype", torch.float16), kw.pop("block_size", 16)
    plan, caches = build_cache(heads, 8, 0, dtype=dtype, block_size=bs)
    return record.build_record(caches, engine_id=kw.pop("engine_id", "e"), agent_name="a", specs=plan.specs, **kw)


def test_record_roundtrip_and_mismatch_names_fields():
    rec = _record(tp_rank=1, tp_size=2)
    msg = wire.decode_payload(wire.encode_frame(hs.make_hello(rec))[8:])
    assert hs.parse_hello(msg) == rec
    assert [l.head_start for l in rec.layers if l.kind == "attention"] == [4, 4]
    assert record.compare_records(_record(), _record(heads=2, tp_rank=1, tp_size=2)) == []   # TP may differ
    diffs = record.compare_records(_record(), _record(dtype=torch.bfloat16, block_size=32))
    fields = {d.field for d in diffs}
    assert {"layers[l0.attn].dtype", "layers[l2.attn].dtype", "layers[l0.attn].block_size"} <= fields
    assert record.compare_records(_record(), _record(heads=2))[0].field == "layers[l0.attn].total_heads"
    with pytest.raises(HandshakeError, match=r"layers\[l0.attn\].dtype \(p: 'float16', d: 'bfloat16'\)") as ei:
        record.check_compatible(_record(engine_id="p"), _record(engine_id="d", dtype=torch.bfloat16))
    assert "layers[l0.attn].dtype" in ei.value.fields


def test_malformed_messages_are_rejected_cleanly():
    good = _record().to_wire()
    mutations = [
        lambda w: w.update(extra=1), lambda w: w.pop("tp_size"), lambda w: w.update(tp_rank=5),
        lambda w: w.update(tp_size="2"), lambda w: w.update(engine_id="x" * 1000),
        lambda w: w["layers"][0].update(dtype="float64"), lambda w: w["layers"][0].update(page_bytes=1),
        lambda w: w["layers"][0].update(num_heads=True), lambda w: w["layers"].append(dict(w["layers"][0])),
        lambda w: w["layers"][1].update(states=[["conv", [1 << 30], "float16", 0]]),
        lambda w: w.update(layers={"a": 1}), lambda w: w.update(layout="other"),
    ]
    for mutate in mutations:
        w = msgpack.unpackb(msgpack.packb(good))
        mutate(w)
        with pytest.raises(HandshakeError):
            hs.parse_hello({"type": "hello", "record": w})
    with pytest.raises(HandshakeError, match="connector_version"):
        record.parse_record({**good, "connector_version": 99})
    rng = np.random.default_rng(1)
    for n in (0, 1, 7, 100, 5000):                               # garbage never escapes as another error
        for _ in range(20):
            try:
                hs.parse_hello(wire.decode_payload(rng.integers(0, 256, n, dtype=np.uint8).tobytes()))
            except HandshakeError:
                pass
    with pytest.raises(HandshakeError, match="exceeds"):
        wire.decode_payload(b"\x00" * (wire.MAX_MESSAGE_BYTES + 1))
    with pytest.raises(HandshakeError):
        wire.decode_payload(msgpack.packb([1] * 10) + b"extra")
    assert wire.decode_notif(b"\xff\x00") is None and wire.decode_notif(msgpack.packb({"r": "x"})) is None
    assert wire.decode_notif(wire.encode_notif("req", True, b"p" * 32)) == ("req", True, b"p" * 32)

    a, b = socket.socketpair()
    with a, b:
        b.sendall(wire.MAGIC + struct.pack(">I", 1 << 31))          # oversized length: refused before reading it
        with pytest.raises(HandshakeError, match="exceeds"):
            wire.recv_message(a, time.monotonic() + 1)
        b.sendall(b"GET / HT")
        with pytest.raises(HandshakeError, match="header"):
            wire.recv_message(a, time.monotonic() + 1)
        with pytest.raises(TimeoutError):
            wire.recv_message(a, time.monotonic() + 0.05)           # silent peer


def _welcome_for(rec):
    regions = [hs.RemoteRegion(l.name, (i + 1) << 20, l.page_bytes, l.page_bytes, 8) for i, l in enumerate(rec.layers)]
    return hs.make_welcome(rec, b"agent-metadata", "DRAM", 0, regions)


def test_handshake_halves_over_sockets():
    ours = _record(engine_id="p")
    welcome = _welcome_for(ours)
    for peer, outcome in ((_record(engine_id="d"), "served"), (_record(engine_id="d", dtype=torch.bfloat16), "refused")):
        a, b = socket.socketpair()
        with a, b:
            wire.send_message(b, hs.make_hello(peer), time.monotonic() + 1)
            reply, got = hs.reply_to_hello(a, ours, welcome, time.monotonic() + 1)
        assert got == outcome
        if outcome == "served":
            assert reply is welcome and hs.parse_reply(wire.decode_payload(wire.encode_frame(reply)[8:])).record == ours
    assert reply["type"] == "refused" and "layers[l0.attn].dtype" in reply["fields"]
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"GET / HT")
        assert hs.reply_to_hello(a, ours, welcome, time.monotonic() + 1)[1] == "malformed"
        with pytest.raises(TimeoutError):                       # a silent peer: the caller counts it dropped
            hs.reply_to_hello(a, ours, welcome, time.monotonic() + 0.05)

    server = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{server.getsockname()[1]}"

    def serve_one():
        conn, _ = server.accept()
        with conn:
            deadline = time.monotonic() + 2
            reply, _ = hs.reply_to_hello(conn, ours, welcome, deadline)
            wire.send_message(conn, reply, deadline)

    with server:
        for client, ok in ((_record(engine_id="d"), True), (_record(engine_id="d", block_size=32), False)):
            th = threading.Thread(target=serve_one, daemon=True)
            th.start()
            got, reason = hs.request_welcome(address, client, 2.0)
            th.join(5)
            if ok:
                assert reason is None and got.record == ours and got.agent_metadata == b"agent-metadata"
                assert [r.base for r in got.regions] == [1 << 20, 2 << 20, 3 << 20, 4 << 20]
            else:
                assert got is None and reason.startswith(f"handshake with {address} failed: refused by the remote")
                assert "layers[l0.attn].block_size" in reason
    assert hs.request_welcome(address, ours, 1.0) == (None, f"no engine listens at {address} (connection refused)")


def test_state_machines_move_only_along_their_transitions():
    from kvlayout.connectors.transfer_state import (TRANSITIONS, Hold, HoldState, IllegalTransition, Load,
                                                    LoadState, Peer, PeerState, Transfer, TransferState)
    for states in (PeerState, LoadState, TransferState, HoldState):
        assert set(states) <= set(TRANSITIONS)
        assert all(t in states for s in states for t in TRANSITIONS[s])     # no move leaves its machine
    load = Load("r", "r", ("h:1",), {}, {}, 0.0, 1.0, 1.0)
    with pytest.raises(IllegalTransition, match="Load 'r': WAITING -> FINISHED"):
        load.move(LoadState.FINISHED)
    load.move(LoadState.RUNNING)
    load.abort("gone")
    assert load.state is LoadState.ABORTING and load.reason == "gone"
    with pytest.raises(IllegalTransition):
        load.abort("again")
    load.move(LoadState.FAILED)

    class Handle:
        def __init__(self, ok=True):
            self.ok, self.released = ok, 0

        def release(self):
            if not self.ok:
                raise RuntimeError("busy")
            self.released += 1

    t, h = Transfer("h:1"), Handle()
    assert not t.live
    t.post(h)
    assert t.live and t.handle is h
    t.finish()
    assert t.done and t.handle is None and h.released == 1
    t.cancel()                                                      # finished: nothing to cancel
    assert t.state is TransferState.DONE
    with pytest.raises(IllegalTransition, match="DONE -> POSTED"):
        t.post(Handle())
    stuck = Transfer("h:2")
    stuck.post(Handle(ok=False))
    stuck.cancel()                                                  # NIXL cannot let go yet: still live
    assert stuck.state is TransferState.POSTED and stuck.live
    stuck.handle.ok = True
    stuck.cancel()
    assert stuck.state is TransferState.CANCELLED and stuck.handle is None
    fresh = Transfer("h:3")
    fresh.cancel()
    assert fresh.state is TransferState.CANCELLED

    hold = Hold("r", [1], 2, 10.0, 10.0)
    hold.note("x", True)
    assert hold.settle(5.0) is None and hold.state is HoldState.HELD
    hold.note("y", False)
    assert hold.settle(5.0) == ("1 of 2 reader(s) gave up", False) and hold.state is HoldState.RELEASED
    with pytest.raises(IllegalTransition):
        hold.move(HoldState.CANCELLED)
    late = Hold("e", [1], 1, 1.0, 1.0)
    assert late.settle(2.0) == ("timed out after 1 s with 0 of 1 reader(s) done", False)
    assert late.state is HoldState.EXPIRED

    peer = Peer("h:1")
    assert peer.state is PeerState.CONNECTING and not peer.ready
    peer.move(PeerState.READY)
    assert peer.ready
    peer.move(PeerState.FAILED)
    with pytest.raises(IllegalTransition, match="FAILED -> READY"):
        peer.move(PeerState.READY)


def test_nixl_layout_wishes_reach_the_plan():
    from kvlayout.connectors import NixlConnector                   # stating wishes needs no nixl package
    from kvlayout.errors import LayoutConflictError
    wish = NixlConnector.layout_wishes()
    assert wish == kvl.ConnectorWishes("nixl", cross_layer=True)
    specs = {f"l{i}": kvl.AttentionSpec(2, 16, torch.float16, 16) for i in range(3)}
    plan = kvl.plan_kv_cache(specs, 3 * 2048 * 10, connector=wish)
    assert plan.groups[0].cross_layer and plan.to_dict()["connector"] == "nixl"
    ((one, _),) = _self_plan(layer_regions(kvl.allocate_kv_cache(plan))).pairs   # one descriptor per block
    assert one.block_len == one.block_stride == 3 * 2048
    assert not kvl.plan_kv_cache(model_specs(4), 1 << 22, connector=wish).groups[0].cross_layer   # hybrid group
    with pytest.raises(LayoutConflictError, match="'nixl' needs block_size 32"):
        kvl.plan_kv_cache(specs, 3 * 2048 * 10, connector=NixlConnector.layout_wishes(block_size=32))


# ------------------------------------------------------------------------- two processes, CPU (NIXL)

@needs_nixl
def test_transfer_bytes_equal_and_other_blocks_untouched(prefill, decode, expected):
    remote = {"attention": [5, 6, 7, 20], "mamba": [100]}
    local = {"attention": [30, 31, 32, 90], "mamba": [7]}
    tok = prefill.call(cmd="hold", holds=[["t1", remote]])["tokens"]
    mine = pages(decode.caches)
    before = mine.clone()
    decode.start_load("t1", prefill.address, remote, local, hold_token=tok["t1"])
    finished, failed = run_until(decode, ["t1"])
    assert finished == {"t1"}, failed
    written = torch.zeros(mine.shape[:2], dtype=torch.bool)
    for layers, kind in ((ATTN, "attention"), (MAMBA, "mamba")):
        for li in layers:
            assert torch.equal(mine[li, local[kind]], expected[li, remote[kind]])
            written[li, local[kind]] = True
    assert torch.equal(mine[~written], before[~written])
    info = decode.transfer_info("t1")
    # attention: 2 layers x 2 runs ([5,6,7] and [20]); Mamba: 2 layers x 1 block
    assert info.num_indices == 2 * 4 + 2 * 1 and info.num_descriptors == 2 * 2 + 2 * 1
    assert info.nixl_descriptors == info.num_descriptors        # NIXL merged exactly what we predicted
    assert info.nbytes == 10 * 4096
    out = prefill.call(cmd="wait", what="holds", request_ids=["t1"], timeout_s=10)
    assert out["released"]["t1"][1] is True
    assert decode.stats["loads_in_flight"] == 0


@needs_nixl
def test_200_concurrent_requests_all_complete(prefill, decode, expected, monkeypatch):
    # 200 confirmations at once can take longer than the fixture's 2 s handshake timeout when the tests share
    # two cores (pytest -n auto); the loads' own 10 s timeout still bounds them
    monkeypatch.setattr(decode, "handshake_timeout_s", 10)
    rng = np.random.default_rng(3)
    remote = rng.integers(0, 256, size=200).tolist()
    local = rng.permutation(256)[:200].tolist()
    ids = [f"c{i}" for i in range(200)]
    tok = prefill.call(cmd="hold", holds=[[rid, [r]] for rid, r in zip(ids, remote)])["tokens"]
    mine = pages(decode.caches)
    for rid, r, l in zip(ids, remote, local):
        decode.start_load(rid, prefill.address, [r], [l], hold_token=tok[rid])
    finished, failed = run_until(decode, ids, timeout=40)
    assert finished == set(ids), list(failed.items())[:3]
    assert torch.equal(mine[:, local], expected[:, remote])
    out = prefill.call(cmd="wait", what="holds", request_ids=ids, timeout_s=20)
    assert len(out["released"]) == 200 and all(ok for _, ok in out["released"].values())
    assert decode.stats["loads_in_flight"] == 0 and prefill.call(cmd="stats")["holds"] == 0


@needs_nixl
def test_handshake_mismatch_is_refused_naming_the_field(prefill):
    from kvlayout.connectors import NixlConnector
    plan, caches = build_cache(4, 16, 0, dtype=torch.bfloat16)
    with NixlConnector(caches, specs=plan.specs, engine_id="Dbf16", handshake_timeout_s=2) as other:
        other.start_load("m1", prefill.address, [1], [1], hold_token=NO_TOKEN)
        finished, failed = run_until(other, ["m1"], timeout=10)
        assert "layers[l0.attn].dtype" in failed["m1"] and "bfloat16" in failed["m1"], failed
        assert other.stats["loads_in_flight"] == 0 and other.stats["peers"] == 0
    assert prefill.call(cmd="stats")["handshakes_refused"] >= 1


@needs_nixl
def test_malformed_handshake_bytes_do_not_hurt_the_engine(prefill, decode, expected):
    host, port = prefill.address.rsplit(":", 1)
    before = prefill.call(cmd="stats").get("handshakes_malformed", 0)
    garbage = [b"GET / HT", wire.MAGIC + struct.pack(">I", 1 << 30),
               wire.MAGIC + struct.pack(">I", 3) + b"\xc1\xc1\xc1",
               wire.encode_frame({"type": "hello", "record": {"connector_version": record.CONNECTOR_VERSION, "x": [1] * 100}}),
               wire.encode_frame({"type": "welcome"}), b"", wire.MAGIC]
    for data in garbage:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            reply = b"".join(iter(lambda: s.recv(65536), b""))
        if len(data) >= 8:                                          # a refusal comes back, framed
            assert reply[:4] == wire.MAGIC
            assert wire.decode_payload(reply[8:])["type"] == "refused"
    assert prefill.call(cmd="stats")["handshakes_malformed"] >= before + 5
    tok = prefill.call(cmd="hold", holds=[["after-garbage", [3]]])["tokens"]      # still serving
    decode.start_load("after-garbage", prefill.address, [3], [200], hold_token=tok["after-garbage"])
    assert run_until(decode, ["after-garbage"])[0] == {"after-garbage"}
    assert torch.equal(pages(decode.caches)[:, 200], expected[:, 3])


@needs_nixl
def test_heterogeneous_tp_each_decode_rank_gets_its_heads(prefill, tp2, expected, tmp_path):
    remote, local = [40, 41, 42, 77], [3, 4, 5, 9]
    tok = prefill.call(cmd="hold", holds=[["h1", remote]], num_readers=2)["tokens"]
    for e in tp2:
        e.call(cmd="load", loads=[["h1", prefill.address, remote, local, tok["h1"]]])
    for e in tp2:
        out = e.call(cmd="wait", what="loads", request_ids=["h1"], timeout_s=20)
        assert out["finished"] == ["h1"], out
    for r, e in enumerate(tp2):
        e.call(cmd="dump", path=str(tmp_path / f"rank{r}"))
        got = torch.from_numpy(np.load(tmp_path / f"rank{r}_0.npy")).view(4, 256, 2048)
        initial = pages(build_cache(2, 256, TP2_SEEDS[r])[1])
        head_span = slice(2 * r * HEAD_BYTES, (2 * r + 2) * HEAD_BYTES)
        for li in ATTN:                                             # exactly this rank's heads
            assert torch.equal(got[li, local], expected[li, remote][:, head_span])
        for li in MAMBA:                                            # replicated states; padding untouched
            assert torch.equal(got[li, local, :1216], expected[li, remote, :1216])
            assert torch.equal(got[li, local, 1216:], initial[li, local, 1216:])
        others = torch.ones(256, dtype=torch.bool)
        others[local] = False
        assert torch.equal(got[:, others], initial[:, others])
    out = prefill.call(cmd="wait", what="holds", request_ids=["h1"], timeout_s=10)
    assert out["released"]["h1"] == ["read by 2 reader(s)", True]


@needs_nixl
def test_killed_prefill_rank_fails_requests_and_leaks_nothing(prefill, tp2, decode, expected):
    """The TP2 ranks serve a TP1 decode engine (each load reads half the heads from each rank); rank 1 is
    killed with loads in flight."""
    ids = [f"k{i}" for i in range(21)]
    src = list(range(20, 28))                                       # blocks the TP2 ranks never wrote
    toks = [e.call(cmd="hold", holds=[[rid, src] for rid in ids])["tokens"] for e in tp2]
    engines = [e.address for e in tp2]
    before = pages(decode.caches).clone()
    decode.start_load("k0", engines, src, list(range(100, 108)), hold_token=[t["k0"] for t in toks])
    assert run_until(decode, ["k0"])[0] == {"k0"}
    mine = pages(decode.caches)
    theirs = [pages(build_cache(2, 256, seed)[1]) for seed in TP2_SEEDS]
    for li in ATTN:                                                 # heads 0-1 from rank 0, 2-3 from rank 1
        assert torch.equal(mine[li, 100:108], torch.cat([t[li, src] for t in theirs], dim=1))
    for li in MAMBA:                                                # states from the first rank listed
        assert torch.equal(mine[li, 100:108, :1216], theirs[0][li, src, :1216])
        assert torch.equal(mine[li, 100:108, 1216:], before[li, 100:108, 1216:])

    for i in range(1, 11):                                          # in flight when rank 1 dies
        decode.start_load(ids[i], engines, src, list(range(100 + 8 * i, 108 + 8 * i)),
                          hold_token=[t[ids[i]] for t in toks])
    os.kill(tp2[1].proc.pid, signal.SIGKILL)
    tp2[1].proc.wait(10)
    for i in range(11, 21):                                         # started before anyone noticed
        decode.start_load(ids[i], engines, src, list(range(8 * (i - 11), 8 * (i - 10))),
                          hold_token=[t[ids[i]] for t in toks])
    finished, failed = run_until(decode, ids[1:], timeout=20)
    assert set(ids[11:]) <= set(failed), (finished, failed)
    assert all(tp2[1].address in reason for reason in failed.values()), failed
    assert decode.stats["loads_in_flight"] == 0
    # the surviving rank is told that this reader gave up, and releases every hold
    out = tp2[0].call(cmd="wait", what="holds", request_ids=ids, timeout_s=10)
    assert set(out["released"]) == set(ids)
    assert all(out["released"][rid][1] for rid in finished | {"k0"})   # failed loads: ok if rank 0's part was read
    assert tp2[0].call(cmd="stats")["holds"] == 0
    decode.start_load("k-again", engines, [0], [0], hold_token=[NO_TOKEN] * 2)   # the dead address is forgotten
    finished, failed = run_until(decode, ["k-again"], timeout=10)
    assert "connection refused" in failed["k-again"]
    tok = prefill.call(cmd="hold", holds=[["alive", [9]]])["tokens"]    # the connector keeps serving others
    decode.start_load("alive", prefill.address, [9], [250], hold_token=tok["alive"])
    assert run_until(decode, ["alive"])[0] == {"alive"}
    assert torch.equal(pages(decode.caches)[:, 250], expected[:, 9])
    assert decode.stats["loads_in_flight"] == 0


@needs_nixl
def test_silent_peer_times_out_with_a_reason(decode):
    server = socket.create_server(("127.0.0.1", 0))             # accepts, never answers (like a stopped engine)
    with server:
        address = f"127.0.0.1:{server.getsockname()[1]}"
        t0 = time.monotonic()
        decode.start_load("silent", address, [1], [1], hold_token=NO_TOKEN)
        finished, failed = run_until(decode, ["silent"], timeout=10)
        assert "timed out" in failed["silent"] and address in failed["silent"]
        assert time.monotonic() - t0 < 6
    assert decode.stats["loads_in_flight"] == 0


@needs_nixl
def test_stalled_transfer_times_out_and_the_owner_is_told(prefill, decode, monkeypatch):
    tok = prefill.call(cmd="hold", holds=[["stall", [12, 13]]])["tokens"]
    monkeypatch.setattr(decode._agent, "check_xfer_state", lambda handle: "PROC")   # NIXL never finishes it
    decode.start_load("stall", prefill.address, [12, 13], [60, 61], timeout_s=0.3, hold_token=tok["stall"])
    finished, failed = run_until(decode, ["stall"], timeout=10)
    assert "timed out after 0.3 s" in failed["stall"] and "still in progress" in failed["stall"]
    assert decode.stats["loads_in_flight"] == 0
    monkeypatch.undo()
    out = prefill.call(cmd="wait", what="holds", request_ids=["stall"], timeout_s=10)
    assert out["released"]["stall"] == ["1 of 1 reader(s) gave up", False]


@needs_nixl
def test_hold_is_released_on_timeout_when_no_reader_reports():
    from kvlayout.connectors import NixlConnector
    plan, caches = build_cache(4, 16, 0)
    with NixlConnector(caches, specs=plan.specs, engine_id="P3") as conn:
        params = conn.hold_blocks("lonely", {"attention": [1, 2], "mamba": [3]}, timeout_s=0.2)
        assert params == {"engine": conn.address, "request_id": "lonely",
                          "block_ids": {"attention": [1, 2], "mamba": [3]}, "hold_token": params["hold_token"],
                          "expires_in_s": 0.2}
        assert conn.stats["holds"] == 1
        deadline = time.monotonic() + 5
        released = []
        while not released and time.monotonic() < deadline:
            released = conn.poll().released
            time.sleep(0.01)
        (rel,) = released
        assert rel.request_id == "lonely" and not rel.ok and "timed out" in rel.reason
        assert rel.block_ids == {"attention": [1, 2], "mamba": [3]} and conn.stats["holds"] == 0
        conn.hold_blocks("dropped", [4])
        assert conn.cancel_hold("dropped").block_ids == [4] and conn.stats["holds"] == 0


@needs_nixl
def test_load_targets_are_exclusive():
    """A load never writes into blocks another load is writing or that remote readers hold, and a hold
    never covers blocks still receiving; each refusal leaves the connector as it was."""
    from kvlayout.connectors import NixlConnector
    plan, caches = build_cache(4, 16, 0)
    with NixlConnector(caches, specs=plan.specs, engine_id="X", handshake_timeout_s=0.5) as conn:
        nowhere = "127.0.0.1:1"                                   # nothing listens: the load waits, then fails
        conn.hold_blocks("served", {"attention": [1, 2], "mamba": [3]})
        conn.start_load("a", nowhere, [9, 10], [4, 5], hold_token=NO_TOKEN)
        for local, match in (([5, 6], "receiving request 'a'"), ([2], "held for remote readers"),
                             ({"mamba": [3]}, "held for remote readers"), ({"attention": [4]}, "receiving")):
            with pytest.raises(KVLayoutError, match=match):
                conn.start_load("b", nowhere, _same_shape(local, 12), local, hold_token=NO_TOKEN)
        with pytest.raises(KVLayoutError, match="still receiving"):
            conn.hold_blocks("c", [5])
        assert set(conn._loads) == {"a"} and set(conn._holds) == {"served"}
        conn.start_load("b", nowhere, [12], [6], hold_token=NO_TOKEN)     # disjoint blocks are fine
        conn.cancel_hold("served")
        conn.start_load("d", nowhere, [13], [2], hold_token=NO_TOKEN)     # the hold is gone


def _same_shape(ids, first):
    if isinstance(ids, list):
        return list(range(first, first + len(ids)))
    return {k: list(range(first, first + len(v))) for k, v in ids.items()}


@needs_nixl
def test_bad_arguments_are_refused_before_anything_starts(prefill, decode):
    tok = prefill.call(cmd="hold", holds=[["v0", [1]]])["tokens"]
    decode.start_load("v0", prefill.address, [1], [1], hold_token=tok["v0"])   # makes the peer ready
    run_until(decode, ["v0"])
    started = decode.stats.get("loads_started", 0)
    bad = [
        dict(request_id="", remote_engine=prefill.address, remote_block_ids=[1], local_block_ids=[1]),
        dict(request_id="x", remote_engine="no-port", remote_block_ids=[1], local_block_ids=[1]),
        dict(request_id="x", remote_engine=prefill.address, remote_block_ids=[1, 2], local_block_ids=[1]),
        dict(request_id="x", remote_engine=prefill.address, remote_block_ids=[1], local_block_ids=[256]),
        dict(request_id="x", remote_engine=prefill.address, remote_block_ids=[256], local_block_ids=[1]),
        dict(request_id="x", remote_engine=prefill.address, remote_block_ids=[1, 2], local_block_ids=[3, 3]),
        dict(request_id="x", remote_engine=prefill.address, remote_block_ids=[], local_block_ids=[]),
        dict(request_id="x", remote_engine=prefill.address, remote_block_ids={"mla": [1]}, local_block_ids={"mla": [1]}),
        dict(request_id="x", remote_engine=prefill.address, remote_block_ids=[1.5], local_block_ids=[1]),
        dict(request_id="x", remote_engine=[prefill.address, prefill.address], remote_block_ids=[1], local_block_ids=[1]),
    ]
    for kw in bad:
        with pytest.raises(KVLayoutError):
            decode.start_load(**kw, hold_token=NO_TOKEN)
    with pytest.raises(KVLayoutError, match="out of range"):
        decode.hold_blocks("y", [999])
    assert decode.stats.get("loads_started", 0) == started and decode.stats["loads_in_flight"] == 0


# ------------------------------------------------------------------------------------------ GPU (VRAM)

@pytest.mark.gpu
@needs_nixl
def test_vram_transfer_between_two_agents():
    from kvlayout.connectors import NixlConnector
    plan, src = build_cache(4, 64, PREFILL_SEED, device="cuda")
    dplan, dst = build_cache(4, 64, DECODE_SEED, device="cuda")
    with NixlConnector(src, specs=plan.specs, engine_id="GP") as p, \
            NixlConnector(dst, specs=dplan.specs, engine_id="GD", telemetry=True) as d:
        assert p._mem_type == d._mem_type == "VRAM"
        before = pages(dst).clone()
        remote, local = [4, 5, 6, 30], [10, 11, 12, 50]
        params = p.hold_blocks("g1", remote)
        d.start_load("g1", params["engine"], params["block_ids"], local, hold_token=params["hold_token"])
        finished, failed = run_until(d, ["g1"], timeout=60)
        assert finished == {"g1"}, failed
        torch.cuda.synchronize()
        mine, theirs = pages(dst), pages(src)
        assert torch.equal(mine[:, local], theirs[:, remote])
        others = torch.ones(64, dtype=torch.bool, device="cuda")
        others[local] = False
        assert torch.equal(mine[:, others], before[:, others])
        deadline = time.monotonic() + 10
        released = []
        while not released and time.monotonic() < deadline:
            released = p.poll().released
        assert released and released[0].ok
