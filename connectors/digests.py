"""Per-block digests of transferred cache bytes: a corrupted block fails the load instead of being served.

The unit of a digest is what a transfer moves whole for every tensor-parallel split: one head slot of an
attention block (``head_bytes``), or one whole MLA / Mamba block (a Mamba block's first ``state_bytes``).
Units of the layers that map heads the same way (a *digest group*: same kind, head range and unit size)
are combined per block and head, each layer weighted by an odd number derived from its name, so a request's
digests are ``blocks x heads`` int64 per group whatever the number of layers; a layer read in place of
another, a block read in place of another, or any changed word changes them.

The prefill side digests the blocks it holds (``hold_blocks``) and returns the rows of the blocks a reader
names when it confirms the read; the reader digests its own blocks after the read and compares the heads it
received. ``kvlayout.kernels.checksum`` has the digest's definition and the GPU kernel; the PyTorch twin here
serves CPU caches.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from kvlayout.allocation import KVCache
from kvlayout.errors import KVLayoutError

from .block_ids import ALL_KINDS, as_block_ids
from .record import CompatRecord
from .regions import Region

__all__ = ["DigestGroup", "digest_groups", "unit_digests", "unit_digests_torch", "Digester", "DigestCheck",
           "held_digests", "read_digests", "start_digest_check", "written_digest"]

_TORCH_CHUNK_WORDS = 1 << 22        # bound on the CPU path's temporaries (32 MiB of int64)


def unit_digests(words: torch.Tensor, offsets: torch.Tensor, unit_words: int) -> torch.Tensor:
    """Digest (int64) of each unit ``words[offsets[u] : offsets[u] + unit_words]`` of an int32 word view.

    CUDA tensors run the Triton kernel, CPU tensors the PyTorch twin (``unit_digests_torch``, also under
    ``TRITON_INTERPRET=1``: the interpreter is for testing the kernel, not for serving); both compute ``sum((w + 1) * (2*i + 1)) mod 2**64`` over the unsigned words.
    """
    if words.dtype != torch.int32 or words.dim() != 1 or offsets.dtype != torch.int64:
        raise KVLayoutError("unit_digests takes a 1-D int32 word view and int64 word offsets")
    if unit_words < 1:
        raise KVLayoutError(f"a digest unit needs at least one word, got {unit_words}")
    if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) + unit_words > words.numel()):
        raise KVLayoutError("a digest unit reaches outside the buffer")
    if words.is_cuda:
        from kvlayout.kernels.checksum import unit_digests_triton
        return unit_digests_triton(words, offsets, unit_words)
    return unit_digests_torch(words, offsets, unit_words)


def unit_digests_torch(words: torch.Tensor, offsets: torch.Tensor, unit_words: int) -> torch.Tensor:
    """``unit_digests`` in PyTorch (any device; memory bounded by chunks of units and words); trusted."""
    out = torch.zeros(offsets.numel(), dtype=torch.int64, device=words.device)
    per = max(1, _TORCH_CHUNK_WORDS // unit_words)            # units at a time ...
    step = min(unit_words, _TORCH_CHUNK_WORDS)                 # ... and words of each
    for w0 in range(0, unit_words, step):
        i = torch.arange(w0, min(w0 + step, unit_words), dtype=torch.int64, device=words.device)
        weight = 2 * i + 1
        for u0 in range(0, offsets.numel(), per):
            idx = offsets[u0:u0 + per, None] + i
            w = words[idx].to(torch.int64) & 0xFFFFFFFF
            out[u0:u0 + per] += ((w + 1) * weight).sum(dim=1)
    return out


@dataclass(frozen=True)
class DigestGroup:
    """Layers whose units map to the same heads: ``num_units`` per block (heads, or 1), of ``unit_bytes``."""

    kind: str
    head_start: int
    num_units: int
    unit_bytes: int
    layers: tuple[str, ...]
    group: int = 0            # the layout group: on a page pool each group has block ids of its own


def _unit_bytes(lay) -> int:
    if lay.kind == "attention":
        return lay.page_bytes // max(lay.num_heads, 1)
    return lay.state_bytes or lay.page_bytes


def digest_groups(record: CompatRecord) -> list[DigestGroup]:
    """The digest groups of an engine's record, in a fixed order (both sides compute it from the record of
    the engine that holds the blocks)."""
    groups: dict[tuple, list[str]] = {}
    for lay in record.layers:
        units = lay.num_heads if lay.kind == "attention" else 1
        start = lay.head_start if lay.kind == "attention" else 0
        groups.setdefault((lay.kind, start, units, _unit_bytes(lay), lay.group), []).append(lay.name)
    return [DigestGroup(k, s, u, b, tuple(names), g) for (k, s, u, b, g), names in groups.items()]


def layer_weight(name: str) -> int:
    """The odd weight of a layer's digests in its group's sum."""
    return 2 * zlib.crc32(name.encode()) + 1


@dataclass(frozen=True)
class _LayerUnits:
    buffer: int
    base_words: int          # word offset of block 0, unit 0 in the buffer
    stride_words: int        # words between blocks
    unit_words: int
    num_units: int


class Digester:
    """Digests of one engine's cache (``caches`` with its per-layer ``regions``)."""

    def __init__(self, caches: KVCache, regions: Sequence[Region], record: CompatRecord):
        self._words = []
        for i, buf in enumerate(caches.buffers):
            if buf.numel() % 4 or buf.data_ptr() % 4:
                raise KVLayoutError(f"digests need 4-byte aligned buffers; buffer {i} is {buf.numel()} B")
            self._words.append(buf.view(torch.int32))
        self._device = caches.buffers[0].device
        self._layers: dict[str, _LayerUnits] = {}
        for region, lay in zip(regions, record.layers):
            unit = _unit_bytes(lay)
            start = region.base - caches.buffers[region.buffer].data_ptr()
            step = region.head_bytes if lay.kind == "attention" else 0
            if any(v % 4 for v in (unit, start, region.block_stride, step)):
                raise KVLayoutError(f"digests need head slots and blocks that are whole 4-byte words; layer "
                                    f"{lay.name!r} has {unit} B units at offset {start}: turn digests off")
            self._layers[lay.name] = _LayerUnits(region.buffer, start // 4, region.block_stride // 4, unit // 4,
                                                 lay.num_heads if lay.kind == "attention" else 1)

    def unit_bytes(self, layer: str) -> int:
        """Bytes of one digest unit of ``layer`` here."""
        return self._layers[layer].unit_words * 4

    def combined(self, layers: Sequence[str], block_ids: np.ndarray) -> torch.Tensor:
        """``(len(block_ids), units)`` int64 on the cache's device: the layers' unit digests of those blocks,
        each layer times its weight, summed (mod 2**64). One launch per buffer."""
        missing = [n for n in layers if n not in self._layers]
        if missing:
            raise KVLayoutError(f"no layer {missing[0]!r} on this engine; the engines serve different models")
        units = {self._layers[n].num_units for n in layers}
        sizes = {self._layers[n].unit_words for n in layers}
        if len(units) != 1 or len(sizes) != 1:
            raise KVLayoutError(f"layers {list(layers)} do not share one unit size; they cannot form a group")
        u, words = units.pop(), sizes.pop()
        ids = np.asarray(block_ids, dtype=np.int64)
        out = torch.zeros(ids.size, u, dtype=torch.int64, device=self._device)
        by_buffer: dict[int, list[str]] = {}
        for n in layers:
            by_buffer.setdefault(self._layers[n].buffer, []).append(n)
        for buf, names in by_buffer.items():
            offs = np.stack([self._layers[n].base_words + ids[:, None] * self._layers[n].stride_words
                             + np.arange(u)[None, :] * words for n in names])          # (L, blocks, units)
            d = unit_digests(self._words[buf], torch.from_numpy(offs.reshape(-1)).to(self._device), words)
            weights = torch.tensor([layer_weight(n) for n in names], dtype=torch.int64, device=self._device)
            out += (d.view(len(names), ids.size, u) * weights[:, None, None]).sum(dim=0)
        return out


