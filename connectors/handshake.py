"""The side-channel handshake two engines run before their first transfer: its messages and both halves.

The exchange (decode side = client, prefill side = server), each message one ``wire`` frame:

    client -> server   {"type": "hello", "record": <record>}
    server -> client   {"type": "welcome", "record": <record>, "agent_metadata": <bytes>,
                        "mem_type": "DRAM" | "VRAM", "device_id": int, "regions": [<region>, ...]}
                   or  {"type": "refused", "reason": str, "fields": [str, ...]}

With a shared secret (``auth``), a challenge-response in both directions comes first and every later
message carries a proof; a peer that cannot prove the secret is answered ``{"type": "refused"}`` alone
(no reason, fields or values). A third message type, ``confirm``, lets a reader ask whether the hold it
read from was still valid when its read completed (``NixlConnector``; bound by the hold's token).

Every message is validated against a strict schema (exact keys, types, ranges) before anything reads it; a
malformed or oversized message raises ``HandshakeError`` and nothing else happens. Both sides compare the
two records (``record.check_compatible``) and refuse a mismatch, naming the fields (to an authenticated
peer, or to any peer when no secret is configured).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from kvlayout.errors import KVLayoutError

import msgpack

from . import auth
from .record import MAX_LAYERS, CompatRecord, check_compatible, parse_record
from .schema import MAX_NAME, MAX_U64, HandshakeError, bounded_list, exact_keys, integer, malformed, string
from .wire import MAX_MESSAGE_BYTES, recv_message, send_message

log = logging.getLogger("kvlayout.connectors")

REFUSED = {"type": "refused", "reason": "refused", "fields": []}      # all an unauthenticated peer learns

MEM_TYPES = ("DRAM", "VRAM")
# A thread per connection, many of them: idle or trickling clients cannot fill a small pool (each is cut off
# by FIRST_FRAME_S for its first frame and by the handshake timeout for the whole exchange).
MAX_CONCURRENT_HANDSHAKES = 1024
FIRST_FRAME_S = 1.0


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``."""
    if not isinstance(address, str) or address.count(":") < 1 or len(address) > 300:
        raise KVLayoutError(f"engine address must be 'host:port', got {address!r}")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise KVLayoutError(f"engine address must be 'host:port' with a port in 1..65535, got {address!r}")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    """``host:port``, IPv6 hosts in brackets (``[::1]:5000``); ``parse_address`` reads it back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------------------------- messages

@dataclass(frozen=True)
class RemoteRegion:
    """One remote layer's region as the peer announced it (addresses in the peer's memory)."""

    name: str
    base: int
    block_len: int
    block_stride: int
    num_blocks: int


@dataclass(frozen=True)
class Welcome:
    """A validated welcome: the peer's record, NIXL agent metadata and per-layer regions."""

    record: CompatRecord
    agent_metadata: bytes
    mem_type: str
    device_id: int
    regions: tuple[RemoteRegion, ...]
    canary: Optional[tuple[int, int]] = None        # (block id, seed) of the engine's geometry canary


def make_hello(record: CompatRecord) -> dict:
    """The client's first message."""
    return {"type": "hello", "record": record.to_wire()}


def parse_hello(obj: Any) -> CompatRecord:
    """The record of a hello, validated."""
    if isinstance(obj, dict) and obj.get("type") != "hello":
        raise malformed("message", f"expected a hello, got type {str(obj.get('type'))[:40]!r}")
    return parse_record(exact_keys(obj, ("type", "record"), "hello")["record"])


