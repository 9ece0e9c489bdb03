"""Prefill kernels behind ``kvlayout.ops``: paged prefill that appends its chunk in the same launch, and
masked attention over a right-padded encoder batch. Both use the shared online-softmax helpers
(``kernels.softmax``) and the tile helpers of ``kernels.tiles``.

Rows: like the unified kernel, a program takes ``BLOCK_Q`` query tokens and all ``GROUP`` query heads of
one KV head, packed as ``BLOCK_Q * GROUP_PAD`` rows (row ``r`` = token ``r // GROUP_PAD``, head ``r %
GROUP_PAD``), so each K/V tile loaded serves the whole group.

Paged prefill with append: request ``b``'s new token ``i`` sits at position ``ctx = cache_seqlens[b]`` plus
``i``. Keys below ``ctx`` are read from the pages; keys of the chunk are read from ``k_new``/``v_new``
themselves, never from the cache, so the program that appends a tile's K/V (program ``(tile, kv_head)``
writes exactly its own tokens of its own head) races with no reader: every program reads only pages of
positions below ``ctx``, which nobody writes (the op's validation refuses a write into a slot another
request reads as prefix).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import interpreting
from .softmax import fold_tile, softmax_finalize, softmax_init
from .tiles import DOT_MIN, attend_paged_range, dot_pad, find_request, key_range, load_tile, packed_rows, store_rows
from .unified import UnifiedConfig, unified_config


@triton.jit
def attend_dense_range(m, l, acc, q, q_pos, lo, hi, k_end, k_ptr, v_ptr, stride_kt, stride_vt, pos0, d, d_ok,
                       sm_scale, soft_cap, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, SOFT_CAP: tl.constexpr,
                       MASK: tl.constexpr, D_MASK: tl.constexpr, IEEE: tl.constexpr):
    """Fold keys of positions ``lo .. hi`` (tiles of ``BLOCK_N`` from ``lo``) into the softmax state, the
    key at position ``p`` being row ``p - pos0`` of the dense ``k_ptr``/``v_ptr`` (one head, rows
    ``stride_kt``/``stride_vt`` apart). With ``MASK`` False every key must be visible to every row."""
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        r = (k_pos - pos0).to(tl.int64)
        k_ok = k_pos < k_end
        k = load_tile(k_ptr + r[:, None] * stride_kt + d[None, :], k_ok, d_ok, MASK, D_MASK, True)
        v = load_tile(v_ptr + r[:, None] * stride_vt + d[None, :], k_ok, d_ok, MASK, D_MASK, True)
        m, l, acc = fold_tile(m, l, acc, q, tl.trans(k), v, q_pos, k_pos, k_end, sm_scale, soft_cap, 0, CAUSAL,
                              False, SOFT_CAP, MASK, IEEE)
    return m, l, acc


@triton.jit
def _paged_prefill_append_kernel(
        q_ptr, k_ptr, v_ptr, kv_ptr, out_ptr, lse_ptr, cu_ptr, ctx_ptr, bt_ptr,
        num_reqs, sm_scale, soft_cap,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lt, stride_lh,
        stride_cb, stride_ch, stride_cn, stride_bt,
        HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, CAUSAL: tl.constexpr,
        SOFT_CAP: tl.constexpr, WRITE_LSE: tl.constexpr, IEEE: tl.constexpr, PAGE_ALIGNED: tl.constexpr):
    M: tl.constexpr = BLOCK_Q * GROUP_PAD
    D_MASK: tl.constexpr = HEAD_PAD != HEAD
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    req = find_request(cu_ptr, 0, num_reqs, pid, BLOCK_Q)
    q_start = tl.load(cu_ptr + req)
    q_len = tl.load(cu_ptr + req + 1) - q_start
    qb = pid - (q_start // BLOCK_Q + req)
    if qb * BLOCK_Q >= q_len:
        return
    ctx = tl.load(ctx_ptr + req)
    bt_row = bt_ptr + req.to(tl.int64) * stride_bt
    head_off = kvh.to(tl.int64) * stride_ch
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD

    # Append this tile's new K/V of this KV head at positions ctx + token.
    at = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    a_ok = at < q_len
    a_row = (q_start + at).to(tl.int64)
    a_pos = ctx + at
    a_blk = tl.load(bt_row + a_pos // PAGE, mask=a_ok, other=0).to(tl.int64)
    dst = kv_ptr + (a_blk * stride_cb + head_off + (a_pos % PAGE) * stride_cn)[:, None] + d[None, :]
    a_mask = a_ok[:, None] & d_ok[None, :]
    k_new = tl.load(k_ptr + a_row[:, None] * stride_kt + kvh * stride_kh + d[None, :], mask=a_mask)
    v_new = tl.load(v_ptr + a_row[:, None] * stride_vt + kvh * stride_vh + d[None, :], mask=a_mask)
    tl.store(dst, k_new, mask=a_mask)
    tl.store(dst + HEAD, v_new, mask=a_mask)

    tok, head, g_ok = packed_rows(qb, kvh, M, BLOCK_Q, GROUP, GROUP_PAD)
    row_ok = (tok < q_len) & g_ok
    t_glob = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + t_glob[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx + tok
    m, l, acc = softmax_init(M, HEAD_PAD)

    # Cached prefix [0, ctx): every key precedes every query, so only the sequence end needs a mask.
    # With PAGE_ALIGNED (BLOCK_N divides the page, no head padding) each tile takes one page id.
    full = ctx // BLOCK_N * BLOCK_N
    m, l, acc = attend_paged_range(m, l, acc, q, q_pos, 0, full, ctx, kv_ptr, bt_row, head_off, stride_cb, stride_cn,
                                   d, d_ok, sm_scale, soft_cap, 0, HEAD, PAGE, BLOCK_N, False, False, SOFT_CAP, False,
                                   D_MASK, IEEE, PAGE_ALIGNED, False, 1)
    m, l, acc = attend_paged_range(m, l, acc, q, q_pos, full, ctx, ctx, kv_ptr, bt_row, head_off, stride_cb, stride_cn,
                                   d, d_ok, sm_scale, soft_cap, 0, HEAD, PAGE, BLOCK_N, False, False, SOFT_CAP, True,
                                   D_MASK, IEEE, False, False, 1)

    # The chunk [ctx, ctx + q_len) from k_new/v_new: unmasked tiles first, then the diagonal / the end.
    k_base = k_ptr + q_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = v_ptr + q_start.to(tl.int64) * stride_vt + kvh * stride_vh
    new_end, new_full = key_range(qb * BLOCK_Q, tl.minimum(qb * BLOCK_Q + BLOCK_Q, q_len) - 1, q_len, BLOCK_N, CAUSAL)
    kv_end = ctx + new_end
    new_full = ctx + new_full
    m, l, acc = attend_dense_range(m, l, acc, q, q_pos, ctx, new_full, kv_end, k_base, v_base, stride_kt, stride_vt,
                                   ctx, d, d_ok, sm_scale, soft_cap, BLOCK_N, CAUSAL, SOFT_CAP, False, D_MASK, IEEE)
    m, l, acc = attend_dense_range(m, l, acc, q, q_pos, new_full, kv_end, kv_end, k_base, v_base, stride_kt,
                                   stride_vt, ctx, d, d_ok, sm_scale, soft_cap, BLOCK_N, CAUSAL, SOFT_CAP, True,
                                   D_MASK, IEEE)

    out, lse = softmax_finalize(m, l, acc, m, False)
    store_rows(out_ptr, lse_ptr, t_glob * stride_ot + head * stride_oh, t_glob * stride_lt + head * stride_lh, d,
               row_ok, d_ok, out, lse, WRITE_LSE, True)


@triton.jit
def _masked_prefill_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, valid_ptr, seq, sm_scale, soft_cap,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_lh,
        HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, SOFT_CAP: tl.constexpr,
        WRITE_LSE: tl.constexpr, IEEE: tl.constexpr):
    M: tl.constexpr = BLOCK_Q * GROUP_PAD
    D_MASK: tl.constexpr = HEAD_PAD != HEAD
    qb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kvh = tl.program_id(2)
    valid = tl.load(valid_ptr + b)
    tok, head, g_ok = packed_rows(qb, kvh, M, BLOCK_Q, GROUP, GROUP_PAD)
    row_ok = (tok < seq) & g_ok
    live = row_ok & (tok < valid)
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD
    m, l, acc = softmax_init(M, HEAD_PAD)
    if qb * BLOCK_Q < valid:            # a tile of only padded rows skips straight to writing zeros
        q = tl.load(q_ptr + b * stride_qb + tok[:, None].to(tl.int64) * stride_qs + head[:, None] * stride_qh
                    + d[None, :], mask=live[:, None] & d_ok[None, :], other=0.0)
        kv_end, full = key_range(qb * BLOCK_Q, tl.minimum(qb * BLOCK_Q + BLOCK_Q, valid) - 1, valid, BLOCK_N, CAUSAL)
        k_base = k_ptr + b * stride_kb + kvh * stride_kh
        v_base = v_ptr + b * stride_vb + kvh * stride_vh
        m, l, acc = attend_dense_range(m, l, acc, q, tok, 0, full, kv_end, k_base, v_base, stride_ks, stride_vs, 0,
                                       d, d_ok, sm_scale, soft_cap, BLOCK_N, CAUSAL, SOFT_CAP, False, D_MASK, IEEE)
        m, l, acc = attend_dense_range(m, l, acc, q, tok, full, kv_end, kv_end, k_base, v_base, stride_ks, stride_vs,
                                       0, d, d_ok, sm_scale, soft_cap, BLOCK_N, CAUSAL, SOFT_CAP, True, D_MASK, IEEE)
    out, lse = softmax_finalize(m, l, acc, m, False)
    out = tl.where(live[:, None], out, 0.0)
    lse = tl.where(live, lse, float("-inf"))
    store_rows(out_ptr, lse_ptr, b * stride_ob + tok.to(tl.int64) * stride_os + head * stride_oh,
               b * stride_lb + tok * stride_ls + head * stride_lh, d, row_ok, d_ok, out, lse, WRITE_LSE, True)


def _config(max_q: int, group: int, d: int, dtype: torch.dtype, config: Optional[UnifiedConfig]) -> UnifiedConfig:
    return config or unified_config(max_q, group, d, dtype.itemsize, interpreting())


@functools.lru_cache(maxsize=256)
def append_config(max_q: int, group: int, d: int, elem_bytes: int, interpret: bool) -> UnifiedConfig:
    """Launch choice of the paged-prefill-with-append kernel: 64 rows and 4 warps per program on a GPU.
    Measured on an H200 (bf16, q [512, 32, 128] on a 4096-token prefix at page 64, tools/bench_ops.py
    --sweep): 64 rows / 4 warps / 64 keys / 3 stages with one page id per tile took 115 us, against 130 us
    for the unified kernel's choice (128 rows / 8 warps) and 124 us for its best 128-row variant."""
    base = unified_config(max_q, group, d, elem_bytes, interpret)
    if interpret:
        return base
    group_pad = triton.next_power_of_2(group)
    min_q = max(1, DOT_MIN // group_pad)             # at least 16 rows: the tensor-core minimum
    block_q = max(min_q, min(64 // group_pad, triton.next_power_of_2(max(max_q, 1))))
    return UnifiedConfig(block_q, base.block_n, 4, base.num_stages)


def paged_prefill_append_launch(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, kv_cache: torch.Tensor,
                                cu_seqlens_q: torch.Tensor, cache_seqlens: torch.Tensor, block_table: torch.Tensor,
                                out: torch.Tensor, lse: Optional[torch.Tensor], *, scale: float, causal: bool,
                                soft_cap: Optional[float], config: Optional[UnifiedConfig] = None,
                                page_aligned: Optional[bool] = None) -> None:
    """One launch: append ``k_new``/``v_new`` into the pages and write ``out`` (and ``lse``, base e).
    Inputs are trusted (``kvlayout.ops`` validates); the grid depends on host sizes only (no sync).
    ``page_aligned``: read the cached prefix one page id per key tile (default: when the tile divides the
    page and the head size needs no padding; False forces the per-key lookup)."""
    t, h, d = q.shape
    b = cache_seqlens.shape[0]
    if t == 0 or b == 0:
        return
    h_kv, page = kv_cache.shape[1], kv_cache.shape[2]
    group = h // h_kv
    cfg = config or append_config(t, group, d, q.dtype.itemsize, interpreting())
    head_pad = dot_pad(d)
    can_align = page % cfg.block_n == 0 and head_pad == d
    lse_t = lse if lse is not None else out
    _paged_prefill_append_kernel[(t // cfg.block_q + b, h_kv)](
        q, k_new, v_new, kv_cache, out, lse_t, cu_seqlens_q, cache_seqlens, block_table,
        b, scale, soft_cap or 0.0,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        out.stride(0), out.stride(1), lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0),
        HEAD=d, HEAD_PAD=head_pad, GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, PAGE=page, CAUSAL=causal, SOFT_CAP=soft_cap is not None,
        WRITE_LSE=lse is not None, IEEE=q.dtype == torch.float32,
        PAGE_ALIGNED=can_align if page_aligned is None else (page_aligned and can_align),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def masked_prefill_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_lens: torch.Tensor,
                          out: torch.Tensor, lse: Optional[torch.Tensor], *, scale: float, causal: bool,
                          soft_cap: Optional[float], config: Optional[UnifiedConfig] = None) -> None:
    """Masked attention over the right-padded batch ``q [B, S, H, D]``; writes every row of ``out`` (padded
    rows 0) and of ``lse [B, S, H]`` (base e, padded rows -inf). Inputs are trusted; no host sync."""
    bsz, s, h, d = q.shape
    if bsz == 0 or s == 0:
        return
    h_kv = k.shape[2]
    group = h // h_kv
    cfg = _config(s, group, d, q.dtype, config)
    lse_t = lse if lse is not None else out
    ls = (lse.stride(0), lse.stride(1), lse.stride(2)) if lse is not None else (0, 0, 0)
    _masked_prefill_kernel[(triton.cdiv(s, cfg.block_q), bsz, h_kv)](
        q, k, v, out, lse_t, valid_lens, s, scale, soft_cap or 0.0,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), out.stride(0), out.stride(1), out.stride(2), *ls,
        HEAD=d, HEAD_PAD=dot_pad(d), GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, CAUSAL=causal, SOFT_CAP=soft_cap is not None,
        WRITE_LSE=lse is not None, IEEE=q.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
