"""Transfer topology: where each layer's blocks sit in memory, as regions, and how two engines' regions pair up.

A *region* is ``(base, block_len, block_stride, num_blocks)``: block ``b`` is the byte span
``[base + b*block_stride, base + b*block_stride + block_len)``. Regions are derived from each layer
tensor's storage pointer, strides and storage offset (never from an assumed contiguous shape), one per
layer; layers of a cross-layer allocation that tile one block merge into one region per allocation.

A transfer between two engines is a list of region *pairs* (local, remote) with equal ``block_len``.
Heterogeneous tensor parallelism needs no special case: a head-major block's head slice ``[h0, h1)`` is the
contiguous sub-span at offset ``h0 * head_bytes`` of length ``(h1 - h0) * head_bytes``, itself a region.
Each side's regions are prepared once as a descriptor list (one descriptor per region and block); a
transfer names ``(pair, block id)`` by index, region-major and in request order, so adjacent blocks that are
contiguous on both sides sit next to each other and coalesce into one descriptor (NIXL merges them when it
makes the transfer; ``coalesce`` computes the same result).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from kvlayout.allocation import KVCache
from kvlayout.errors import KVLayoutError

ALL_KINDS = "*"          # key of a block-id mapping that applies to every layer kind
BlockIds = Union[Sequence[int], np.ndarray, torch.Tensor, Mapping[str, Sequence[int]]]


@dataclass(frozen=True)
class Region:
    """Blocks of one layer (or one cross-layer allocation): block b is ``[base + b*block_stride, +block_len)``.

    ``num_heads``/``head_bytes``: the block is ``num_heads`` contiguous head slots of ``head_bytes`` each
    (1 and ``block_len`` where there is nothing to slice: MLA, Mamba, merged cross-layer regions).
    """

    layers: tuple[str, ...]
    kind: str
    buffer: int
    base: int
    block_len: int
    block_stride: int
    num_blocks: int
    num_heads: int = 1
    head_bytes: int = 0

    def __post_init__(self):
        if self.head_bytes == 0:
            object.__setattr__(self, "head_bytes", self.block_len // max(self.num_heads, 1))

    @property
    def end(self) -> int:
        """One past the last byte of the last block."""
        return self.base + (self.num_blocks - 1) * self.block_stride + self.block_len

    def sub(self, offset: int, length: int, num_heads: int = 1) -> "Region":
        """The span ``[offset, offset + length)`` of every block, as a region of its own."""
        if offset < 0 or length <= 0 or offset + length > self.block_len:
            raise KVLayoutError(f"span [{offset}, {offset + length}) is outside a {self.block_len}-byte block "
                                f"of {self.layers[0]!r}")
        return replace(self, base=self.base + offset, block_len=length, num_heads=num_heads,
                       head_bytes=length // num_heads)

    def head_slice(self, h0: int, h1: int) -> "Region":
        """Head slots ``[h0, h1)`` of every block (a contiguous sub-span in the head-major layout)."""
        if not 0 <= h0 < h1 <= self.num_heads:
            raise KVLayoutError(f"head slice [{h0}, {h1}) is outside the {self.num_heads} head slots of "
                                f"{self.layers[0]!r}")
        return self.sub(h0 * self.head_bytes, (h1 - h0) * self.head_bytes, h1 - h0)


def tensor_region(name: str, kind: str, tensor: torch.Tensor, buffers: Sequence[torch.Tensor]) -> Region:
    """The region of one layer's ``(B, H, N, C)`` cache view, from its storage, strides and storage offset."""
    if tensor.dim() != 4:
        raise KVLayoutError(f"layer {name!r}: expected a (blocks, heads, tokens, content) view, "
                            f"got {tensor.dim()} dims")
    item = tensor.element_size()
    storage_ptr = tensor.untyped_storage().data_ptr()
    base = storage_ptr + tensor.storage_offset() * item
    sizes, strides = tensor.size(), tensor.stride()
    # One block spans the inner dims; it must be dense so it is one contiguous run of bytes.
    inner_elems = sizes[1] * sizes[2] * sizes[3]
    span = 1 + sum((sizes[d] - 1) * strides[d] for d in (1, 2, 3))
    if inner_elems == 0 or span != inner_elems or min(strides[1:]) < 1:
        raise KVLayoutError(f"layer {name!r}: one block is not one contiguous span (strides {tuple(strides)}); "
                            f"connectors need the packed blocks-first layout from allocate_kv_cache")
    block_len = inner_elems * item
    num_heads = sizes[1]
    head_bytes = (strides[1] if num_heads > 1 else inner_elems) * item
    if num_heads * head_bytes != block_len:
        raise KVLayoutError(f"layer {name!r}: head slots are not contiguous inside a block")
    num_blocks, block_stride = sizes[0], strides[0] * item
    if num_blocks > 1 and block_stride < block_len:
        raise KVLayoutError(f"layer {name!r}: blocks overlap (stride {block_stride} B < block {block_len} B)")
    owner = [i for i, b in enumerate(buffers) if b.untyped_storage().data_ptr() == storage_ptr]
    if not owner:
        raise KVLayoutError(f"layer {name!r} is not a view of any of the cache's buffers")
    buf = buffers[owner[0]]
    region = Region((name,), kind, owner[0], base, block_len, block_stride, num_blocks,
                    num_heads if kind == "attention" else 1)
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    if region.base < lo or region.end > hi:
        raise KVLayoutError(f"layer {name!r}: its blocks reach outside buffer {owner[0]}")
    return region


