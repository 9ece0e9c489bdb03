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
