"""NIXL connector: a decode engine pulls the KV blocks of a request from the prefill engine that computed them.

Each engine creates one ``NixlConnector`` over its ``KVCache``. The connector registers the cache's
allocations with NIXL once (``KVCache.buffers``), derives one region per layer (or per cross-layer
allocation) from the tensors' storage and strides, and listens on a small side channel (TCP, 127.0.0.1 by
default) where peers exchange a compatibility record, NIXL agent metadata and region tables (msgpack, see
``handshake``). Descriptor lists are prepared once per peer; a transfer only indexes them.

This class coordinates; the jobs live in their own modules: ``regions`` (where blocks sit), ``topology``
(how two engines' regions pair, tensor-parallel head slices), ``descriptors`` (indices and coalescing),
``record`` (the compatibility record), ``wire`` / ``schema`` (bytes on the network and their strict checks),
``handshake`` (the side-channel exchange), ``transfer_state`` (the state machines) and ``block_ids``.

Flow (pull): the prefill engine ``hold_blocks`` a finished request and passes the returned plain dict to the
decode engine (with the request, never over the side channel: it holds the hold's token); the decode engine
``start_load``s it into blocks of its own; NIXL READs the remote blocks; then the decode engine asks the
prefill engine, with a proof made from the token, whether the hold was still valid when the read completed
(*validate after read*). Only a "yes" finishes the load, and it releases the hold (``poll().released``); a
hold that expired or was cancelled first fails the load with the reason, so bytes another request may have
written are never reported as a success. A hold no reader confirms is released after ``hold_timeout_s``.

Trust: engines of one deployment share a secret (``secret=``, or ``KVLAYOUT_CONNECTOR_SECRET`` /
``KVLAYOUT_CONNECTOR_SECRET_FILE``); a peer must prove it before it learns anything (``auth``). Without one
the connector listens on loopback only (``allow_unauthenticated=True`` to bind elsewhere) and warns once. Nothing blocks: both engines call ``poll()`` from their
scheduler loop. A peer that dies, stalls or never answers fails the request with a reason after
``load_timeout_s``; its in-flight transfers are cancelled, so no block stays in use on either side, and other
requests keep going. Keep ``load_timeout_s`` below the prefill side's ``hold_timeout_s``.

Heterogeneous tensor parallelism: each rank is an engine of its own (``tp_rank``, ``tp_size``). A decode
rank passes the prefill ranks that hold its heads (one engine, or a list) and reads exactly its head slice
of every attention block; MLA and Mamba blocks are replicated and come from the first engine listed.

Usage::

    from kvlayout.connectors import NixlConnector

    # prefill engine
    prefill = NixlConnector(caches, specs=plan.specs)         # caches = kvlayout.allocate_kv_cache(plan)
    params = prefill.hold_blocks("req-7", block_ids)           # after the prefill step wrote those blocks
    send_to_decode_engine(params)                              # plain dict: engine address, request id, ids
    for rel in prefill.poll().released:                        # every scheduler step
        allocator.free(rel.block_ids)                          # read (or timed out): blocks are free again

    # decode engine
    decode = NixlConnector(dcaches, specs=dplan.specs)
    decode.start_load(params["request_id"], params["engine"], params["block_ids"], my_block_ids)
    events = decode.poll()                                     # every scheduler step
    for rid in events.finished: scheduler.resume(rid)          # blocks are in place
    for rid, reason in events.failed.items(): scheduler.recompute(rid, reason)  # free my blocks, recompute

Block ids are one sequence for every layer, or ``{"attention": ids, "mamba": ids}`` when layer kinds use
different blocks (hybrid models: many attention blocks, one Mamba state block); kinds left out of the
mapping are not transferred.

Engines find each other through this side channel rather than NIXL's own metadata listener: one exchange
carries the compatibility record (checked before NIXL sees the peer's metadata), the metadata and the region
addresses the descriptor lists need, under one size bound and one timeout.
"""

from __future__ import annotations

import collections
import os
import queue
import secrets
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import msgpack
import numpy as np

from kvlayout.allocation import KVCache
from kvlayout.capabilities import ConnectorWishes
from kvlayout.errors import BackendUnavailableError, KVLayoutError

from .block_ids import (ALL_KINDS, BlockIds, as_block_ids, check_in_range, check_load_pairs, kind_blocks,
                        plain_block_ids, shared_block)
from .descriptors import TransferPlan, descriptor_rows
from . import auth
from .handshake import (HandshakeClient, HandshakeServer, RemoteRegion, Welcome, confirm_read, format_address,
                        make_welcome, parse_address)
