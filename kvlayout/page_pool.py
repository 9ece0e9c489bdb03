"""The page pool: hands out block ids per group, so that a page belongs to exactly one group at a time.

In a hybrid plan every group addresses the same small pages (``kvlayout.hybrid``): an attention block is
one small page, a state block one aligned large page of k small pages. The pool keeps

- ``large``: whole free large pages (a stack);
- ``small``: free small pages of large pages split for attention (a stack, each entry tagged with its large
  page's generation; when a large page is whole again its generation moves on, so its entries go stale and
  are skipped when popped);
- ``free_count[q]``: how many small pages of split large page ``q`` are free;
- ``owner[p]``: the group that owns small page ``p`` (-1: free).

Attention takes small pages from split large pages first and splits a whole one only when none is left;
when the last small page of a split large page is freed, the large page is whole again and can hold a state.
Outside a hybrid plan each group has its own block ids and k = 1 (a free list).

Every call checks its inputs before it changes anything: a refused call leaves the pool as it was.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from .errors import KVLayoutError
from .layout import KVCacheLayout


class PoolExhaustedError(KVLayoutError):
    """Not enough free pages for the request; nothing was allocated."""


@dataclass(frozen=True)
class PoolGroup:
    """What the pool knows of one group: its space, pages per block, tokens per block and a name."""

    index: int
    space: int
    pages_per_block: int
    block_size: Optional[int]
    kind: str

    @property
    def is_state(self) -> bool:
        return self.block_size is None

    def describe(self) -> str:
        return f"group {self.index} ({self.kind})"


class _Stack:
    """A stack of int64 values (with an int64 tag each) in numpy arrays: push and pop many at once."""

    def __init__(self, values: np.ndarray, capacity: int):
        self.values = np.empty(max(capacity, values.size, 1), dtype=np.int64)
        self.tags = np.zeros_like(self.values)
        self.values[:values.size] = values
        self.top = values.size

    def push(self, values: np.ndarray, tags=0) -> None:
        end = self.top + values.size
        if end > self.values.size:
            grow = max(end, 2 * self.values.size)
            self.values = np.resize(self.values, grow)
            self.tags = np.resize(self.tags, grow)
        self.values[self.top:end] = values
        self.tags[self.top:end] = tags
        self.top = end

    def pop(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        lo = self.top - n
        out = self.values[lo:self.top][::-1].copy(), self.tags[lo:self.top][::-1].copy()
        self.top = lo
        return out


class _Space:
    """One block-id address space: ``num_pages`` small pages in large pages of ``k``.

    Free small pages sit on a stack tagged with their large page's generation; when a large page is whole
    again its generation moves on, so its pages still on the stack are stale and skipped when popped (no
    search, no per-page Python loop). ``num_small`` counts the live entries only."""

    def __init__(self, num_pages: int, k: int, order: Optional[Sequence[int]]):
        self.num_pages, self.k = num_pages, k
        num_large = num_pages // k
        if order is None:
            first = np.arange(num_large - 1, -1, -1, dtype=np.int64)          # popped from the end: 0 first
        else:
            first = np.asarray([int(i) for i in order], dtype=np.int64)
            if first.size != num_large or not np.array_equal(np.sort(first), np.arange(num_large)):
                raise KVLayoutError(f"page order must be a permutation of 0..{num_large - 1}")
            first = first[::-1]
        self.large = _Stack(first, num_large)
        self.small = _Stack(np.empty(0, dtype=np.int64), 2 * num_pages if k > 1 else 0)
        self.num_small = 0
        self.gen = np.zeros(num_large, dtype=np.int64)
        self.free_count = np.zeros(num_large, dtype=np.int64)     # free small pages of a split large page
        self.owner = np.full(num_pages, -1, dtype=np.int16)

    @property
    def free_pages(self) -> int:
        return self.num_small + self.k * self.large.top

    @property
    def free_large(self) -> int:
        return self.large.top

    def take_pages(self, group: int, n: int) -> np.ndarray:
        """``n`` free small pages (the caller checked there are enough): first those of split large pages,
        then whole large pages split for the rest."""
        k = self.k
        if k == 1:
            out = self.large.pop(n)[0]
            self.owner[out] = group
            return out
        parts, need = [], n
        while need and self.num_small:
            pages, tags = self.small.pop(min(need, self.num_small))
            live = self.gen[pages // k] == tags
            if not live.all():
                pages = pages[live]
            parts.append(pages)
            need -= pages.size
            self.num_small -= pages.size
        if parts:
            np.subtract.at(self.free_count, np.concatenate(parts) // k if len(parts) > 1 else parts[0] // k, 1)
        if need:                                              # split whole large pages for the rest
            qs = self.large.pop(-(-need // k))[0]
            pages = (qs[:, None] * k + np.arange(k)).ravel()
            parts.append(pages[:need])
            rest = pages[need:]
            self.free_count[qs] = 0
            if rest.size:
                self.free_count[qs[-1]] = rest.size
                self.small.push(rest[::-1], self.gen[qs[-1]])
                self.num_small += rest.size
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.owner[out] = group
        return out

    def give_pages(self, ids: np.ndarray) -> None:
        self.owner[ids] = -1
        k = self.k
        if k == 1:
            self.large.push(ids)
            return
        q = ids // k
        self.small.push(ids, self.gen[q])
        self.num_small += ids.size
        np.add.at(self.free_count, q, 1)
        whole = self.free_count[q] == k
        if whole.any():                                       # whole again: back to the large pages
            qs = np.unique(q[whole])
            self.gen[qs] += 1
            self.num_small -= k * qs.size
            self.large.push(qs)
            if self.small.top > 2 * self.num_pages:          # drop stale entries now and then
                live = self.gen[self.small.values[:self.small.top] // k] == self.small.tags[:self.small.top]
                keep_v, keep_t = self.small.values[:self.small.top][live], self.small.tags[:self.small.top][live]
                self.small.top = 0
                self.small.push(keep_v, keep_t)

    def take_large(self, group: int, n: int) -> np.ndarray:
        out = self.large.pop(n)[0]
        if out.size:
            k = self.k
            self.owner[(out[:, None] * k + np.arange(k)).ravel()] = group
        return out

    def give_large(self, ids: np.ndarray) -> None:
        k = self.k
        self.owner[(ids[:, None] * k + np.arange(k)).ravel()] = -1
        self.large.push(ids)


class PagePool:
    """Block ids per group over a plan's pages (see the module docstring).

    ``order``: the initial order in which large pages (blocks, outside a pool) are handed out, per
    space, e.g. a permutation to scramble block ids in tests. ``cache``: the ``KVCache`` of the plan;
    when given, every state block is zeroed as it is handed out, so a recurrent state never starts from
    another request's bytes.
    """

    def __init__(self, plan, *, order: Optional[Sequence[int]] = None, cache=None):
        layout = getattr(plan, "layout", plan)
        if not isinstance(layout, KVCacheLayout):
            raise KVLayoutError(f"PagePool needs a KVCachePlan or KVCacheLayout, got {type(plan).__name__}")
        if cache is not None and getattr(cache, "layout", None) is not layout:
            raise KVLayoutError("PagePool: the cache was not allocated from this plan")
        self.layout, self.cache = layout, cache
        kinds = {lay.group: lay.kind for lay in layout.layers}
        if layout.pool is not None:
            geo = layout.pool
            self._spaces = [_Space(geo.num_pages, geo.large_page_pages, order)]
            self.groups = tuple(PoolGroup(g.index, 0, g.pages_per_block, g.block_size, kinds[g.index])
                                for g in layout.groups)
        else:
            self._spaces = [_Space(g.num_blocks, 1, order) for g in layout.groups]
            self.groups = tuple(PoolGroup(g.index, g.index, 1, g.block_size, kinds[g.index]) for g in layout.groups)

    # ---- counts -----------------------------------------------------------------------------
    def group(self, group: int) -> PoolGroup:
        if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or not 0 <= group < len(self.groups):
            raise KVLayoutError(f"group {group!r} does not exist; this plan has groups 0..{len(self.groups) - 1}")
        return self.groups[int(group)]

    def num_free_blocks(self, group: int) -> int:
        """Blocks of ``group`` that could be allocated now (other groups compete for the same pages)."""
        g = self.group(group)
        space = self._spaces[g.space]
        return space.free_large if g.pages_per_block > 1 else space.free_pages

    def num_free_tokens(self, group: int) -> int:
        g = self.group(group)
        if g.block_size is None:
            raise KVLayoutError(f"{g.describe()} holds states, not tokens; use num_free_blocks")
        return self.num_free_blocks(group) * g.block_size

    def num_used_blocks(self, group: int) -> int:
        g = self.group(group)
        return int(np.count_nonzero(self._spaces[g.space].owner == g.index)) // g.pages_per_block

    # ---- allocate and free ------------------------------------------------------------------
    def allocate(self, group: int, n: int) -> list[int]:
        """``n`` block ids of ``group`` (small pages for attention, large pages for a state)."""
        return self.allocate_many(group, [n])[0]

    def allocate_many(self, group: int, counts: Sequence[int]) -> list[list[int]]:
        """Block ids for several requests at once: ``counts[i]`` blocks for request ``i``. All or nothing."""
        g = self.group(group)
        if not counts:
            return []
        try:
            total = sum(counts) if isinstance(counts, (list, tuple)) else None
        except TypeError:
            total = None
        if type(total) is int and min(counts) >= 0:         # plain ints (the hot path): no array needed
            least = min(counts)
        else:
            want = np.asarray(counts)
            if want.ndim != 1 or want.dtype.kind not in "iu" or int(want.min()) < 0:
                raise KVLayoutError(f"{g.describe()}: block counts must be integers >= 0, got {list(counts)[:16]}")
            counts, total, least = want.tolist(), int(want.sum()), int(want.min())
        free = self.num_free_blocks(group)
        if total > free:
            raise PoolExhaustedError(f"{g.describe()}: cannot allocate {total} blocks, {free} are free")
        space = self._spaces[g.space]
        arr = space.take_large(g.index, total) if g.pages_per_block > 1 else space.take_pages(g.index, total)
        if g.is_state and self.cache is not None and arr.size:
            from .ops import zero_blocks
            zero_blocks(self.cache, arr, group=g.index)
        ids = arr.tolist()
        if len(counts) == 1:
            return [ids]
        if total == len(counts) and least == 1:                    # one block each (a decode step)
            return [[i] for i in ids]
        ends = itertools.accumulate(counts)
        return [ids[e - c:e] for c, e in zip(counts, ends)]

    def free(self, group: int, ids: Iterable[int]) -> None:
        """Give ``group``'s blocks back; refused (changing nothing) if any is not ``group``'s."""
        g = self.group(group)
        arr = self.check_owned(group, ids, "free")
        if arr.size == 0:
            return
        space = self._spaces[g.space]
        if g.pages_per_block > 1:
            space.give_large(arr)
        else:
            space.give_pages(arr)

    def free_many(self, group: int, id_lists: Iterable[Iterable[int]]) -> None:
        """Free the blocks of several requests at once (checked together: all or nothing)."""
        self.free(group, np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64))

    # ---- ownership --------------------------------------------------------------------------
    def check_held(self, group: int, ids, what: str = "block ids") -> np.ndarray:
        """``ids`` as an int64 array, after checking each is a block of ``group`` that ``group`` holds now
        (an id may repeat: requests can share a prefix). The error names the block, the group it was given
        for and its real owner."""
        g = self.group(group)
        if not (isinstance(ids, np.ndarray) and ids.dtype == np.int64 and ids.ndim == 1):
            try:
                arr = np.asarray(ids).ravel()
            except (TypeError, ValueError):
                raise KVLayoutError(f"{what}: block ids must be a sequence of integers, "
                                    f"got {type(ids).__name__}") from None
            if arr.size and arr.dtype.kind not in "iu":
                raise KVLayoutError(f"{what}: block ids must be integers, got {arr.dtype}")
            ids = arr.astype(np.int64, copy=False)
        arr = ids
        if arr.size == 0:
            return arr
        space = self._spaces[g.space]
        limit = space.num_pages // g.pages_per_block
        if int(arr.min()) < 0 or int(arr.max()) >= limit:
            bad = (arr < 0) | (arr >= limit)
            b = int(arr[np.argmax(bad)])
            raise KVLayoutError(f"{what}: block {b} is not a block of {g.describe()} (its ids are 0..{limit - 1})")
        owners = space.owner[arr * g.pages_per_block]
        wrong = owners != g.index
        if wrong.any():
            i = int(np.argmax(wrong))
            b, o = int(arr[i]), int(owners[i])
            if o < 0:
                raise KVLayoutError(f"{what}: block {b} of {g.describe()} is free (freed, or never allocated)")
            other = self.groups[o]
            page = b * g.pages_per_block
            how = ("a state page" if other.is_state else "an attention page") + f" of {other.describe()}"
            raise KVLayoutError(f"{what}: block {b} of {g.describe()} (pool page {page}) is {how}, "
                                f"not {g.describe()}'s")
        return arr

    def check_owned(self, group: int, ids, what: str = "block ids") -> np.ndarray:
        """``check_held``, and no id repeats (what ``free`` needs)."""
        arr = self.check_held(group, ids, what)
        g = self.groups[int(group)]
        srt = np.sort(arr)
        if srt.size > 1 and (srt[1:] == srt[:-1]).any():
            b = int(srt[1:][srt[1:] == srt[:-1]][0])
            raise KVLayoutError(f"{what}: block {b} of {g.describe()} is listed twice")
        return arr

    def owner_of_pages(self, space: int = 0) -> np.ndarray:
        """A read-only copy of the owner of every small page of ``space`` (-1: free); for tests and tools."""
        return self._spaces[space].owner.copy()
