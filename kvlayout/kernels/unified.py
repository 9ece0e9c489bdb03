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

from kvlayout.params import AttentionParams
from kvlayout.specs import is_fp8

from .softmax import LN2, dot, finalize_heads, score_tile, softmax_init, softmax_update


def interpreting() -> bool:
    """True when this module's kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` was
    set when they were defined; setting it later does not change them)."""
    return type(load_kv_tile).__name__ == "InterpretedFunction"


@triton.jit
def load_kv_tile(kv_ptr, bt_row_ptr, start, head_off, stride_kb, stride_kn, d, d_ok, k_end,
                 HEAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                 D_MASK: tl.constexpr):
    """Keys and values of positions ``start .. start + BLOCK_N`` of one sequence and one KV head:
    ``(k_pos [N], k [N, D_PAD], v [N, D_PAD])`` in the cache dtype. The page of position ``p`` is
    ``bt_row_ptr[p // PAGE]``; ``head_off`` is the head's offset inside a page. ``MASK``: positions at or
    past ``k_end`` are not read (and give 0); ``D_MASK``: only ``d_ok`` columns are read."""
    k_pos = start + tl.arange(0, BLOCK_N)
    if MASK:
        k_ok = k_pos < k_end
        blk = tl.load(bt_row_ptr + k_pos // PAGE, mask=k_ok, other=0)
    else:
        blk = tl.load(bt_row_ptr + k_pos // PAGE)
    off = blk.to(tl.int64) * stride_kb + head_off + (k_pos % PAGE) * stride_kn
    ptr = kv_ptr + off[:, None] + d[None, :]
    if MASK:
        if D_MASK:
            mask = k_ok[:, None] & d_ok[None, :]
        else:
            mask = k_ok[:, None]
        k = tl.load(ptr, mask=mask, other=0.0)
        v = tl.load(ptr + HEAD, mask=mask, other=0.0)
    elif D_MASK:
        k = tl.load(ptr, mask=d_ok[None, :], other=0.0)
        v = tl.load(ptr + HEAD, mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(ptr)
        v = tl.load(ptr + HEAD)
    return k_pos, k, v


@triton.jit
def attend_paged_range(m, l, acc, q, q_pos, lo, hi, k_end, kv_ptr, bt_row_ptr, head_off, stride_kb, stride_kn,
                       d, d_ok, sm_scale, soft_cap, window,
                       HEAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, MASK: tl.constexpr, D_MASK: tl.constexpr,
                       IEEE: tl.constexpr):
    """Fold keys ``lo .. hi`` (tiles of ``BLOCK_N`` from ``lo``) of one paged sequence into the softmax
    state of the query rows ``q [M, D_PAD]`` at positions ``q_pos [M]``. With ``MASK`` False every key of
    the range must be visible to every row (no mask is built). fp8 keys/values are widened to q's dtype."""
    for start in range(lo, hi, BLOCK_N):
        k_pos, k, v = load_kv_tile(kv_ptr, bt_row_ptr, start, head_off, stride_kb, stride_kn, d, d_ok, k_end,
                                   HEAD, PAGE, BLOCK_N, MASK, D_MASK)
        s = dot(q, tl.trans(k.to(q.dtype)), None, IEEE)
        s = score_tile(s, q_pos, k_pos, k_end, sm_scale, soft_cap, window, CAUSAL, WINDOW, SOFT_CAP, MASK)
        m, l, acc = softmax_update(m, l, acc, s, v.to(q.dtype), IEEE)
    return m, l, acc


@triton.jit
def load_group_query(q_ptr, tok, kvh, stride_qt, stride_qh, GROUP: tl.constexpr, M: tl.constexpr,
                     HEAD: tl.constexpr, HEAD_PAD: tl.constexpr):
    """The query of token ``tok`` for the ``GROUP`` query heads of KV head ``kvh``, as ``M >= GROUP`` rows
    (padding rows masked to zero). Returns ``(q [M, HEAD_PAD], head, row_ok, d, d_ok)``."""
    rows = tl.arange(0, M)
    row_ok = rows < GROUP
    head = kvh * GROUP + rows
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD
    q = tl.load(q_ptr + tok * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return q, head, row_ok, d, d_ok


@triton.jit
def find_request(starts_ptr, start_lo, num_reqs, pid, BLOCK_Q: tl.constexpr):
    """The request a program works on, when request r owns the programs from
    ``(starts[r] - start_lo) // BLOCK_Q + r`` on (its query tiles, rounded up): a binary search for the
    last r whose first program is ``<= pid``."""
    lo = pid * 0
    hi = lo + num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        go = (tl.load(starts_ptr + mid) - start_lo) // BLOCK_Q + mid <= pid
        lo = tl.where(go, mid + 1, lo)
        hi = tl.where(go, hi, mid)
    return lo - 1


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

    rows = tl.arange(0, M)
    tok = qb * BLOCK_Q + rows // GROUP_PAD
    g = rows % GROUP_PAD
    head = kvh * GROUP + g
    row_ok = (tok < q_len) & (g < GROUP)
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD
    t_glob = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + t_glob[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx + tok
    if K_SCALE:
        sm_scale = sm_scale * tl.load(k_scale_ptr + kvh * k_scale_stride)

    # Key ranges: [0, head_end) masked (window's lower edge), [head_end, mid_end) visible to every row,
    # [mid_end, kv_end) masked (causal diagonal, sequence end).
    q_first = ctx + qb * BLOCK_Q
    q_last = ctx + tl.minimum(qb * BLOCK_Q + BLOCK_Q, q_len) - 1
    if CAUSAL:
        kv_end = q_last + 1
        full_end = (q_first + 1) // BLOCK_N * BLOCK_N
    else:
        kv_end = seq_len
        full_end = seq_len // BLOCK_N * BLOCK_N
    bt_row = bt_ptr + req.to(tl.int64) * stride_bt
    head_off = kvh.to(tl.int64) * stride_kh
    m, l, acc = softmax_init(M, HEAD_PAD)
    if WINDOW:
        kv_lo = tl.maximum(q_first - window + 1, 0) // BLOCK_N * BLOCK_N
        all_lo = tl.maximum(q_last - window + 1, 0)
        head_end = tl.minimum((all_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, kv_end)
        m, l, acc = attend_paged_range(m, l, acc, q, q_pos, kv_lo, head_end, kv_end, kv_ptr, bt_row, head_off,
                                       stride_kb, stride_kn, d, d_ok, sm_scale, soft_cap, window, HEAD, PAGE,
                                       BLOCK_N, CAUSAL, WINDOW, SOFT_CAP, True, D_MASK, IEEE)
    else:
        head_end = kv_end * 0
    mid_end = tl.maximum(head_end, full_end)
    m, l, acc = attend_paged_range(m, l, acc, q, q_pos, head_end, mid_end, kv_end, kv_ptr, bt_row, head_off,
                                   stride_kb, stride_kn, d, d_ok, sm_scale, soft_cap, window, HEAD, PAGE,
                                   BLOCK_N, CAUSAL, WINDOW, SOFT_CAP, False, D_MASK, IEEE)
    m, l, acc = attend_paged_range(m, l, acc, q, q_pos, mid_end, kv_end, kv_end, kv_ptr, bt_row, head_off,
                                   stride_kb, stride_kn, d, d_ok, sm_scale, soft_cap, window, HEAD, PAGE,
                                   BLOCK_N, CAUSAL, WINDOW, SOFT_CAP, True, D_MASK, IEEE)

    out, lse = finalize_heads(m, l, acc, sinks_ptr, head, row_ok, v_scale_ptr, kvh * v_scale_stride, HAS_SINK,
                              V_SCALE)
    tl.store(out_ptr + t_glob[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        tl.store(lse_ptr + t_glob * stride_lt + head * stride_lh, lse * LN2, mask=row_ok)


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
    head_pad = triton.next_power_of_2(head_size)
    big = head_pad * elem_bytes > 256           # D=256 in 16 bits, or float32 with D >= 128
    target_rows = 32 if elem_bytes >= 4 else (128 if head_pad > 128 else 256)
    min_q = max(1, 16 // group_pad)
    block_q = max(min_q, min(max(1, target_rows // group_pad), triton.next_power_of_2(max(max_query_len, 1))))
    rows = block_q * group_pad
    block_n = 32 if big else 64
    num_warps = 8 if rows >= 256 or (rows >= 128 and big) else 4
    num_stages = 2 if big else 3
    return UnifiedConfig(block_q, block_n, num_warps, num_stages)


def _scale_args(scale: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple[torch.Tensor, int]:
    if scale is None:
        return dummy, 0
    return scale, (1 if scale.numel() > 1 else 0)


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
    ks, ks_stride = _scale_args(k_scale, seq_lens)
    vs, vs_stride = _scale_args(v_scale, seq_lens)
    lse_t = lse if lse is not None else out
    grid = (num_tokens // cfg.block_q + num_reqs, h_kv)
    _unified_attention_kernel[grid](
        q, kv_cache, out, lse_t, query_start_loc, seq_lens, block_table,
        sinks if sinks is not None else seq_lens, ks, vs,
        num_reqs, tok_lo, params.scale, params.logits_soft_cap or 0.0, params.sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        lse_t.stride(0) if lse is not None else 0, lse_t.stride(1) if lse is not None else 0,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0), ks_stride, vs_stride,
        HEAD=d, HEAD_PAD=max(16, triton.next_power_of_2(d)), GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, PAGE=page,
        CAUSAL=params.causal, WINDOW=params.sliding_window is not None,
        SOFT_CAP=params.logits_soft_cap is not None, HAS_SINK=sinks is not None,
        K_SCALE=k_scale is not None and is_fp8(kv_cache.dtype), V_SCALE=v_scale is not None and is_fp8(kv_cache.dtype),
        WRITE_LSE=lse is not None, IEEE=compute_dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
