"""Tensor-parallel head math: which global heads a rank holds, and which ranks of another TP size a rank
reads its KV heads from. One home for it: the model sharding (``engine.tensor_parallel``), the planner's
per-rank specs, the connector's records and the demo's choice of prefill ranks all use these functions.

Query heads split evenly: rank ``r`` of ``T`` holds ``[r*H/T, (r+1)*H/T)``. KV heads split evenly too when
``T`` divides ``K``; when there are fewer KV heads than ranks (``T % K == 0``, e.g. 8 KV heads at TP 16, or
multi-query attention), each rank keeps a copy of the one KV head its query heads use, as serving engines
do: rank ``r`` holds KV head ``r // (T/K)``. Worked example, ``K = 2`` KV heads at ``T = 4``: ranks 0 and 1
hold KV head 0, ranks 2 and 3 KV head 1; a TP 1 decode engine (both heads) reads head 0 from rank 0 and
head 1 from rank 2 (``source_ranks(0, 1, 4, 2) == [0, 2]``), never the same head twice.
"""

from __future__ import annotations

from .errors import KVLayoutError


def _check(rank: int, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise KVLayoutError(f"tensor-parallel size must be a positive integer, got {size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
        raise KVLayoutError(f"tensor-parallel rank must be in [0, {size}), got {rank!r}")


def query_head_range(rank: int, size: int, num_heads: int) -> tuple[int, int]:
    """``(first global head, count)`` of the query heads rank ``rank`` of ``size`` holds."""
    _check(rank, size)
    if num_heads % size:
        raise KVLayoutError(f"{num_heads} attention heads cannot be split over tensor-parallel size {size}")
    per = num_heads // size
    return rank * per, per


def kv_head_range(rank: int, size: int, num_kv_heads: int) -> tuple[int, int]:
    """``(first global KV head, count)`` rank ``rank`` of ``size`` holds (one replicated head when there
    are fewer KV heads than ranks)."""
    _check(rank, size)
    if num_kv_heads % size == 0:
        per = num_kv_heads // size
        return rank * per, per
    if size % num_kv_heads == 0:
        return rank // (size // num_kv_heads), 1
    raise KVLayoutError(f"{num_kv_heads} KV heads cannot be split over tensor-parallel size {size} (it must "
                        f"divide the head count or be a multiple of it)")


def source_ranks(rank: int, size: int, remote_size: int, num_kv_heads: int) -> list[int]:
    """The ranks of a ``remote_size`` engine group that together hold the KV heads of rank ``rank`` of
    ``size``, each head from the first remote rank that holds it (so no head is read twice), in head order."""
    start, count = kv_head_range(rank, size, num_kv_heads)
    ranks: list[int] = []
    for head in range(start, start + count):
        first = next(r for r in range(remote_size)
                     if kv_head_range(r, remote_size, num_kv_heads)[0] <= head
                     < sum(kv_head_range(r, remote_size, num_kv_heads)))
        if first not in ranks:
            ranks.append(first)
    return ranks


def num_readers(rank: int, size: int, reader_size: int, num_kv_heads: int) -> int:
    """How many ranks of a ``reader_size`` group read KV heads from rank ``rank`` of ``size`` (by
    ``source_ranks``); 0 for a rank whose heads are all replicas another rank serves."""
    return sum(rank in source_ranks(r, reader_size, size, num_kv_heads) for r in range(reader_size))
