"""Unified paged attention in Triton: one launch for any mix of prefill, chunked-prefill and decode requests.

K and V are read in place from the packed cache ``(B, H_kv, N, 2*D)`` (K = ``[..., :D]``, V = ``[..., D:]``)
through its strides, so cross-layer views (block stride ``L*H*N*2D``, a storage offset) need nothing special.

Work split: program ``(i, kv_head)`` takes a tile of ``BLOCK_Q`` query tokens of one request and all
``GROUP`` query heads of one KV head, packed as ``BLOCK_Q * GROUP_PAD`` rows (row ``r`` = token
``r // GROUP_PAD``, head ``r % GROUP_PAD``), so every K/V tile loaded serves the whole group. Request ``r``
owns programs from ``(query_start_loc[r] - first token) // BLOCK_Q + r``; the kernel finds its request by
binary search over ``query_start_loc``, so the grid depends on host integers only (tokens and requests) and
the launch needs no host sync (CUDA-graph capturable).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from kvlayout.fp8 import scale_arg
from kvlayout.params import AttentionParams

from . import interpreting
from .softmax import finalize_heads, fold_k_scale, softmax_init, window_tiles
from .tiles import DOT_MIN, attend_paged_span, dot_pad, find_request, key_range, packed_rows, store_rows, wide_rows


@triton.jit
def _unified_attention_kernel(
        q_ptr, kv_ptr, out_ptr, lse_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, sinks_ptr, k_scale_ptr, v_scale_ptr,
        num_reqs, tok_lo, sm_scale, soft_cap, window,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_lh,
        stride_kb, stride_kh, stride_kn, stride_bt, k_scale_stride, v_scale_stride,
        HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
        CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, HAS_SINK: tl.constexpr,
        K_SCALE: tl.constexpr, V_SCALE: tl.constexpr, WRITE_LSE: tl.constexpr, IEEE: tl.constexpr):
    M: tl.constexpr = BLOCK_Q * GROUP_PAD
    D_MASK: tl.constexpr = HEAD_PAD != HEAD
    pid = tl.program_id(0)
    kvh = tl.program_id(1)

    req = find_request(qsl_ptr, tok_lo, num_reqs, pid, BLOCK_Q)
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    qb = pid - ((q_start - tok_lo) // BLOCK_Q + req)
    if qb * BLOCK_Q >= q_len:
        return
    if CAUSAL:                     # heaviest tiles (last queries) of each request first: shorter tail
        qb = tl.cdiv(q_len, BLOCK_Q) - 1 - qb
    seq_len = tl.load(seq_lens_ptr + req)
    ctx = seq_len - q_len

    tok, head, g_ok = packed_rows(qb, kvh, M, BLOCK_Q, GROUP, GROUP_PAD)
    row_ok = (tok < q_len) & g_ok
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD
    t_glob = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + t_glob[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx + tok
    sm_scale = fold_k_scale(sm_scale, k_scale_ptr, kvh, k_scale_stride, K_SCALE)

    # Key ranges: [kv_lo, vis_lo) masked (window's lower edge), [vis_lo, full_end) visible to every row,
    # [full_end, kv_end) masked (causal diagonal, sequence end).
    q_first = ctx + qb * BLOCK_Q
    q_last = ctx + tl.minimum(qb * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_end, full_end = key_range(q_first, q_last, seq_len, BLOCK_N, CAUSAL)
    kv_lo, vis_lo = window_tiles(q_first, q_last, window, BLOCK_N, WINDOW)
    m, l, acc = softmax_init(M, HEAD_PAD)
    m, l, acc = attend_paged_span(m, l, acc, q, q_pos, kv_lo, vis_lo, full_end, kv_end, kv_ptr,
                                  bt_ptr + req.to(tl.int64) * stride_bt, kvh.to(tl.int64) * stride_kh, stride_kb,
                                  stride_kn, d, d_ok, sm_scale, soft_cap, window, HEAD, PAGE, BLOCK_N, CAUSAL,
                                  WINDOW, SOFT_CAP, D_MASK, IEEE, False, False, 1, WINDOW)

    out, lse = finalize_heads(m, l, acc, sinks_ptr, head, row_ok, v_scale_ptr, kvh * v_scale_stride, HAS_SINK,
                              V_SCALE)
    store_rows(out_ptr, lse_ptr, t_glob * stride_ot + head * stride_oh, t_glob * stride_lt + head * stride_lh, d,
               row_ok, d_ok, out, lse, WRITE_LSE, True)


@dataclass(frozen=True)
class UnifiedConfig:
    """Tile shape and launch settings of the unified kernel (rows per program = block_q * group_pad)."""

    block_q: int
    block_n: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=256)
def unified_config(max_query_len: int, group: int, head_size: int, elem_bytes: int, interpret: bool
                   ) -> UnifiedConfig:
    """Launch choice for a shape class. 16-bit prefill: 256 query rows per program for head sizes up to
    128 (measured on an H200, causal 4 x 4096: 403 TFLOP/s against 361 for 128 rows and 315 for 64), 128
    rows for 256; float32 runs its dots on FMAs, so 32 rows. Fewer rows when the longest query is short,
    never fewer than 16 (the tensor-core minimum on a GPU)."""
    group_pad = triton.next_power_of_2(group)
    if interpret:                       # small tiles: more tiles and masks exercised, faster on the CPU
        return UnifiedConfig(max(1, 16 // group_pad), 16, 4, 1)
    big = wide_rows(head_size, elem_bytes)
    target_rows = 32 if elem_bytes >= 4 else (128 if triton.next_power_of_2(head_size) > 128 else 256)
    min_q = max(1, DOT_MIN // group_pad)
    block_q = max(min_q, min(max(1, target_rows // group_pad), triton.next_power_of_2(max(max_query_len, 1))))
    rows = block_q * group_pad
    block_n = 32 if big else 64
    num_warps = 8 if rows >= 256 or (rows >= 128 and big) else 4
    num_stages = 2 if big else 3
    return UnifiedConfig(block_q, block_n, num_warps, num_stages)


def unified_attention(q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, query_start_loc: torch.Tensor,
                      seq_lens: torch.Tensor, block_table: torch.Tensor, params: AttentionParams, *,
                      num_tokens: int, tok_lo: int = 0, max_query_len: int, sinks: Optional[torch.Tensor] = None,
                      k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
                      lse: Optional[torch.Tensor] = None, config: Optional[UnifiedConfig] = None) -> None:
    """Attention for requests ``0 .. len(seq_lens)`` of the given (possibly sliced) metadata, whose tokens
    are ``tok_lo .. tok_lo + num_tokens`` of ``q``; writes ``out`` and, if given, ``lse`` (base e) rows of
    those tokens. Inputs are trusted (the backend validates); host integers only, no sync."""
    num_reqs = seq_lens.shape[0]
    if num_reqs == 0 or num_tokens == 0:
        return
    h_kv, page, d = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3] // 2
    group = params.num_heads // h_kv
    compute_dtype = q.dtype
    cfg = config or unified_config(max_query_len, group, d, compute_dtype.itemsize, interpreting())
    ks, vs = scale_arg(k_scale, kv_cache.dtype, seq_lens), scale_arg(v_scale, kv_cache.dtype, seq_lens)
    lse_t = lse if lse is not None else out
    grid = (num_tokens // cfg.block_q + num_reqs, h_kv)
    _unified_attention_kernel[grid](
        q, kv_cache, out, lse_t, query_start_loc, seq_lens, block_table,
        sinks if sinks is not None else seq_lens, ks.tensor, vs.tensor,
        num_reqs, tok_lo, params.scale, params.logits_soft_cap or 0.0, params.sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        lse_t.stride(0) if lse is not None else 0, lse_t.stride(1) if lse is not None else 0,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0), ks.stride, vs.stride,
        HEAD=d, HEAD_PAD=dot_pad(d), GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, PAGE=page,
        CAUSAL=params.causal, WINDOW=params.sliding_window is not None,
        SOFT_CAP=params.logits_soft_cap is not None, HAS_SINK=sinks is not None,
        K_SCALE=ks.on, V_SCALE=vs.on,
        WRITE_LSE=lse is not None, IEEE=compute_dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
