"""Position-weighted checksums of byte spans (units) of a raw cache buffer, one program per unit.

The digest of a unit of ``W`` 32-bit words ``w[0..W)`` (read as unsigned) is
``sum((w[i] + 1) * (2*i + 1)) mod 2**64``, as a signed int64. Any change of a single word changes it (the
weight is odd, hence invertible mod 2**64), and so does moving a word within the unit. Worked example: the
two words ``[0, 1]`` give ``(0+1)*1 + (1+1)*3 = 7``; ``[1, 0]`` give ``2*1 + 1*3 = 5``.
``connectors.digests`` owns the definition and the PyTorch twin; this is the GPU (and interpreter) path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_WORDS = 1024


@triton.jit
def _digest_kernel(words_ptr, offsets_ptr, out_ptr, unit_words, BLOCK: tl.constexpr):
    u = tl.program_id(0)
    start = tl.load(offsets_ptr + u).to(tl.int64)
    acc = tl.zeros([BLOCK], tl.int64)
    for c in range(0, tl.cdiv(unit_words, BLOCK)):
        i = c * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = i < unit_words
        w = tl.load(words_ptr + start + i, mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
        acc += tl.where(mask, (w + 1) * (2 * i + 1), 0)
    tl.store(out_ptr + u, tl.sum(acc, axis=0))


def unit_digests_triton(words: torch.Tensor, offsets: torch.Tensor, unit_words: int) -> torch.Tensor:
    """Digests (int64, one per unit) of ``words[offsets[u] : offsets[u] + unit_words]`` for an int32 word view
    of a buffer and int64 word offsets on its device; trusted (``connectors.digests`` checks)."""
    out = torch.empty(offsets.numel(), dtype=torch.int64, device=words.device)
    if offsets.numel():
        block = min(BLOCK_WORDS, triton.next_power_of_2(max(unit_words, 16)))
        _digest_kernel[(offsets.numel(),)](words, offsets, out, unit_words, BLOCK=block, num_warps=4)
    return out