from .nixl_api import load_nixl_agent
from .record import CompatRecord, build_record
from .regions import layer_regions
from .results import PollResult, ReleasedBlocks, TransferInfo
from .schema import HandshakeError
from .topology import Role, head_coverage_problem, peer_pairs, tp_group_problem
from .transfer_state import Hold, HoldState, Load, LoadState, Peer, PeerState, Transfer, release_handle
from .wire import MAX_MESSAGE_BYTES, decode_notif, encode_frame, encode_notif

__all__ = ["NixlConnector", "PollResult", "ReleasedBlocks", "TransferInfo"]

DEFAULT_LOAD_TIMEOUT_S = 60.0
DEFAULT_HOLD_TIMEOUT_S = 120.0
DEFAULT_HANDSHAKE_TIMEOUT_S = 5.0
MAX_REQUEST_ID = 256
_INFO_KEEP = 1024


@dataclass
class _Prepared:
    """The descriptor lists prepared for one peer in one role, and the plan that indexes them."""

    plan: TransferPlan
    local: Any                      # prepared local descriptor list handle (shared between peers)
    remote: Any                     # prepared remote descriptor list handle


class NixlConnector:
    """Moves whole cache blocks between engines through NIXL (see the module docstring for the flow).

    Args:
        caches: this engine's ``KVCache`` (CPU -> NIXL "DRAM", CUDA -> "VRAM" on the tensors' device).
        specs: ``plan.specs``; lets engines whose Mamba pages are padded differently exchange states.
        engine_id: a name for logs and records (default: host-pid-random).
        tp_rank, tp_size: this engine's tensor-parallel position; attention blocks hold heads
            ``[tp_rank*H, (tp_rank+1)*H)`` of ``H*tp_size``.
        host, port: where the side channel listens (default 127.0.0.1 and a free port; IPv6 works).
        advertise_host: the host peers are told to connect to (``address``), when it differs from the bound
            one (binding 0.0.0.0 or a container address); a name is resolved once, here.
        load_timeout_s: a load that has not finished by then fails (handshake included).
        hold_timeout_s: held blocks are released by then even if no reader reported.
        handshake_timeout_s: bound on one side-channel exchange, either side.
        max_message_bytes: bound on one side-channel message.
        telemetry: ask NIXL for per-transfer telemetry (descriptor counts in ``transfer_info``).
        backends: NIXL backends to create.
        secret: the deployment's shared secret (>= 16 bytes; default from the environment, see ``auth``).
        allow_unauthenticated: bind a non-loopback ``host`` without a secret (anyone who reaches the port
            can then handshake and read or write the registered cache: only on an isolated network).
        model_id: what this engine serves (model name, revision, weights fingerprint); engines with
            different ids refuse each other at the handshake.
    """

    NAME = "nixl"

    @classmethod
    def layout_wishes(cls, block_size: Optional[int] = None) -> ConnectorWishes:
        """What this connector asks of the cache layout; pass it as ``plan_kv_cache(..., connector=...)``.

        A cross-layer allocation where a group allows it (a block of all the group's layers is then one
        descriptor instead of one per layer; per-layer caches work too, and either side may use either).
        ``block_size``: the peer engines' block size, when known, so a mismatch fails at planning time
        rather than at the handshake.
        """
        return ConnectorWishes(cls.NAME, cross_layer=True, block_size=block_size)

    def __init__(self, caches: KVCache, *, specs: Optional[Mapping[str, Any]] = None,
                 engine_id: Optional[str] = None, tp_rank: int = 0, tp_size: int = 1,
                 host: str = "127.0.0.1", port: int = 0, load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
                 hold_timeout_s: float = DEFAULT_HOLD_TIMEOUT_S,
                 handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, telemetry: bool = False,
                 backends: Sequence[str] = ("UCX",), secret: Union[bytes, str, None] = None,
                 allow_unauthenticated: bool = False, model_id: str = "", advertise_host: Optional[str] = None):
        if not isinstance(caches, KVCache):
            raise KVLayoutError("NixlConnector needs the KVCache returned by kvlayout.allocate_kv_cache")
        for name, v in (("load_timeout_s", load_timeout_s), ("hold_timeout_s", hold_timeout_s),
                        ("handshake_timeout_s", handshake_timeout_s)):
            if not _positive_seconds(v):
                raise KVLayoutError(f"{name} must be a positive number of seconds, got {v!r}")
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes < 4096:
            raise KVLayoutError(f"max_message_bytes must be an integer >= 4096, got {max_message_bytes!r}")
        self._key = auth.load_secret(secret)
        if self._key is None:
            if not auth.is_loopback(host) and not allow_unauthenticated:
                raise KVLayoutError(f"binding the side channel to {host!r} without a shared secret would let anyone "
                                    f"who reaches it read and write this engine's cache; give secret= (or "
                                    f"{auth.SECRET_ENV}), or pass allow_unauthenticated=True on an isolated network")
            _warn_unauthenticated()
        devices = {b.device for b in caches.buffers}
        if len(devices) != 1:
            raise KVLayoutError(f"the cache's buffers sit on several devices {sorted(map(str, devices))}; "
                                f"use one connector per device")
        device = devices.pop()
        try:
            nixl_agent, nixl_agent_config = load_nixl_agent()
        except ImportError as exc:
            raise BackendUnavailableError(f"the NIXL connector needs the nixl package ({exc}); "
                                          f"install kvlayout[nixl]") from None
        self.caches = caches
        self.engine_id = engine_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.load_timeout_s = float(load_timeout_s)
        self.hold_timeout_s = float(hold_timeout_s)
        self.handshake_timeout_s = float(handshake_timeout_s)
        self.max_message_bytes = max_message_bytes
        self._mem_type = "VRAM" if device.type == "cuda" else "DRAM"
        self._device_id = (device.index or 0) if device.type == "cuda" else 0
        self._regions = layer_regions(caches)                       # one per layer
        self._kind_blocks = kind_blocks((r.kind, r.num_blocks) for r in self._regions)
        self._closed = False

        agent_name = f"kvl-{self.engine_id}-{secrets.token_hex(4)}"
        self._agent = nixl_agent(agent_name, nixl_agent_config(backends=list(backends), capture_telemetry=telemetry))
        self._telemetry = telemetry
        self._reg = self._agent.register_memory(list(caches.buffers))   # once per allocation
        self.record: CompatRecord = build_record(caches, engine_id=self.engine_id, agent_name=agent_name,
                                                 tp_rank=tp_rank, tp_size=tp_size, specs=specs, model_id=model_id)
        regions = [RemoteRegion(r.layers[0], r.base, r.block_len, r.block_stride, r.num_blocks) for r in self._regions]
        self._welcome = make_welcome(self.record, self._agent.get_agent_metadata(), self._mem_type,
                                     self._device_id, regions)
        encode_frame(self._welcome, max_message_bytes)               # fail now, not in a peer's handshake

        self._peers: dict[str, Peer] = {}
        self._dead: dict[str, Peer] = {}        # failed peers whose transfers NIXL has not cancelled yet
        self._engine_sets: dict[tuple, Optional[str]] = {}    # engines of a load -> why they cannot serve it
        self._local_lists: dict[bytes, Any] = {}
        self._loads: dict[str, Load] = {}
        self._holds: dict[str, Hold] = {}
        self._holds_lock = threading.Lock()     # the side channel's threads confirm reads against the holds
        self._confirms: queue.Queue = queue.Queue()
        self._pending = PollResult()
        self._info: collections.OrderedDict[str, TransferInfo] = collections.OrderedDict()
        self._stats: collections.Counter = collections.Counter()
        self._stats_lock = threading.Lock()

        self._client = HandshakeClient(self.record, timeout_s=self.handshake_timeout_s, limit=max_message_bytes,
                                       key=self._key)
        self._server = HandshakeServer(host, port, self.record, self._welcome, timeout_s=self.handshake_timeout_s,
                                       limit=max_message_bytes, count=self._count, name=f"kvl-nixl-{self.engine_id}",
                                       key=self._key, on_confirm=self._on_confirm)
        self.address = self._server.address
        if advertise_host is not None or host in ("0.0.0.0", "::"):
            self.address = format_address(_resolve_once(advertise_host or socket.gethostname()), self._server.port)

    # ------------------------------------------------------------------------------------- prefill side

    def hold_blocks(self, request_id: str, block_ids: BlockIds, *, num_readers: int = 1,
                    timeout_s: Optional[float] = None) -> dict:
        """Keep ``block_ids`` for ``num_readers`` remote readers (one per decode rank that reads them).

        Returns the plain dict a decode engine needs: ``{"engine", "request_id", "block_ids", "hold_token",
        "expires_in_s"}``; send it with the request (the token lets its holder, and only its holder, confirm
        or give up the hold). The blocks come back in ``poll().released`` once every reader confirmed or gave
        up, or after ``timeout_s`` (default ``hold_timeout_s``, 120 s: serving engines under load have seen
        decode admission delayed by tens of seconds); until then the engine must not reuse them.
        """
        self._check_open()
        _check_request_id(request_id)
        if request_id in self._holds:
            raise KVLayoutError(f"request {request_id!r} already holds blocks on this engine")
        if isinstance(num_readers, bool) or not isinstance(num_readers, int) or num_readers < 1:
            raise KVLayoutError(f"num_readers must be a positive integer, got {num_readers!r}")
        timeout = self.hold_timeout_s if timeout_s is None else timeout_s
        if not _positive_seconds(timeout):
            raise KVLayoutError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        ids = as_block_ids(block_ids, "hold_blocks")
        check_in_range(ids, self._kind_blocks, "hold_blocks", "this engine")
        for load in self._loads.values():
            b = shared_block(ids, load.local_ids)
            if b is not None:
                raise KVLayoutError(f"hold_blocks: block {b} is still receiving request {load.request_id!r}'s "
                                    f"load; hold it once that load has finished")
        plain = plain_block_ids(ids)
        token = auth.new_token()
        with self._holds_lock:
            self._holds[request_id] = Hold(request_id, plain, num_readers, time.monotonic() + timeout,
                                           float(timeout), token)
        return {"engine": self.address, "request_id": request_id, "block_ids": plain, "hold_token": token.hex(),
                "expires_in_s": float(timeout)}

    def cancel_hold(self, request_id: str) -> ReleasedBlocks:
        """Drop a hold now (the engine aborted the request); returns what was held."""
        with self._holds_lock:
            hold = self._holds.pop(request_id, None)
            if hold is None:
                raise KVLayoutError(f"request {request_id!r} holds no blocks on this engine")
            hold.move(HoldState.CANCELLED)
        return ReleasedBlocks(request_id, hold.block_ids, "cancelled by the engine", False)

    # -------------------------------------------------------------------------------------- decode side

    def connect(self, remote_engine: str) -> None:
        """Start the handshake with ``remote_engine`` in the background (``start_load`` does it when needed)."""
        self._check_open()
        parse_address(remote_engine)
        self._ensure_handshake(remote_engine)

    def start_load(self, request_id: str, remote_engine: Union[str, Sequence[str]], remote_block_ids: BlockIds,
                   local_block_ids: BlockIds, *, hold_token: Union[str, Sequence[str]],
                   remote_request_id: Optional[str] = None, timeout_s: Optional[float] = None) -> None:
        """Read the blocks ``remote_block_ids`` of ``remote_engine`` into this engine's ``local_block_ids``.

        ``remote_engine`` and ``hold_token`` are what the prefill side returned from ``hold_blocks`` (or
        lists of them, one per prefill rank holding some of this rank's heads). Returns at once; the outcome
        comes from ``poll()``: finished only once every engine confirmed its hold was still valid when the
        read completed. Bad arguments raise ``KVLayoutError`` before anything starts.
        """
        self._check_open()
        _check_request_id(request_id)
        rrid = request_id if remote_request_id is None else remote_request_id
        _check_request_id(rrid)
        if request_id in self._loads:
            raise KVLayoutError(f"request {request_id!r} is already loading")
        engines = (remote_engine,) if isinstance(remote_engine, str) else tuple(remote_engine)
        if not engines or len(set(engines)) != len(engines):
            raise KVLayoutError(f"remote_engine must name one engine or distinct engines, got {remote_engine!r}")
        for e in engines:
            parse_address(e)
        tokens = _hold_tokens(hold_token, len(engines))
        local = as_block_ids(local_block_ids, "start_load local_block_ids")
        remote = as_block_ids(remote_block_ids, "start_load remote_block_ids")
        check_load_pairs(local, remote)
        check_in_range(local, self._kind_blocks, "start_load", "this engine")
        self._check_local_targets(local)
        timeout = self.load_timeout_s if timeout_s is None else timeout_s
        if not _positive_seconds(timeout):
            raise KVLayoutError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        now = time.monotonic()
        load = Load(request_id, rrid, engines, local, remote, now, now + timeout, float(timeout), tokens)
        if self._all_ready(engines):
            problem = self._check_against_peers(load)
            if problem:
                raise KVLayoutError(problem)
            self._loads[request_id] = load
            self._count("loads_started")
            self._launch(load)
            return
        for e in engines:
            self._ensure_handshake(e)
        self._loads[request_id] = load
        self._count("loads_started")

    # ------------------------------------------------------------------------------------------ polling

    def poll(self) -> PollResult:
        """Advance handshakes, transfers and holds; return what finished, failed or was released since."""
        self._check_open()
        self._finish_handshakes()
        self._collect_confirmations()
        now = time.monotonic()
        for load in list(self._loads.values()):
            if self._loads.get(load.request_id) is not load:
                continue                        # settled earlier in this poll (its engine failed)
            if load.state is LoadState.WAITING:
                self._advance_waiting(load, now)
            elif load.state is LoadState.RUNNING:
                self._advance_running(load, now)
            elif load.state is LoadState.CONFIRMING:
                self._advance_confirming(load, now)
            if load.state is LoadState.ABORTING:
                self._try_finish_abort(load)
        self._advance_holds(now)
        out, self._pending = self._pending, PollResult()
        return out

    def transfer_info(self, request_id: str) -> TransferInfo:
        """Cost of a recently finished load (the last 1024 are kept)."""
        if request_id not in self._info:
            raise KVLayoutError(f"no finished load {request_id!r} is on record")
        return self._info[request_id]

    @property
    def stats(self) -> dict:
        """Counters (handshakes served/refused/malformed, loads, holds, stray notes) and current gauges."""
        with self._stats_lock:
            out = dict(self._stats)
        out.update(loads_in_flight=len(self._loads), holds=len(self._holds),
                   peers=sum(p.ready for p in self._peers.values()))
        return out

    def close(self) -> None:
        """Cancel transfers, release every NIXL handle, deregister memory and stop the side channel."""
        if self._closed:
            return
        self._closed = True
        self._server.close()
        for load in list(self._loads.values()):
            for transfer in load.transfers:
                release_handle(transfer.handle)
        self._loads.clear()
        with self._holds_lock:
            self._holds.clear()
        for peer in list(self._peers.values()) + list(self._dead.values()):
            self._release_peer(peer)
        self._peers.clear()
        self._dead.clear()
        for handle in self._local_lists.values():
            release_handle(handle)
        self._local_lists.clear()
        try:
            self._agent.deregister_memory(self._reg)
        except Exception:
            pass

    def __enter__(self) -> "NixlConnector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- internals

    def _check_local_targets(self, local) -> None:
        """Refuse a load into blocks another load is still writing, or that remote readers hold."""
        for other in self._loads.values():
            b = shared_block(local, other.local_ids)
            if b is not None:
                raise KVLayoutError(f"start_load: local block {b} is already receiving request "
                                    f"{other.request_id!r}'s load; give this request its own blocks")
        with self._holds_lock:
            holds = list(self._holds.values())
        for hold in holds:
            b = shared_block(local, as_block_ids(hold.block_ids, "hold"))
            if b is not None:
                raise KVLayoutError(f"start_load: local block {b} is held for remote readers of request "
                                    f"{hold.request_id!r}; loading into it would change what they read")

    def _check_open(self) -> None:
        if self._closed:
            raise KVLayoutError("this NixlConnector is closed")

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    def _all_ready(self, engines: Sequence[str]) -> bool:
        return all(self._peers.get(e) is not None and self._peers[e].ready for e in engines)

    # side channel, client half

    def _ensure_handshake(self, address: str) -> None:
        """Start a handshake unless one is done or under way (or the failed peer there is still winding down:
        then ``poll`` starts it once the old transfers are gone)."""
        if address not in self._peers and address not in self._dead:
            self._peers[address] = Peer(address)
            self._count("handshakes_started")
            self._client.start(address)

    def _finish_handshakes(self) -> None:
        for address, welcome, reason in self._client.results():
            peer = self._peers.get(address)
            if peer is None or peer.state is not PeerState.CONNECTING:
                continue
            if reason is None:
                try:
                    self._adopt(peer, welcome)
                    continue
                except Exception as exc:
                    reason = f"could not set up transfers with {address}: {type(exc).__name__}: {exc}"
            self._count("handshakes_failed")
            self._fail_peer(address, reason)

    def _adopt(self, peer: Peer, welcome: Welcome) -> None:
        """Load the peer's NIXL metadata and prepare the descriptor lists of both roles, once per peer."""
        peer.welcome = welcome
        name = self._agent.add_remote_agent(welcome.agent_metadata)
        name = name.decode() if isinstance(name, bytes) else str(name)
        peer.agent_name = name
        if name != welcome.record.agent_name:
            raise HandshakeError(f"the NIXL metadata names agent {name!r} but the record says "
                                 f"{welcome.record.agent_name!r}")
        peer.kind_blocks = kind_blocks((lay.kind, rr.num_blocks) for rr, lay in zip(welcome.regions,
                                                                                    welcome.record.layers))
        for role in Role:
            pairs = peer_pairs(self._regions, self.record, welcome, role)
            if not pairs:
                peer.prepared[role] = None
                continue
            lrows = descriptor_rows([p[0] for p in pairs], self._device_id)
            key = lrows.tobytes()
            if key not in self._local_lists:
                self._local_lists[key] = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", lrows, self._mem_type)
            rhandle = self._agent.prep_xfer_dlist(name, descriptor_rows([p[1] for p in pairs], welcome.device_id),
                                                  welcome.mem_type)
            peer.prepared[role] = _Prepared(TransferPlan(pairs), self._local_lists[key], rhandle)
        peer.move(PeerState.READY)
        self._engine_sets.clear()
        self._count("handshakes_ok")

    def _release_peer(self, peer: Peer) -> None:
        for prep in peer.prepared.values():
            if prep is not None:
                release_handle(prep.remote)
        if peer.agent_name:
            try:
                self._agent.remove_remote_agent(peer.agent_name)
            except Exception:
                pass

    def _fail_peer(self, address: str, reason: str) -> None:
        """Fail every load that uses ``address`` and forget the peer (a later load handshakes again)."""
        peer = self._peers.pop(address, None)
        if peer is not None:
            peer.move(PeerState.FAILED)
            self._dead[address] = peer
            self._engine_sets.clear()
        for load in list(self._loads.values()):
            if address in load.engines and load.state is not LoadState.ABORTING:
                self._abort(load, reason, dead=address)
        self._release_dead_peers()

    def _release_dead_peers(self) -> None:
        """Release failed peers once none of their transfers is left."""
        busy = {t.address for l in self._loads.values() for t in l.transfers if t.live}
        for address in [a for a in self._dead if a not in busy]:
            self._release_peer(self._dead.pop(address))

    # loads

    def _check_against_peers(self, load: Load) -> Optional[str]:
        """Why ``load`` cannot run against its (ready) engines, or None."""
        peers = [self._peers[e] for e in load.engines]
        problem = self._engine_set_problem(load.engines, peers)
        if problem:
            return problem
        for p in peers:
            try:
                check_in_range(load.remote_ids, p.kind_blocks, "start_load", f"engine {p.address}")
            except KVLayoutError as exc:
                return str(exc)
        kinds = set(load.local_ids) - {ALL_KINDS}
        have = set().union(*(p.prepared[Role.of(i)].plan.kinds for i, p in enumerate(peers)))
        if kinds - have:
            return f"no engine serves the {sorted(kinds - have)} layers"
        return None

    def _engine_set_problem(self, engines: tuple, peers: list) -> Optional[str]:
        """Whether these engines together hold exactly this rank's heads (cached until peers change)."""
        if engines in self._engine_sets:
            return self._engine_sets[engines]
        recs = [p.welcome.record for p in peers]
        problem = tp_group_problem(engines, recs)
        for i, p in enumerate(peers):
            if problem is None and p.prepared.get(Role.of(i)) is None:
                problem = f"engine {p.address} holds none of this rank's blocks; leave it out"
        if problem is None:
            problem = head_coverage_problem(self.record, engines, recs)
        self._engine_sets[engines] = problem
        return problem

    def _launch(self, load: Load) -> None:
        """Make and post one READ per engine (indices into the prepared lists; one note each)."""
        load.move(LoadState.RUNNING)
        t_index = t_prep = t_post = 0.0
        for i, address in enumerate(load.engines):
            prep = self._peers[address].prepared[Role.of(i)]
            t0 = time.perf_counter()
            li, ri = prep.plan.indices(load.local_ids, load.remote_ids)
            t1 = time.perf_counter()
            transfer = Transfer(address)
            load.transfers.append(transfer)
            try:
                transfer.post(self._agent.make_prepped_xfer("READ", prep.local, li, prep.remote, ri))
                t2 = time.perf_counter()
                status = self._agent.transfer(transfer.handle)
                t3 = time.perf_counter()
            except Exception as exc:
                reason = f"could not start the transfer from {address}: {type(exc).__name__}: {exc}"
                if "DISCONNECT" in str(exc).upper():
                    self._fail_peer(address, reason + " (the engine died or dropped the connection)")
                else:
                    self._abort(load, reason)
                return
            t_index, t_prep, t_post = t_index + t1 - t0, t_prep + t2 - t1, t_post + t3 - t2
            if status == "ERR":
                self._abort(load, f"NIXL refused to post the transfer from {address}")
                return
        load.costs = (t_index * 1e6, t_prep * 1e6, t_post * 1e6)

    def _advance_waiting(self, load: Load, now: float) -> None:
        for e in load.engines:
            self._ensure_handshake(e)
        if now > load.deadline:
            waiting = [e for e in load.engines if self._peers.get(e) is None or not self._peers[e].ready]
            self._abort(load, f"timed out after {load.timeout_s:g} s waiting for the handshake with {waiting}")
            return
        if self._all_ready(load.engines):
            problem = self._check_against_peers(load)
            if problem:
                self._abort(load, problem)
            else:
                self._launch(load)

    def _advance_running(self, load: Load, now: float) -> None:
        for transfer in load.transfers:
            if transfer.done:
                continue
            error = None
            try:
                status = self._agent.check_xfer_state(transfer.handle)
            except Exception as exc:
                status, error = "ERR", f"{type(exc).__name__}: {exc}"
            if status == "DONE":
                if self._telemetry:
                    try:
                        transfer.nixl_descriptors = int(self._agent.get_xfer_telemetry(transfer.handle).descCount)
                    except Exception:
                        pass
                transfer.finish()
            elif status == "ERR":
                reason = f"transfer from {transfer.address} failed: {error or 'NIXL reported an error'}"
                if error and "DISCONNECT" in error.upper():
                    self._fail_peer(transfer.address, reason + " (the engine died or dropped the connection)")
                else:
                    self._abort(load, reason)
                return
        if all(t.done for t in load.transfers):
            load.move(LoadState.CONFIRMING)
            for address, token in zip(load.engines, load.tokens):
                read = plain_block_ids(load.remote_ids)
                message = {"type": "confirm", "r": load.remote_request_id, "a": self.record.agent_name, "b": read,
                           "m": auth.mac(token, "confirm", load.remote_request_id, self.record.agent_name,
                                         msgpack.packb(read, use_bin_type=True))}
                threading.Thread(target=self._confirm, args=(load, address, message), daemon=True).start()
        elif now > load.deadline:
            slow = [t.address for t in load.transfers if not t.done]
            self._abort(load, f"timed out after {load.timeout_s:g} s: transfer from {slow} still in progress")

    def _confirm(self, load: Load, address: str, message: dict) -> None:
        """(A thread of its own.) Ask ``address`` whether its hold was valid; the answer goes to ``poll``."""
        remaining = max(load.deadline - time.monotonic(), 0.05)
        valid, reason = confirm_read(address, message, min(remaining, self.handshake_timeout_s),
                                     self.max_message_bytes)
        self._confirms.put((load, address, valid, reason))

    def _collect_confirmations(self) -> None:
        while True:
            try:
                load, address, valid, reason = self._confirms.get_nowait()
            except queue.Empty:
                return
            if self._loads.get(load.request_id) is not load or load.state is not LoadState.CONFIRMING:
                continue
            if valid:
                load.confirmed.add(address)
            else:
                self._abort(load, f"the read from {address} is not valid: {reason}; the blocks may hold another "
                                  f"request's bytes, so the load failed (recompute it)")

    def _advance_confirming(self, load: Load, now: float) -> None:
        if len(load.confirmed) == len(load.engines):
            load.move(LoadState.FINISHED)
            del self._loads[load.request_id]
            self._pending.finished.append(load.request_id)
            self._count("loads_finished")
            self._record_info(load, now)
        elif now > load.deadline:
            waiting = [e for e in load.engines if e not in load.confirmed]
            self._abort(load, f"timed out after {load.timeout_s:g} s waiting for {waiting} to confirm the read")

    def _abort(self, load: Load, reason: str, dead: Optional[str] = None) -> None:
        """Cancel the load's transfers and tell its live engines (not ``dead``) that this reader gave up,
        so they stop holding the blocks for it."""
        load.abort(reason)
        for transfer in load.transfers:
            transfer.cancel()
        for address, token in zip(load.engines, load.tokens):
            peer = self._peers.get(address)
            if address != dead and address not in load.confirmed and peer is not None and peer.ready:
                note = encode_notif(load.remote_request_id, False,
                                    auth.mac(token, "note", load.remote_request_id, "0"))
                try:
                    self._agent.send_notif(peer.agent_name, note)
                except Exception:
                    pass
        self._try_finish_abort(load)

    def _try_finish_abort(self, load: Load) -> None:
        """Report the failure once no transfer can still write into the load's blocks."""
        for transfer in load.transfers:
            transfer.cancel()
        if load.live or self._loads.get(load.request_id) is not load:
            return
        del self._loads[load.request_id]
        load.move(LoadState.FAILED)
        self._pending.failed[load.request_id] = load.reason
        self._count("loads_failed")
        if self._dead:
            self._release_dead_peers()

    def _record_info(self, load: Load, now: float) -> None:
        n_idx = n_desc = nbytes = 0
        for i, address in enumerate(load.engines):
            plan = self._peers[address].prepared[Role.of(i)].plan
            la, ra, ln = plan.descriptors(load.local_ids, load.remote_ids)
            n_desc += la.size
            nbytes += int(ln.sum())
            n_idx += plan.indices(load.local_ids, load.remote_ids)[0].size
        nixl = [t.nixl_descriptors for t in load.transfers]
        self._info[load.request_id] = TransferInfo(
            load.request_id, load.engines, n_idx, n_desc, None if None in nixl else sum(nixl), nbytes,
            *load.costs, now - load.started)
        while len(self._info) > _INFO_KEEP:
            self._info.popitem(last=False)

    # holds

    def _on_confirm(self, message) -> dict:
        """(A side-channel thread.) A reader asks whether the hold it read from is still valid: it is when
        the hold exists, is held, has not passed its deadline and the proof matches its token; the reader
        then counts as done (the hold is released by the next ``poll`` once every reader is)."""
        def answer(valid: bool, reason: str) -> dict:
            return {"type": "confirmed", "valid": valid, "reason": reason}
        if not isinstance(message, dict) or set(message) != {"type", "r", "a", "b", "m"} or \
                not all(isinstance(message[k], str) and 0 < len(message[k]) <= 256 for k in ("r", "a")):
            return answer(False, "malformed confirmation")
        rid, reader = message["r"], message["a"]
        with self._holds_lock:
            hold = self._holds.get(rid)
            if hold is None or not auth.verify(hold.token, message["m"], "confirm", rid, reader,
                                               msgpack.packb(message["b"], use_bin_type=True)):
                return answer(False, f"no hold of request {rid[:80]!r} with that token (released, expired, "
                                     f"cancelled, or never held)")
            stray = _unheld_block(message["b"], hold.block_ids)
            if stray is not None:
                return answer(False, f"block {stray} was read but request {rid[:80]!r} never held it here")
            if hold.state is not HoldState.HELD or time.monotonic() > hold.deadline:
                return answer(False, f"the hold of request {rid[:80]!r} expired after {hold.timeout_s:g} s before "
                                     f"the read was confirmed")
            hold.note(reader, True)
        return answer(True, "")

    def _advance_holds(self, now: float) -> None:
        try:
            notes = self._agent.get_new_notifs()
        except Exception:
            notes = {}
        with self._holds_lock:
            for sender, msgs in notes.items():
                sender = sender.decode() if isinstance(sender, bytes) else str(sender)
                for msg in msgs:
                    parsed = decode_notif(msg)
                    hold = self._holds.get(parsed[0]) if parsed else None
                    if hold is None:
                        self._count("stray_notes")
                        continue
                    rid, ok, proof = parsed
                    if not auth.verify(hold.token, proof, "note", rid, "1" if ok else "0") or ok:
                        self._count("forged_notes")      # only a reader holding the token can give up a hold
                        continue
                    hold.note(sender, False)
            for rid, hold in list(self._holds.items()):
                outcome = hold.settle(now)
                if outcome is None:
                    continue
                reason, ok = outcome
                del self._holds[rid]
                self._pending.released.append(ReleasedBlocks(rid, hold.block_ids, reason, ok))
                self._count("holds_released" if ok else "holds_expired")


