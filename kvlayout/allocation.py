"""One raw int8 buffer per group; every layer's cache is a zero-copy view of it."""

from __future__ import annotations

from typing import Sequence, Union

import torch

from .errors import KVLayoutError
from .layout import KVCacheLayout, LayerLayout
from .planner import KVCachePlan


class KVCache(dict):
    """``{layer name: tensor}`` where every tensor is a view of one of ``buffers`` (one per group, or one
    for a hybrid model's whole page pool)."""

    def __init__(self, layout: KVCacheLayout, buffers: Sequence[torch.Tensor], views: dict):
        super().__init__(views)
        self.layout = layout
        self.buffers = tuple(buffers)

    def group_blocks_view(self, group: int) -> torch.Tensor:
        """The group's blocks as bytes: ``(L, B, page)`` for one region per layer (layer ``i`` at index
        ``i``, block stride as laid out, so in a page pool a state block spans its large page) or
        ``(B, L·page)`` (cross-layer). A view, never a copy."""
        g = self.layout.groups[group]
        members = self.layout.group_layers(group)
        buf = self.buffers[members[0].buffer]
        if g.cross_layer:
            return buf.view(g.num_blocks, len(g.layer_names) * g.page_size_bytes)
        first = members[0]
        step = members[1].byte_offset - first.byte_offset if len(members) > 1 else 0
        if any(m.byte_offset != first.byte_offset + i * step for i, m in enumerate(members)):
            raise KVLayoutError(f"group {group}: its layers are not evenly spaced in one buffer")
        return buf.as_strided((len(members), g.num_blocks, g.page_size_bytes),
                              (step, first.block_stride_bytes, 1), first.byte_offset)


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
    alloc = torch.zeros if zero else torch.empty
    for nbytes in layout.buffer_nbytes:
        buffers.append(alloc(nbytes, dtype=torch.int8, device=device))
    views = {lay.name: layer_view(buffers[lay.buffer], lay) for lay in layout.layers}
    return KVCache(layout, buffers, views)
