"""The connector's state machines: peers, loads (requests), transfers (one READ each) and holds.

Every state is a named ``enum`` member and every legal move is listed once, in ``TRANSITIONS``; records
change state only through ``move``, which raises ``IllegalTransition`` for any other move::

    peer      CONNECTING -> READY -> FAILED            (CONNECTING -> FAILED: the handshake failed)
    load      WAITING -> RUNNING -> FINISHED           (WAITING/RUNNING -> ABORTING -> FAILED)
    transfer  NEW -> POSTED -> DONE                    (NEW/POSTED -> CANCELLED)
    hold      HELD -> RELEASED | EXPIRED | CANCELLED

Nothing here talks to NIXL or the network: a transfer's ``handle`` is any object with ``release()``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from kvlayout.errors import KVLayoutError


class PeerState(enum.Enum):
    CONNECTING = "connecting"   # handshake under way
    VERIFYING = "verifying"     # reading its geometry canary back through NIXL
    READY = "ready"             # descriptor lists prepared: loads may use it
    FAILED = "failed"           # forgotten; released once none of its transfers is left


class LoadState(enum.Enum):
    WAITING = "waiting"         # for the handshakes with its engines
    RUNNING = "running"         # its transfers are posted
    CONFIRMING = "confirming"   # every transfer done; asking each engine whether its hold was still valid
    ABORTING = "aborting"       # failed; waits until no transfer can still write into its blocks
    FINISHED = "finished"       # every transfer done (reported in poll().finished)
    FAILED = "failed"           # reported in poll().failed


class PushState(enum.Enum):
    WAITING = "waiting"         # for the handshake with the engine that granted the blocks
    RUNNING = "running"         # its WRITE is posted (the note rides on it)
    ABORTING = "aborting"       # failed; waits until the WRITE can no longer land
    FINISHED = "finished"       # written (reported in poll().pushed); the source blocks are free
    FAILED = "failed"           # reported in poll().push_failed


class GrantState(enum.Enum):
    OPEN = "open"               # blocks kept for the writers; their notes are awaited
    REVOKING = "revoking"       # failed; each writer not yet settled is asked to revoke (no write may land after)
    FINISHED = "finished"       # every writer wrote (reported in poll().finished)
    FAILED = "failed"           # reported in poll().failed once no write can land


class TransferState(enum.Enum):
    NEW = "new"                 # no NIXL handle yet
    POSTED = "posted"           # NIXL holds a live handle
    DONE = "done"               # finished; handle released
    CANCELLED = "cancelled"     # handle released before it finished (or never made)


class HoldState(enum.Enum):
    HELD = "held"               # blocks kept for remote readers
    RELEASED = "released"       # every reader reported (ok or gave up)
    EXPIRED = "expired"         # the hold timed out first
    CANCELLED = "cancelled"     # the engine dropped it (cancel_hold)


TRANSITIONS: dict[enum.Enum, frozenset] = {
    PeerState.CONNECTING: frozenset({PeerState.VERIFYING, PeerState.READY, PeerState.FAILED}),
    PeerState.VERIFYING: frozenset({PeerState.READY, PeerState.FAILED}),
    PeerState.READY: frozenset({PeerState.FAILED}),
    PeerState.FAILED: frozenset(),
    LoadState.WAITING: frozenset({LoadState.RUNNING, LoadState.ABORTING}),
    LoadState.RUNNING: frozenset({LoadState.CONFIRMING, LoadState.ABORTING}),
    LoadState.CONFIRMING: frozenset({LoadState.FINISHED, LoadState.ABORTING}),
    LoadState.ABORTING: frozenset({LoadState.FAILED}),
    LoadState.FINISHED: frozenset(),
    LoadState.FAILED: frozenset(),
    PushState.WAITING: frozenset({PushState.RUNNING, PushState.ABORTING}),
    PushState.RUNNING: frozenset({PushState.FINISHED, PushState.ABORTING}),
    PushState.ABORTING: frozenset({PushState.FAILED}),
    PushState.FINISHED: frozenset(),
    PushState.FAILED: frozenset(),
    GrantState.OPEN: frozenset({GrantState.FINISHED, GrantState.REVOKING}),
    GrantState.REVOKING: frozenset({GrantState.FAILED}),
    GrantState.FINISHED: frozenset(),
    GrantState.FAILED: frozenset(),
    TransferState.NEW: frozenset({TransferState.POSTED, TransferState.CANCELLED}),
    TransferState.POSTED: frozenset({TransferState.DONE, TransferState.CANCELLED}),
    TransferState.DONE: frozenset(),
    TransferState.CANCELLED: frozenset(),
    HoldState.HELD: frozenset({HoldState.RELEASED, HoldState.EXPIRED, HoldState.CANCELLED}),
    HoldState.RELEASED: frozenset(),
    HoldState.EXPIRED: frozenset(),
    HoldState.CANCELLED: frozenset(),
}


class IllegalTransition(KVLayoutError):
    """A state machine was asked for a move ``TRANSITIONS`` does not list (a connector bug)."""


class _StateMachine:
    state: enum.Enum

    def move(self, new: enum.Enum) -> None:
        """Go to state ``new``; raises ``IllegalTransition`` unless the move is listed in ``TRANSITIONS``."""
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"{type(self).__name__} {self._label()!r}: {self.state.name} -> {new.name} "
                                    f"is not a legal transition")
        self.state = new

    def _label(self) -> str:
        return ""


def release_handle(handle: Any) -> bool:
    """Release a NIXL handle; False when NIXL cannot yet (a transfer it could not cancel)."""
    if handle is None:
        return True
    try:
        handle.release()
        return True
    except Exception:
        return False


@dataclass
class Peer(_StateMachine):
    """A remote engine this one reads from: handshake result and the descriptor lists prepared for it."""

    address: str
    state: PeerState = PeerState.CONNECTING
    welcome: Any = None                              # handshake.Welcome once the handshake succeeded
    agent_name: str = ""
    prepared: dict = field(default_factory=dict)    # topology.Role -> prepared lists, or None (serves nothing)
    kind_blocks: dict = field(default_factory=dict)
    canary: Any = None                               # (NIXL handle, pairs, deadline) while VERIFYING

    @property
    def ready(self) -> bool:
        return self.state is PeerState.READY

    def _label(self) -> str:
        return self.address


@dataclass
class Transfer(_StateMachine):
    """One READ of a load from one engine."""

    address: str
    state: TransferState = TransferState.NEW
    handle: Any = None                               # live NIXL handle exactly while POSTED
    nixl_descriptors: Optional[int] = None

    @property
    def done(self) -> bool:
        return self.state is TransferState.DONE

    @property
    def live(self) -> bool:
        """True while NIXL may still write through this transfer."""
        return self.state is TransferState.POSTED

    def post(self, handle: Any) -> None:
        self.move(TransferState.POSTED)
        self.handle = handle

    def finish(self) -> None:
        """Done: release the handle (a failure to release is ignored; the bytes are in place)."""
        self.move(TransferState.DONE)
        release_handle(self.handle)
        self.handle = None

    def cancel(self) -> None:
        """Cancel unless finished: release the handle; stays POSTED if NIXL cannot let go yet (retry later)."""
        if self.state is TransferState.NEW:
            self.move(TransferState.CANCELLED)
        elif self.state is TransferState.POSTED and release_handle(self.handle):
            self.handle = None
            self.move(TransferState.CANCELLED)

    def _label(self) -> str:
        return self.address


@dataclass
class Load(_StateMachine):
    """One request's read of remote blocks into local blocks, from one or more engines."""

    request_id: str
    remote_request_id: str
    engines: tuple[str, ...]
    local_ids: dict
    remote_ids: dict
    started: float
    deadline: float
    timeout_s: float
    tokens: tuple = ()                               # the hold token of each engine (from its hold_blocks)
    transfers: list[Transfer] = field(default_factory=list)
    confirmed: set = field(default_factory=set)      # engines that confirmed their hold was valid
    state: LoadState = LoadState.WAITING
    reason: str = ""
    costs: tuple = (0.0, 0.0, 0.0)
    remote_digests: dict = field(default_factory=dict)   # engine -> the digests its confirmation carried
    digest_check: Any = None                         # digests.DigestCheck once every engine confirmed

    @property
    def live(self) -> bool:
        """True while any of its transfers may still write into its blocks."""
        return any(t.live for t in self.transfers)

    def abort(self, reason: str) -> None:
        self.move(LoadState.ABORTING)
        self.reason = reason

    def _label(self) -> str:
        return self.request_id