def layer_regions(caches: KVCache) -> list[Region]:
    """One region per layer, in the layout's layer order."""
    if not isinstance(caches, KVCache):
        raise KVLayoutError("layer_regions needs the KVCache returned by allocate_kv_cache")
    return [tensor_region(lay.name, lay.kind, caches[lay.name], caches.buffers) for lay in caches.layout.layers]


def _adjacent(a: Region, b: Region) -> bool:
    """True when ``b``'s block lies right after ``a``'s inside every block (cross-layer tiling)."""
    return (b.base == a.base + a.block_len and a.block_stride == b.block_stride and a.num_blocks == b.num_blocks
            and a.kind == b.kind and a.buffer == b.buffer and a.block_len + b.block_len <= a.block_stride)


def _join(a: Region, b: Region) -> Region:
    return Region(a.layers + b.layers, a.kind, a.buffer, a.base, a.block_len + b.block_len, a.block_stride,
                  a.num_blocks)


def merge_regions(regions: Sequence[Region]) -> list[Region]:
    """Merge layers that tile one block (a cross-layer allocation) into one region per allocation."""
    out: list[Region] = []
    for r in regions:
        if out and _adjacent(out[-1], r):
            out[-1] = _join(out[-1], r)
        else:
            out.append(r)
    return out


def kv_regions(caches: KVCache) -> list[Region]:
    """The regions a connector transfers: one per layer, or one per cross-layer allocation."""
    return merge_regions(layer_regions(caches))


RegionPair = tuple[Region, Region]


