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
        pool.free(group, rel.block_ids)                        # read (or timed out): blocks are free again

    # decode engine
    decode = NixlConnector(dcaches, specs=dplan.specs)
    decode.start_load(params["request_id"], params["engine"], params["block_ids"], my_block_ids)
    events = decode.poll()                                     # every scheduler step
    for rid in events.finished: scheduler.resume(rid)          # blocks are in place
    for rid, reason in events.failed.items(): scheduler.recompute(rid, reason)  # free my blocks, recompute

Flow (push; on hosts where WRITEs take a faster path than READs): the decode engine ``grant_blocks`` its
blocks to the prefill engine's address and sends the returned dict (it holds the grant's token) with the
request; the prefill engine ``start_push``es its blocks into them. The WRITE carries a MAC'd note that NIXL
delivers after the bytes; the decode engine reports the request in ``poll().finished`` when every writer's note
arrived, the prefill engine in ``poll().pushed`` when its write completed. A grant that expires is revoked (see
``grant_blocks``) before its blocks are reported free::

    grant = decode.grant_blocks("req-7", my_block_ids, prefill.address)     # decode engine
    prefill.start_push("req-7", grant, block_ids)                            # prefill engine
    # prefill: poll().pushed / push_failed -> free block_ids; decode: poll().finished / failed

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
import torch

from kvlayout.allocation import KVCache
from kvlayout.capabilities import ConnectorWishes
from kvlayout.errors import BackendUnavailableError, KVLayoutError

from .canary import check_canary, scratch_regions, transfer_rows as canary_rows, write_canary
from .block_ids import (ALL_KINDS, BlockIds, as_block_ids, check_in_range, check_load_pairs, check_receivers,
                        kind_blocks, plain_block_ids, shared_block)
from .descriptors import TransferPlan, descriptor_rows
from .digests import (Digester, digest_groups, held_digests, read_digests as _read_digests, start_digest_check,
                      written_digest)
from . import auth
from .handshake import (HandshakeClient, HandshakeServer, RemoteRegion, Welcome, confirm_read, format_address,
                        make_welcome, parse_address, side_request)
from .nixl_api import load_nixl_agent
from .record import CompatRecord, build_record
from .regions import layer_regions
from .results import PollResult, ReleasedBlocks, TransferInfo
from .schema import HandshakeError
from .topology import Role, head_coverage_problem, peer_pairs, tp_group_problem
from .transfer_state import (Grant, GrantState, Hold, HoldState, Load, LoadState, Peer, PeerState, Push, PushState,
                             Transfer, release_handle)
