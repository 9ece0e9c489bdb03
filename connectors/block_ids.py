"""Block ids as callers give them, normalized and checked against the blocks an engine has.

Block ids are one sequence for every layer, or ``{"attention": ids, "mamba": ids}`` when layer kinds use
different blocks; internally both become ``{kind: int64 array}``, with the key ``"*"`` (``ALL_KINDS``)
for a sequence that applies to every kind.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence, Union

import numpy as np
import torch

from kvlayout.errors import KVLayoutError

ALL_KINDS = "*"          # key of a block-id mapping that applies to every layer kind
BlockIds = Union[Sequence[int], np.ndarray, torch.Tensor, Mapping[str, Sequence[int]]]
KindIds = dict[str, np.ndarray]


def as_block_ids(block_ids: BlockIds, what: str) -> KindIds:
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


def plain_block_ids(ids: KindIds):
    """Normalized ids back as plain lists (a list, or ``{kind: list}``), e.g. for a JSON message."""
    return ids[ALL_KINDS].tolist() if ALL_KINDS in ids else {k: v.tolist() for k, v in ids.items()}


def kind_blocks(kinds_and_counts: Iterable[tuple[str, int]]) -> dict[str, int]:
    """``{kind: blocks every layer of that kind has}`` plus ``"*"``: blocks every layer has."""
    out: dict = {}
    for kind, n in kinds_and_counts:
        out[kind] = min(out.get(kind, n), n)
        out[ALL_KINDS] = min(out.get(ALL_KINDS, n), n)
    return out


def check_in_range(ids: KindIds, blocks: Mapping[str, int], what: str, where: str) -> None:
    """Raise unless every kind of ``ids`` exists at ``where`` and every id is one of its blocks."""
    for kind, arr in ids.items():
        if kind not in blocks:
            raise KVLayoutError(f"{what}: {where} has no {kind} layers (kinds: {sorted(set(blocks) - {ALL_KINDS})})")
        if arr.size and (arr.min() < 0 or arr.max() >= blocks[kind]):
            bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
            raise KVLayoutError(f"{what}: block id {bad} is out of range; {where} has blocks "
                                f"0..{blocks[kind] - 1}" + ("" if kind == ALL_KINDS else f" for {kind} layers"))


def shared_block(a: KindIds, b: KindIds) -> "int | None":
    """A block id that ``a`` and ``b`` both name for some layer kind (``"*"`` names every kind), or None."""
    for ka, ia in a.items():
        for kb, ib in b.items():
            if ka == kb or ALL_KINDS in (ka, kb):
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
