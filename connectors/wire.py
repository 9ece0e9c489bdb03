"""The wire format: how messages become bytes and back, under hard size bounds.

Side-channel messages are msgpack maps (never pickle) in frames ``b"KVL1" + 4-byte big-endian length +
payload``; a frame's length is checked against the limit before its payload is read. The note a reader sends
a block owner over NIXL when it gives up on a request is a small msgpack map ``{"r": request id, "ok": bool,
"m": proof}`` (``auth``: a MAC with the hold's token).
Nothing here knows what the messages mean (``handshake`` and ``record`` do).
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, Optional

import msgpack

from .schema import HandshakeError, boolean, exact_keys, string

MAGIC = b"KVL1"
HEADER_BYTES = 8                     # magic + length
MAX_MESSAGE_BYTES = 1 << 20          # default bound on one framed message
MAX_NOTIF_BYTES = 1024               # bound on one NIXL note


# --------------------------------------------------------------------------------------------- framing

def encode_frame(obj: Any, limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """One framed message; raises ``HandshakeError`` if its payload exceeds ``limit`` bytes."""
    payload = msgpack.packb(obj, use_bin_type=True)
    if len(payload) > limit:
        raise HandshakeError(f"message of {len(payload)} B exceeds the {limit}-byte limit")
    return MAGIC + struct.pack(">I", len(payload)) + payload


def decode_payload(payload: bytes, limit: int = MAX_MESSAGE_BYTES) -> Any:
    """Unpack one msgpack payload with hard bounds; any malformation raises ``HandshakeError``."""
    if len(payload) > limit:
        raise HandshakeError(f"message of {len(payload)} B exceeds the {limit}-byte limit")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True,
                               max_bin_len=limit, max_str_len=limit, max_array_len=1 << 20, max_map_len=1 << 16,
                               max_ext_len=0)
    except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError,
            msgpack.exceptions.StackError, msgpack.exceptions.OutOfData) as exc:
        raise HandshakeError(f"malformed handshake message: not valid msgpack ({type(exc).__name__})") from None


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the peer did not answer in time")
        sock.settimeout(remaining)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the peer closed the connection mid-message")
        got += k
    return bytes(buf)


def send_message(sock: socket.socket, obj: Any, deadline: float, limit: int = MAX_MESSAGE_BYTES) -> None:
    """Frame ``obj`` and send it before ``deadline`` (``time.monotonic()``)."""
    data = encode_frame(obj, limit)
    sock.settimeout(max(deadline - time.monotonic(), 1e-3))
    sock.sendall(data)


def recv_message(sock: socket.socket, deadline: float, limit: int = MAX_MESSAGE_BYTES) -> Any:
    """One framed message; wrong magic, oversized length or bad msgpack raise ``HandshakeError``
    before more than the 8-byte header is read."""
    header = _recv_exact(sock, HEADER_BYTES, deadline)
    if header[:4] != MAGIC:
        raise HandshakeError("malformed handshake message: bad frame header (not a kvlayout peer?)")
    (length,) = struct.unpack(">I", header[4:])
    if length > limit:
        raise HandshakeError(f"handshake message of {length} B exceeds the {limit}-byte limit")
    return decode_payload(_recv_exact(sock, length, deadline), limit)


# --------------------------------------------------------------------------------------- notifications

def encode_notif(request_id: str, ok: bool, proof: bytes) -> bytes:
    """The note a reader sends the block owner about a request's blocks (``proof``: see ``auth``)."""
    return msgpack.packb({"r": request_id, "ok": bool(ok), "m": bytes(proof)}, use_bin_type=True)


def decode_notif(data: bytes) -> Optional[tuple[str, bool, bytes]]:
    """``(request id, ok, proof)``, or None for anything that is not a well-formed note (ignored)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_NOTIF_BYTES:
        return None
    try:
        obj = decode_payload(bytes(data), MAX_NOTIF_BYTES)
        exact_keys(obj, ("r", "ok", "m"), "note")
        if not isinstance(obj["m"], bytes):
            return None
        return string(obj["r"], "note.r"), boolean(obj["ok"], "note.ok"), obj["m"]
    except HandshakeError:
        return None


def encode_push_note(request_id: str, writer: str, ok: bool, heads: tuple[int, int], primary: bool,
                     digest: bytes, proof: bytes) -> bytes:
    """The note a writer's WRITE carries to the granting engine (it arrives after the bytes): the grant's
    request id, the writer's address, whether it wrote, the global heads ``(start, count)`` it wrote,
    whether it wrote the replicated layers, its digest hash (``b""`` without digests) and the proof."""
    return msgpack.packb({"t": "push", "r": request_id, "w": writer, "ok": bool(ok), "s": int(heads[0]),
                          "n": int(heads[1]), "p": bool(primary), "h": bytes(digest), "m": bytes(proof)},
                         use_bin_type=True)


def decode_push_note(data: bytes) -> Optional[dict]:
    """A push note as a dict, or None for anything that is not a well-formed one (ignored)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_NOTIF_BYTES:
        return None
    try:
        obj = decode_payload(bytes(data), MAX_NOTIF_BYTES)
        exact_keys(obj, ("t", "r", "w", "ok", "s", "n", "p", "h", "m"), "push note")
        if obj["t"] != "push" or not all(isinstance(obj[k], bytes) for k in ("h", "m")) or \
                not all(isinstance(obj[k], int) and not isinstance(obj[k], bool) and 0 <= obj[k] < 1 << 20
                        for k in ("s", "n")):
            return None
        string(obj["r"], "note.r"), string(obj["w"], "note.w"), boolean(obj["ok"], "note.ok"), boolean(obj["p"], "note.p")
        return obj
    except HandshakeError:
        return None
