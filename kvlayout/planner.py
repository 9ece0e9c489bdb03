"""Turn layer specs and a memory budget into a plan: unified page sizes, block counts, the layout."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Mapping, Optional, Union

from .capabilities import BackendCapabilities, ConnectorWishes
from .errors import KVLayoutError, LayoutConflictError
from .layout import KVCacheLayout, resolve_kv_cache_layout, spec_kind
from .specs import KVCacheSpec, MambaSpec, dtype_name

MAX_BLOCK_SIZE = 1 << 16


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

    def to_dict(self) -> dict:
        return {
            "memory_bytes": self.memory_bytes,
            "allocated_bytes": self.nbytes,
            "backend": self.layout.backend,
            "connector": self.layout.connector,
            "adjustments": list(self.adjustments),
            "groups": [{
                "index": g.index, "layers": list(g.layer_names), "kinds": _kind_counts(g.kinds),
                "page_size_bytes": g.page_size_bytes, "padding_bytes_per_page": g.padding_bytes_per_page,
                "padding_bytes": g.padding_bytes, "block_size": g.block_size, "num_blocks": g.num_blocks,
                "num_tokens": g.num_tokens, "nbytes": g.nbytes, "cross_layer": g.cross_layer,
            } for g in self.groups],
            "layers": {lay.name: {
                "kind": lay.kind, "group": lay.group, "dtype": dtype_name(lay.dtype), "shape": list(lay.shape),
                "strides": list(lay.strides), "storage_offset": lay.storage_offset,
            } for lay in self.layout.layers},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def describe(self) -> str:
        """A table of the groups (what ``kvlayout plan`` prints)."""
        from rich.console import Console
        from rich.table import Table

        table = Table(title="kvlayout plan", title_justify="left")
        for col in ("group", "layers", "page", "padding/page", "block size", "blocks", "tokens (+ states)", "memory"):
            table.add_column(col, justify="right" if col != "layers" else "left")
        for g in self.groups:
            table.add_row(str(g.index), _kind_counts_text(g.kinds) + (" (cross-layer)" if g.cross_layer else ""),
                          _fmt_bytes(g.page_size_bytes),
                          f"{_fmt_bytes(g.padding_bytes_per_page)} ({100 * g.padding_bytes_per_page / (g.page_size_bytes * g.num_layers):.1f}%)",
                          "-" if g.block_size is None else str(g.block_size), f"{g.num_blocks:,}",
                          _capacity_text(g), _fmt_bytes(g.nbytes))
        buf = io.StringIO()
        console = Console(file=buf, width=120, force_terminal=False, color_system=None)
        console.print(table)
        console.print(f"budget {_fmt_bytes(self.memory_bytes)}, allocated {_fmt_bytes(self.nbytes)}, "
                      f"padding {_fmt_bytes(sum(g.padding_bytes for g in self.groups))}"
                      + (f", backend {self.layout.backend}" if self.layout.backend else ""))
        for note in self.adjustments:
            console.print(f"note: {note}")
        return buf.getvalue().rstrip()


def _capacity_text(g: GroupPlan) -> str:
    parts = [] if g.num_tokens is None else [f"{g.num_tokens:,}"]
    if "mamba" in g.kinds:
        parts.append(f"{g.num_blocks:,} states")
    return " + ".join(parts)


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


def unify_page_sizes(specs: Mapping[str, KVCacheSpec], backend: Optional[BackendCapabilities] = None
                     ) -> tuple[dict[str, KVCacheSpec], list[str]]:
    """For hybrid models: raise the attention block size until a page covers the largest Mamba state,
    then pad every Mamba page to exactly that size. Returns the new specs and what was changed."""
    specs = dict(specs)
    notes: list[str] = []
    mamba = {n: s for n, s in specs.items() if isinstance(s, MambaSpec)}
    if not mamba:
        return specs, notes
    tokenwise = {n: s for n, s in specs.items() if not isinstance(s, MambaSpec)}
    need_name, need_spec = max(mamba.items(), key=lambda kv: kv[1].state_bytes)
    need = need_spec.state_bytes
    if not tokenwise:
        target = need
    else:
        pages, raised = {}, {}
        for name, spec in tokenwise.items():
            block = spec.block_size
            while (block * spec.token_bytes < need or (backend and not backend.block_size_ok(block))):
                block += spec.block_size
                if block > MAX_BLOCK_SIZE:
                    rule = f"; backend {backend.name!r} allows block sizes {backend.block_size_rule()}" if backend else ""
                    raise LayoutConflictError(
                        f"Mamba layer {need_name!r} needs {need:,} B per page, but no block size of attention "
                        f"layer {name!r} ({spec.token_bytes:,} B/token, multiples of {spec.block_size}) up to "
                        f"{MAX_BLOCK_SIZE} covers it{rule}. Use a backend without that limit (torch, flashinfer).")
            if block != spec.block_size:
                raised.setdefault((spec.block_size, block, block * spec.token_bytes), []).append(name)
                specs[name] = spec.with_block_size(block)
            pages[name] = specs[name].page_size_bytes
        for (old, new, page), names in raised.items():
            notes.append(f"block size of {len(names)} attention layer(s) raised {old} -> {new} so a page "
                         f"({page:,} B) covers the largest Mamba state ({need:,} B, {need_name})")
        if len(set(pages.values())) > 1:
            (a, pa), (b, pb) = sorted(pages.items(), key=lambda kv: kv[1])[::len(pages) - 1]
            raise LayoutConflictError(
                f"after raising block sizes to cover the Mamba state, attention layers {a!r} ({pa:,} B/page) and "
                f"{b!r} ({pb:,} B/page) still differ; a hybrid model needs one page size. Give the attention "
                f"layers the same head count, head size and dtype")
        target = next(iter(pages.values()))
    for name, spec in mamba.items():
        if spec.page_size_bytes != target:
            specs[name] = spec.padded_to(target)
    if target > need:
        notes.append(f"Mamba pages padded {need:,} -> {target:,} B ({100 * (target - need) / target:.1f}% padding)")
    return specs, notes


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
    """Resolve the layout once: unify page sizes (hybrid models), turn ``memory_bytes`` into block
    counts (every token-indexed group holds the same number of tokens), and freeze the layout."""
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0:
        raise KVLayoutError(f"memory_bytes must be a positive integer, got {memory_bytes!r}")
    if not specs:
        raise KVLayoutError("no layer specs given: pass {layer name: AttentionSpec | MLASpec | MambaSpec}")
    caps = _as_capabilities(backend)
    unified, notes = unify_page_sizes(specs, caps)

    from .layout import group_by_page_size
    groups = group_by_page_size(unified)
    # Bytes one "token" costs in each group (a Mamba-only group counts one state as one token).
    per_unit = []
    for names in groups:
        bs = next((unified[n].block_size for n in names if not isinstance(unified[n], MambaSpec)), 1)
        per_unit.append((bs, unified[names[0]].page_size_bytes * len(names)))
    units = memory_bytes / sum(page_all / bs for bs, page_all in per_unit)
    num_blocks = {gi: int(units // bs) for gi, (bs, _) in enumerate(per_unit)}
    need = sum(page_all for _, page_all in per_unit)
    if min(num_blocks.values()) < 1:
        raise KVLayoutError(
            f"memory budget {memory_bytes:,} B is too small for one block in every layer "
            f"(needs at least {need:,} B); raise the budget or lower the block size")
    if max(num_blocks.values()) > MAX_BLOCKS:
        raise KVLayoutError(f"memory budget {memory_bytes:,} B gives {max(num_blocks.values()):,} blocks, more than "
                            f"the {MAX_BLOCKS:,} that int32 block ids address; give a real device budget or a "
                            f"larger block size")
    layout = resolve_kv_cache_layout(unified, num_blocks, caps, connector, cross_layer)
    group_plans = []
    for g in layout.groups:
        kinds = tuple(spec_kind(unified[n]) for n in g.layer_names)
        pad = sum(unified[n].padding_bytes for n in g.layer_names if isinstance(unified[n], MambaSpec))
        group_plans.append(GroupPlan(g.index, g.layer_names, kinds, g.page_size_bytes, pad, g.block_size,
                                     g.num_blocks, g.cross_layer))
    return KVCachePlan(unified, layout, tuple(group_plans), memory_bytes, tuple(notes))
