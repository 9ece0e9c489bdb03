"""The compatibility record two engines exchange before their first transfer, and its wire format.

Messages are msgpack maps (never pickle) in frames ``b"KVL1" + 4-byte big-endian length + payload``,
bounded in size. Every message is validated against a strict schema (exact keys, types, ranges) before
anything reads it; a malformed or oversized message raises ``HandshakeError`` and nothing else happens.

The exchange (decode side = client, prefill side = server):

    client -> server   {"type": "hello", "record": <record>}
    server -> client   {"type": "welcome", "record": <record>, "agent_metadata": <bytes>,
                        "mem_type": "DRAM" | "VRAM", "device_id": int, "regions": [<region>, ...]}
                   or  {"type": "refused", "reason": str, "fields": [str, ...]}

Both sides compare the two records with ``compare_records`` and refuse a mismatch, naming the fields.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import msgpack

from kvlayout.allocation import KVCache
from kvlayout.errors import KVLayoutError
from kvlayout.specs import MambaSpec, dtype_name

CONNECTOR_VERSION = 1
LAYOUT_ID = "kvlayout/packed-hnd-blocks-first/1"
MAGIC = b"KVL1"
MAX_MESSAGE_BYTES = 1 << 20          # default bound on one framed message
MAX_NAME = 256                       # bound on every string in a record
MAX_LAYERS = 4096
MAX_U64 = (1 << 64) - 1
MEM_TYPES = ("DRAM", "VRAM")
KINDS = ("attention", "mla", "mamba")


class HandshakeError(KVLayoutError):
    """A handshake failed: malformed or oversized message, or incompatible engines (``fields`` names them)."""

    def __init__(self, message: str, fields: Sequence[str] = ()):
        super().__init__(message)
        self.fields = tuple(fields)


# ----------------------------------------------------------------------------------------------- record

@dataclass(frozen=True)
class LayerRecord:
    """What the peer must know about one layer's cache to read it.

    ``num_heads`` head slots per block hold global KV heads ``[head_start, head_start + num_heads)`` of
    ``total_heads`` (attention; MLA and Mamba are replicated: 1 slot of 1). ``content`` is the last dim
    (2·head_size, or the MLA latent, or the Mamba page bytes). ``states``: Mamba ``(name, shape, dtype,
    byte offset)`` when known.
    """

    name: str
    kind: str
    dtype: str
    block_size: Optional[int]
    num_heads: int
    head_start: int
    total_heads: int
    content: int
    page_bytes: int
    states: Optional[tuple[tuple[str, tuple[int, ...], str, int], ...]] = None

    @property
    def state_bytes(self) -> Optional[int]:
        """Bytes of a Mamba page that hold states (the rest is padding)."""
        if not self.states:
            return None
        return max(off + _prod(shape) * _itemsize(dt) for _, shape, dt, off in self.states)


@dataclass(frozen=True)
class CompatRecord:
    """The compatibility record of one engine (one tensor-parallel rank)."""

    engine_id: str
    agent_name: str
    tp_rank: int
    tp_size: int
    cross_layer: bool
    layers: tuple[LayerRecord, ...]
    connector_version: int = CONNECTOR_VERSION
    layout: str = LAYOUT_ID

    def layer(self, name: str) -> LayerRecord:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KVLayoutError(f"no layer {name!r} in the record of engine {self.engine_id!r}")

    def to_wire(self) -> dict:
        return {
            "connector_version": self.connector_version, "layout": self.layout, "engine_id": self.engine_id,
            "agent_name": self.agent_name, "tp_rank": self.tp_rank, "tp_size": self.tp_size,
            "cross_layer": self.cross_layer,
            "layers": [{
                "name": l.name, "kind": l.kind, "dtype": l.dtype, "block_size": l.block_size,
                "num_heads": l.num_heads, "head_start": l.head_start, "total_heads": l.total_heads,
                "content": l.content, "page_bytes": l.page_bytes,
                "states": None if l.states is None else [[n, list(s), d, o] for n, s, d, o in l.states],
            } for l in self.layers],
        }


def build_record(caches: KVCache, *, engine_id: str, agent_name: str, tp_rank: int = 0, tp_size: int = 1,
                 specs: Optional[Mapping[str, Any]] = None) -> CompatRecord:
    """The record of a local cache. ``specs`` (``plan.specs``) adds the Mamba state layouts, which lets
    two engines with differently padded Mamba pages exchange the states."""
    if not (isinstance(tp_size, int) and isinstance(tp_rank, int) and 0 <= tp_rank < tp_size):
        raise KVLayoutError(f"tp_rank must be in [0, tp_size), got tp_rank={tp_rank!r}, tp_size={tp_size!r}")
    layers = []
    for lay in caches.layout.layers:
        _, h, n, c = lay.shape
        page = lay.block_bytes
        if lay.kind == "attention":
            num_heads, head_start, total = h, tp_rank * h, h * tp_size
            block_size = n
        else:
            num_heads, head_start, total = 1, 0, 1
            block_size = None if lay.kind == "mamba" else n
        states = None
        spec = (specs or {}).get(lay.name)
        if lay.kind == "mamba" and isinstance(spec, MambaSpec):
            states = tuple((s.name, tuple(s.shape), dtype_name(s.dtype), s.byte_offset) for s in spec.slices())
        layers.append(LayerRecord(lay.name, lay.kind, dtype_name(lay.dtype), block_size, num_heads, head_start,
                                  total, c, page, states))
    return CompatRecord(engine_id, agent_name, tp_rank, tp_size, caches.layout.cross_layer, tuple(layers))


@dataclass(frozen=True)
class Difference:
    """One field on which two records disagree."""

    field: str
    local: Any
    remote: Any


def compare_records(local: CompatRecord, remote: CompatRecord) -> list[Difference]:
    """Every field that makes the two engines unable to exchange blocks (empty when compatible).

    Tensor-parallel sizes may differ (each rank then reads its head slice), and so may cross-layer versus
    per-layer allocation (regions pair layer by layer); head size, dtype, block size, total head count,
    layer names and kinds, and Mamba state layouts must agree.
    """
    diffs = [Difference(f, getattr(local, f), getattr(remote, f)) for f in ("connector_version", "layout")
             if getattr(local, f) != getattr(remote, f)]
    if diffs:
        return diffs
    lnames, rnames = [l.name for l in local.layers], [l.name for l in remote.layers]
    if lnames != rnames:
        missing = sorted(set(lnames) - set(rnames))
        extra = sorted(set(rnames) - set(lnames))
        diffs.append(Difference("layers", f"{len(lnames)} layers" + (f", remote lacks {missing[:4]}" if missing else ""),
                                f"{len(rnames)} layers" + (f", extra {extra[:4]}" if extra else "")
                                + ("" if missing or extra else ", in another order")))
        return diffs
    for a, b in zip(local.layers, remote.layers):
        for f in ("kind", "dtype", "block_size", "total_heads"):
            if getattr(a, f) != getattr(b, f):
                diffs.append(Difference(f"layers[{a.name}].{f}", getattr(a, f), getattr(b, f)))
        if a.kind != b.kind:
            continue
        if a.kind == "attention" and a.content != b.content:
            diffs.append(Difference(f"layers[{a.name}].head_size", a.content // 2, b.content // 2))
        elif a.kind == "mla" and a.content != b.content:
            diffs.append(Difference(f"layers[{a.name}].latent_size", a.content, b.content))
        elif a.kind == "mamba":
            if a.states is not None and b.states is not None:
                if a.states != b.states:
                    diffs.append(Difference(f"layers[{a.name}].states", a.states, b.states))
            elif a.page_bytes != b.page_bytes:
                diffs.append(Difference(f"layers[{a.name}].page_bytes", a.page_bytes, b.page_bytes))
    return diffs


def check_compatible(local: CompatRecord, remote: CompatRecord) -> None:
    """Raise ``HandshakeError`` naming every differing field (and each engine's value)."""
    diffs = compare_records(local, remote)
    if diffs:
        a, b = local.engine_id, remote.engine_id
        raise HandshakeError(f"engines {a!r} and {b!r} cannot exchange blocks; fields differ: "
                             + "; ".join(f"{d.field} ({a}: {d.local!r}, {b}: {d.remote!r})" for d in diffs),
                             [d.field for d in diffs])


# ------------------------------------------------------------------------------------ strict validation

def _bad(where: str, what: str) -> HandshakeError:
    return HandshakeError(f"malformed handshake message: {where}: {what}")


def _keys(obj: Any, required: Sequence[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise _bad(where, f"expected a map, got {type(obj).__name__}")
    keys = set(obj)
    if keys != set(required):
        missing, extra = sorted(set(required) - keys), sorted(map(str, keys - set(required)))
        raise _bad(where, (f"missing {missing}" if missing else "") + (" " if missing and extra else "")
                   + (f"unexpected {extra[:8]}" if extra else ""))
    return obj


def _int(v: Any, where: str, lo: int = 0, hi: int = MAX_U64) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(where, f"expected an integer in [{lo}, {hi}], got {v!r}"[:200])
    return v


def _opt_int(v: Any, where: str, lo: int = 1, hi: int = MAX_U64) -> Optional[int]:
    return None if v is None else _int(v, where, lo, hi)


def _str(v: Any, where: str, choices: Optional[Sequence[str]] = None) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME:
        raise _bad(where, f"expected a string of 1..{MAX_NAME} characters, got {type(v).__name__}")
    if choices is not None and v not in choices:
        raise _bad(where, f"expected one of {list(choices)}, got {v!r}")
    return v


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise _bad(where, f"expected a boolean, got {type(v).__name__}")
    return v


def _list(v: Any, where: str, max_len: int) -> list:
    if not isinstance(v, list) or len(v) > max_len:
        raise _bad(where, f"expected a list of at most {max_len} items, got {type(v).__name__}")
    return v


_LAYER_KEYS = ("name", "kind", "dtype", "block_size", "num_heads", "head_start", "total_heads", "content",
               "page_bytes", "states")
_RECORD_KEYS = ("connector_version", "layout", "engine_id", "agent_name", "tp_rank", "tp_size", "cross_layer",
                "layers")
_DTYPES = ("float16", "bfloat16", "float32", "float8_e4m3fn", "float8_e5m2", "int8")
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1,
             "float64": 8, "int32": 4, "int64": 8, "int16": 2, "uint8": 1}


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE[dtype]


def parse_record(obj: Any, where: str = "record") -> CompatRecord:
    """Validate a wire record strictly and turn it into a ``CompatRecord``."""
    if isinstance(obj, dict) and obj.get("connector_version") != CONNECTOR_VERSION:
        raise HandshakeError(f"fields differ: connector_version (here {CONNECTOR_VERSION}, peer "
                             f"{str(obj.get('connector_version'))[:40]})", ["connector_version"])
    _keys(obj, _RECORD_KEYS, where)
    tp_size = _int(obj["tp_size"], f"{where}.tp_size", 1, 1 << 16)
    tp_rank = _int(obj["tp_rank"], f"{where}.tp_rank", 0, tp_size - 1)
    layers, seen = [], set()
    for i, lw in enumerate(_list(obj["layers"], f"{where}.layers", MAX_LAYERS)):
        w = f"{where}.layers[{i}]"
        _keys(lw, _LAYER_KEYS, w)
        name = _str(lw["name"], f"{w}.name")
        if name in seen:
            raise _bad(w, f"layer {name!r} appears twice")
        seen.add(name)
        kind = _str(lw["kind"], f"{w}.kind", KINDS)
        dtype = _str(lw["dtype"], f"{w}.dtype", _DTYPES)
        num_heads = _int(lw["num_heads"], f"{w}.num_heads", 1, 1 << 16)
        total = _int(lw["total_heads"], f"{w}.total_heads", 1, 1 << 20)
        head_start = _int(lw["head_start"], f"{w}.head_start", 0, total - 1)
        if head_start + num_heads > total:
            raise _bad(w, f"head slots [{head_start}, {head_start + num_heads}) exceed total_heads {total}")
        block_size = _opt_int(lw["block_size"], f"{w}.block_size", 1, 1 << 20)
        content = _int(lw["content"], f"{w}.content", 1, 1 << 40)
        page = _int(lw["page_bytes"], f"{w}.page_bytes", 1, 1 << 40)
        if kind == "mamba":
            expect = content
        else:
            if block_size is None:
                raise _bad(w, f"a {kind} layer needs a block_size")
            expect = num_heads * block_size * content * _itemsize(dtype)
        if kind != "attention" and (num_heads, head_start, total) != (1, 0, 1):
            raise _bad(w, f"a {kind} layer has one replicated head slot")
        if page != expect:
            raise _bad(w, f"page_bytes {page} does not match the block format ({expect} bytes)")
        states = None
        if lw["states"] is not None:
            if kind != "mamba":
                raise _bad(w, "only Mamba layers carry states")
            states = []
            for j, sw in enumerate(_list(lw["states"], f"{w}.states", 64)):
                if not isinstance(sw, list) or len(sw) != 4:
                    raise _bad(f"{w}.states[{j}]", "expected [name, shape, dtype, offset]")
                sname = _str(sw[0], f"{w}.states[{j}].name")
                shape = tuple(_int(s, f"{w}.states[{j}].shape", 1, 1 << 40)
                              for s in _list(sw[1], f"{w}.states[{j}].shape", 8))
                sdt = _str(sw[2], f"{w}.states[{j}].dtype", tuple(_ITEMSIZE))
                off = _int(sw[3], f"{w}.states[{j}].offset", 0, page)
                if off + _prod(shape) * _itemsize(sdt) > page:
                    raise _bad(f"{w}.states[{j}]", "state reaches past the page")
                states.append((sname, shape, sdt, off))
            states = tuple(states)
        layers.append(LayerRecord(name, kind, dtype, block_size, num_heads, head_start, total, content, page, states))
    return CompatRecord(
        engine_id=_str(obj["engine_id"], f"{where}.engine_id"), agent_name=_str(obj["agent_name"], f"{where}.agent_name"),
        tp_rank=tp_rank, tp_size=tp_size, cross_layer=_bool(obj["cross_layer"], f"{where}.cross_layer"),
        layers=tuple(layers), connector_version=CONNECTOR_VERSION,
        layout=_str(obj["layout"], f"{where}.layout", (LAYOUT_ID,)))


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


def parse_hello(obj: Any) -> CompatRecord:
    if isinstance(obj, dict) and obj.get("type") != "hello":
        raise _bad("message", f"expected a hello, got type {str(obj.get('type'))[:40]!r}")
    return parse_record(_keys(obj, ("type", "record"), "hello")["record"])


def parse_reply(obj: Any, max_metadata: int = MAX_MESSAGE_BYTES) -> Welcome:
    """A welcome, validated; a refusal raises ``HandshakeError`` with the peer's reason and fields."""
    if isinstance(obj, dict) and obj.get("type") == "refused":
        _keys(obj, ("type", "reason", "fields"), "refusal")
        reason = obj["reason"] if isinstance(obj["reason"], str) else "no reason given"
        fields = [f for f in _list(obj["fields"], "refusal.fields", 256) if isinstance(f, str)]
        raise HandshakeError(f"refused by the remote engine: {reason[:2000]}", [f[:MAX_NAME] for f in fields])
    if isinstance(obj, dict) and obj.get("type") != "welcome":
        raise _bad("message", f"expected a welcome or refusal, got type {str(obj.get('type'))[:40]!r}")
    _keys(obj, ("type", "record", "agent_metadata", "mem_type", "device_id", "regions"), "welcome")
    record = parse_record(obj["record"])
    md = obj["agent_metadata"]
    if not isinstance(md, bytes) or not 0 < len(md) <= max_metadata:
        raise _bad("welcome.agent_metadata", "expected non-empty bytes")
    mem_type = _str(obj["mem_type"], "welcome.mem_type", MEM_TYPES)
    device_id = _int(obj["device_id"], "welcome.device_id", 0, 1 << 16)
    raw = _list(obj["regions"], "welcome.regions", MAX_LAYERS)
    if len(raw) != len(record.layers):
        raise _bad("welcome.regions", f"{len(raw)} regions for {len(record.layers)} layers")
    regions = []
    for i, (rw, lay) in enumerate(zip(raw, record.layers)):
        w = f"welcome.regions[{i}]"
        if not isinstance(rw, list) or len(rw) != 5:
            raise _bad(w, "expected [name, base, block_len, block_stride, num_blocks]")
        if rw[0] != lay.name:
            raise _bad(w, f"region for {str(rw[0])[:40]!r} where layer {lay.name!r} was expected")
        base = _int(rw[1], f"{w}.base", 1)
        block_len = _int(rw[2], f"{w}.block_len", 1, 1 << 40)
        stride = _int(rw[3], f"{w}.block_stride", 1, 1 << 48)
        nb = _int(rw[4], f"{w}.num_blocks", 1, 1 << 40)
        if block_len != lay.page_bytes:
            raise _bad(w, f"block_len {block_len} differs from the record's page_bytes {lay.page_bytes}")
        if nb > 1 and stride < block_len:
            raise _bad(w, "blocks overlap")
        if base + (nb - 1) * stride + block_len > MAX_U64:
            raise _bad(w, "region wraps the address space")
        regions.append(RemoteRegion(lay.name, base, block_len, stride, nb))
    return Welcome(record, md, mem_type, device_id, tuple(regions))


def make_hello(record: CompatRecord) -> dict:
    return {"type": "hello", "record": record.to_wire()}


def make_welcome(record: CompatRecord, agent_metadata: bytes, mem_type: str, device_id: int,
                 regions: Sequence[RemoteRegion]) -> dict:
    return {"type": "welcome", "record": record.to_wire(), "agent_metadata": bytes(agent_metadata),
            "mem_type": mem_type, "device_id": device_id,
            "regions": [[r.name, r.base, r.block_len, r.block_stride, r.num_blocks] for r in regions]}


def make_refusal(reason: str, fields: Sequence[str] = ()) -> dict:
    return {"type": "refused", "reason": reason[:4000], "fields": [f[:MAX_NAME] for f in fields][:256]}


# --------------------------------------------------------------------------------------------- framing

def encode_frame(obj: Any, limit: int = MAX_MESSAGE_BYTES) -> bytes:
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
    data = encode_frame(obj, limit)
    sock.settimeout(max(deadline - time.monotonic(), 1e-3))
    sock.sendall(data)


def recv_message(sock: socket.socket, deadline: float, limit: int = MAX_MESSAGE_BYTES) -> Any:
    """One framed message; wrong magic, oversized length or bad msgpack raise ``HandshakeError``
    before more than the 8-byte header is read."""
    header = _recv_exact(sock, 8, deadline)
    if header[:4] != MAGIC:
        raise HandshakeError("malformed handshake message: bad frame header (not a kvlayout peer?)")
    (length,) = struct.unpack(">I", header[4:])
    if length > limit:
        raise HandshakeError(f"handshake message of {length} B exceeds the {limit}-byte limit")
    return decode_payload(_recv_exact(sock, length, deadline), limit)


# --------------------------------------------------------------------------------------- notifications

MAX_NOTIF_BYTES = 1024


def encode_notif(request_id: str, ok: bool) -> bytes:
    """The note a reader sends the block owner when it is done with a request's blocks."""
    return msgpack.packb({"r": request_id, "ok": bool(ok)}, use_bin_type=True)


def decode_notif(data: bytes) -> Optional[tuple[str, bool]]:
    """``(request id, ok)``, or None for anything that is not a well-formed note (ignored by the caller)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_NOTIF_BYTES:
        return None
    try:
        obj = decode_payload(bytes(data), MAX_NOTIF_BYTES)
        _keys(obj, ("r", "ok"), "note")
        return _str(obj["r"], "note.r"), _bool(obj["ok"], "note.ok")
    except HandshakeError:
        return None
