"""Descriptors: region pairs and block ids turned into what NIXL transfers.

Each side's regions are prepared once as a descriptor list (``descriptor_rows``: one descriptor per region
and block); a transfer names ``(pair, block id)`` by index (``TransferPlan.indices``), region-major and in
request order, so adjacent blocks that are contiguous on both sides sit next to each other and coalesce
into one descriptor (NIXL merges them when it makes the transfer; ``coalesce`` computes the same result).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .block_ids import ALL_KINDS
from .regions import Region, RegionPair


def descriptor_rows(regions: Sequence[Region], device_id: int = 0) -> np.ndarray:
    """NIXL's strided descriptor form, one row per region: ``(base, block_len, device, block_stride, blocks)``.
    Row i expands to ``num_blocks`` descriptors, one per block."""
    return np.array([(r.base, r.block_len, device_id, r.block_stride, r.num_blocks) for r in regions],
                    dtype=np.uint64).reshape(-1, 5)


class TransferPlan:
    """Region pairs between this engine and one remote engine, with the offsets per key (kind, group or
    ``"*"``) that turn ``(pair, block id)`` into indices of the two prepared descriptor lists."""

    def __init__(self, pairs: Sequence[RegionPair]):
        self.pairs = tuple(pairs)
        counts_l = np.array([lp.num_blocks for lp, _ in self.pairs], dtype=np.int64)
        counts_r = np.array([rp.num_blocks for _, rp in self.pairs], dtype=np.int64)
        start_l = np.concatenate([[0], np.cumsum(counts_l)[:-1]]) if len(counts_l) else counts_l
        start_r = np.concatenate([[0], np.cumsum(counts_r)[:-1]]) if len(counts_r) else counts_r
        self._by_kind: dict = {}
        for kind in {lp.kind for lp, _ in self.pairs} | {lp.group for lp, _ in self.pairs} | {ALL_KINDS}:
            sel = np.array([k for k, (lp, _) in enumerate(self.pairs) if kind in (ALL_KINDS, lp.kind, lp.group)],
                           dtype=np.int64)
            self._by_kind[kind] = (
                start_l[sel], start_r[sel],
                np.array([self.pairs[k][0].base for k in sel], dtype=np.int64),
                np.array([self.pairs[k][0].block_stride for k in sel], dtype=np.int64),
                np.array([self.pairs[k][1].base for k in sel], dtype=np.int64),
                np.array([self.pairs[k][1].block_stride for k in sel], dtype=np.int64),
                np.array([self.pairs[k][0].block_len for k in sel], dtype=np.int64))
        self.kinds = frozenset(lp.kind for lp, _ in self.pairs) | frozenset(lp.group for lp, _ in self.pairs)

    def _rows(self, kind: str):
        return self._by_kind.get(kind)

    def indices(self, local_ids: Mapping[str, np.ndarray], remote_ids: Mapping[str, np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray]:
        """Descriptor indices of a transfer, pair-major and in request order (int32, for NIXL)."""
        li, ri = [], []
        for kind, lid in local_ids.items():
            rows = self._rows(kind)
            if rows is None:
                continue
            li.append((rows[0][:, None] + lid[None, :]).ravel())
            ri.append((rows[1][:, None] + remote_ids[kind][None, :]).ravel())
        if not li:
            return np.empty(0, np.int32), np.empty(0, np.int32)
        return np.concatenate(li).astype(np.int32), np.concatenate(ri).astype(np.int32)

    def addresses(self, local_ids: Mapping[str, np.ndarray], remote_ids: Mapping[str, np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(local address, remote address, length)`` of every indexed descriptor, in index order."""
        la, ra, ln = [], [], []
        for kind, lid in local_ids.items():
            rows = self._rows(kind)
            if rows is None:
                continue
            rid = remote_ids[kind]
            la.append((rows[2][:, None] + rows[3][:, None] * lid[None, :]).ravel())
            ra.append((rows[4][:, None] + rows[5][:, None] * rid[None, :]).ravel())
            ln.append(np.repeat(rows[6], lid.size))
        if not la:
            return (np.empty(0, np.int64),) * 3
        return np.concatenate(la), np.concatenate(ra), np.concatenate(ln)

    def descriptors(self, local_ids: Mapping[str, np.ndarray], remote_ids: Mapping[str, np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The coalesced descriptors of a transfer: ``(local address, remote address, length)``."""
        return coalesce(*self.addresses(local_ids, remote_ids))


def coalesce(local_addr: np.ndarray, remote_addr: np.ndarray, length: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge consecutive descriptors that are contiguous on both sides into one."""
    if local_addr.size == 0:
        return local_addr, remote_addr, length
    end_l, end_r = local_addr[:-1] + length[:-1], remote_addr[:-1] + length[:-1]
    starts = np.concatenate([[True], (local_addr[1:] != end_l) | (remote_addr[1:] != end_r)])
    first = np.flatnonzero(starts)
    total = np.add.reduceat(length, first)
    return local_addr[first], remote_addr[first], total
