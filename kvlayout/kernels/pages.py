"""Whole-page kernels over raw page bytes: copy pages (between or within tensors) and zero pages.

Every cache kind is seen the same way, as a byte view ``[X, B, P]``: ``X`` spans that share a block id
(the layers of a layer-major group; 1 for one layer or a cross-layer group), ``B`` blocks, ``P`` contiguous
bytes per span. Attention, MLA and Mamba pages differ only in ``P``. The views may be reinterpreted as
wider integer words (``word_view``) so each thread moves 16 bytes per access.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK_BYTES = 8192       # bytes one program moves per span (a page of 256 KiB is 32 programs wide)


@triton.jit
def _copy_pages_kernel(src_ptr, src_ids_ptr, dst_ptr, dst_ids_ptr, words,
                       stride_sx, stride_sb, stride_dx, stride_db, BLOCK: tl.constexpr):
    pair = tl.program_id(0)
    x = tl.program_id(1).to(tl.int64)
    off = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = off < words
    s = tl.load(src_ids_ptr + pair).to(tl.int64)
    t = tl.load(dst_ids_ptr + pair).to(tl.int64)
    val = tl.load(src_ptr + x * stride_sx + s * stride_sb + off, mask=mask)
    tl.store(dst_ptr + x * stride_dx + t * stride_db + off, val, mask=mask)


@triton.jit
def _zero_pages_kernel(dst_ptr, ids_ptr, words, stride_dx, stride_db, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    x = tl.program_id(1).to(tl.int64)
    off = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    t = tl.load(ids_ptr + i).to(tl.int64)
    zero = tl.zeros([BLOCK], dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + x * stride_dx + t * stride_db + off, zero, mask=off < words)


def word_view(view: torch.Tensor) -> torch.Tensor:
    """The int8 byte view ``[X, B, P]`` reinterpreted as the widest integer words (8, 4 or 2 bytes) that
    divide its span, its strides and its start address (the view itself when none does)."""
    flat = torch.empty(0, dtype=torch.int8, device=view.device).set_(view.untyped_storage())
    x, b, p = view.shape
    for dtype in (torch.int64, torch.int32, torch.int16):
        w = dtype.itemsize
        if all(v % w == 0 for v in (p, view.stride(0), view.stride(1), view.storage_offset(), flat.numel(),
                                    flat.data_ptr())):
            return torch.as_strided(flat.view(dtype), (x, b, p // w), (view.stride(0) // w, view.stride(1) // w, 1),
                                    view.storage_offset() // w)
    return view


def _launch_args(words: int, itemsize: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(words, 1)), CHUNK_BYTES // itemsize)
    return block, triton.cdiv(words, block)


def copy_pages(src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """``dst[:, dst_ids[i]] = src[:, src_ids[i]]`` for word views ``[X, B, P]`` of one dtype and shape ``X, P``.
    All pairs run in parallel: the caller makes sure no pair reads a page another pair writes. Ids are int32/int64
    on the device; trusted."""
    n = src_ids.numel()
    if n == 0:
        return
    x, _, words = src.shape
    block, chunks = _launch_args(words, src.element_size())
    _copy_pages_kernel[(n, x, chunks)](src, src_ids, dst, dst_ids, words, src.stride(0), src.stride(1),
                                       dst.stride(0), dst.stride(1), BLOCK=block, num_warps=4)


def zero_pages(dst: torch.Tensor, ids: torch.Tensor) -> None:
    """Zero ``dst[:, ids]`` for a word view ``[X, B, P]``. Ids are int32/int64 on the device; trusted."""
    n = ids.numel()
    if n == 0:
        return
    x, _, words = dst.shape
    block, chunks = _launch_args(words, dst.element_size())
    _zero_pages_kernel[(n, x, chunks)](dst, ids, words, dst.stride(0), dst.stride(1), BLOCK=block, num_warps=4)
