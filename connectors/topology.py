"""Transfer topology: how this engine's regions pair with the parts of remote engines' regions they receive.

A transfer between two engines is a list of region *pairs* (local, remote) with equal ``block_len``.
Heterogeneous tensor parallelism needs no special case: a head-major block's head slice ``[h0, h1)`` is the
contiguous sub-span at offset ``h0 * head_bytes`` of length ``(h1 - h0) * head_bytes``, itself a region.
Layers without heads (MLA, Mamba) are replicated across ranks and come from one engine, the *primary*
(the first one a load lists); the others serve attention heads only. A Mamba state that tensor
parallelism cut by rows (``MambaSpec.tp_rows``) is sliced like heads: every engine serves the rows of it
that this rank holds, as byte spans of the state inside the page (``state_spans``). Which engines together cover a rank's
heads is checked here too (``tp_group_problem`` / ``head_coverage_problem``).
"""

from __future__ import annotations

import enum
from typing import Mapping, Optional, Sequence

from kvlayout.errors import KVLayoutError

from .handshake import Welcome
from .record import _ITEMSIZE, CompatRecord, states_sliceable
from .regions import Region, RegionPair, adjacent, join

__all__ = ["Role", "pair_regions", "state_spans", "remote_regions", "peer_pairs", "tp_group_problem", "head_coverage_problem"]


class Role(enum.Enum):
    """What one engine of a load serves: the first engine listed is the primary."""

    PRIMARY = "primary"          # this rank's heads it holds, and the replicated layers (MLA, Mamba)
    HEADS_ONLY = "heads only"    # this rank's heads it holds

    @classmethod
    def of(cls, position: int) -> "Role":
        """The role of the engine at ``position`` in a load's list of engines."""
        return cls.PRIMARY if position == 0 else cls.HEADS_ONLY


def _rank_rows(blocks: tuple, rank: int, size: int) -> list[tuple[int, int, int, bool]]:
    """``(global first row, local first row, rows, sharded)`` of each row block one rank holds."""
    out, g, l = [], 0, 0
    for n, sharded in blocks:
        per = n // size if sharded else n
        out.append((g + (rank * per if sharded else 0), l, per, sharded))
        g, l = g + n, l + per
    return out


def state_spans(local_states: tuple, remote_states: tuple, local_tp: tuple[int, int], remote_tp: tuple[int, int],
                primary: bool) -> list[tuple[int, int, int]]:
    """``(local byte offset, remote byte offset, length)`` inside a page: the rows of every state that both
    ranks hold (the replicated row blocks only when ``primary``). Worked example: a conv state of row
    blocks ``((8, True), (4, False))`` of 6 B rows; local TP 2 rank 1 holds global rows 4..7 then 8..11 at
    local rows 0..3, 4..7; a TP 1 remote holds every row at its global index: spans ``(0, 24, 24)`` and,
    if primary, ``(24, 48, 24)`` (plus the state offsets)."""
    spans = []
    for (_, lshape, dt, loff, rows), (_, rshape, _, roff, _) in zip(local_states, remote_states):
        row_bytes = _ITEMSIZE[dt]
        for d in lshape[1:]:
            row_bytes *= d
        for (lg, ll, ln, sharded), (rg, rl, rn, _) in zip(_rank_rows(rows, *local_tp), _rank_rows(rows, *remote_tp)):
            a, b = max(lg, rg), min(lg + ln, rg + rn)
            if a >= b or (not sharded and not primary):
                continue
            spans.append((loff + (ll + a - lg) * row_bytes, roff + (rl + a - rg) * row_bytes, (b - a) * row_bytes))
    return spans


