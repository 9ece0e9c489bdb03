"""The one layout decision: where every layer's cache sits in memory, resolved once and frozen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

import numpy as np
import torch

from .capabilities import BackendCapabilities, ConnectorWishes
from .errors import LayoutConflictError, KVLayoutError
from .specs import AttentionSpec, KVCacheSpec, MambaSpec, MLASpec, dtype_name


def spec_kind(spec: KVCacheSpec) -> str:
    if isinstance(spec, AttentionSpec):
        return "attention"
    if isinstance(spec, MLASpec):
        return "mla"
    if isinstance(spec, MambaSpec):
        return "mamba"
    raise KVLayoutError(f"not a KV-cache spec: {spec!r} (use AttentionSpec, MLASpec or MambaSpec)")


@dataclass(frozen=True)
class LayerLayout:
    """Where one layer's cache lives inside its group's buffer.

    ``shape``/``strides``/``storage_offset`` are in elements of ``dtype`` and describe the view
    ``(B, H, N, C)`` exactly (``as_strided`` on the buffer viewed as ``dtype``). ``block_bytes`` is the
    contiguous span one block of this layer occupies; ``block_stride_bytes`` the distance between blocks.
    """

    name: str
    kind: str
    group: int
    index_in_group: int
    dtype: torch.dtype
    shape: tuple[int, int, int, int]
    strides: tuple[int, int, int, int]
    storage_offset: int
    byte_offset: int
    block_bytes: int
    block_stride_bytes: int
    buffer: int = -1                  # index of the allocation (``KVCache.buffers``); -1: the group's own

    def __post_init__(self):
        if self.buffer < 0:
            object.__setattr__(self, "buffer", self.group)

    @property
    def num_blocks(self) -> int:
        return self.shape[0]


@dataclass(frozen=True)
class GroupLayout:
    """Layers that share one block table (one block-id space).

    Outside a page pool a group owns its buffer. In a page pool (``pooled``, hybrid models) every
    group's block ids address pages of one shared allocation, and a block id is ``pages_per_block`` small
    pages (1 for attention, k for a recurrent state); which group may use a page is the ``PagePool``'s
    to decide."""

    index: int
    layer_names: tuple[str, ...]
    page_size_bytes: int
    block_size: Optional[int]         # tokens per block (None for a group of only state layers)
    num_blocks: int
    cross_layer: bool
    pages_per_block: int = 1
    pooled: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes the group's block ids address (in a page pool other groups address the same bytes)."""
        return self.num_blocks * self.page_size_bytes * len(self.layer_names)

    @property
    def num_tokens(self) -> Optional[int]:
        return None if self.block_size is None else self.num_blocks * self.block_size


@dataclass(frozen=True)
class PoolGeometry:
    """The two-level page pool of a hybrid layout: ``num_slots`` slots of ``num_pages`` small pages of
    ``page_bytes`` each, in one allocation (slot-major). Slot ``j`` holds layer ``j`` of every group, so
    small page ``p`` is the bytes ``[j*num_pages*page_bytes + p*page_bytes, +page_bytes)`` of slot ``j`` in
    every slot at once. A large page is the aligned run of ``large_page_pages`` small pages ``[q*k, (q+1)*k)``.

    Worked example (k = 65): attention block id 130 is small page 130, the first page of large page 2;
    state block id 2 of a Mamba group is small pages 130..194. The pool never gives both out at once."""

    page_bytes: int
    num_pages: int
    large_page_pages: int
    num_slots: int

    @property
    def num_large_pages(self) -> int:
        return self.num_pages // self.large_page_pages

    @property
    def slot_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.slot_bytes


@dataclass(frozen=True)
class KVCacheLayout:
    """The frozen record of the layout decision. Nothing re-decides it later."""

    groups: tuple[GroupLayout, ...]
    layers: tuple[LayerLayout, ...]
    backend: Optional[str]
    connector: Optional[str]
    pool: Optional[PoolGeometry] = None

    @property
    def buffer_nbytes(self) -> tuple[int, ...]:
        """Size of each allocation: one per group, or one for the whole page pool."""
        if self.pool is not None:
            return (self.pool.nbytes,)
        return tuple(g.nbytes for g in self.groups)

    def group_layers(self, group: int) -> tuple[LayerLayout, ...]:
        return tuple(lay for lay in self.layers if lay.group == group)

    def layer(self, name: str) -> LayerLayout:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KVLayoutError(f"no layer named {name!r} in this layout; layers: {', '.join(self.layer_names)}")

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(lay.name for lay in self.layers)

    @property
    def cross_layer(self) -> bool:
        return any(g.cross_layer for g in self.groups)

    @property
    def nbytes(self) -> int:
        return sum(self.buffer_nbytes)


