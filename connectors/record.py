"""The compatibility record: what two engines must agree on before one reads the other's blocks.

A record names the layout, the connector version, the engine's tensor-parallel position and, per layer, the
kind, dtype, block size, head counts and block format. It travels as plain msgpack data (``to_wire`` /
``parse_record``, never pickle); ``parse_record`` checks a peer's record strictly. ``check_compatible``
refuses a mismatch with a message naming every differing field and both engines' values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from kvlayout.allocation import KVCache
from kvlayout.errors import KVLayoutError
from kvlayout.specs import MambaSpec, dtype_name
from kvlayout.tp import kv_head_range

from .schema import (MAX_NAME, HandshakeError, bounded_list, boolean, exact_keys, integer, malformed, optional_integer,
                     string)

CONNECTOR_VERSION = 3                # 2: model identity, authenticated handshake; 3: groups of a page pool
LAYOUT_ID = "kvlayout/packed-hnd-blocks-first/1"
MAX_LAYERS = 4096
KINDS = ("attention", "mla", "mamba")

_LAYER_KEYS = ("name", "kind", "group", "dtype", "block_size", "num_heads", "head_start", "total_heads", "content",
               "page_bytes", "states")
_RECORD_KEYS = ("connector_version", "layout", "engine_id", "agent_name", "tp_rank", "tp_size", "cross_layer", "pooled",
                "model_id", "layers")
_DTYPES = ("float16", "bfloat16", "float32", "float8_e4m3fn", "float8_e5m2", "int8")
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1,
             "float64": 8, "int32": 4, "int64": 8, "int16": 2, "uint8": 1}


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


@dataclass(frozen=True)
class LayerRecord:
    """What the peer must know about one layer's cache to read it.

    ``num_heads`` head slots per block hold global KV heads ``[head_start, head_start + num_heads)`` of
    ``total_heads`` (attention; MLA and Mamba are replicated: 1 slot of 1). ``content`` is the last dim
    (2·head_size, or the MLA latent, or the Mamba page bytes). ``states``: Mamba ``(name, shape, dtype,
    byte offset, tp_rows)`` when known (``tp_rows``: ``MambaSpec.tp_rows`` of that state, or None).
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
    states: Optional[tuple[tuple[str, tuple[int, ...], str, int, Optional[tuple]], ...]] = None
    group: int = 0                   # the layout group (block-id space) the layer belongs to

    @property
    def state_bytes(self) -> Optional[int]:
        """Bytes of a Mamba page that hold states (the rest is padding)."""
        if not self.states:
            return None
        return max(off + _prod(shape) * _ITEMSIZE[dt] for _, shape, dt, off, _ in self.states)


@dataclass(frozen=True)
class CompatRecord:
    """The compatibility record of one engine (one tensor-parallel rank)."""

    engine_id: str
    agent_name: str
    tp_rank: int
    tp_size: int
    cross_layer: bool
    layers: tuple[LayerRecord, ...]
    pooled: bool = False            # groups share a hybrid page pool: block ids are per group
    connector_version: int = CONNECTOR_VERSION
    layout: str = LAYOUT_ID
    model_id: str = ""              # what the engine serves (name, revision, weights fingerprint); "" unknown

    def layer(self, name: str) -> LayerRecord:
        """The record of layer ``name``."""
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KVLayoutError(f"no layer {name!r} in the record of engine {self.engine_id!r}")

    def to_wire(self) -> dict:
        """The record as plain msgpack-able data (``parse_record`` reads it back)."""
        return {
            "connector_version": self.connector_version, "layout": self.layout, "engine_id": self.engine_id,
            "agent_name": self.agent_name, "tp_rank": self.tp_rank, "tp_size": self.tp_size,
            "cross_layer": self.cross_layer, "pooled": self.pooled, "model_id": self.model_id,
            "layers": [{
                "name": l.name, "kind": l.kind, "group": l.group, "dtype": l.dtype, "block_size": l.block_size,
                "num_heads": l.num_heads, "head_start": l.head_start, "total_heads": l.total_heads,
                "content": l.content, "page_bytes": l.page_bytes,
                "states": None if l.states is None else [
                    [n, list(s), d, o, None if r is None else [[b, sh] for b, sh in r]] for n, s, d, o, r in l.states],
            } for l in self.layers],
        }