def pair_regions(local: Sequence[Region], remote: Mapping[str, Region], local_head_start: Mapping[str, int],
                 remote_head_start: Mapping[str, int], replicated: bool = True,
                 replicated_len: Optional[Mapping[str, int]] = None,
                 sliced: Optional[Mapping[str, list]] = None) -> list[RegionPair]:
    """Pair every local per-layer region with the part of the remote layer it receives.

    Attention layers pair the overlap of the two sides' global head ranges (``*_head_start`` + slots);
    layers without heads (MLA, Mamba) are replicated across ranks and pair whole blocks, or their first
    ``replicated_len[name]`` bytes (a Mamba state padded differently on each side); ``replicated=False``
    leaves them out (another remote rank serves them). ``sliced[name]``: the byte spans (``state_spans``)
    of a Mamba layer whose states TP cut differently on the two sides. Pairs that tile a block on both sides
    merge.
    """
    pairs: list[RegionPair] = []
    for lr in local:
        name = lr.layers[0]
        rr = remote.get(name)
        if rr is None:
            raise KVLayoutError(f"the remote engine has no layer {name!r}")
        if lr.kind != rr.kind:
            raise KVLayoutError(f"layer {name!r} is {lr.kind} here but {rr.kind} on the remote engine")
        if lr.kind == "attention":
            if lr.head_bytes != rr.head_bytes:
                raise KVLayoutError(f"layer {name!r}: a head slot is {lr.head_bytes} B here, {rr.head_bytes} B remote")
            la, ra = local_head_start[name], remote_head_start[name]
            h0, h1 = max(la, ra), min(la + lr.num_heads, ra + rr.num_heads)
            if h0 >= h1:
                continue
            pairs.append((lr.head_slice(h0 - la, h1 - la), rr.head_slice(h0 - ra, h1 - ra)))
        elif sliced is not None and name in sliced:
            pairs += [(lr.sub(lo, n), rr.sub(ro, n)) for lo, ro, n in sliced[name]]
        elif replicated:
            n = lr.block_len if lr.block_len == rr.block_len else (replicated_len or {}).get(name)
            if n is None or n > min(lr.block_len, rr.block_len):
                raise KVLayoutError(f"layer {name!r}: blocks are {lr.block_len} B here and {rr.block_len} B on the "
                                    f"remote engine; they cannot be copied onto each other")
            pairs.append((lr.sub(0, n), rr.sub(0, n)) if n != lr.block_len or n != rr.block_len else (lr, rr))
    merged: list[RegionPair] = []
    for lp, rp in pairs:
        if merged and adjacent(merged[-1][0], lp) and adjacent(merged[-1][1], rp):
            merged[-1] = (join(merged[-1][0], lp), join(merged[-1][1], rp))
        else:
            merged.append((lp, rp))
    return merged


def remote_regions(welcome: Welcome) -> dict[str, Region]:
    """The peer's announced per-layer regions, by layer name (addresses in the peer's memory)."""
    return {rr.name: Region((rr.name,), lay.kind, 0, rr.base, rr.block_len, rr.block_stride, rr.num_blocks,
                            lay.num_heads, group=lay.group)
            for rr, lay in zip(welcome.regions, welcome.record.layers)}


def peer_pairs(local: Sequence[Region], local_record: CompatRecord, welcome: Welcome, role: Role) -> list[RegionPair]:
    """The pairs one peer serves in ``role``: this rank's heads it holds, plus the replicated layers if primary."""
    remote_record = welcome.record
    lstart = {l.name: l.head_start for l in local_record.layers}
    rstart = {l.name: l.head_start for l in remote_record.layers}
    state_len = {l.name: l.state_bytes for l in local_record.layers if l.state_bytes}
    ltp, rtp = (local_record.tp_rank, local_record.tp_size), (remote_record.tp_rank, remote_record.tp_size)
    sliced = {}
    for lay in local_record.layers:
        other = remote_record.layer(lay.name)
        if lay.kind == "mamba" and lay.states and other.states and ltp != rtp and states_sliceable(lay.states,
                                                                                                    other.states):
            sliced[lay.name] = state_spans(lay.states, other.states, ltp, rtp, role is Role.PRIMARY)
    return pair_regions(local, remote_regions(welcome), lstart, rstart, replicated=role is Role.PRIMARY,
                        replicated_len=state_len, sliced=sliced)


def tp_group_problem(engines: Sequence[str], records: Sequence[CompatRecord]) -> Optional[str]:
    """Why ``engines`` (with these records) are not distinct ranks of one tensor-parallel group, or None."""
    if len({r.tp_size for r in records}) > 1 or len({r.tp_rank for r in records}) != len(records):
        return f"engines {list(engines)} must be distinct ranks of one tensor-parallel group"
    return None


def head_coverage_problem(local: CompatRecord, engines: Sequence[str],
                          records: Sequence[CompatRecord]) -> Optional[str]:
    """Why ``engines`` together do not hold exactly this rank's heads of every attention layer, or None."""
    remote_heads = [{l.name: l for l in r.layers} for r in records]
    for lay in local.layers:
        if lay.kind != "attention":
            continue
        got = sum(max(0, min(lay.head_start + lay.num_heads, rl.head_start + rl.num_heads)
                      - max(lay.head_start, rl.head_start)) for rl in (h[lay.name] for h in remote_heads))
        if got != lay.num_heads:
            return (f"engines {list(engines)} hold {got} of the {lay.num_heads} heads "
                    f"[{lay.head_start}, {lay.head_start + lay.num_heads}) of layer {lay.name!r} on this "
                    f"rank; list every prefill rank that holds them")
    return None
