"""Block ids as callers give them, normalized and checked against the blocks an engine has.

Block ids are one sequence for every layer, ``{"attention": ids, "mamba": ids}`` when layer kinds use
different blocks, or ``{group index: ids}`` (the layout's groups) when one kind spans several groups, as
a hybrid model's Mamba layers do on a page pool. Internally all become ``{key: int64 array}``, with the key
``"*"`` (``ALL_KINDS``) for a sequence that applies to every layer. On a page pool of several groups a
sequence for every layer is refused: attention and state blocks there have ids of their own.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence, Union

import numpy as np
import torch

from kvlayout.errors import KVLayoutError

ALL_KINDS = "*"          # key of a block-id mapping that applies to every layer kind
BlockIds = Union[Sequence[int], np.ndarray, torch.Tensor, Mapping[str, Sequence[int]]]
KindIds = dict[str, np.ndarray]


KINDS = ("attention", "mla", "mamba")


def as_block_ids(block_ids: BlockIds, what: str) -> KindIds:
    """Normalize block ids to ``{kind or group: int64 array}``; a plain sequence applies to every layer
    (``"*"``)."""
    if isinstance(block_ids, Mapping):
        items = dict(block_ids)
        if not items:
            raise KVLayoutError(f"{what}: the block-id mapping is empty")
        keyed = {}
        for key, ids in items.items():
            if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
                group = int(key)
            elif isinstance(key, str) and key.isdecimal() and len(key) <= 6:
                group = int(key)                    # a group index that went through JSON or the wire
            elif key in KINDS:
                keyed[key] = ids
                continue
            else:
                raise KVLayoutError(f"{what}: unknown layer kind {str(key)[:40]!r}; use 'attention', 'mla', "
                                    f"'mamba' or a group index")
            if group < 0:
                raise KVLayoutError(f"{what}: group index {group} is negative")
            keyed[group] = ids
        if len(keyed) != len(items):
            raise KVLayoutError(f"{what}: a group is named twice")
        if len({isinstance(k, int) for k in keyed}) > 1:
            raise KVLayoutError(f"{what}: key the block ids by layer kind or by group index, not both")
        items = keyed
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


def plain_block_ids(ids: KindIds):
    """Normalized ids back as plain lists (a list, or ``{kind or group: list}``), e.g. for a message; group
    indices become decimal strings, which JSON and a strict msgpack reader keep (``as_block_ids`` reads
    them back)."""
    if ALL_KINDS in ids:
        return ids[ALL_KINDS].tolist()
    return {str(k) if isinstance(k, int) else k: v.tolist() for k, v in ids.items()}


def kind_blocks(layers: Iterable[tuple[str, int, int]], pooled: bool) -> dict:
    """What keys ``layers`` (``(kind, group, num_blocks)`` each) accept, with the blocks each names:
    every group index; a kind whose layers share one block-id space (always outside a page pool; in a
    pool, a kind of one group); ``"*"`` unless the layers sit on a page pool of several groups."""
    out: dict = {}
    groups_of: dict[str, set] = {}
    for kind, group, n in layers:
        out[group] = min(out.get(group, n), n)
        out[kind] = min(out.get(kind, n), n)
        out[ALL_KINDS] = min(out.get(ALL_KINDS, n), n)
        groups_of.setdefault(kind, set()).add(group)
    if pooled:
        for kind, groups in groups_of.items():
            if len(groups) > 1:
                del out[kind]
        if sum(len(g) for g in groups_of.values()) > 1:
            del out[ALL_KINDS]
    return out


def check_in_range(ids: KindIds, blocks: Mapping, what: str, where: str) -> None:
    """Raise unless every key of ``ids`` is one ``where`` accepts and every id is one of its blocks."""
    for kind, arr in ids.items():
        if kind not in blocks:
            groups = sorted(k for k in blocks if isinstance(k, int))
            kinds = sorted(k for k in blocks if isinstance(k, str) and k != ALL_KINDS)
            if kind == ALL_KINDS:
                raise KVLayoutError(f"{what}: {where} keeps a hybrid page pool, where attention and state blocks have "
                                    f"ids of their own; pass {{kind: ids}} (kinds {kinds}) or {{group: ids}} "
                                    f"(groups {groups})")
            if kind in KINDS and isinstance(kind, str):
                raise KVLayoutError(f"{what}: {where} has no single block-id space for {kind} layers (they are "
                                    f"absent, or span several groups of its page pool); key the ids by group "
                                    f"(groups {groups}) or use kinds {kinds}")
            raise KVLayoutError(f"{what}: {where} has no group {kind} (groups {groups})")
        if arr.size and (arr.min() < 0 or arr.max() >= blocks[kind]):
            bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
            raise KVLayoutError(f"{what}: block id {bad} is out of range; {where} has blocks "
                                f"0..{blocks[kind] - 1}" + ("" if kind == ALL_KINDS else f" for {kind} layers"))


def shared_block(a: KindIds, b: KindIds, kind_of_group: Mapping[int, str]) -> "int | None":
    """A block id that ``a`` and ``b`` both name for some layers (``"*"`` names every layer; a group index
    names that group's layers, a kind every layer of the kind), or None."""
    def meet(x, y) -> bool:
        if x == y or ALL_KINDS in (x, y):
            return True
        if isinstance(x, int) != isinstance(y, int):
            g, k = (x, y) if isinstance(x, int) else (y, x)
            return kind_of_group.get(g) == k
        return False

    for ka, ia in a.items():
        for kb, ib in b.items():
            if meet(ka, kb):
                both = np.intersect1d(ia, ib)
                if both.size:
                    return int(both[0])
    return None


def check_load_pairs(local: KindIds, remote: KindIds) -> None:
    """Raise unless local and remote ids pair one to one, per kind, and no local block receives twice."""
    if set(local) != set(remote):
        raise KVLayoutError(f"local and remote block ids name different layer kinds: {sorted(local)} vs {sorted(remote)}")
    for k in local:
        if local[k].size != remote[k].size:
            raise KVLayoutError(f"{local[k].size} local but {remote[k].size} remote block ids"
                                + ("" if k == ALL_KINDS else f" for {k} layers"))
    check_receivers(local)


def check_receivers(ids: KindIds) -> None:
    """Raise unless some block is named and no block receives twice (per kind)."""
    for arr in ids.values():
        srt = np.sort(arr)
        if srt.size > 1 and (srt[1:] == srt[:-1]).any():
            raise KVLayoutError("local block ids repeat a block; each block can receive one remote block")
    if sum(v.size for v in ids.values()) == 0:
        raise KVLayoutError("no block ids given: nothing to load")