def pair_regions(local: Sequence[Region], remote: Mapping[str, Region], local_head_start: Mapping[str, int],
                 remote_head_start: Mapping[str, int], replicated: bool = True,
                 replicated_len: Optional[Mapping[str, int]] = None) -> list[RegionPair]:
    """Pair every local per-layer region with the part of the remote layer it receives.

    Attention layers pair the overlap of the two sides' global head ranges (``*_head_start`` + slots);
    layers without heads (MLA, Mamba) are replicated across ranks and pair whole blocks, or their first
    ``replicated_len[name]`` bytes (a Mamba state padded differently on each side); ``replicated=False``
    leaves them out (another remote rank serves them). Pairs that tile a block on both sides merge.
    """
    pairs: list[RegionPair] = []
    for lr in local:
        name = lr.layers[0]
        rr = remote.get(name)
        if rr is None:
            raise KVLayoutError(f"the remote engine has no layer {name!r}")
        if lr.kind != rr.kind:
            raise KVLayoutError(f"layer {name!r} is {lr.kind} here but {rr.kind} on the remote engine")
        if lr.kind == "attention":
            if lr.head_bytes != rr.head_bytes:
                raise KVLayoutError(f"layer {name!r}: a head slot is {lr.head_bytes} B here, {rr.head_bytes} B remote")
            la, ra = local_head_start[name], remote_head_start[name]
            h0, h1 = max(la, ra), min(la + lr.num_heads, ra + rr.num_heads)
            if h0 >= h1:
                continue
            pairs.append((lr.head_slice(h0 - la, h1 - la), rr.head_slice(h0 - ra, h1 - ra)))
        elif replicated:
            n = lr.block_len if lr.block_len == rr.block_len else (replicated_len or {}).get(name)
            if n is None or n > min(lr.block_len, rr.block_len):
                raise KVLayoutError(f"layer {name!r}: blocks are {lr.block_len} B here and {rr.block_len} B on the "
                                    f"remote engine; they cannot be copied onto each other")
            pairs.append((lr.sub(0, n), rr.sub(0, n)) if n != lr.block_len or n != rr.block_len else (lr, rr))
    merged: list[RegionPair] = []
    for lp, rp in pairs:
        if merged and _adjacent(merged[-1][0], lp) and _adjacent(merged[-1][1], rp):
            merged[-1] = (_join(merged[-1][0], lp), _join(merged[-1][1], rp))
        else:
            merged.append((lp, rp))
    return merged


def descriptor_rows(regions: Sequence[Region], device_id: int = 0) -> np.ndarray:
    """NIXL's strided descriptor form, one row per region: ``(base, block_len, device, block_stride, blocks)``.
    Row i expands to ``num_blocks`` descriptors, one per block."""
    return np.array([(r.base, r.block_len, device_id, r.block_stride, r.num_blocks) for r in regions],
                    dtype=np.uint64).reshape(-1, 5)


def as_block_ids(block_ids: BlockIds, what: str) -> dict[str, np.ndarray]:
    """Normalize block ids to ``{kind: int64 array}``; a plain sequence applies to every kind (``"*"``)."""
    if isinstance(block_ids, Mapping):
        items = dict(block_ids)
        if not items:
            raise KVLayoutError(f"{what}: the block-id mapping is empty")
        for key in items:
            if key not in ("attention", "mla", "mamba"):
                raise KVLayoutError(f"{what}: unknown layer kind {key!r}; use 'attention', 'mla' or 'mamba'")
    else:
        items = {ALL_KINDS: block_ids}
    out = {}
    for key, ids in items.items():
        arr = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise KVLayoutError(f"{what}: block ids must be a 1-D sequence of integers, got {arr.dtype} "
                                f"of shape {arr.shape}")
        out[key] = arr.astype(np.int64, copy=False)
    return out