# ---- the two sides of a load -----------------------------------------------------------------------------

def _kind_ids(ids: Mapping, kind: str, group: int) -> Optional[np.ndarray]:
    """The ids that name the blocks of ``group``'s ``kind`` layers: keyed by group, by kind, or for all."""
    return ids.get(group, ids.get(kind, ids.get(ALL_KINDS)))


def _head_span(record: CompatRecord, layers: Sequence[str]) -> tuple[int, int]:
    """``(head_start, num_heads)`` that every one of ``layers`` holds on the engine of ``record``."""
    spans = {(record.layer(n).head_start, record.layer(n).num_heads) for n in layers}
    if len(spans) != 1:
        raise KVLayoutError(f"layers {list(layers)[:4]} hold different heads on this engine; turn digests off")
    return spans.pop()


def held_digests(digester: Digester, groups: Sequence[DigestGroup], ids: Mapping[str, np.ndarray]) -> list:
    """(Prefill side, at ``hold_blocks``.) Per digest group: ``(group, held ids, (blocks, units) int64)``, or
    None for layers the hold does not name. Syncs the device once."""
    out, pending = [], []
    for g in groups:
        held = _kind_ids(ids, g.kind, g.group)
        if held is None or held.size == 0:
            out.append(None)
            continue
        pending.append((len(out), g, held, digester.combined(g.layers, held)))
        out.append(None)
    for i, g, held, t in pending:
        out[i] = (g, held, t.cpu().numpy())
    return out


