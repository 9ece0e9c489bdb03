"""Input checks shared by the cache ops, the page ops, the metadata builder and the backends: one home for each."""

from __future__ import annotations

import numpy as np
import torch

from .errors import KVLayoutError
from .specs import dtype_name


def check_block_ids(block_ids, num_blocks: int, device: torch.device, what: str) -> torch.Tensor:
    """Block ids (a sequence of ints, or a 1-D integer array or tensor) as an int64 tensor on ``device``;
    raises if any is outside ``[0, num_blocks)``."""
    if isinstance(block_ids, torch.Tensor):
        if block_ids.device.type == "meta":
            raise KVLayoutError(f"{what}: block ids are on the meta device (no values); pass real ids")
        ids = block_ids.detach().cpu()
    elif block_ids is None or isinstance(block_ids, (str, bytes)) or not hasattr(block_ids, "__len__"):
        raise KVLayoutError(f"{what}: block ids must be a sequence of integers (list, tuple, range, or a 1-D "
                            f"integer array or tensor), got {type(block_ids).__name__}")
    else:
        try:
            ids = torch.as_tensor(np.asarray(block_ids))
        except (TypeError, ValueError, RuntimeError):
            raise KVLayoutError(f"{what}: block ids must be a 1-D sequence of integers, got "
                                f"{type(block_ids).__name__}") from None
    if ids.numel() == 0 and ids.dim() == 1:
        ids = ids.long()                    # an empty list comes out float; no ids is fine
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or ids.dim() != 1:
        raise KVLayoutError(f"{what}: block ids must be a 1-D integer sequence, got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_blocks:
            raise KVLayoutError(f"{what}: block id {lo if lo < 0 else hi} is out of range; "
                                f"the cache has blocks 0..{num_blocks - 1}")
    return ids.to(device=device, dtype=torch.int64)


def check_slot_values(slot_mapping: torch.Tensor, num_tokens: int, num_blocks: int, block_size: int) -> None:
    """The first ``num_tokens`` slots (read on the host) are -1 (skip) or in ``[0, num_blocks * block_size)``,
    and no slot is named twice: one write writes each slot at most once (which of two tokens would win
    is not defined on every device)."""
    if num_tokens == 0:
        return
    slots = slot_mapping[:num_tokens].cpu()
    hi, lo = int(slots.max()), int(slots.min())
    if hi >= num_blocks * block_size or lo < -1:
        raise KVLayoutError(f"slot_mapping has slot {hi if hi >= num_blocks * block_size else lo}; valid slots are "
                            f"-1 (skip) and 0..{num_blocks * block_size - 1} ({num_blocks} blocks of {block_size})")
    uniq, counts = torch.unique(slots[slots >= 0], return_counts=True)
    if bool((counts > 1).any()):
        slot = int(uniq[counts > 1][0])
        raise KVLayoutError(f"slot_mapping names slot {slot} (block {slot // block_size}, offset {slot % block_size}) "
                            f"for more than one token; a write writes each slot at most once (which token would "
                            f"win is not defined on every device), so drop or redirect the extra tokens")


def check_out_buffer(out, shape: tuple, dtype: torch.dtype, device: torch.device, what: str) -> None:
    """An optional output buffer: None, or a ``dtype`` tensor of ``shape`` on ``device`` whose last dim is
    contiguous (the kernels write rows)."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype \
            or out.device != device:
        got = (f"{dtype_name(out.dtype)} {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise KVLayoutError(f"{what} must be a {dtype_name(dtype)} tensor of shape {tuple(shape)} on {device}, "
                            f"got {got}")
    if out.numel() and out.stride(-1) != 1:
        raise KVLayoutError(f"{what}: the last dim must be contiguous (stride 1)")


def check_schedule(cached: np.ndarray, new: np.ndarray, table: np.ndarray, num_blocks: int, block_size: int,
                   shared_block_ids=None) -> np.ndarray:
    """Refuse a step's schedule that would read or write the wrong cache slots; return the blocks each
    request uses (``ceil((cached + new) / block_size)``).

    ``cached[r]``/``new[r]`` are request ``r``'s tokens already in the cache and computed this step (int64,
    ``>= 0``), ``table[r]`` its block ids (int64 ``[R, W]``; only the first ``need[r]`` entries count). The
    rules, checked on the host with no device work:

    - every used block id lies in ``[0, num_blocks)`` and a request lists each block once;
    - a block listed by two requests holds a prefix they share, so it must be declared in
      ``shared_block_ids`` (a scheduler that hands one block to two requests by mistake is caught here);
    - no request writes into a shared block, nor into a block another request reads: new tokens go to
      blocks their request owns alone (fork a shared last page with ``copy_blocks`` first).

    These make the step's slots unique. Example, block size 4: request 0 with 6 cached + 1 new token and
    table ``[3, 7]`` writes slot ``7*4 + 2 = 30``; request 1 with table ``[3, 5]`` and 4 cached tokens
    reads block 3 and writes into block 5. That is valid only with ``shared_block_ids=[3]``; with table
    ``[3, 7]`` request 1 would read block 7, which request 0 writes, and is refused.
    """
    n, width = table.shape
    need = -(-(cached + new) // block_size)
    over = np.nonzero(need > width)[0]
    if over.size:
        r = int(over[0])
        raise KVLayoutError(f"request {r} holds {int(cached[r] + new[r])} tokens, which need {int(need[r])} blocks of "
                            f"{block_size}, but its block table row has {width}; give it more blocks")
    used = np.arange(width) < need[:, None]
    ids = table[used]
    if ids.size and (ids.min() < 0 or ids.max() >= num_blocks):
        r, c = (int(x[0]) for x in np.nonzero(used & ((table < 0) | (table >= num_blocks))))
        raise KVLayoutError(f"request {r}: block id {int(table[r, c])} is out of range; the cache has blocks "
                            f"0..{num_blocks - 1}")
    shared = _shared_ids(shared_block_ids, num_blocks)
    if shared.size:
        written = used & (np.arange(width) >= (cached // block_size)[:, None]) & (new > 0)[:, None]
        written_ids = table[written]                         # blocks receiving new tokens, row by row
        is_shared = np.zeros(num_blocks, dtype=bool)
        is_shared[shared] = True
        hit = np.nonzero(is_shared[written_ids])[0]
        if hit.size:
            r = int(np.repeat(np.arange(n), written.sum(1))[hit[0]])
            raise KVLayoutError(f"request {r} writes new tokens into block {int(written_ids[hit[0]])}, which is "
                                f"shared (shared_block_ids); fork it with copy_blocks and give the request the copy")
    listed = np.bincount(ids, minlength=num_blocks)          # O(ids + blocks): no sort on the usual step
    if ids.size == 0 or listed.max() <= 1:
        return need                                          # every used block appears once: the usual step
    rows = np.repeat(np.arange(n), need)
    again = listed[ids] > 1                                  # only the entries of blocks listed more than once
    sub_rows, sub_ids = rows[again], ids[again]
    keys, count = np.unique(sub_rows * num_blocks + sub_ids, return_counts=True)
    if (count > 1).any():
        k = int(keys[count > 1][0])
        raise KVLayoutError(f"request {k // num_blocks} lists block {k % num_blocks} twice; each position of a "
                            f"sequence needs its own block")
    declared = np.zeros(num_blocks, dtype=bool)
    declared[shared] = True
    undeclared = sub_ids[~declared[sub_ids]]
    if undeclared.size:
        b = int(undeclared[0])
        rs = np.unique(sub_rows[sub_ids == b]).tolist()
        raise KVLayoutError(f"block {b} is listed by requests {rs}; two requests may read one block only when it "
                            f"holds a prefix they share: declare it in shared_block_ids (and write into it from "
                            f"no request), or give each request its own block")
    return need                                              # (a write into a multi-listed block is caught above:
                                                             # such a block is declared shared)


def _shared_ids(shared_block_ids, num_blocks: int) -> np.ndarray:
    if shared_block_ids is None:
        return np.zeros(0, dtype=np.int64)
    if isinstance(shared_block_ids, torch.Tensor):
        shared_block_ids = shared_block_ids.tolist()
    try:
        ids = np.asarray(list(shared_block_ids))
    except TypeError:
        raise KVLayoutError(f"shared_block_ids must be a sequence of block ids, got "
                            f"{type(shared_block_ids).__name__}") from None
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ids.dtype.kind not in "iu" or ids.ndim != 1:
        raise KVLayoutError(f"shared_block_ids must be a 1-D sequence of integers, got {ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= num_blocks:
        bad = int(ids[(ids < 0) | (ids >= num_blocks)][0])
        raise KVLayoutError(f"shared_block_ids: block id {bad} is out of range; the cache has blocks 0..{num_blocks - 1}")
    return ids.astype(np.int64)