def _same_block_format(a: KVCacheSpec, b: KVCacheSpec) -> bool:
    return type(a) is type(b) and a.block_shape() == b.block_shape() and a.dtype == b.dtype


def group_by_page_size(specs: Mapping[str, KVCacheSpec]) -> list[list[str]]:
    """Layer names grouped by page size, groups and members in the order the specs were given."""
    groups: dict[int, list[str]] = {}
    for name, spec in specs.items():
        groups.setdefault(spec.page_size_bytes, []).append(name)
    return list(groups.values())


def _group_block_size(names: list[str], specs: Mapping[str, KVCacheSpec]) -> Optional[int]:
    sizes = {specs[n].block_size for n in names if not isinstance(specs[n], MambaSpec)}
    if len(sizes) > 1:
        by_size = {specs[n].block_size: n for n in names if not isinstance(specs[n], MambaSpec)}
        a, b = list(by_size.items())[:2]
        raise LayoutConflictError(
            f"layers {a[1]!r} (block_size {a[0]}) and {b[1]!r} (block_size {b[0]}) have the same page size "
            f"but different block sizes, so they cannot share one block table; give them one block size")
    return sizes.pop() if sizes else None


def check_specs(specs: Mapping[str, KVCacheSpec], backend: Optional[BackendCapabilities],
                connector: Optional[ConnectorWishes], cross_layer: Optional[bool]) -> None:
    """Raise ``LayoutConflictError`` where a spec, the backend and the connector disagree (naming both)."""
    if not specs:
        raise KVLayoutError("no layer specs given: pass {layer name: AttentionSpec | MLASpec | MambaSpec}")
    for name, spec in specs.items():
        spec_kind(spec)
        if backend is not None:
            problems = backend.problems(spec)
            if problems:
                raise LayoutConflictError(
                    f"layer {name!r} ({spec_kind(spec)}, {dtype_name(spec.dtype)}, block_size "
                    f"{getattr(spec, 'block_size', '-')}) conflicts with backend {backend.name!r}: "
                    + "; ".join(problems) + ". Change the spec or choose another backend.")
        if connector is not None and connector.block_size is not None and not isinstance(spec, MambaSpec) \
                and spec.block_size != connector.block_size:
            raise LayoutConflictError(
                f"layer {name!r} has block_size {spec.block_size} but connector {connector.name!r} needs "
                f"block_size {connector.block_size} (the peer engine's); use the same block size on both sides")
    if cross_layer is False and connector is not None and connector.cross_layer:
        raise LayoutConflictError(
            f"cross_layer=False was asked for, but connector {connector.name!r} requires a cross-layer "
            f"layout; drop one of the two")
    if cross_layer and backend is not None and "cross_layer" not in backend.features:
        raise LayoutConflictError(
            f"cross_layer=True was asked for, but backend {backend.name!r} cannot read strided "
            f"cross-layer views; use cross_layer=False or another backend")