def _packed(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _nonce_of(obj: Any, kind: str) -> Optional[bytes]:
    if not isinstance(obj, dict) or obj.get("type") != kind:
        return None
    n = obj.get("nonce")
    return n if isinstance(n, bytes) and len(n) == auth.NONCE_BYTES else None


def make_welcome(record: CompatRecord, agent_metadata: bytes, mem_type: str, device_id: int,
                 regions: Sequence[RemoteRegion], canary: Optional[tuple[int, int]] = None) -> dict:
    """The server's answer to a compatible hello (``canary``: see ``connectors.canary``)."""
    return {"type": "welcome", "record": record.to_wire(), "agent_metadata": bytes(agent_metadata),
            "mem_type": mem_type, "device_id": device_id,
            "regions": [[r.name, r.base, r.block_len, r.block_stride, r.num_blocks] for r in regions],
            "canary": None if canary is None else list(canary)}


def make_refusal(reason: str, fields: Sequence[str] = ()) -> dict:
    """The server's answer to a malformed or incompatible hello."""
    return {"type": "refused", "reason": reason[:4000], "fields": [f[:MAX_NAME] for f in fields][:256]}


def _parse_region(rw: Any, w: str, name: str, page_bytes: int) -> RemoteRegion:
    if not isinstance(rw, list) or len(rw) != 5:
        raise malformed(w, "expected [name, base, block_len, block_stride, num_blocks]")
    if rw[0] != name:
        raise malformed(w, f"region for {str(rw[0])[:40]!r} where layer {name!r} was expected")
    base = integer(rw[1], f"{w}.base", 1)
    block_len = integer(rw[2], f"{w}.block_len", 1, 1 << 40)
    stride = integer(rw[3], f"{w}.block_stride", 1, 1 << 48)
    nb = integer(rw[4], f"{w}.num_blocks", 1, 1 << 40)
    if block_len != page_bytes:
        raise malformed(w, f"block_len {block_len} differs from the record's page_bytes {page_bytes}")
    if nb > 1 and stride < block_len:
        raise malformed(w, "blocks overlap")
    if base + (nb - 1) * stride + block_len > MAX_U64:
        raise malformed(w, "region wraps the address space")
    return RemoteRegion(name, base, block_len, stride, nb)


def parse_reply(obj: Any, max_metadata: int = MAX_MESSAGE_BYTES, proof_key: Optional[bytes] = None,
                proof_parts: tuple = ()) -> Welcome:
    """A welcome, validated; a refusal raises ``HandshakeError`` with the peer's reason and fields. With
    ``proof_key``, the welcome must carry ``proof = mac(key, "welcome", *proof_parts, packb(rest))``."""
    if proof_key is not None and isinstance(obj, dict) and obj.get("type") == "welcome":
        proof = obj.pop("proof", None)
        if not auth.verify(proof_key, proof, "welcome", *proof_parts, _packed(obj)):
            raise HandshakeError("the welcome carries no valid proof of the shared secret")
    if isinstance(obj, dict) and obj.get("type") == "refused":
        exact_keys(obj, ("type", "reason", "fields"), "refusal")
        reason = obj["reason"] if isinstance(obj["reason"], str) else "no reason given"
        fields = [f for f in bounded_list(obj["fields"], "refusal.fields", 256) if isinstance(f, str)]
        raise HandshakeError(f"refused by the remote engine: {reason[:2000]}", [f[:MAX_NAME] for f in fields])
    if isinstance(obj, dict) and obj.get("type") != "welcome":
        raise malformed("message", f"expected a welcome or refusal, got type {str(obj.get('type'))[:40]!r}")
    exact_keys(obj, ("type", "record", "agent_metadata", "mem_type", "device_id", "regions", "canary"), "welcome")
    record = parse_record(obj["record"])
    md = obj["agent_metadata"]
    if not isinstance(md, bytes) or not 0 < len(md) <= max_metadata:
        raise malformed("welcome.agent_metadata", "expected non-empty bytes")
    mem_type = string(obj["mem_type"], "welcome.mem_type", MEM_TYPES)
    device_id = integer(obj["device_id"], "welcome.device_id", 0, 1 << 16)
    raw = bounded_list(obj["regions"], "welcome.regions", MAX_LAYERS)
    if len(raw) != len(record.layers):
        raise malformed("welcome.regions", f"{len(raw)} regions for {len(record.layers)} layers")
    regions = tuple(_parse_region(rw, f"welcome.regions[{i}]", lay.name, lay.page_bytes)
                    for i, (rw, lay) in enumerate(zip(raw, record.layers)))
    canary = obj["canary"]
    if canary is not None:
        if not isinstance(canary, list) or len(canary) != 2:
            raise malformed("welcome.canary", "expected null or [block id, seed]")
        canary = (integer(canary[0], "welcome.canary.block", 0, min(r.num_blocks for r in regions) - 1),
                  integer(canary[1], "welcome.canary.seed", 0, (1 << 32) - 1))
    return Welcome(record, md, mem_type, device_id, regions, canary)


# ------------------------------------------------------------------------------------ the two halves

def reply_to_hello(conn: socket.socket, record: CompatRecord, welcome: dict, deadline: float,
                   limit: int = MAX_MESSAGE_BYTES, key: Optional[bytes] = None, first: Any = None
                   ) -> tuple[dict, str]:
    """Server half: read one hello from ``conn`` (``first``: the message already read) and choose the reply
    (``welcome``, or a refusal).

    Returns ``(reply, outcome)``, outcome ``"served"``, ``"refused"`` (incompatible: fields named),
    ``"malformed"`` or ``"unauthenticated"``; the caller sends the reply. With ``key``, the peer must
    first prove the shared secret (see ``auth``); a peer that does not is told nothing but "refused".
    Socket errors and timeouts propagate.
    """
    parts: tuple = ()
    try:
        msg = recv_message(conn, deadline, limit) if first is None else first
        if key is not None:
            nc = _nonce_of(msg, "auth")
            if nc is None:
                return dict(REFUSED), "unauthenticated"
            ns = auth.nonce()
            send_message(conn, {"type": "challenge", "nonce": ns, "proof": auth.mac(key, "server", nc, ns)},
                         deadline, limit)
            msg = recv_message(conn, deadline, limit)
            proof = msg.pop("proof", None) if isinstance(msg, dict) else None
            if not isinstance(msg, dict) or not auth.verify(key, proof, "client", nc, ns, _packed(msg.get("record"))):
                return dict(REFUSED), "unauthenticated"
            parts = (nc, ns)
    except HandshakeError as exc:
        return (dict(REFUSED), "unauthenticated") if key is not None else (make_refusal(str(exc)), "malformed")
    try:
        hello = parse_hello(msg)
        check_compatible(record, hello)
    except HandshakeError as exc:
        return make_refusal(str(exc), exc.fields), ("refused" if exc.fields else "malformed")
    if key is None:
        return welcome, "served"
    return {**welcome, "proof": auth.mac(key, "welcome", *parts, _packed(welcome))}, "served"


def request_welcome(address: str, record: CompatRecord, timeout_s: float, limit: int = MAX_MESSAGE_BYTES,
                    key: Optional[bytes] = None) -> tuple[Optional[Welcome], Optional[str]]:
    """Client half: send our hello to ``address`` and read the welcome, all within ``timeout_s``; with
    ``key``, after both sides proved the shared secret (the server first, so a fake server learns nothing).

    Returns ``(welcome, None)`` for a compatible peer, else ``(None, reason)``; never raises for a peer's
    behaviour (a malformed ``address`` raises ``KVLayoutError``).
    """
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            hello, parts = make_hello(record), ()
            if key is not None:
                nc = auth.nonce()
                send_message(sock, {"type": "auth", "nonce": nc}, deadline, limit)
                challenge = recv_message(sock, deadline, limit)
                ns = _nonce_of(challenge, "challenge")
                if ns is None or not auth.verify(key, challenge.get("proof"), "server", nc, ns):
                    if isinstance(challenge, dict) and challenge.get("type") == "refused":
                        return None, f"handshake with {address} failed: refused by the remote engine"
                    return None, (f"handshake with {address} failed: the engine could not prove the shared "
                                  f"secret (a different secret, or not a kvlayout engine)")
                parts = (nc, ns)
                hello["proof"] = auth.mac(key, "client", nc, ns, _packed(hello["record"]))
            send_message(sock, hello, deadline, limit)
            welcome = parse_reply(recv_message(sock, deadline, limit), limit, key, parts)
        check_compatible(record, welcome.record)
        return welcome, None
    except HandshakeError as exc:
        return None, f"handshake with {address} failed: {exc}"
    except ConnectionRefusedError:
        return None, f"no engine listens at {address} (connection refused)"
    except (TimeoutError, socket.timeout):
        return None, (f"handshake with {address} timed out after {timeout_s:g} s "
                      f"(the engine is stalled or not a kvlayout engine)")
    except Exception as exc:
        return None, f"handshake with {address} failed: {type(exc).__name__}: {exc}"


def confirm_read(address: str, message: dict, timeout_s: float, limit: int = MAX_MESSAGE_BYTES
                 ) -> tuple[bool, str, list, bytes]:
    """Ask the engine at ``address`` whether the hold a read came from was still valid (a ``confirm``
    message, see ``NixlConnector``). Returns ``(valid, reason, digests, proof)``: the digests of the blocks
    read (one bytes per digest group, empty without digests) and the hold owner's MAC over the answer,
    which the caller checks. Never raises for a peer's behaviour."""
    try:
        reply = side_request(address, message, timeout_s, limit)
        exact_keys(reply, ("type", "valid", "reason", "d", "m"), "confirmation")
        if reply["type"] != "confirmed" or not isinstance(reply["valid"], bool) or not isinstance(reply["reason"], str) \
                or not isinstance(reply["d"], list) or not all(isinstance(x, bytes) for x in reply["d"]) \
                or not isinstance(reply["m"], bytes):
            raise malformed("confirmation", "expected {type: confirmed, valid: bool, reason: str, d: [bytes], m: bytes}")
        return reply["valid"], reply["reason"][:500], reply["d"], reply["m"]
    except (HandshakeError, OSError, TimeoutError, socket.timeout) as exc:
        return False, f"the engine at {address} did not confirm the read ({type(exc).__name__}: {exc})", [], b""


def side_request(address: str, message: dict, timeout_s: float, limit: int = MAX_MESSAGE_BYTES) -> Any:
    """Send one request on the side channel of ``address`` and return its one reply (raises ``OSError``,
    ``TimeoutError`` or ``HandshakeError``; ``ConnectionRefusedError`` when nothing listens there)."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        send_message(sock, message, deadline, limit)
        return recv_message(sock, deadline, limit)


class HandshakeServer:
    """The server half on threads of its own: accepts on ``(host, port)`` and answers every hello with
    ``welcome`` (or a refusal) within ``timeout_s``, at most ``max_concurrent`` at once.

    It touches nothing but its sockets; ``count(key)`` is told each outcome (``handshakes_served``,
    ``_refused``, ``_malformed``, ``_dropped`` for a peer that broke off, ``_busy`` for one turned away).
    ``requests``: handlers of the other one-message requests by their ``type`` (``confirm``, ``revoke``); each
    answers with the dict it returns (``{type}s_valid`` / ``_refused`` counted by its ``valid`` key).
    """

    def __init__(self, host: str, port: int, record: CompatRecord, welcome: dict, *, timeout_s: float,
                 limit: int, count: Callable[[str], None], name: str = "kvl-handshake",
                 max_concurrent: int = MAX_CONCURRENT_HANDSHAKES, key: Optional[bytes] = None,
                 requests: Optional[Mapping[str, Callable[[Any], dict]]] = None):
        self.record, self.welcome, self.timeout_s, self.limit, self._count = record, welcome, timeout_s, limit, count
        self.key, self._requests = key, dict(requests or {})
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._listener = socket.create_server((host, port), family=family, backlog=64)
        except OSError as e:
            raise KVLayoutError(f"cannot listen on {format_address(host, port)}: {e}") from None
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.address = format_address(host, self.port)
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting (handshakes under way finish on their own threads)."""
        self._stop.set()
        try:
            self._listener.close()
        except OSError:
            pass
        self._thread.join(timeout=2)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                break
            if not self._slots.acquire(blocking=False):
                self._count("handshakes_busy")
                conn.close()
                continue
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            with conn:
                deadline = time.monotonic() + self.timeout_s
                try:      # a real peer sends its first frame at once; an idle connection is dropped early
                    first = recv_message(conn, min(deadline, time.monotonic() + FIRST_FRAME_S), self.limit)
                except HandshakeError as exc:
                    self._count("handshakes_malformed")
                    send_message(conn, dict(REFUSED) if self.key is not None else make_refusal(str(exc)),
                                 deadline, self.limit)
                    return
                kind = first.get("type") if isinstance(first, dict) else None
                if isinstance(kind, str) and kind in self._requests:
                    reply = self._requests[kind](first)
                    self._count(f"{kind}s_{'valid' if reply.get('valid') else 'refused'}")
                else:
                    reply, outcome = reply_to_hello(conn, self.record, self.welcome, deadline, self.limit,
                                                    self.key, first)
                    self._count(f"handshakes_{outcome}")
                send_message(conn, reply, deadline, self.limit)
        except Exception as exc:                # a peer must never take the listener down
            self._count("handshakes_dropped")
            log.warning("side channel: a connection was dropped: %s: %s", type(exc).__name__, str(exc)[:300])
        finally:
            self._slots.release()


class HandshakeClient:
    """The client half: each handshake runs on a thread of its own; ``results`` hands the finished ones to
    the caller's thread as ``(address, welcome, None)`` or ``(address, None, reason)``."""

    def __init__(self, record: CompatRecord, *, timeout_s: float, limit: int, key: Optional[bytes] = None):
        self.record, self.timeout_s, self.limit, self.key = record, timeout_s, limit, key
        self._results: queue.Queue = queue.Queue()

    def start(self, address: str) -> None:
        """Begin a handshake with ``address`` in the background."""
        threading.Thread(target=self._run, args=(address,), daemon=True).start()

    def _run(self, address: str) -> None:
        welcome, reason = request_welcome(address, self.record, self.timeout_s, self.limit, self.key)
        self._results.put((address, welcome, reason))

    def results(self) -> Iterator[tuple[str, Optional[Welcome], Optional[str]]]:
        """The handshakes finished since the last call, without waiting."""
        while True:
            try:
                yield self._results.get_nowait()
            except queue.Empty:
                return
