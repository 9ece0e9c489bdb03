"""Input checks shared by the cache ops, the page ops and the backends: one home for each."""

from __future__ import annotations

import torch

from .errors import KVLayoutError


def check_block_ids(block_ids, num_blocks: int, device: torch.device, what: str) -> torch.Tensor:
    """Block ids as an int64 tensor on ``device``; raises if any is outside ``[0, num_blocks)``."""
    ids = torch.as_tensor(block_ids)
    if ids.numel() == 0 and ids.dim() == 1:
        ids = ids.long()                    # an empty list comes out float32; no ids is fine
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 1:
        raise KVLayoutError(f"{what}: block ids must be a 1-D integer sequence, got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_blocks:
            raise KVLayoutError(f"{what}: block id {lo if lo < 0 else hi} is out of range; "
                                f"the cache has blocks 0..{num_blocks - 1}")
    return ids.to(device=device, dtype=torch.int64)