def resolve_kv_cache_layout(
    specs: Mapping[str, KVCacheSpec],
    num_blocks: Union[int, Mapping[int, int]],
    backend: Optional[BackendCapabilities] = None,
    connector: Optional[ConnectorWishes] = None,
    cross_layer: Optional[bool] = None,
) -> KVCacheLayout:
    """Decide, once, where every layer's cache lives.

    ``num_blocks`` is one count for every group or a mapping from group index to count (group order:
    by page size, in the order the specs first show each size). ``cross_layer``: True puts the layers of
    each group in one ``(B, L, H, N, C)`` allocation (all layers of a group must then have the same block
    format), False keeps one contiguous region per layer, None follows the connector's wish where the
    group allows it. Conflicts between the specs, the backend and the connector raise
    ``LayoutConflictError`` naming both sides.
    """
    check_specs(specs, backend, connector, cross_layer)

    groups, layers = [], []
    for gi, names in enumerate(group_by_page_size(specs)):
        n_blocks = num_blocks.get(gi) if isinstance(num_blocks, Mapping) else num_blocks
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks <= 0:
            raise KVLayoutError(f"num_blocks for group {gi} must be a positive integer, got {n_blocks!r}")
        page = specs[names[0]].page_size_bytes
        uniform = all(_same_block_format(specs[names[0]], specs[n]) for n in names)
        want_cross = cross_layer if cross_layer is not None else bool(connector and connector.cross_layer)
        if want_cross and not uniform and len(names) > 1:
            odd = next(n for n in names if not _same_block_format(specs[names[0]], specs[n]))
            if cross_layer:
                raise LayoutConflictError(
                    f"a cross-layer allocation needs identical block formats, but layers {names[0]!r} "
                    f"({spec_kind(specs[names[0]])} {specs[names[0]].block_shape()}) and {odd!r} "
                    f"({spec_kind(specs[odd])} {specs[odd].block_shape()}) share a page size with different "
                    f"formats; use cross_layer=False")
            want_cross = False              # only the connector's wish: this group stays per-layer
        is_cross = bool(want_cross) and len(names) > 1
        block_size = _group_block_size(names, specs)
        groups.append(GroupLayout(gi, tuple(names), page, block_size, n_blocks, is_cross))
        n_layers = len(names)
        for li, name in enumerate(names):
            spec = specs[name]
            item = spec.dtype.itemsize
            if is_cross:
                byte_offset, block_stride = li * page, n_layers * page
            else:
                byte_offset, block_stride = li * n_blocks * page, page
            h, n, c = spec.block_shape()
            layers.append(LayerLayout(
                name=name, kind=spec_kind(spec), group=gi, index_in_group=li, dtype=spec.dtype,
                shape=(n_blocks, h, n, c), strides=(block_stride // item, n * c, c, 1),
                storage_offset=byte_offset // item, byte_offset=byte_offset,
                block_bytes=page, block_stride_bytes=block_stride))
    layout = KVCacheLayout(tuple(groups), tuple(layers), backend.name if backend else None,
                           connector.name if connector else None)
    check_no_overlap(layout)
    return layout


def check_no_overlap(layout: KVCacheLayout) -> None:
    """Raise if two layers of one group share a byte, or a block reaches past its buffer. In a page pool
    the layers of different groups share bytes on purpose (the pool gives each page to one group at a
    time); there every block must be a whole, aligned run of the pool's small pages."""
    sizes = layout.buffer_nbytes
    for group in layout.groups:
        members = layout.group_layers(group.index)
        starts, ends, owners = [], [], []
        for k, lay in enumerate(members):
            if lay.block_bytes > lay.block_stride_bytes and lay.num_blocks > 1:
                raise LayoutConflictError(f"layer {lay.name!r}: a block ({lay.block_bytes} B) is larger than the "
                                          f"block stride ({lay.block_stride_bytes} B); blocks would overlap")
            if layout.pool is not None:
                geo = layout.pool
                if (lay.block_stride_bytes != group.pages_per_block * geo.page_bytes
                        or lay.byte_offset % geo.slot_bytes or lay.num_blocks * group.pages_per_block > geo.num_pages):
                    raise LayoutConflictError(f"layer {lay.name!r}: its blocks are not aligned runs of "
                                              f"{group.pages_per_block} pool page(s) of one slot")
            s = lay.byte_offset + np.arange(lay.num_blocks, dtype=np.int64) * lay.block_stride_bytes
            starts.append(s)
            ends.append(s + lay.block_bytes)
            owners.append(np.full(lay.num_blocks, k))
        s, e, o = np.concatenate(starts), np.concatenate(ends), np.concatenate(owners)
        order = np.argsort(s, kind="stable")
        s, e, o = s[order], e[order], o[order]
        if s[0] < 0 or e.max() > sizes[members[0].buffer]:
            raise LayoutConflictError(f"group {group.index}: a block lies outside the group's buffer")
        bad = np.nonzero(s[1:] < e[:-1])[0]
        if bad.size:
            i = bad[0]
            raise LayoutConflictError(
                f"layers {members[o[i]].name!r} and {members[o[i + 1]].name!r} overlap at byte {s[i + 1]}: "
                f"one layer's writes would reach the other's cache")