from .wire import MAX_MESSAGE_BYTES, decode_notif, decode_push_note, encode_frame, encode_notif, encode_push_note

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
        num_kv_heads: the model's KV heads over all ranks (one count, or one per layer name); give it when
            there may be fewer than ranks: each rank then holds a replica (``kvlayout.tp.kv_head_range``).
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
        digests: end-to-end integrity (``digests``). A prefill engine digests the blocks it holds (a
            checksum kernel over them, and a device sync, in ``hold_blocks``) and sends the digests with its
            confirmation; a decode engine digests its blocks after the read and fails a load whose bytes
            differ. Turn it on on both sides; a decode engine that asks for digests fails loads from an
            engine that sends none.
        canary_block: a block id the engine never uses for requests (e.g. its last one). The connector fills
            that block of every layer with a pattern of its addresses, and every peer reads it back through
            NIXL at the handshake (``canary``): a layout or address mismatch fails the handshake, never a
            request. This engine checks the canaries of the peers that serve one either way.
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
                 allow_unauthenticated: bool = False, model_id: str = "", advertise_host: Optional[str] = None,
                 digests: bool = False, canary_block: Optional[int] = None,
                 num_kv_heads: Union[int, Mapping[str, int], None] = None):
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
        self._pooled = caches.layout.pool is not None and len(caches.layout.groups) > 1
        self._kind_blocks = kind_blocks(((r.kind, r.group, r.num_blocks) for r in self._regions), self._pooled)
        self._kind_of_group = {r.group: r.kind for r in self._regions}
        self._closed = False

        agent_name = f"kvl-{self.engine_id}-{secrets.token_hex(4)}"
        self._agent = nixl_agent(agent_name, nixl_agent_config(backends=list(backends), capture_telemetry=telemetry))
        self._telemetry = telemetry
        self._reg = self._agent.register_memory(list(caches.buffers))   # once per allocation
        self.record: CompatRecord = build_record(caches, engine_id=self.engine_id, agent_name=agent_name,
                                                 tp_rank=tp_rank, tp_size=tp_size, specs=specs, model_id=model_id,
                                                 num_kv_heads=num_kv_heads)
        if not isinstance(digests, bool):
            raise KVLayoutError(f"digests must be True or False, got {digests!r}")
        self._digester = Digester(caches, self._regions, self.record) if digests else None
        self._digest_groups = digest_groups(self.record)
        canary = None
        if canary_block is not None and self._pooled:
            raise KVLayoutError("canary_block is not available on a hybrid page pool (attention block b and state "
                                "block b are different bytes there); use digests=True to check transfers")
        if canary_block is not None:
            if isinstance(canary_block, bool) or not isinstance(canary_block, int) or \
                    not 0 <= canary_block < self._kind_blocks[ALL_KINDS]:
                raise KVLayoutError(f"canary_block must be a block id in [0, {self._kind_blocks[ALL_KINDS]}), "
                                    f"got {canary_block!r}")
            canary = (canary_block, secrets.randbits(32))
            write_canary(caches, self._regions, *canary)
        self._canary = canary
        regions = [RemoteRegion(r.layers[0], r.base, r.block_len, r.block_stride, r.num_blocks) for r in self._regions]
        self._welcome = make_welcome(self.record, self._agent.get_agent_metadata(), self._mem_type,
                                     self._device_id, regions, canary)
        encode_frame(self._welcome, max_message_bytes)               # fail now, not in a peer's handshake

        self._peers: dict[str, Peer] = {}
        self._dead: dict[str, Peer] = {}        # failed peers whose transfers NIXL has not cancelled yet
        self._engine_sets: dict[tuple, Optional[str]] = {}    # engines of a load -> why they cannot serve it
        self._local_lists: dict[bytes, Any] = {}
        self._loads: dict[str, Load] = {}
        self._holds: dict[str, Hold] = {}
        self._holds_lock = threading.Lock()     # the side channel's threads confirm reads against the holds
        self._confirms: queue.Queue = queue.Queue()
        self._grants: dict[str, Grant] = {}             # push mode, receiving side
        self._revokes: queue.Queue = queue.Queue()
        self._pushes: dict[str, Push] = {}              # push mode, writing side
        self._pushes_lock = threading.Lock()    # the side channel's threads revoke pushes
        self._revoked: collections.OrderedDict = collections.OrderedDict()   # (engine, grant id) revoked early
        self._pending = PollResult()
        self._info: collections.OrderedDict[str, TransferInfo] = collections.OrderedDict()
        self._stats: collections.Counter = collections.Counter()
        self._stats_lock = threading.Lock()

        self._client = HandshakeClient(self.record, timeout_s=self.handshake_timeout_s, limit=max_message_bytes,
                                       key=self._key)
        self._server = HandshakeServer(host, port, self.record, self._welcome, timeout_s=self.handshake_timeout_s,
                                       limit=max_message_bytes, count=self._count, name=f"kvl-nixl-{self.engine_id}",
                                       key=self._key,
                                       requests={"confirm": self._on_confirm, "revoke": self._on_revoke})
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
        timeout = _timeout(timeout_s, self.hold_timeout_s)
        ids = as_block_ids(block_ids, "hold_blocks")
        check_in_range(ids, self._kind_blocks, "hold_blocks", "this engine")
        self._check_not_receiving(ids, "hold_blocks")
        plain = plain_block_ids(ids)
        token = auth.new_token()
        digests = held_digests(self._digester, self._digest_groups, ids) if self._digester is not None else None
        with self._holds_lock:
            self._holds[request_id] = Hold(request_id, plain, num_readers, time.monotonic() + timeout,
                                           float(timeout), token, digests=digests)
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

    def start_push(self, request_id: str, grant: Mapping[str, Any], block_ids: BlockIds) -> None:
        """(Push mode.) WRITE this engine's ``block_ids`` into the blocks ``grant`` names: the dict a decode
        engine's ``grant_blocks`` returned, sent here with the request. Returns at once; the outcome comes
        from ``poll()``: ``pushed`` once the write completed (the note announcing it rides on the write, so the
        decode engine sees it after the bytes), ``push_failed`` with the reason once the write can no longer
        land (the grant expired or was revoked, the engine died, a transfer error). Either way the source
        blocks may then be freed. Bad arguments raise ``KVLayoutError`` before anything starts.
        """
        self._check_open()
        _check_request_id(request_id)
        if request_id in self._pushes:
            raise KVLayoutError(f"request {request_id!r} is already being pushed")
        engine, grant_id, remote, token, expires = _parse_grant(grant)
        local = as_block_ids(block_ids, "start_push block_ids")
        check_load_pairs(remote, local)
        check_in_range(local, self._kind_blocks, "start_push", "this engine")
        self._check_not_receiving(local, "start_push")
        with self._pushes_lock:
            if (engine, grant_id) in self._revoked:
                raise KVLayoutError(f"start_push: engine {engine} already revoked its grant {grant_id!r} (it expired "
                                    f"there); the request must be granted again")
            now = time.monotonic()
            self._pushes[request_id] = Push(request_id, grant_id, engine, local, remote, now, now + expires, token)
        self._count("pushes_started")
        self._ensure_handshake(engine)

    # -------------------------------------------------------------------------------------- decode side

    def grant_blocks(self, request_id: str, block_ids: BlockIds, writers: Union[str, Sequence[str]], *,
                     timeout_s: Optional[float] = None) -> dict:
        """(Push mode.) Let ``writers`` (the prefill engine's address, or the addresses of its ranks that hold
        this rank's heads) WRITE request ``request_id``'s blocks into ``block_ids`` here.

        Returns the dict each writer's ``start_push`` takes: ``{"engine", "request_id", "block_ids",
        "grant_token", "expires_in_s"}``; send it with the request. The outcome comes from ``poll()``:
        ``finished`` once every writer's note arrived (NIXL delivers it after the bytes; with digests, once they
        agree), ``failed`` with the reason once no write can land any more: after ``timeout_s`` (default
        ``load_timeout_s``) or a writer giving up, every writer that has not written is asked to revoke, and
        the blocks stay reserved until it confirmed (or nothing listens at its address any more).
        """
        self._check_open()
        _check_request_id(request_id)
        if request_id in self._grants or request_id in self._loads:
            raise KVLayoutError(f"request {request_id!r} is already receiving blocks on this engine")
        names = _engine_addresses(writers, "writers")
        ids = as_block_ids(block_ids, "grant_blocks")
        check_receivers(ids)
        check_in_range(ids, self._kind_blocks, "grant_blocks", "this engine")
        self._check_local_targets(ids)
        timeout = _timeout(timeout_s, self.load_timeout_s)
        token = auth.new_token()
        self._grants[request_id] = Grant(request_id, ids, names, time.monotonic() + timeout, float(timeout), token)
        self._count("grants_started")
        return {"engine": self.address, "request_id": request_id, "block_ids": plain_block_ids(ids),
                "grant_token": token.hex(), "expires_in_s": float(timeout)}

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
        engines = _engine_addresses(remote_engine, "remote_engine")
        tokens = _hold_tokens(hold_token, len(engines))
        local = as_block_ids(local_block_ids, "start_load local_block_ids")
        remote = as_block_ids(remote_block_ids, "start_load remote_block_ids")
        check_load_pairs(local, remote)
        check_in_range(local, self._kind_blocks, "start_load", "this engine")
        self._check_local_targets(local)
        timeout = _timeout(timeout_s, self.load_timeout_s)
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
        self._advance_canaries()
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
        notes = self._new_notes()
        self._advance_holds(now, notes.get("hold", ()))
        self._advance_pushes(now)
        self._advance_grants(now, notes.get("push", ()))
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
        out.update(loads_in_flight=len(self._loads), holds=len(self._holds), grants=len(self._grants),
                   pushes_in_flight=len(self._pushes), peers=sum(p.ready for p in self._peers.values()))
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
        for push in self._pushes.values():
            if push.transfer is not None:
                release_handle(push.transfer.handle)
        self._pushes.clear()
        self._grants.clear()
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

    def _check_not_receiving(self, ids, what: str) -> None:
        """Refuse to read out blocks a load or a grant may still be writing (or the canary block)."""
        if self._canary is not None and shared_block(ids, {ALL_KINDS: np.array([self._canary[0]])}, self._kind_of_group) is not None:
            raise KVLayoutError(f"{what}: block {self._canary[0]} is this connector's canary block; the engine must "
                                f"never use it for requests")
        for rid, other in [(l.request_id, l.local_ids) for l in self._loads.values()] + \
                [(g.request_id, g.block_ids) for g in self._grants.values()]:
            b = shared_block(ids, other, self._kind_of_group)
            if b is not None:
                raise KVLayoutError(f"{what}: block {b} is still receiving request {rid!r}'s blocks; "
                                    f"give this request its own blocks, or wait until that one finished")

    def _check_local_targets(self, local) -> None:
        """Refuse to receive into blocks a load or grant is still writing, that remote readers hold, or
        that a push is still reading."""
        self._check_not_receiving(local, "receiving")
        for push in self._pushes.values():
            b = shared_block(local, push.local_ids, self._kind_of_group)
            if b is not None:
                raise KVLayoutError(f"receiving: block {b} is being pushed for request {push.request_id!r}; "
                                    f"writing into it would change what is pushed")
        with self._holds_lock:
            holds = list(self._holds.values())
        for hold in holds:
            b = shared_block(local, as_block_ids(hold.block_ids, "hold"), self._kind_of_group)
            if b is not None:
                raise KVLayoutError(f"receiving: block {b} is held for remote readers of request "
                                    f"{hold.request_id!r}; writing into it would change what they read")

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
        peer.kind_blocks = kind_blocks(((lay.kind, lay.group, rr.num_blocks)
                                        for rr, lay in zip(welcome.regions, welcome.record.layers)),
                                       welcome.record.pooled)
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
        if welcome.canary is not None and self._start_canary(peer):
            return
        self._ready(peer)

    def _ready(self, peer: Peer) -> None:
        peer.move(PeerState.READY)
        self._engine_sets.clear()
        self._count("handshakes_ok")

    def _start_canary(self, peer: Peer) -> bool:
        """Read the peer's canary block of every region this engine may transfer into a scratch block; True
        when a read was posted (the peer is then VERIFYING until ``_advance_canaries``)."""
        scratch = torch.zeros(sum(r.block_len for r in self._regions), dtype=torch.int8,
                              device=self.caches.buffers[0].device)        # one per handshake: they may overlap
        pairs = peer_pairs(scratch_regions(self._regions, scratch), self.record, peer.welcome, Role.PRIMARY)
        if not pairs:
            return False
        reg = self._agent.register_memory([scratch])
        block, _ = peer.welcome.canary
        lrows, rrows = canary_rows(pairs, block, self._device_id, peer.welcome.device_id)
        handle = None
        try:
            handle = self._agent.initialize_xfer("READ", self._agent.get_xfer_descs(lrows, self._mem_type),
                                                 self._agent.get_xfer_descs(rrows, peer.welcome.mem_type),
                                                 peer.agent_name)
            status = self._agent.transfer(handle)
        except Exception as exc:
            status = f"ERR {type(exc).__name__}: {exc}"
        peer.canary = (handle, pairs, time.monotonic() + self.handshake_timeout_s, scratch, reg)
        if status.startswith("ERR"):
            raise HandshakeError(f"NIXL refused to read the engine's geometry canary ({status[4:]})")
        peer.move(PeerState.VERIFYING)
        return True

    def _release_canary(self, peer: Peer) -> bool:
        """Release the canary read's handle and scratch memory; False while NIXL cannot let go yet."""
        if peer.canary is None:
            return True
        if not release_handle(peer.canary[0]):
            return False
        try:
            self._agent.deregister_memory(peer.canary[4])
        except Exception:
            pass
        peer.canary = None
        return True

    def _advance_canaries(self) -> None:
        for address, peer in list(self._peers.items()):
            if peer.state is not PeerState.VERIFYING:
                continue
            handle, pairs, deadline, scratch, _ = peer.canary
            try:
                status = self._agent.check_xfer_state(handle)
            except Exception as exc:
                status = f"ERR {type(exc).__name__}: {exc}"
            if status == "DONE":
                problem = check_canary(scratch, pairs, *peer.welcome.canary)
                self._release_canary(peer)
                if problem is None:
                    self._count("canaries_ok")
                    self._ready(peer)
                    continue
                self._count("canaries_failed")
                reason = f"handshake with {address} failed: {problem}"
            elif status.startswith("ERR") or time.monotonic() > deadline:
                reason = (f"handshake with {address} failed: reading its geometry canary "
                          + ("timed out" if not status.startswith("ERR") else f"failed ({status[4:]})"))
            else:
                continue
            self._count("handshakes_failed")
            self._fail_peer(address, reason)

    def _release_peer(self, peer: Peer) -> None:
        self._release_canary(peer)
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
        for push in list(self._pushes.values()):
            if push.address == address and push.state is not PushState.ABORTING:
                self._abort_push(push, reason)
        self._release_dead_peers()

    def _release_dead_peers(self) -> None:
        """Release failed peers once none of their transfers is left."""
        busy = {t.address for l in self._loads.values() for t in l.transfers if t.live}
        busy |= {p.address for p in self._pushes.values() if p.live}
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
            missing = sorted(str(k) if isinstance(k, int) else k for k in kinds - have)
            return f"no engine serves the {missing} layers"
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
                threading.Thread(target=self._confirm, args=(load, address, message, token), daemon=True).start()
        elif now > load.deadline:
            slow = [t.address for t in load.transfers if not t.done]
            self._abort(load, f"timed out after {load.timeout_s:g} s: transfer from {slow} still in progress")

    def _confirm(self, load: Load, address: str, message: dict, token: bytes) -> None:
        """(A thread of its own.) Ask ``address`` whether its hold was valid; the answer goes to ``poll``."""
        remaining = max(load.deadline - time.monotonic(), 0.05)
        valid, reason, digests, proof = confirm_read(address, message, min(remaining, self.handshake_timeout_s),
                                                     self.max_message_bytes)
        if valid and not auth.verify(token, proof, "confirmed", load.remote_request_id, self.record.agent_name,
                                     msgpack.packb(digests, use_bin_type=True)):
            valid, reason = False, "its answer does not carry the hold's proof (not the engine that holds the blocks)"
        self._confirms.put((load, address, valid, reason, digests))

    def _collect_confirmations(self) -> None:
        while True:
            try:
                load, address, valid, reason, digests = self._confirms.get_nowait()
            except queue.Empty:
                return
            if self._loads.get(load.request_id) is not load or load.state is not LoadState.CONFIRMING:
                continue
            if valid:
                load.confirmed.add(address)
                load.remote_digests[address] = digests
            else:
                self._abort(load, f"the read from {address} is not valid: {reason}; the blocks may hold another "
                                  f"request's bytes, so the load failed (recompute it)")

    def _advance_confirming(self, load: Load, now: float) -> None:
        if len(load.confirmed) == len(load.engines) and self._digester is not None:
            if load.digest_check is None:
                load.digest_check = self._start_digest_check(load)
            if isinstance(load.digest_check, str):
                self._abort(load, load.digest_check)
                return
            problem = load.digest_check.result()
            if problem:
                self._abort(load, problem)
                return
            if not load.digest_check.done:
                if now > load.deadline:
                    self._abort(load, f"timed out after {load.timeout_s:g} s checking the digests")
                return
        if len(load.confirmed) == len(load.engines):
            load.move(LoadState.FINISHED)
            del self._loads[load.request_id]
            self._pending.finished.append(load.request_id)
            self._count("loads_finished")
            self._record_info(load, now)
        elif now > load.deadline:
            waiting = [e for e in load.engines if e not in load.confirmed]
            self._abort(load, f"timed out after {load.timeout_s:g} s waiting for {waiting} to confirm the read")

    def _start_digest_check(self, load: Load):
        records = [self._peers[e].welcome.record for e in load.engines]
        try:
            return start_digest_check(self._digester, self.record, load, records,
                                      [Role.of(i) is not Role.PRIMARY for i in range(len(load.engines))])
        except KVLayoutError as exc:
            return f"the digests cannot be compared: {exc}"

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

    # pushes (writing side)

    def _push_role(self, welcome: Welcome) -> tuple[Role, tuple[int, int]]:
        """Whether this engine writes the replicated layers into the granting engine (it holds the first of
        that engine's heads, or neither has heads), and the global heads ``(start, count)`` both hold."""
        mine = next((l for l in self.record.layers if l.kind == "attention"), None)
        theirs = next((l for l in welcome.record.layers if l.kind == "attention"), None)
        if mine is None or theirs is None:
            return (Role.PRIMARY if self.record.tp_rank == 0 else Role.HEADS_ONLY), (0, 0)
        h0 = max(mine.head_start, theirs.head_start)
        h1 = min(mine.head_start + mine.num_heads, theirs.head_start + theirs.num_heads)
        first = mine.head_start <= theirs.head_start < mine.head_start + mine.num_heads
        return (Role.PRIMARY if first else Role.HEADS_ONLY), (h0, max(h1 - h0, 0))

    def _advance_pushes(self, now: float) -> None:
        for push in list(self._pushes.values()):
            if push.state is PushState.WAITING:
                peer = self._peers.get(push.address)
                if push.revoked or now > push.deadline:
                    self._abort_push(push, "the grant was revoked by the engine that made it" if push.revoked else
                                     "the grant expired before the handshake with its engine finished")
                elif peer is None:
                    self._ensure_handshake(push.address)
                elif peer.ready:
                    self._launch_push(push, peer)
            elif push.state is PushState.RUNNING:
                try:
                    status = self._agent.check_xfer_state(push.transfer.handle)
                except Exception as exc:
                    status = f"ERR {type(exc).__name__}: {exc}"
                if status == "DONE":
                    push.transfer.finish()
                    push.move(PushState.FINISHED)
                    with self._pushes_lock:
                        del self._pushes[push.request_id]
                    self._pending.pushed.append(push.request_id)
                    self._count("pushes_finished")
                elif status.startswith("ERR"):
                    self._abort_push(push, f"the write to {push.address} failed: {status[4:] or 'NIXL reported an error'}")
                elif push.revoked:
                    self._abort_push(push, "the engine that granted the blocks revoked the grant mid-write")
                elif now > push.deadline:
                    self._abort_push(push, f"the grant of {push.address} expired mid-write")
            if push.state is PushState.ABORTING:
                self._try_finish_push_abort(push)

    def _launch_push(self, push: Push, peer: Peer) -> None:
        role, heads = self._push_role(peer.welcome)
        prep = peer.prepared.get(role)
        problem = None
        if prep is None:
            problem = f"this engine holds none of the blocks engine {push.address} granted"
        else:
            try:
                check_in_range(push.remote_ids, peer.kind_blocks, "start_push", f"engine {push.address}")
            except KVLayoutError as exc:
                problem = str(exc)
        if problem:
            self._abort_push(push, problem)
            return
        digest = b""
        if self._digester is not None:
            try:
                digest = written_digest(self._digester, self.record, digest_groups(peer.welcome.record),
                                        push.local_ids, heads, role is Role.PRIMARY)
            except KVLayoutError as exc:
                self._abort_push(push, f"the digests cannot be computed: {exc}")
                return
        primary = role is Role.PRIMARY
        proof = auth.mac(push.token, "pushed", push.grant_id, self.address, "1", str(heads), str(primary), digest)
        note = encode_push_note(push.grant_id, self.address, True, heads, primary, digest, proof)
        li, ri = prep.plan.indices(push.local_ids, push.remote_ids)
        with self._pushes_lock:
            revoked = push.revoked
            if not revoked:
                push.move(PushState.RUNNING)
                push.transfer = Transfer(push.address)
                try:
                    push.transfer.post(self._agent.make_prepped_xfer("WRITE", prep.local, li, prep.remote, ri,
                                                                     notif_msg=note))
                    status = self._agent.transfer(push.transfer.handle, notif_msg=note)
                except Exception as exc:
                    status = f"ERR {type(exc).__name__}: {exc}"
        if revoked:
            self._abort_push(push, "the grant was revoked by the engine that made it")
        elif status.startswith("ERR"):
            self._abort_push(push, f"could not start the write to {push.address}: {status[4:] or 'NIXL refused it'}")

    def _abort_push(self, push: Push, reason: str) -> None:
        if push.state is not PushState.ABORTING:
            push.move(PushState.ABORTING)
            push.reason = reason
        self._try_finish_push_abort(push)

    def _try_finish_push_abort(self, push: Push) -> None:
        """Report the failure once the write can no longer land, and tell the granting engine."""
        if push.transfer is not None:
            push.transfer.cancel()
        if push.live:
            return
        with self._pushes_lock:
            self._pushes.pop(push.request_id, None)
        push.move(PushState.FAILED)
        self._pending.push_failed[push.request_id] = push.reason
        self._count("pushes_failed")
        peer = self._peers.get(push.address)
        if peer is not None and peer.ready:
            proof = auth.mac(push.token, "pushed", push.grant_id, self.address, "0", "(0, 0)", "False", b"")
            try:
                self._agent.send_notif(peer.agent_name, encode_push_note(push.grant_id, self.address, False, (0, 0),
                                                                         False, b"", proof))
            except Exception:
                pass

    def _on_revoke(self, message) -> dict:
        """(A side-channel thread.) The engine that granted blocks revokes its grant: no write may start after
        this answer, and the answer is "revoked" only once no write can still land ("pending" until then)."""
        if not isinstance(message, dict) or set(message) != {"type", "r", "a", "m", "k"} or \
                not all(isinstance(message[k], str) and 0 < len(message[k]) <= 256 for k in ("r", "a")):
            return {"type": "revoked", "valid": False, "state": "malformed", "m": b""}
        rid, engine = message["r"], message["a"]
        with self._pushes_lock:
            push = next((p for p in self._pushes.values() if p.grant_id == rid and p.address == engine), None)
            if push is not None:
                if not auth.verify(push.token, message["m"], "revoke", rid, engine):
                    return {"type": "revoked", "valid": False, "state": "refused", "m": b""}
                push.revoked = True
                state = "pending" if push.live else "revoked"
                return {"type": "revoked", "valid": True, "state": state,
                        "m": auth.mac(push.token, "revoked", rid, self.address, state)}
            if self._key is not None and not auth.verify(self._key, message["k"], "revoke", rid, engine):
                return {"type": "revoked", "valid": False, "state": "refused", "m": b""}
            self._revoked[(engine, rid)] = True          # a grant that arrives later is refused
            while len(self._revoked) > _INFO_KEEP * 4:
                self._revoked.popitem(last=False)
        proof = b"" if self._key is None else auth.mac(self._key, "revoked", rid, self.address, "revoked")
        return {"type": "revoked", "valid": True, "state": "revoked", "m": proof}

    # grants (receiving side)

    def _advance_grants(self, now: float, notes) -> None:
        for note in notes:
            grant = self._grants.get(note["r"])
            fields = (note["r"], note["w"], "1" if note["ok"] else "0", str((note["s"], note["n"])), str(note["p"]),
                      note["h"])
            if grant is None or note["w"] not in grant.writers or note["w"] in grant.settled:
                self._count("stray_notes")
                continue
            if not auth.verify(grant.token, note["m"], "pushed", *fields):
                self._count("forged_notes")
                continue
            if note["ok"]:
                grant.settled[note["w"]] = "wrote"
                grant.notes[note["w"]] = ((note["s"], note["n"]), note["p"], note["h"])
            else:
                grant.settled[note["w"]] = "gave up"
                if grant.state is GrantState.OPEN:
                    self._fail_grant(grant, f"writer {note['w']} gave up")
        self._collect_revokes()
        for grant in list(self._grants.values()):
            if grant.state is GrantState.OPEN:
                if len(grant.settled) == len(grant.writers):
                    problem = self._grant_digest_problem(grant)
                    if problem is None:
                        grant.move(GrantState.FINISHED)
                        del self._grants[grant.request_id]
                        self._pending.finished.append(grant.request_id)
                        self._count("grants_finished")
                        continue
                    self._fail_grant(grant, problem)
                elif now > grant.deadline:
                    waiting = [w for w in grant.writers if w not in grant.settled]
                    self._fail_grant(grant, f"timed out after {grant.timeout_s:g} s waiting for {waiting} to write")
            if grant.state is GrantState.REVOKING:
                self._advance_revoking(grant, now)

    def _grant_digest_problem(self, grant: Grant) -> Optional[str]:
        """Why the bytes written differ from what the writers sent (digests on), or None."""
        if self._digester is None:
            return None
        for writer, (heads, primary, sent) in grant.notes.items():
            if not sent:
                return f"writer {writer} sent no digests: create its connector with digests=True too"
            try:
                here = written_digest(self._digester, self.record, self._digest_groups, grant.block_ids, heads,
                                      primary)
            except KVLayoutError as exc:
                return f"the digests cannot be compared: {exc}"
            if here != sent:
                return (f"digest mismatch: the blocks written by {writer} differ from what it sent; the bytes were "
                        f"corrupted in transit or the layouts differ, so the request failed (recompute it)")
        return None

    def _fail_grant(self, grant: Grant, reason: str) -> None:
        grant.reason = reason
        grant.move(GrantState.REVOKING)

    def _advance_revoking(self, grant: Grant, now: float) -> None:
        """Ask every writer not yet settled to revoke (retrying every 0.5 s); fail once all are settled."""
        if len(grant.settled) == len(grant.writers):
            grant.move(GrantState.FAILED)
            del self._grants[grant.request_id]
            self._pending.failed[grant.request_id] = f"{grant.reason}; no write can land any more"
            self._count("grants_failed")
            return
        if now < grant.next_revoke:
            return
        grant.next_revoke = now + 0.5
        for writer in grant.writers:
            if writer not in grant.settled and writer not in grant.revoking:
                grant.revoking.add(writer)
                message = {"type": "revoke", "r": grant.request_id, "a": self.address,
                           "m": auth.mac(grant.token, "revoke", grant.request_id, self.address),
                           "k": b"" if self._key is None else auth.mac(self._key, "revoke", grant.request_id,
                                                                      self.address)}
                threading.Thread(target=self._revoke, args=(grant, writer, message), daemon=True).start()

    def _revoke(self, grant: Grant, writer: str, message: dict) -> None:
        """(A thread of its own.) One revoke request; the outcome (why the writer can no longer write, or None
        to ask again) goes to ``poll``."""
        outcome = None
        try:
            reply = side_request(writer, message, self.handshake_timeout_s, self.max_message_bytes)
            if isinstance(reply, dict) and set(reply) == {"type", "valid", "state", "m"} and reply["valid"] is True \
                    and reply["state"] == "revoked" and isinstance(reply["m"], bytes):
                if auth.verify(grant.token, reply["m"], "revoked", grant.request_id, writer, "revoked") or \
                        (self._key is None and reply["m"] == b"") or \
                        (self._key is not None and auth.verify(self._key, reply["m"], "revoked", grant.request_id,
                                                               writer, "revoked")):
                    outcome = "revoked"
        except ConnectionRefusedError:
            outcome = "nothing listens at its address (a closed connector writes nothing)"
        except Exception:
            pass
        self._revokes.put((grant, writer, outcome))

    def _collect_revokes(self) -> None:
        while True:
            try:
                grant, writer, outcome = self._revokes.get_nowait()
            except queue.Empty:
                return
            grant.revoking.discard(writer)
            if outcome is not None and writer not in grant.settled:
                grant.settled[writer] = outcome

    # holds

    def _on_confirm(self, message) -> dict:
        """(A side-channel thread.) A reader asks whether the hold it read from is still valid: it is when
        the hold exists, is held, has not passed its deadline and the proof matches its token; the reader
        then counts as done (the hold is released by the next ``poll`` once every reader is)."""
        def answer(valid: bool, reason: str, digests: Sequence[bytes] = (), proof: bytes = b"") -> dict:
            return {"type": "confirmed", "valid": valid, "reason": reason, "d": list(digests), "m": proof}
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
            digests = _read_digests(hold.digests, message["b"])
        return answer(True, "", digests, auth.mac(hold.token, "confirmed", rid, reader,
                                                  msgpack.packb(digests, use_bin_type=True)))

    def _new_notes(self) -> dict:
        """NIXL notes since the last poll, parsed: ``{"hold": [(sender, (rid, ok, proof))], "push": [dict]}``;
        anything else is counted as a stray note and dropped."""
        try:
            notes = self._agent.get_new_notifs()
        except Exception:
            return {}
        out: dict = {"hold": [], "push": []}
        for sender, msgs in notes.items():
            sender = sender.decode() if isinstance(sender, bytes) else str(sender)
            for msg in msgs:
                hold_note = decode_notif(msg)
                if hold_note is not None:
                    out["hold"].append((sender, hold_note))
                    continue
                push_note = decode_push_note(msg)
                if push_note is not None:
                    out["push"].append(push_note)
                else:
                    self._count("stray_notes")
        return out

    def _advance_holds(self, now: float, notes) -> None:
        with self._holds_lock:
            for sender, (rid, ok, proof) in notes:
                hold = self._holds.get(rid)
                if hold is None:
                    self._count("stray_notes")
                    continue
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