def build_record(caches: KVCache, *, engine_id: str, agent_name: str, tp_rank: int = 0, tp_size: int = 1,
                 specs: Optional[Mapping[str, Any]] = None, model_id: str = "",
                 num_kv_heads: Union[int, Mapping[str, int], None] = None) -> CompatRecord:
    """The record of a local cache. ``specs`` (``plan.specs``) adds the Mamba state layouts, which lets
    two engines with differently padded Mamba pages exchange the states. ``model_id`` names the model
    (and its weights) the engine serves; engines with different ids refuse each other. ``num_kv_heads``:
    the model's KV heads over all ranks (one count, or one per layer name); needed when there are fewer
    than ranks (each rank then holds a replica, ``kvlayout.tp.kv_head_range``), else ``H * tp_size``."""
    if not isinstance(model_id, str) or len(model_id) > MAX_NAME:
        raise KVLayoutError(f"model_id must be a string of at most {MAX_NAME} characters, got {model_id!r}"[:300])
    if not (isinstance(tp_size, int) and isinstance(tp_rank, int) and 0 <= tp_rank < tp_size):
        raise KVLayoutError(f"tp_rank must be in [0, tp_size), got tp_rank={tp_rank!r}, tp_size={tp_size!r}")
    layers = []
    for lay in caches.layout.layers:
        _, h, n, c = lay.shape
        page = lay.block_bytes
        if lay.kind == "attention":
            total = num_kv_heads.get(lay.name) if isinstance(num_kv_heads, Mapping) else num_kv_heads
            if total is None:
                num_heads, head_start, total = h, tp_rank * h, h * tp_size
            else:
                head_start, count = kv_head_range(tp_rank, tp_size, total)
                if count != h:
                    raise KVLayoutError(f"layer {lay.name!r} holds {h} KV heads, but {total} KV heads at "
                                        f"tensor-parallel size {tp_size} give {count} per rank")
                num_heads = h
            block_size = n
        else:
            num_heads, head_start, total = 1, 0, 1
            block_size = None if lay.kind == "mamba" else n
        states = None
        spec = (specs or {}).get(lay.name)
        if lay.kind == "mamba" and isinstance(spec, MambaSpec):
            rows = spec.tp_rows or {}
            for s in spec.slices():
                if s.name in rows and sum(n // tp_size if sh else n for n, sh in rows[s.name]) != s.shape[0] \
                        or any(sh and n % tp_size for n, sh in rows.get(s.name, ())):
                    raise KVLayoutError(f"layer {lay.name!r}: state {s.name!r} has {s.shape[0]} rows, which its "
                                        f"tp_rows {rows[s.name]} do not give at tensor-parallel size {tp_size}")
            states = tuple((s.name, tuple(s.shape), dtype_name(s.dtype), s.byte_offset, rows.get(s.name))
                           for s in spec.slices())
        layers.append(LayerRecord(lay.name, lay.kind, dtype_name(lay.dtype), block_size, num_heads, head_start,
                                  total, c, page, states, lay.group))
    pooled = caches.layout.pool is not None and len(caches.layout.groups) > 1
    return CompatRecord(engine_id, agent_name, tp_rank, tp_size, caches.layout.cross_layer, tuple(layers),
                        pooled, model_id=model_id)


# ---------------------------------------------------------------------------------------- comparison

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
    diffs = [Difference(f, getattr(local, f), getattr(remote, f))
             for f in ("connector_version", "layout", "model_id", "pooled")
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
        for f in ("kind", "dtype", "block_size", "total_heads") + (("group",) if local.pooled else ()):
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
                if a.states != b.states and not states_sliceable(a.states, b.states):
                    diffs.append(Difference(f"layers[{a.name}].states", a.states, b.states))
            elif a.page_bytes != b.page_bytes:
                diffs.append(Difference(f"layers[{a.name}].page_bytes", a.page_bytes, b.page_bytes))
    return diffs


def states_sliceable(a: tuple, b: tuple) -> bool:
    """Two ranks' state layouts that differ only in how TP cut their rows: same names, dtypes, inner dims
    and global row blocks (``MambaSpec.tp_rows``) on both sides."""
    if len(a) != len(b):
        return False
    return all(na == nb and da == db and sa[1:] == sb[1:] and ra is not None and ra == rb
               for (na, sa, da, _, ra), (nb, sb, db, _, rb) in zip(a, b))


def check_compatible(local: CompatRecord, remote: CompatRecord) -> None:
    """Raise ``HandshakeError`` naming every differing field (and each engine's value)."""
    diffs = compare_records(local, remote)
    if diffs:
        a, b = local.engine_id, remote.engine_id
        raise HandshakeError(f"engines {a!r} and {b!r} cannot exchange blocks; fields differ: "
                             + "; ".join(f"{d.field} ({a}: {d.local!r}, {b}: {d.remote!r})" for d in diffs),
                             [d.field for d in diffs])


# ------------------------------------------------------------------------------------ strict parsing

def _parse_states(raw: Any, w: str, page: int) -> tuple:
    states = []
    for j, sw in enumerate(bounded_list(raw, f"{w}.states", 64)):
        if not isinstance(sw, list) or len(sw) != 5:
            raise malformed(f"{w}.states[{j}]", "expected [name, shape, dtype, offset, tp_rows]")
        sname = string(sw[0], f"{w}.states[{j}].name")
        shape = tuple(integer(s, f"{w}.states[{j}].shape", 1, 1 << 40)
                      for s in bounded_list(sw[1], f"{w}.states[{j}].shape", 8))
        sdt = string(sw[2], f"{w}.states[{j}].dtype", tuple(_ITEMSIZE))
        off = integer(sw[3], f"{w}.states[{j}].offset", 0, page)
        if off + _prod(shape) * _ITEMSIZE[sdt] > page:
            raise malformed(f"{w}.states[{j}]", "state reaches past the page")
        rows = None
        if sw[4] is not None:
            rows = []
            for k, rw in enumerate(bounded_list(sw[4], f"{w}.states[{j}].tp_rows", 16)):
                if not isinstance(rw, list) or len(rw) != 2:
                    raise malformed(f"{w}.states[{j}].tp_rows[{k}]", "expected [rows, sharded]")
                rows.append((integer(rw[0], f"{w}.states[{j}].tp_rows[{k}]", 1, 1 << 40),
                             boolean(rw[1], f"{w}.states[{j}].tp_rows[{k}]")))
            if not rows:
                raise malformed(f"{w}.states[{j}].tp_rows", "empty")
            rows = tuple(rows)
        states.append((sname, shape, sdt, off, rows))
    return tuple(states)


def _parse_layer(lw: Any, w: str, seen: set) -> LayerRecord:
    exact_keys(lw, _LAYER_KEYS, w)
    name = string(lw["name"], f"{w}.name")
    if name in seen:
        raise malformed(w, f"layer {name!r} appears twice")
    seen.add(name)
    kind = string(lw["kind"], f"{w}.kind", KINDS)
    group = integer(lw["group"], f"{w}.group", 0, MAX_LAYERS)
    dtype = string(lw["dtype"], f"{w}.dtype", _DTYPES)
    num_heads = integer(lw["num_heads"], f"{w}.num_heads", 1, 1 << 16)
    total = integer(lw["total_heads"], f"{w}.total_heads", 1, 1 << 20)
    head_start = integer(lw["head_start"], f"{w}.head_start", 0, total - 1)
    if head_start + num_heads > total:
        raise malformed(w, f"head slots [{head_start}, {head_start + num_heads}) exceed total_heads {total}")
    block_size = optional_integer(lw["block_size"], f"{w}.block_size", 1, 1 << 20)
    content = integer(lw["content"], f"{w}.content", 1, 1 << 40)
    page = integer(lw["page_bytes"], f"{w}.page_bytes", 1, 1 << 40)
    if kind == "mamba":
        expect = content
    else:
        if block_size is None:
            raise malformed(w, f"a {kind} layer needs a block_size")
        expect = num_heads * block_size * content * _ITEMSIZE[dtype]
    if kind != "attention" and (num_heads, head_start, total) != (1, 0, 1):
        raise malformed(w, f"a {kind} layer has one replicated head slot")
    if page != expect:
        raise malformed(w, f"page_bytes {page} does not match the block format ({expect} bytes)")
    states = None
    if lw["states"] is not None:
        if kind != "mamba":
            raise malformed(w, "only Mamba layers carry states")
        states = _parse_states(lw["states"], w, page)
    return LayerRecord(name, kind, dtype, block_size, num_heads, head_start, total, content, page, states, group)


def parse_record(obj: Any, where: str = "record") -> CompatRecord:
    """Validate a wire record strictly and turn it into a ``CompatRecord``."""
    if isinstance(obj, dict) and obj.get("connector_version") != CONNECTOR_VERSION:
        raise HandshakeError(f"fields differ: connector_version (here {CONNECTOR_VERSION}, peer "
                             f"{str(obj.get('connector_version'))[:40]})", ["connector_version"])
    exact_keys(obj, _RECORD_KEYS, where)
    tp_size = integer(obj["tp_size"], f"{where}.tp_size", 1, 1 << 16)
    tp_rank = integer(obj["tp_rank"], f"{where}.tp_rank", 0, tp_size - 1)
    layers, seen = [], set()
    for i, lw in enumerate(bounded_list(obj["layers"], f"{where}.layers", MAX_LAYERS)):
        layers.append(_parse_layer(lw, f"{where}.layers[{i}]", seen))
    return CompatRecord(
        engine_id=string(obj["engine_id"], f"{where}.engine_id"),
        agent_name=string(obj["agent_name"], f"{where}.agent_name"),
        tp_rank=tp_rank, tp_size=tp_size, cross_layer=boolean(obj["cross_layer"], f"{where}.cross_layer"),
        layers=tuple(layers), pooled=boolean(obj["pooled"], f"{where}.pooled"), connector_version=CONNECTOR_VERSION,
        layout=string(obj["layout"], f"{where}.layout", (LAYOUT_ID,)),
        model_id=_model_id(obj["model_id"], f"{where}.model_id"))


def _model_id(v: Any, where: str) -> str:
    if not isinstance(v, str) or len(v) > MAX_NAME:
        raise malformed(where, f"expected a string of at most {MAX_NAME} characters")
    return v
