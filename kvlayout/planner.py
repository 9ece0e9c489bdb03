"""Turn layer specs and a memory budget into a plan: unified page sizes, block counts, the layout."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Mapping, Optional, Union

from .capabilities import BackendCapabilities, ConnectorWishes
from .capacity import DEFAULT_CONTEXT_TOKENS, Capacity, plan_capacity
from .errors import KVLayoutError
from .hybrid import group_hybrid_layers, is_hybrid, resolve_pooled_layout
from .layout import KVCacheLayout, group_by_page_size, resolve_kv_cache_layout, spec_kind
from .specs import KVCacheSpec, MambaSpec, dtype_name


@dataclass(frozen=True)
class GroupPlan:
    """What the plan reports for one group of layers sharing a page size."""

    index: int
    layer_names: tuple[str, ...]
    kinds: tuple[str, ...]                 # kind of each layer, same order
    page_size_bytes: int
    padding_bytes_per_page: int            # summed over the group's layers
    block_size: Optional[int]
    num_blocks: int
    cross_layer: bool
    pages_per_block: int = 1               # pool pages one block id takes (k for a state group in a pool)
    pooled: bool = False                   # block ids come from a page pool shared with other groups

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.page_size_bytes * self.num_layers

    @property
    def padding_bytes(self) -> int:
        return self.padding_bytes_per_page * self.num_blocks

    @property
    def num_tokens(self) -> Optional[int]:
        return None if self.block_size is None else self.block_size * self.num_blocks


@dataclass(frozen=True)
class KVCachePlan:
    """The resolved plan: the specs as adjusted, the block counts, the frozen layout, and what changed."""

    specs: Mapping[str, KVCacheSpec]
    layout: KVCacheLayout
    groups: tuple[GroupPlan, ...]
    memory_bytes: int
    adjustments: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def group_of(self, layer_name: str) -> GroupPlan:
        return self.groups[self.layout.layer(layer_name).group]

    def attention_group(self) -> GroupPlan:
        """The one group holding token-indexed caches (attention or MLA); errors if there are several."""
        groups = [g for g in self.groups if g.block_size is not None]
        if len(groups) != 1:
            raise KVLayoutError(f"this plan has {len(groups)} token-indexed groups; name the group you mean")
        return groups[0]

    def capacity(self, context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> Capacity:
        """Concurrent requests at ``context_tokens``, or the longest single request (``kvlayout.capacity``)."""
        return plan_capacity(self, context_tokens)

    def to_dict(self, context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> dict:
        pool = self.layout.pool
        return {
            "memory_bytes": self.memory_bytes,
            "allocated_bytes": self.nbytes,
            "backend": self.layout.backend,
            "connector": self.layout.connector,
            "adjustments": list(self.adjustments),
            "capacity": self.capacity(context_tokens).to_dict(),
            "pool": None if pool is None else {
                "page_bytes": pool.page_bytes, "num_pages": pool.num_pages, "num_slots": pool.num_slots,
                "large_page_pages": pool.large_page_pages, "num_large_pages": pool.num_large_pages},
            "groups": [{
                "index": g.index, "layers": list(g.layer_names), "kinds": _kind_counts(g.kinds),
                "page_size_bytes": g.page_size_bytes, "padding_bytes_per_page": g.padding_bytes_per_page,
                "padding_bytes": g.padding_bytes, "block_size": g.block_size, "num_blocks": g.num_blocks,
                "num_tokens": g.num_tokens, "nbytes": g.nbytes, "cross_layer": g.cross_layer,
                "pages_per_block": g.pages_per_block, "pooled": g.pooled,
            } for g in self.groups],
            "layers": {lay.name: {
                "kind": lay.kind, "group": lay.group, "dtype": dtype_name(lay.dtype), "shape": list(lay.shape),
                "strides": list(lay.strides), "storage_offset": lay.storage_offset,
            } for lay in self.layout.layers},
        }

    def to_json(self, context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> str:
        return json.dumps(self.to_dict(context_tokens), indent=2)

    def describe(self, context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> str:
        """A table of the groups and the capacity (what ``kvlayout plan`` prints)."""
        from rich.console import Console
        from rich.table import Table

        pool = self.layout.pool
        table = Table(title="kvlayout plan", title_justify="left")
        for col in ("group", "layers", "page/layer", "padding/block", "block size", "blocks", "at most", "memory"):
            table.add_column(col, justify="right" if col != "layers" else "left")
        for g in self.groups:
            stride = g.pages_per_block * pool.page_bytes * pool.num_slots if pool else g.page_size_bytes * g.num_layers
            most = f"{g.num_tokens:,} tokens" if g.block_size else f"{g.num_blocks:,} states"
            table.add_row(str(g.index), _kind_counts_text(g.kinds) + (" (cross-layer)" if g.cross_layer else ""),
                          _fmt_bytes(g.page_size_bytes),
                          f"{_fmt_bytes(g.padding_bytes_per_page)} ({100 * g.padding_bytes_per_page / stride:.1f}%)",
                          "-" if g.block_size is None else str(g.block_size), f"{g.num_blocks:,}", most,
                          "shared pool" if g.pooled else _fmt_bytes(g.nbytes))
        buf = io.StringIO()
        console = Console(file=buf, width=120, force_terminal=False, color_system=None)
        console.print(table)
        if pool is not None:
            console.print(f"page pool: {pool.num_pages:,} small pages of {_fmt_bytes(pool.page_bytes)} x "
                          f"{pool.num_slots} slot(s); a large page (one state) is {pool.large_page_pages} small "
                          f"pages; the split between tokens and states follows the running requests")
        cap = self.capacity(context_tokens)
        one = ("" if cap.max_tokens_one_request is None
               else f"; or one request of up to {cap.max_tokens_one_request:,} tokens")
        console.print(f"capacity: {cap.concurrent_requests:,} concurrent requests of {cap.context_tokens:,} tokens "
                      f"({_fmt_bytes(cap.held_bytes_per_request)} each, {100 * cap.padding_fraction:.1f}% padding)"
                      + one)
        if cap.attention_block_size is not None:
            console.print(f"attention block {cap.attention_block_size} tokens, prefix-cache granularity "
                          f"{cap.prefix_granularity_tokens} tokens")
        console.print(f"budget {_fmt_bytes(self.memory_bytes)}, allocated {_fmt_bytes(self.nbytes)}"
                      + (f", backend {self.layout.backend}" if self.layout.backend else ""))
        for note in self.adjustments:
            console.print(f"note: {note}")
        return buf.getvalue().rstrip()


def _kind_counts(kinds) -> dict:
    out: dict[str, int] = {}
    for k in kinds:
        out[k] = out.get(k, 0) + 1
    return out


def _kind_counts_text(kinds) -> str:
    return ", ".join(f"{n} {k}" for k, n in _kind_counts(kinds).items())


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _as_capabilities(backend) -> Optional[BackendCapabilities]:
    if backend is None or isinstance(backend, BackendCapabilities):
        return backend
    if isinstance(backend, str):
        from .registry import get_attention_backend
        backend = get_attention_backend(backend)
    caps = getattr(backend, "capabilities", None)
    if not isinstance(caps, BackendCapabilities):
        raise KVLayoutError(f"backend must be a name, a backend object or BackendCapabilities, got {backend!r}")
    return caps


MAX_BLOCKS = 2**31 - 1        # block tables are int32 on every backend


def plan_kv_cache(
    specs: Mapping[str, KVCacheSpec],
    memory_bytes: int,
    backend: Union[str, BackendCapabilities, object, None] = None,
    connector: Optional[ConnectorWishes] = None,
    cross_layer: Optional[bool] = None,
) -> KVCachePlan:
    """Resolve the layout once and turn ``memory_bytes`` into block counts.

    A hybrid model (attention + recurrent state) gets a two-level page pool (``kvlayout.hybrid``): its
    attention keeps the engine's block size and the split between tokens and states follows the running
    requests. Otherwise layers are grouped by page size, each group with its own buffer, and every
    token-indexed group holds the same number of tokens."""
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0:
        raise KVLayoutError(f"memory_bytes must be a positive integer, got {memory_bytes!r}")
    if not specs:
        raise KVLayoutError("no layer specs given: pass {layer name: AttentionSpec | MLASpec | MambaSpec}")
    for spec in specs.values():
        spec_kind(spec)
    caps = _as_capabilities(backend)
    if is_hybrid(specs):
        return _plan_pooled(specs, memory_bytes, caps, connector, cross_layer)

    groups = group_by_page_size(specs)
    # Bytes one "token" costs in each group (a state-only group counts one state as one token).
    per_unit = []
    for names in groups:
        bs = next((specs[n].block_size for n in names if not isinstance(specs[n], MambaSpec)), 1)
        per_unit.append((bs, specs[names[0]].page_size_bytes * len(names)))
    units = memory_bytes / sum(page_all / bs for bs, page_all in per_unit)
    num_blocks = {gi: int(units // bs) for gi, (bs, _) in enumerate(per_unit)}
    need = sum(page_all for _, page_all in per_unit)
    if min(num_blocks.values()) < 1:
        raise KVLayoutError(
            f"memory budget {memory_bytes:,} B is too small for one block in every layer "
            f"(needs at least {need:,} B); raise the budget or lower the block size")
    _check_block_count(max(num_blocks.values()), memory_bytes)
    layout = resolve_kv_cache_layout(specs, num_blocks, caps, connector, cross_layer)
    group_plans = [GroupPlan(g.index, g.layer_names, tuple(spec_kind(specs[n]) for n in g.layer_names),
                             g.page_size_bytes, 0, g.block_size, g.num_blocks, g.cross_layer)
                   for g in layout.groups]
    return KVCachePlan(dict(specs), layout, tuple(group_plans), memory_bytes, ())


def _plan_pooled(specs, memory_bytes, caps, connector, cross_layer) -> KVCachePlan:
    grouping = group_hybrid_layers(specs)
    k, slots = grouping.large_page_pages, grouping.num_slots
    per_page = slots * grouping.page_bytes
    num_pages = memory_bytes // per_page // k * k
    if num_pages < grouping.min_pages():
        raise KVLayoutError(
            f"memory budget {memory_bytes:,} B is too small for one request of this model (one small page per "
            f"attention group and one large page per state group: {grouping.min_pages() * per_page:,} B); "
            f"raise the budget or lower the block size")
    _check_block_count(num_pages, memory_bytes)
    layout = resolve_pooled_layout(grouping, num_pages, caps, connector, cross_layer)
    unified = grouping.specs
    group_plans = []
    for g in layout.groups:
        stride = g.pages_per_block * grouping.page_bytes
        pad = sum(stride - (unified[n].state_bytes if isinstance(unified[n], MambaSpec) else g.page_size_bytes)
                  for n in g.layer_names) + (slots - len(g.layer_names)) * stride
        group_plans.append(GroupPlan(g.index, g.layer_names, tuple(spec_kind(unified[n]) for n in g.layer_names),
                                     g.page_size_bytes, pad, g.block_size, g.num_blocks, False,
                                     g.pages_per_block, True))
    notes = [f"hybrid model: {len(layout.groups)} groups of {slots} layer slot(s) share one page pool of "
             f"{num_pages:,} small pages ({_fmt_bytes(grouping.page_bytes)} per slot); a state takes a large page "
             f"of {k} small pages"]
    return KVCachePlan(dict(unified), layout, tuple(group_plans), memory_bytes, tuple(notes))


def _check_block_count(n: int, memory_bytes: int) -> None:
    if n > MAX_BLOCKS:
        raise KVLayoutError(f"memory budget {memory_bytes:,} B gives {n:,} blocks, more than the {MAX_BLOCKS:,} "
                            f"that int32 block ids address; give a real device budget or a larger block size")