def _parse_grant(grant: Any) -> tuple[str, str, dict, bytes, float]:
    """``(engine, request id, block ids, token, expires_in_s)`` from what ``grant_blocks`` returned."""
    keys = {"engine", "request_id", "block_ids", "grant_token", "expires_in_s"}
    if not isinstance(grant, Mapping) or set(grant) != keys:
        raise KVLayoutError(f"start_push takes the dict grant_blocks returned (keys {sorted(keys)}), got "
                            f"{grant!r}"[:300])
    engine = grant["engine"]
    if not isinstance(engine, str):
        raise KVLayoutError(f"grant['engine'] must be an address string, got {engine!r}"[:300])
    parse_address(engine)
    _check_request_id(grant["request_id"])
    (token,) = _hold_tokens(grant["grant_token"], 1, "grant_token")
    if not _positive_seconds(grant["expires_in_s"]):
        raise KVLayoutError(f"grant['expires_in_s'] must be a positive number, got {grant['expires_in_s']!r}")
    return engine, grant["request_id"], as_block_ids(grant["block_ids"], "grant block_ids"), token, \
        float(grant["expires_in_s"])


def _hold_tokens(hold_token, n: int, what: str = "hold_token") -> tuple[bytes, ...]:
    tokens = (hold_token,) if isinstance(hold_token, str) else tuple(hold_token) if hold_token is not None else ()
    if len(tokens) != n:
        raise KVLayoutError(f"give one {what} per remote engine ({n}), as it was returned, got "
                            f"{hold_token!r}"[:300])
    out = []
    for t in tokens:
        try:
            b = bytes.fromhex(t) if isinstance(t, str) else None
        except ValueError:
            b = None
        if b is None or len(b) != auth.TOKEN_BYTES:
            raise KVLayoutError(f"{what} must be the hex string it was returned as, got {t!r}"[:300])
        out.append(b)
    return tuple(out)


def _timeout(timeout_s: Any, default: float) -> float:
    """``timeout_s`` (``default`` when None), checked to be a positive number of seconds."""
    timeout = default if timeout_s is None else timeout_s
    if not _positive_seconds(timeout):
        raise KVLayoutError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return float(timeout)


def _engine_addresses(engines: Any, what: str) -> tuple[str, ...]:
    """One engine address or distinct ones, as a tuple, each a valid ``host:port``."""
    out = (engines,) if isinstance(engines, str) else tuple(engines)
    if not out or len(set(out)) != len(out) or not all(isinstance(e, str) for e in out):
        raise KVLayoutError(f"{what} must name one engine or distinct engines, got {engines!r}"[:300])
    for e in out:
        parse_address(e)
    return out


def _check_request_id(request_id: Any) -> None:
    if not isinstance(request_id, str) or not 0 < len(request_id.encode()) <= MAX_REQUEST_ID:
        raise KVLayoutError(f"request ids must be non-empty strings of at most {MAX_REQUEST_ID} bytes, "
                            f"got {request_id!r}"[:300])


def _positive_seconds(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0
