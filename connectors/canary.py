"""The geometry canary: a layout or address mismatch between two engines fails their handshake, not a request.

An engine that serves a canary keeps one block id out of use (``canary_block``) and fills that block of every
layer with a pattern of its own memory addresses: the 32-bit word at address ``A`` is
``((A >> 2) * 2654435761 + seed) mod 2**32``, ``seed`` drawn per engine and sent in the welcome. A peer that
handshakes reads that block of every region it will ever transfer (the same region pairs its loads and pushes
use) through NIXL into a scratch block of its own, and checks every word against the pattern of the address
it meant to read. Announced bases, strides, block lengths or head slices that do not match the memory fail
the check. Worked example: seed 7, address 0x1000 -> (0x400 * 2654435761 + 7) mod 2**32 = 0xDDE6_C407.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from kvlayout.allocation import KVCache
from kvlayout.errors import KVLayoutError

from .regions import Region, RegionPair

__all__ = ["pattern", "write_canary", "scratch_regions", "transfer_rows", "check_canary"]

_MULT = 2654435761


def pattern(addresses: np.ndarray, seed: int) -> np.ndarray:
    """The canary words (uint32) for byte ``addresses`` (multiples of 4)."""
    a = np.asarray(addresses, dtype=np.uint64)
    return (((a >> np.uint64(2)) * np.uint64(_MULT) + np.uint64(seed)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _words(region: Region, block: int) -> np.ndarray:
    start = region.base + block * region.block_stride
    return start + 4 * np.arange(region.block_len // 4, dtype=np.uint64)


def write_canary(caches: KVCache, regions: Sequence[Region], block: int, seed: int) -> None:
    """Fill ``block`` of every region with the pattern of its addresses (every region checked first)."""
    for r in regions:
        if r.base % 4 or r.block_len % 4 or r.block_stride % 4:
            raise KVLayoutError(f"layer {r.layers[0]!r}: the canary needs 4-byte aligned blocks; pass canary_block=None")
    for r in regions:
        buf = caches.buffers[r.buffer]
        off = (r.base + block * r.block_stride - buf.data_ptr()) // 4
        words = torch.from_numpy(pattern(_words(r, block), seed).view(np.int32))
        buf.view(torch.int32)[off:off + r.block_len // 4].copy_(words)


def scratch_regions(regions: Sequence[Region], scratch: torch.Tensor) -> list[Region]:
    """One-block regions laid out back to back in ``scratch`` (an int8 tensor of ``sum(block_len)`` bytes),
    shaped like ``regions`` (same block length and head slots), for receiving a peer's canary."""
    out, off = [], scratch.data_ptr()
    for r in regions:
        out.append(Region(r.layers, r.kind, -1, off, r.block_len, r.block_len, 1, r.num_heads, r.head_bytes))
        off += r.block_len
    return out


def transfer_rows(pairs: Sequence[RegionPair], block: int, local_device: int, remote_device: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """NIXL descriptor rows ``(addr, len, device)``: each pair's scratch span and the remote canary span."""
    local = np.array([[lp.base, lp.block_len, local_device] for lp, _ in pairs], dtype=np.uint64)
    remote = np.array([[rp.base + block * rp.block_stride, rp.block_len, remote_device] for _, rp in pairs],
                      dtype=np.uint64)
    return local, remote


def check_canary(scratch: torch.Tensor, pairs: Sequence[RegionPair], block: int, seed: int) -> Optional[str]:
    """Why the canary read into ``scratch`` (through ``pairs``) is not the pattern of the remote addresses."""
    data = scratch.cpu().numpy().view(np.uint32)
    base = scratch.data_ptr()
    for lp, rp in pairs:
        if lp.block_len % 4:
            continue
        got = data[(lp.base - base) // 4:(lp.base - base + lp.block_len) // 4]
        want = pattern(rp.base + block * rp.block_stride + 4 * np.arange(lp.block_len // 4, dtype=np.uint64), seed)
        bad = np.flatnonzero(got != want)
        if bad.size:
            return (f"geometry canary mismatch in layer(s) {list(rp.layers)[:4]}: {bad.size} of {got.size} words "
                    f"read from the announced addresses are not the engine's pattern (first at byte {4 * int(bad[0])} "
                    f"of the span); the two engines disagree on where the blocks are, so no request may use it")
    return None