_warned = False


def _warn_unauthenticated() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn("kvlayout NixlConnector runs without a shared secret: any local process that reaches its "
                      f"side channel can read and write the registered cache; set {auth.SECRET_ENV} (or pass "
                      f"secret=) in production", UserWarning, stacklevel=3)


def _unheld_block(read, held) -> Optional[int]:
    """A block id in ``read`` that ``held`` (both as ``hold_blocks`` takes them) does not hold, or None."""
    try:
        read_ids, held_ids = as_block_ids(read, "confirm"), as_block_ids(held, "hold")
    except KVLayoutError:
        return -1
    for kind, ids in read_ids.items():
        have = held_ids.get(kind, held_ids.get(ALL_KINDS))
        if have is None and kind == ALL_KINDS and held_ids:
            have = np.unique(np.concatenate(list(held_ids.values())))
        missing = ids if have is None else ids[~np.isin(ids, have)]
        if missing.size:
            return int(missing[0])
    return None


def _resolve_once(host: str) -> str:
    """A host name resolved to one address now (peers then never depend on their own resolver)."""
    try:
        info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise KVLayoutError(f"advertise_host {host!r} does not resolve: {e}") from None
    return info[0][4][0]


def _hold_tokens(hold_token, n: int) -> tuple[bytes, ...]:
    tokens = (hold_token,) if isinstance(hold_token, str) else tuple(hold_token) if hold_token is not None else ()
    if len(tokens) != n:
        raise KVLayoutError(f"give one hold_token per remote engine ({n}), as hold_blocks returned it, got "
                            f"{hold_token!r}"[:300])
    out = []
    for t in tokens:
        try:
            b = bytes.fromhex(t) if isinstance(t, str) else None
        except ValueError:
            b = None
        if b is None or len(b) != auth.TOKEN_BYTES:
            raise KVLayoutError(f"hold_token must be the hex string hold_blocks returned, got {t!r}"[:300])
        out.append(b)
    return tuple(out)


def _check_request_id(request_id: Any) -> None:
    if not isinstance(request_id, str) or not 0 < len(request_id.encode()) <= MAX_REQUEST_ID:
        raise KVLayoutError(f"request ids must be non-empty strings of at most {MAX_REQUEST_ID} bytes, "
                            f"got {request_id!r}"[:300])


def _positive_seconds(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0