@dataclass
class Hold(_StateMachine):
    """Blocks kept on this engine until ``num_readers`` remote readers report, or until ``deadline``."""

    request_id: str
    block_ids: Any                                   # as given to hold_blocks (list, or {kind: list})
    num_readers: int
    deadline: float
    timeout_s: float
    token: bytes = b""                               # binds notes and confirmations to this hold
    digests: Any = None                              # per digest group (``digests.held_digests``), or None
    readers: set = field(default_factory=set)
    failures: list = field(default_factory=list)
    state: HoldState = HoldState.HELD

    def note(self, reader: str, ok: bool) -> None:
        """A reader reported: it read the blocks (``ok``) or gave up."""
        self.readers.add(reader)
        if not ok:
            self.failures.append(reader)

    def settle(self, now: float) -> Optional[tuple[str, bool]]:
        """``(reason, ok)`` once every reader reported or the hold timed out (the hold is then over), else None."""
        if len(self.readers) >= self.num_readers:
            self.move(HoldState.RELEASED)
            ok = not self.failures
            return (f"read by {self.num_readers} reader(s)" if ok else
                    f"{len(self.failures)} of {self.num_readers} reader(s) gave up"), ok
        if now > self.deadline:
            self.move(HoldState.EXPIRED)
            return (f"timed out after {self.timeout_s:g} s with {len(self.readers)} of {self.num_readers} "
                    f"reader(s) done"), False
        return None

    def _label(self) -> str:
        return self.request_id


