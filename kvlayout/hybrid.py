"""Hybrid models (attention + recurrent state) on a two-level page pool.

The layers are split into groups of one kind and one spec, all of ``num_slots`` layers (the last group of a
kind may be short). The pool is one allocation of ``num_slots`` slots; slot ``j`` holds layer ``j`` of every
group, so one page id costs ``num_slots`` small pages of memory however many groups there are. A small page
is one attention block at the engine's block size; a large page is an aligned run of ``k`` small pages that
holds one recurrent state. Which group owns a page is the ``PagePool``'s to decide (``kvlayout.page_pool``).

Worked example, Nemotron-H-8B (4 attention + 24 Mamba2 layers; 8 KV heads, D=128, bf16; 4,255,744 B of
state per layer): 4 slots, 1 attention group + 6 Mamba groups of 4 layers; a small page is 16 tokens x
4,096 B = 64 KiB per slot, a large page 65 small pages. A request of 8,192 tokens holds 512 small pages and
6 large pages (390 small pages): 902 x 4 x 64 KiB = 225.5 MiB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

from .capabilities import BackendCapabilities, ConnectorWishes
from .errors import KVLayoutError, LayoutConflictError
from .layout import (GroupLayout, KVCacheLayout, LayerLayout, PoolGeometry, check_no_overlap, check_specs,
                     spec_kind)
from .specs import STATE_ALIGN_BYTES, KVCacheSpec, MambaSpec

SLOT_WASTE_TOLERANCE = 0.02    # prefer fewer, larger groups unless that leaves more than 2% more empty slots


def is_hybrid(specs: Mapping[str, KVCacheSpec]) -> bool:
    """True when the model has both token-indexed layers (attention, MLA) and recurrent-state layers."""
    kinds = {isinstance(s, MambaSpec) for s in specs.values()}
    return kinds == {True, False}


def choose_num_slots(counts: list[int]) -> int:
    """Layers per group: the largest size whose empty slots stay within ``SLOT_WASTE_TOLERANCE`` of the
    fewest possible. E.g. counts (4, 24) -> 4 (1 + 6 groups, none short); (4, 30) -> 2 (2 + 15 groups: at 4,
    2 of 36 slots would be empty); (5, 12) -> 1."""
    total = sum(counts)

    def waste(s: int) -> float:
        slots = sum(-(-c // s) * s for c in counts)
        return (slots - total) / slots

    sizes = range(1, max(counts) + 1)
    best = min(waste(s) for s in sizes)
    return max(s for s in sizes if waste(s) <= best + SLOT_WASTE_TOLERANCE)


@dataclass(frozen=True)
class HybridGrouping:
    """How a hybrid model's layers share the pool (before the budget turns it into a page count)."""

    groups: tuple[tuple[str, ...], ...]
    num_slots: int
    page_bytes: int              # one small page of one slot
    large_page_pages: int        # k: small pages per large page
    specs: Mapping[str, KVCacheSpec]   # state specs padded to one large page

    @property
    def state_groups(self) -> tuple[int, ...]:
        return tuple(i for i, g in enumerate(self.groups) if isinstance(self.specs[g[0]], MambaSpec))

    @property
    def token_groups(self) -> tuple[int, ...]:
        return tuple(i for i, g in enumerate(self.groups) if not isinstance(self.specs[g[0]], MambaSpec))

    def pages_per_block(self, group: int) -> int:
        return self.large_page_pages if group in self.state_groups else 1

    def min_pages(self) -> int:
        """Small pages one request of one token needs."""
        return len(self.state_groups) * self.large_page_pages + len(self.token_groups)


def group_hybrid_layers(specs: Mapping[str, KVCacheSpec]) -> HybridGrouping:
    """Split a hybrid model's layers into equal-size groups of one spec, and size the pool's pages."""
    by_spec: dict[KVCacheSpec, list[str]] = {}
    for name, spec in specs.items():
        by_spec.setdefault(spec, []).append(name)
    slots = choose_num_slots([len(v) for v in by_spec.values()])
    order = {name: i for i, name in enumerate(specs)}
    chunks = [tuple(names[i:i + slots]) for names in by_spec.values() for i in range(0, len(names), slots)]
    chunks.sort(key=lambda c: order[c[0]])
    token = [s for s in specs.values() if not isinstance(s, MambaSpec)]
    states = [s for s in specs.values() if isinstance(s, MambaSpec)]
    page = _round_up(max(s.page_size_bytes for s in token), STATE_ALIGN_BYTES)
    k = max(1, math.ceil(max(s.state_bytes for s in states) / page))
    padded = {n: (s.padded_to(k * page) if isinstance(s, MambaSpec) else s) for n, s in specs.items()}
    return HybridGrouping(tuple(chunks), slots, page, k, padded)


def resolve_pooled_layout(
    grouping: HybridGrouping,
    num_pages: int,
    backend: Optional[BackendCapabilities] = None,
    connector: Optional[ConnectorWishes] = None,
    cross_layer: Optional[bool] = None,
) -> KVCacheLayout:
    """The layout of a hybrid model on a pool of ``num_pages`` small pages (a multiple of k) per slot.

    Every layer's view starts at its slot; an attention layer's block ``b`` is small page ``b``
    (stride one small page), a state layer's block ``q`` is large page ``q`` (stride k small pages)."""
    specs = grouping.specs
    if cross_layer:
        raise LayoutConflictError(
            "cross_layer=True was asked for, but this is a hybrid model: its groups share one page pool slot "
            "by slot, so a block of several layers is not one span; use cross_layer=None or False")
    check_specs(specs, backend, connector, None)
    k = grouping.large_page_pages
    if num_pages < grouping.min_pages() or num_pages % k:
        raise KVLayoutError(f"a pool of {num_pages} pages cannot serve this model: it must be a multiple of "
                            f"{k} and at least {grouping.min_pages()}")
    geo = PoolGeometry(grouping.page_bytes, num_pages, k, grouping.num_slots)
    groups, layers = [], {}
    for gi, names in enumerate(grouping.groups):
        first = specs[names[0]]
        per_block = grouping.pages_per_block(gi)
        num_blocks = num_pages // per_block
        stride = per_block * geo.page_bytes
        groups.append(GroupLayout(gi, names, first.page_size_bytes, getattr(first, "block_size", None),
                                  num_blocks, False, per_block, True))
        for slot, name in enumerate(names):
            spec = specs[name]
            item = spec.dtype.itemsize
            h, n, c = spec.block_shape()
            offset = slot * geo.slot_bytes
            layers[name] = LayerLayout(
                name=name, kind=spec_kind(spec), group=gi, index_in_group=slot, dtype=spec.dtype,
                shape=(num_blocks, h, n, c), strides=(stride // item, n * c, c, 1), storage_offset=offset // item,
                byte_offset=offset, block_bytes=spec.page_size_bytes, block_stride_bytes=stride, buffer=0)
    layout = KVCacheLayout(tuple(groups), tuple(layers[n] for n in specs), backend.name if backend else None,
                           connector.name if connector else None, geo)
    check_no_overlap(layout)
    return layout


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m
