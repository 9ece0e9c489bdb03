"""One raw int8 buffer per group; every layer's cache is a zero-copy view of it."""

from __future__ import annotations

from typing import Sequence, Union

import torch

from .errors import KVLayoutError
from .layout import KVCacheLayout, LayerLayout
from .planner import KVCachePlan


class KVCache(dict):
    """``{layer name: tensor}`` where every tensor is a view of one of ``buffers`` (one per group)."""

    def __init__(self, layout: KVCacheLayout, buffers: Sequence[torch.Tensor], views: dict):
        super().__init__(views)
        self.layout = layout
        self.buffers = tuple(buffers)

    def group_blocks_view(self, group: int) -> torch.Tensor:
        """The group's buffer as ``(L, B, page)`` bytes (layer-major) or ``(B, L·page)`` (cross-layer)."""
        g = self.layout.groups[group]
        buf = self.buffers[group]
        if g.cross_layer:
            return buf.view(g.num_blocks, len(g.layer_names) * g.page_size_bytes)
        return buf.view(len(g.layer_names), g.num_blocks, g.page_size_bytes)

    def zero_blocks(self, block_ids, group: int = 0) -> None:
        """Zero blocks ``block_ids`` of every layer of ``group`` (one kernel per group, no layer loop); see
        ``kvlayout.ops.zero_blocks``."""
        from .ops import zero_blocks as ops_zero_blocks
        ops_zero_blocks(self, block_ids, group=group)


def check_block_ids(block_ids, num_blocks: int, device: torch.device, what: str) -> torch.Tensor:
    """Block ids as an int64 tensor on ``device``; raises if any is outside ``[0, num_blocks)``."""
    ids = torch.as_tensor(block_ids)
    if ids.numel() == 0 and ids.dim() == 1:
        ids = ids.long()                    # an empty list comes out float32; no ids is fine
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 1:
        raise KVLayoutError(f"{what}: block ids must be a 1-D integer sequence, got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_blocks:
            raise KVLayoutError(f"{what}: block id {lo if lo < 0 else hi} is out of range; "
                                f"the cache has blocks 0..{num_blocks - 1}")
    return ids.to(device=device, dtype=torch.int64)


def layer_view(buffer: torch.Tensor, lay: LayerLayout) -> torch.Tensor:
    """The layer's ``(B, H, N, C)`` view of ``buffer``, with true strides and storage offset."""
    typed = buffer.view(lay.dtype)
    return typed.as_strided(lay.shape, lay.strides, lay.storage_offset)


def allocate_kv_cache(plan: Union[KVCachePlan, KVCacheLayout], device: Union[str, torch.device] = "cpu",
                      zero: bool = True) -> KVCache:
    """Allocate one int8 buffer per group and return every layer's view of it."""
    layout = plan.layout if isinstance(plan, KVCachePlan) else plan
    if not isinstance(layout, KVCacheLayout):
        raise KVLayoutError(f"allocate_kv_cache needs a KVCachePlan or KVCacheLayout, got {type(plan).__name__}")
    device = torch.device(device)
    buffers = []
    for g in layout.groups:
        alloc = torch.zeros if zero else torch.empty
        buffers.append(alloc(g.nbytes, dtype=torch.int8, device=device))
    views = {lay.name: layer_view(buffers[lay.group], lay) for lay in layout.layers}
    return KVCache(layout, buffers, views)


def zero_blocks(caches: KVCache, block_ids, group: int = 0) -> None:
    """Zero ``block_ids`` in every layer of ``group``; see ``KVCache.zero_blocks``."""
    if not isinstance(caches, KVCache):
        raise KVLayoutError("zero_blocks needs the KVCache returned by allocate_kv_cache")
    caches.zero_blocks(block_ids, group)