def read_digests(held: Optional[list], read_ids) -> list[bytes]:
    """(Prefill side, answering a confirmation.) The digest rows of the blocks a reader names, one bytes per
    group (empty for a group it did not read); ``[]`` when the hold has no digests."""
    if held is None:
        return []
    read = as_block_ids(read_ids, "confirm")
    out = []
    for entry in held:
        rids = None if entry is None else _kind_ids(read, entry[0].kind, entry[0].group)
        if rids is None or not np.isin(rids, entry[1]).all():
            out.append(b"")
            continue
        order = np.argsort(entry[1], kind="stable")
        rows = order[np.searchsorted(entry[1], rids, sorter=order)]
        out.append(entry[2][rows].astype("<i8").tobytes())
    return out


@dataclass
class _Comparison:
    kind: str
    address: str
    local: torch.Tensor          # (blocks, local units), on the cache's device
    remote: np.ndarray           # (blocks, remote units)
    columns: tuple[slice, slice]
    local_ids: np.ndarray


class DigestCheck:
    """(Decode side, after every engine confirmed.) The local digests run on the current stream; ``done``
    polls an event (no host sync), then ``result()`` compares."""

    def __init__(self, comparisons: list):
        self._items = comparisons
        self._event = None
        self._problem: Optional[str] = None
        self._compared = False
        if any(c.local.is_cuda for c in comparisons):
            self._event = torch.cuda.Event()
            self._event.record()

    @property
    def done(self) -> bool:
        return self._event is None or self._event.query()

    def result(self) -> Optional[str]:
        """Why the bytes read are not the bytes held (once ``done``), else None."""
        if not self.done or self._compared:
            return self._problem
        self._compared = True
        for c in self._items:
            lc, rc = c.columns
            bad = np.argwhere(c.local.cpu().numpy()[:, lc] != c.remote[:, rc])
            if bad.size:
                row, col = int(bad[0, 0]), int(bad[0, 1]) + (lc.start or 0)
                where = f"head slot {col} of " if c.kind == "attention" else ""
                self._problem = (f"digest mismatch in {where}local block {int(c.local_ids[row])} ({c.kind} layers) "
                                 f"read from {c.address}: {bad.shape[0]} unit(s) differ from what the engine "
                                 f"holds; the bytes were corrupted in transit or the layouts differ, so the load "
                                 f"failed (recompute it)")
                break
        self._items = []
        return self._problem