class TransferPlan:
    """Region pairs between this engine and one remote engine, with the per-kind offsets that turn
    ``(pair, block id)`` into indices of the two prepared descriptor lists."""

    def __init__(self, pairs: Sequence[RegionPair]):
        self.pairs = tuple(pairs)
        counts_l = np.array([lp.num_blocks for lp, _ in self.pairs], dtype=np.int64)
        counts_r = np.array([rp.num_blocks for _, rp in self.pairs], dtype=np.int64)
        start_l = np.concatenate([[0], np.cumsum(counts_l)[:-1]]) if len(counts_l) else counts_l
        start_r = np.concatenate([[0], np.cumsum(counts_r)[:-1]]) if len(counts_r) else counts_r
        self._by_kind: dict[str, tuple] = {}
        for kind in {lp.kind for lp, _ in self.pairs} | {ALL_KINDS}:
            sel = np.array([k for k, (lp, _) in enumerate(self.pairs) if kind in (ALL_KINDS, lp.kind)], dtype=np.int64)
            self._by_kind[kind] = (
                start_l[sel], start_r[sel],
                np.array([self.pairs[k][0].base for k in sel], dtype=np.int64),
                np.array([self.pairs[k][0].block_stride for k in sel], dtype=np.int64),
                np.array([self.pairs[k][1].base for k in sel], dtype=np.int64),
                np.array([self.pairs[k][1].block_stride for k in sel], dtype=np.int64),
                np.array([self.pairs[k][0].block_len for k in sel], dtype=np.int64))
        self.kinds = frozenset(lp.kind for lp, _ in self.pairs)

    def _rows(self, kind: str):
        return self._by_kind.get(kind)

    def indices(self, local_ids: Mapping[str, np.ndarray], remote_ids: Mapping[str, np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray]:
        """Descriptor indices of a transfer, pair-major and in request order (int32, for NIXL)."""
        li, ri = [], []
        for kind, lid in local_ids.items():
            rows = self._rows(kind)
            if rows is None:
                continue
            li.append((rows[0][:, None] + lid[None, :]).ravel())
            ri.append((rows[1][:, None] + remote_ids[kind][None, :]).ravel())
        if not li:
            return np.empty(0, np.int32), np.empty(0, np.int32)
        return np.concatenate(li).astype(np.int32), np.concatenate(ri).astype(np.int32)

    def addresses(self, local_ids: Mapping[str, np.ndarray], remote_ids: Mapping[str, np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(local address, remote address, length)`` of every indexed descriptor, in index order."""
        la, ra, ln = [], [], []
        for kind, lid in local_ids.items():
            rows = self._rows(kind)
            if rows is None:
                continue
            rid = remote_ids[kind]
            la.append((rows[2][:, None] + rows[3][:, None] * lid[None, :]).ravel())
            ra.append((rows[4][:, None] + rows[5][:, None] * rid[None, :]).ravel())
            ln.append(np.repeat(rows[6], lid.size))
        if not la:
            return (np.empty(0, np.int64),) * 3
        return np.concatenate(la), np.concatenate(ra), np.concatenate(ln)

    def descriptors(self, local_ids: Mapping[str, np.ndarray], remote_ids: Mapping[str, np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The coalesced descriptors of a transfer: ``(local address, remote address, length)``."""
        return coalesce(*self.addresses(local_ids, remote_ids))


def coalesce(local_addr: np.ndarray, remote_addr: np.ndarray, length: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge consecutive descriptors that are contiguous on both sides into one."""
    if local_addr.size == 0:
        return local_addr, remote_addr, length
    end_l, end_r = local_addr[:-1] + length[:-1], remote_addr[:-1] + length[:-1]
    starts = np.concatenate([[True], (local_addr[1:] != end_l) | (remote_addr[1:] != end_r)])
    first = np.flatnonzero(starts)
    total = np.add.reduceat(length, first)
    return local_addr[first], remote_addr[first], total


def block_runs(local_ids: np.ndarray, remote_ids: np.ndarray) -> np.ndarray:
    """Runs of block-id pairs that are adjacent on both sides: rows ``(local start, remote start, count)``."""
    local_ids, remote_ids = np.asarray(local_ids, np.int64), np.asarray(remote_ids, np.int64)
    if local_ids.size == 0:
        return np.empty((0, 3), np.int64)
    brk = np.concatenate([[True], (np.diff(local_ids) != 1) | (np.diff(remote_ids) != 1)])
    first = np.flatnonzero(brk)
    counts = np.diff(np.concatenate([first, [local_ids.size]]))
    return np.stack([local_ids[first], remote_ids[first], counts], axis=1)