@dataclass
class Push(_StateMachine):
    """(Prefill side.) One request's WRITE of local blocks into blocks a remote engine granted."""

    request_id: str
    grant_id: str                                    # the request id the granting engine named
    address: str                                     # the granting engine
    local_ids: dict
    remote_ids: dict
    started: float
    deadline: float                                  # the grant's expiry, on this engine's clock
    token: bytes
    transfer: Optional[Transfer] = None
    revoked: bool = False                            # the granting engine revoked it: never post, cancel
    state: PushState = PushState.WAITING
    reason: str = ""

    @property
    def live(self) -> bool:
        return self.transfer is not None and self.transfer.live

    def _label(self) -> str:
        return self.request_id


@dataclass
class Grant(_StateMachine):
    """(Decode side.) Blocks kept for remote writers until each wrote (its note arrived) or revoked."""

    request_id: str
    block_ids: dict                                  # normalized {kind: ids}
    writers: tuple[str, ...]                         # the addresses allowed to write
    deadline: float
    timeout_s: float
    token: bytes
    notes: dict = field(default_factory=dict)        # writer -> (head_start, num_heads, primary, digest hash)
    settled: dict = field(default_factory=dict)      # writer -> why it can no longer write ("wrote", ...)
    revoking: set = field(default_factory=set)       # writers a revoke request is under way to
    next_revoke: float = 0.0
    state: GrantState = GrantState.OPEN
    reason: str = ""

    def _label(self) -> str:
        return self.request_id