def start_digest_check(digester: Digester, local_record: CompatRecord, load, engine_records: Sequence[CompatRecord],
                       primary_only: Sequence[bool]) -> "DigestCheck | str":
    """Launch the local digests of ``load``'s blocks against what each engine sent (``load.remote_digests``);
    a problem string when what was sent cannot be compared (``KVLayoutError`` when the layers differ here)."""
    items = []
    for address, rec, heads_only in zip(load.engines, engine_records, primary_only):
        groups = digest_groups(rec)
        sent = load.remote_digests.get(address, [])
        if len(sent) != len(groups):
            return (f"the engine at {address} sent {len(sent)} digest group(s), expected {len(groups)}: create its "
                    f"connector with digests=True too")
        for g, raw in zip(groups, sent):
            rids, lids = _kind_ids(load.remote_ids, g.kind, g.group), _kind_ids(load.local_ids, g.kind, g.group)
            if rids is None or rids.size == 0 or (heads_only and g.kind != "attention"):
                continue
            try:
                remote = np.frombuffer(raw, dtype="<i8").reshape(rids.size, g.num_units)
            except ValueError:
                return f"the engine at {address} sent malformed digests for its {g.kind} layers"
            if {digester.unit_bytes(n) for n in g.layers} != {g.unit_bytes}:
                return (f"the {g.kind} layers' digest units differ between here and {address} (states that tensor "
                        f"parallelism cut differently are sliced, and a slice has no digest of its own); "
                        f"turn digests off")
            columns = (slice(None), slice(None))
            if g.kind == "attention":
                ls, lh = _head_span(local_record, g.layers)
                h0, h1 = max(ls, g.head_start), min(ls + lh, g.head_start + g.num_units)
                if h0 >= h1:
                    continue
                columns = (slice(h0 - ls, h1 - ls), slice(h0 - g.head_start, h1 - g.head_start))
            items.append(_Comparison(g.kind, address, digester.combined(g.layers, lids), remote, columns, lids))
    return DigestCheck(items)


def written_digest(digester: Digester, own_record: CompatRecord, groups: Sequence[DigestGroup],
                   ids: Mapping[str, np.ndarray], heads: tuple[int, int], replicated: bool) -> bytes:
    """(Push.) One hash of what a writer wrote: for each of the *granting* engine's digest groups, this
    engine's combined digests of ``ids`` over global heads ``[heads[0], heads[0] + heads[1])`` (attention)
    or of the whole unit (the replicated layers, when ``replicated``). Writer and granting engine compute
    it over their own blocks, each with its own head slots; equal bytes give equal hashes. Syncs the device
    once; ``KVLayoutError`` when the layers differ here."""
    start, count = heads
    parts = []
    for gi, g in enumerate(groups):
        block_ids = _kind_ids(ids, g.kind, g.group)
        if block_ids is None or block_ids.size == 0 or (g.kind != "attention" and not replicated):
            continue
        cols = slice(None)
        if g.kind == "attention":
            ls, lh = _head_span(own_record, g.layers)
            h0, h1 = max(start, ls, g.head_start), min(start + count, ls + lh, g.head_start + g.num_units)
            if h0 >= h1:
                continue
            cols = slice(h0 - ls, h1 - ls)
        parts.append((gi, digester.combined(g.layers, block_ids)[:, cols]))
    h = hashlib.sha256()
    for gi, d in parts:
        h.update(gi.to_bytes(4, "little"))
        h.update(d.cpu().numpy().astype("<i8").tobytes())
    return h.digest()
