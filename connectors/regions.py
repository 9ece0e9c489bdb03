"""Regions: where each layer's blocks sit in memory.

A *region* is ``(base, block_len, block_stride, num_blocks)``: block ``b`` is the byte span
``[base + b*block_stride, base + b*block_stride + block_len)``. Regions are derived from each layer
tensor's storage pointer, strides and storage offset (never from an assumed contiguous shape), one per
layer, and identified by all of (base, length, stride), never by base alone: on a hybrid page pool an
attention layer and a state layer of the same slot start at the same address with different strides. Two regions whose blocks tile one block stride side by side (the layers of a cross-layer allocation)
join into one (``adjacent`` / ``join``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from kvlayout.allocation import KVCache
from kvlayout.errors import KVLayoutError


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
    group: int = 0                     # the layout group whose block ids index this region

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


RegionPair = tuple[Region, Region]   # (local, remote): the bytes of one local region and their remote source


def tensor_region(name: str, kind: str, tensor: torch.Tensor, buffers: Sequence[torch.Tensor], group: int = 0) -> Region:
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
                    num_heads if kind == "attention" else 1, group=group)
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    if region.base < lo or region.end > hi:
        raise KVLayoutError(f"layer {name!r}: its blocks reach outside buffer {owner[0]}")
    return region


def layer_regions(caches: KVCache) -> list[Region]:
    """One region per layer, in the layout's layer order."""
    if not isinstance(caches, KVCache):
        raise KVLayoutError("layer_regions needs the KVCache returned by allocate_kv_cache")
    return [tensor_region(lay.name, lay.kind, caches[lay.name], caches.buffers, lay.group)
            for lay in caches.layout.layers]


def adjacent(a: Region, b: Region) -> bool:
    """True when ``b``'s block lies right after ``a``'s inside every block (cross-layer tiling)."""
    return (b.base == a.base + a.block_len and a.block_stride == b.block_stride and a.num_blocks == b.num_blocks
            and a.kind == b.kind and a.group == b.group and a.buffer == b.buffer
            and a.block_len + b.block_len <= a.block_stride)


def join(a: Region, b: Region) -> Region:
    """The region of ``a`` and the ``adjacent`` region ``b`` side by side (no head slots to slice)."""
    return Region(a.layers + b.layers, a.kind, a.buffer, a.base, a.block_len + b.block_len, a.block_stride,
                  a.num_blocks, group=a.group)
