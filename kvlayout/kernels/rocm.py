"""Triton kernels of the ``rocm`` backend, in the shape AMD GPUs favour (64-wide wavefronts).

- ``paged_decode``: a 2-D paged decode kernel, one program per (sequence, KV head) serving all query heads
  of that KV head. Long contexts with too few such programs to fill the device are cut into partitions of
  a fixed number of tokens (the sequence axis of the grid becomes sequence x partition); the partial
  states are merged by their LSE with the project's merge kernel (``triton_merge``).
- ``prefix_prefill``: one program per (tile of ``BLOCK_M`` query tokens of one request, query head). It
  first sweeps the keys every row of the tile sees (the cached prefix and earlier new tokens) without a
  mask, then the keys on the causal diagonal (and the window's lower edge) with one. The tiles are listed
  once per step on the host (``prefill_tiles``), so no program idles.

Tiles are 64x64 (32 keys for head size 256) with 4 warps, i.e. four 64-wide wavefronts on AMD; key tiles
are aligned to ``BLOCK_N`` so that one block-table lookup serves a whole tile when a page holds it. K and V
rows are read in place from the packed cache through its strides; when the 2*D row stride, the head stride
and the block stride are all multiples of 16 bytes the row offsets are declared multiples of a 16-byte
vector, so loads along D are 16 bytes wide. The online softmax is ``triton_softmax``'s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from kvlayout.params import AttentionParams
from kvlayout.specs import is_fp8

from .unified import load_group_query
from .merge import merge_states_launch
from .softmax import LN2, dot, finalize_heads, score_tile, softmax_init, softmax_update

VECTOR_BYTES = 16
MAX_PARTITIONS = 64


@triton.jit
def _tile_rows(bt_row, start, k_pos, k_end, stride_kb, stride_kn, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK: tl.constexpr):
    """Element offsets (int64) of the cache rows of keys ``k_pos = start + arange(BLOCK_N)`` of one
    sequence, ``start`` a multiple of ``BLOCK_N``. A page of at least ``BLOCK_N`` tokens holds the whole
    tile: one block-table lookup."""
    if PAGE >= BLOCK_N:
        blk = tl.load(bt_row + start // PAGE).to(tl.int64)
        return blk * stride_kb + (start % PAGE + k_pos - start) * stride_kn
    else:
        if MASK:
            blk = tl.load(bt_row + k_pos // PAGE, mask=k_pos < k_end, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row + k_pos // PAGE).to(tl.int64)
        return blk * stride_kb + (k_pos % PAGE) * stride_kn


@triton.jit
def _fold_tiles(m, l, acc, q, q_pos, lo, hi, k_end, kv_ptr, bt_row, stride_kb, stride_kn, sm_scale, soft_cap,
                window, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                VEC: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr,
                MASK: tl.constexpr, IEEE: tl.constexpr):
    """Fold the key tiles starting at ``lo, lo + BLOCK_N, .. < hi`` into the softmax state of the rows
    ``q [M, HEAD_PAD]`` at positions ``q_pos [M]``. ``kv_ptr`` points at the KV head's slice of block 0.
    K is loaded transposed (``[HEAD_PAD, BLOCK_N]``) so the score tile is one ``q @ k_t``. With ``MASK``
    False every key of every tile must exist and be visible to every row."""
    d = tl.arange(0, HEAD_PAD)
    j = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + j
        rows = tl.multiple_of(_tile_rows(bt_row, start, k_pos, k_end, stride_kb, stride_kn, PAGE, BLOCK_N, MASK),
                              VEC)
        k_ptrs = kv_ptr + rows[None, :] + d[:, None]
        v_ptrs = kv_ptr + HEAD + rows[:, None] + d[None, :]
        if MASK:
            k_ok = k_pos < k_end
            if HEAD_PAD != HEAD:
                k_t = tl.load(k_ptrs, mask=k_ok[None, :] & (d < HEAD)[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=k_ok[:, None] & (d < HEAD)[None, :], other=0.0)
            else:
                k_t = tl.load(k_ptrs, mask=k_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0)
        elif HEAD_PAD != HEAD:
            k_t = tl.load(k_ptrs, mask=(d < HEAD)[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=(d < HEAD)[None, :], other=0.0)
        else:
            k_t = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = dot(q, k_t.to(q.dtype), None, IEEE)
        s = score_tile(s, q_pos, k_pos, k_end, sm_scale, soft_cap, window, CAUSAL, WINDOW, SOFT_CAP, MASK)
        m, l, acc = softmax_update(m, l, acc, s, v.to(q.dtype), IEEE)
    return m, l, acc


@triton.jit
def _fold_range(m, l, acc, q, q_pos, lo, vis_lo, vis_hi, hi, kv_ptr, bt_row, stride_kb, stride_kn, sm_scale,
                soft_cap, window, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, PAGE: tl.constexpr,
                BLOCK_N: tl.constexpr, VEC: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                SOFT_CAP: tl.constexpr, IEEE: tl.constexpr):
    """Fold keys ``[lo, hi)`` where every row sees every key of ``[vis_lo, vis_hi)`` (``vis_hi <= hi``; lo,
    vis_lo and vis_hi multiples of ``BLOCK_N``): masked tiles before and after that span, unmasked ones in
    it. Keys at or past ``hi`` do not count."""
    m, l, acc = _fold_tiles(m, l, acc, q, q_pos, lo, tl.minimum(vis_lo, hi), hi, kv_ptr, bt_row, stride_kb,
                            stride_kn, sm_scale, soft_cap, window, HEAD, HEAD_PAD, PAGE, BLOCK_N, VEC, CAUSAL,
                            WINDOW, SOFT_CAP, True, IEEE)
    m, l, acc = _fold_tiles(m, l, acc, q, q_pos, vis_lo, vis_hi, hi, kv_ptr, bt_row, stride_kb, stride_kn,
                            sm_scale, soft_cap, window, HEAD, HEAD_PAD, PAGE, BLOCK_N, VEC, CAUSAL, WINDOW,
                            SOFT_CAP, False, IEEE)
    m, l, acc = _fold_tiles(m, l, acc, q, q_pos, tl.maximum(vis_lo, vis_hi), hi, hi, kv_ptr, bt_row, stride_kb,
                            stride_kn, sm_scale, soft_cap, window, HEAD, HEAD_PAD, PAGE, BLOCK_N, VEC, CAUSAL,
                            WINDOW, SOFT_CAP, True, IEEE)
    return m, l, acc


@triton.jit
def _paged_decode_kernel(
        q_ptr, kv_ptr, out_ptr, lse_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, sinks_ptr, k_scale_ptr, v_scale_ptr,
        num_parts, part_size, sm_scale, soft_cap, window,
        stride_qt, stride_qh, stride_o0, stride_o1, stride_oh, stride_l0, stride_l1, stride_lh,
        stride_kb, stride_kh, stride_kn, stride_bt, k_scale_stride, v_scale_stride,
        HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, VEC: tl.constexpr, WINDOW: tl.constexpr,
        SOFT_CAP: tl.constexpr, HAS_SINK: tl.constexpr, K_SCALE: tl.constexpr, V_SCALE: tl.constexpr,
        PARTIAL: tl.constexpr, WRITE_LSE: tl.constexpr, IEEE: tl.constexpr):
    # Program (sequence * num_parts + partition, kv head). Direct (num_parts 1): final rows of out/lse,
    # row = the sequence's token. PARTIAL: row = sequence, axis 1 = partition, LSE kept in log2 units.
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = pid // num_parts
    part = pid % num_parts
    tok = tl.load(qsl_ptr + seq).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    q_pos = seq_len - 1
    if PARTIAL:
        p_lo = part * part_size
        p_hi = tl.minimum(p_lo + part_size, seq_len)
    else:
        p_lo = q_pos * 0
        p_hi = seq_len
    w_lo = q_pos * 0
    if WINDOW:
        w_lo = tl.maximum(q_pos - window + 1, 0)
    lo = tl.maximum(p_lo, w_lo // BLOCK_N * BLOCK_N)
    vis_lo = tl.maximum(p_lo, tl.cdiv(w_lo, BLOCK_N) * BLOCK_N)
    vis_hi = p_lo + tl.maximum(p_hi - p_lo, 0) // BLOCK_N * BLOCK_N

    q, head, row_ok, d, d_ok = load_group_query(q_ptr, tok, kvh, stride_qt, stride_qh, GROUP, M, HEAD, HEAD_PAD)
    if K_SCALE:
        sm_scale = sm_scale * tl.load(k_scale_ptr + kvh * k_scale_stride)
    m, l, acc = softmax_init(M, HEAD_PAD)
    m, l, acc = _fold_range(m, l, acc, q, tl.zeros([M], tl.int32) + q_pos, lo, vis_lo, vis_hi, p_hi,
                            kv_ptr + kvh.to(tl.int64) * stride_kh, bt_ptr + seq.to(tl.int64) * stride_bt,
                            stride_kb, stride_kn, sm_scale, soft_cap, window, HEAD, HEAD_PAD, PAGE, BLOCK_N, VEC,
                            False, WINDOW, SOFT_CAP, IEEE)
    out, lse = finalize_heads(m, l, acc, sinks_ptr, head, row_ok, v_scale_ptr, kvh * v_scale_stride, HAS_SINK,
                              V_SCALE)
    if PARTIAL:
        row = seq.to(tl.int64)
    else:
        row = tok
        lse = lse * LN2
    o_off = row * stride_o0 + part * stride_o1 + head * stride_oh
    tl.store(out_ptr + o_off[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        tl.store(lse_ptr + row * stride_l0 + part * stride_l1 + head * stride_lh, lse, mask=row_ok)


@triton.jit
def _prefix_prefill_kernel(
        q_ptr, kv_ptr, out_ptr, lse_ptr, tiles_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, sinks_ptr,
        k_scale_ptr, v_scale_ptr, sm_scale, soft_cap, window,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_lh,
        stride_kb, stride_kh, stride_kn, stride_bt, k_scale_stride, v_scale_stride,
        HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, VEC: tl.constexpr, CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, HAS_SINK: tl.constexpr, K_SCALE: tl.constexpr,
        V_SCALE: tl.constexpr, WRITE_LSE: tl.constexpr, IEEE: tl.constexpr):
    # Program (tile, query head); tile = (request, first query token of the tile within the request).
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    req = tl.load(tiles_ptr + 2 * tile)
    qb = tl.load(tiles_ptr + 2 * tile + 1)
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    ctx = seq_len - q_len
    tok = qb + tl.arange(0, BLOCK_M)
    row_ok = tok < q_len
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD
    t_glob = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + t_glob[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx + tok
    q_first = ctx + qb
    q_last = ctx + tl.minimum(qb + BLOCK_M, q_len) - 1
    if K_SCALE:
        sm_scale = sm_scale * tl.load(k_scale_ptr + kvh * k_scale_stride)
    # Keys every row sees: up to the first row's position (causal) or all (non-causal), from the last
    # row's window edge on; before it the window's lower edge is masked, after it the diagonal.
    if CAUSAL:
        hi = q_last + 1
        vis_hi = (q_first + 1) // BLOCK_N * BLOCK_N
    else:
        hi = seq_len
        vis_hi = seq_len // BLOCK_N * BLOCK_N
    lo = q_first * 0
    vis_lo = lo
    if WINDOW:
        lo = tl.maximum(q_first - window + 1, 0) // BLOCK_N * BLOCK_N
        vis_lo = tl.cdiv(tl.maximum(q_last - window + 1, 0), BLOCK_N) * BLOCK_N
    m, l, acc = softmax_init(BLOCK_M, HEAD_PAD)
    m, l, acc = _fold_range(m, l, acc, q, q_pos, lo, vis_lo, vis_hi, hi, kv_ptr + kvh.to(tl.int64) * stride_kh,
                            bt_ptr + req.to(tl.int64) * stride_bt, stride_kb, stride_kn, sm_scale, soft_cap,
                            window, HEAD, HEAD_PAD, PAGE, BLOCK_N, VEC, CAUSAL, WINDOW, SOFT_CAP, IEEE)
    out, lse = finalize_heads(m, l, acc, sinks_ptr, h + tok * 0, row_ok, v_scale_ptr, kvh * v_scale_stride,
                              HAS_SINK, V_SCALE)
    tl.store(out_ptr + t_glob[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        tl.store(lse_ptr + t_glob * stride_lt + h * stride_lh, lse * LN2, mask=row_ok)


@dataclass(frozen=True)
class RocmConfig:
    """Tile shapes and launch settings (``num_warps`` 4 = four 64-wide wavefronts on AMD)."""

    block_m: int            # query tokens per prefill program
    block_n: int            # keys per tile
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=64)
def rocm_config(head_size: int, elem_bytes: int, interpret: bool) -> RocmConfig:
    if interpret:                       # small tiles: more tiles and masks exercised, quick on the CPU
        return RocmConfig(16, 16, 4, 1)
    big = triton.next_power_of_2(head_size) * elem_bytes > 256      # D=256 in 16 bits, or fp32 D >= 128
    return RocmConfig(64, 32 if big else 64, 4, 2)


def vector_width(kv_cache: torch.Tensor) -> int:
    """Elements per 16-byte load along D, or 1 when the row, head or block stride is not a multiple of
    16 bytes (then the loads must stay narrow)."""
    elem = kv_cache.element_size()
    if any(s * elem % VECTOR_BYTES for s in kv_cache.stride()[:3]):
        return 1
    return VECTOR_BYTES // elem


@functools.lru_cache(maxsize=1024)
def decode_partition_size(num_seqs: int, num_kv_heads: int, max_seq_len: int, block_n: int, num_cus: int) -> int:
    """Keys per decode partition (a multiple of ``block_n``), or 0 for one program per (sequence, KV
    head). Partitions are used when those programs are fewer than two per compute unit and the longest
    context spans at least four tiles; then about two programs per compute unit, at most
    ``MAX_PARTITIONS`` per sequence and at least two tiles per partition."""
    programs = max(1, num_seqs * num_kv_heads)
    if programs >= 2 * num_cus or max_seq_len <= 4 * block_n:
        return 0
    parts = min(-(-2 * num_cus // programs), -(-max_seq_len // (2 * block_n)), MAX_PARTITIONS)
    if parts <= 1:
        return 0
    return -(-max_seq_len // (parts * block_n)) * block_n


def prefill_tiles(query_start_loc_cpu: torch.Tensor, first_req: int, block_m: int) -> np.ndarray:
    """``[n, 2]`` int32 rows ``(request, first token within the request)``: the query tiles of requests
    ``first_req ..`` (host data, built once per step)."""
    qsl = query_start_loc_cpu.numpy().astype(np.int64)
    lens = qsl[first_req + 1:] - qsl[first_req:-1]
    counts = -(-lens // block_m)
    total = int(counts.sum())
    req = np.repeat(np.arange(first_req, first_req + lens.shape[0]), counts)
    first_tile = np.repeat(np.cumsum(counts) - counts, counts)
    qb = (np.arange(total) - first_tile) * block_m
    return np.stack([req, qb], axis=1).astype(np.int32)


def _scale(scale: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple[torch.Tensor, int]:
    return (dummy, 0) if scale is None else (scale, 1 if scale.numel() > 1 else 0)


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, lse: Optional[torch.Tensor],
                 query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                 params: AttentionParams, cfg: RocmConfig, *, max_seq_len: int, partition_size: int = 0,
                 sinks: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None,
                 v_scale: Optional[torch.Tensor] = None) -> None:
    """Decode attention for requests ``0 .. len(seq_lens)`` with one query token each (token
    ``query_start_loc[r]``); writes those rows of ``out`` and ``lse`` (base e, if given).
    ``partition_size`` > 0 (a multiple of ``cfg.block_n``) cuts the contexts into partitions of that many
    keys, ``ceil(max_seq_len / partition_size)`` per sequence (``max_seq_len``: a host bound on every
    sequence's length), merged by LSE. Inputs are trusted; no host sync."""
    n = seq_lens.shape[0]
    if n == 0:
        return
    h_kv, page, d = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3] // 2
    h = params.num_heads
    partial = partition_size > 0
    num_parts = -(-max_seq_len // partition_size) if partial else 1
    if partial:
        o_dst = torch.empty(n, num_parts, h, d, dtype=torch.float32, device=q.device)
        l_dst = torch.empty(n, num_parts, h, dtype=torch.float32, device=q.device)
        o_strides, l_strides = o_dst.stride()[:3], l_dst.stride()
    else:
        o_dst, l_dst = out, (lse if lse is not None else out)
        o_strides = (out.stride(0), 0, out.stride(1))
        l_strides = (lse.stride(0), 0, lse.stride(1)) if lse is not None else (0, 0, 0)
    ks, ks_stride = _scale(k_scale, seq_lens)
    vs, vs_stride = _scale(v_scale, seq_lens)
    fp8 = is_fp8(kv_cache.dtype)
    _paged_decode_kernel[(n * num_parts, h_kv)](
        q, kv_cache, o_dst, l_dst, query_start_loc, seq_lens, block_table,
        sinks if sinks is not None else seq_lens, ks, vs,
        num_parts, partition_size, params.scale, params.logits_soft_cap or 0.0, params.sliding_window or 0,
        q.stride(0), q.stride(1), *o_strides, *l_strides,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0), ks_stride, vs_stride,
        HEAD=d, HEAD_PAD=max(16, triton.next_power_of_2(d)), GROUP=h // h_kv,
        M=max(16, triton.next_power_of_2(h // h_kv)), BLOCK_N=cfg.block_n, PAGE=page, VEC=vector_width(kv_cache),
        WINDOW=params.sliding_window is not None, SOFT_CAP=params.logits_soft_cap is not None,
        HAS_SINK=sinks is not None and not partial, K_SCALE=k_scale is not None and fp8,
        V_SCALE=v_scale is not None and fp8, PARTIAL=partial, WRITE_LSE=partial or lse is not None,
        IEEE=q.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if partial:
        merge_states_launch(o_dst, l_dst, out, lse, in_base="2", out_base="e", rows=query_start_loc,
                            sinks=sinks, num_states=num_parts)


def prefix_prefill(q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, lse: Optional[torch.Tensor],
                   tiles: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                   block_table: torch.Tensor, params: AttentionParams, cfg: RocmConfig, *,
                   sinks: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None,
                   v_scale: Optional[torch.Tensor] = None) -> None:
    """Attention for the query tiles ``tiles [n, 2]`` (``prefill_tiles`` of ``cfg.block_m``) of the
    requests indexed by ``query_start_loc``/``seq_lens``/``block_table``; writes their rows of ``out``
    and ``lse`` (base e, if given). Inputs are trusted; no host sync."""
    n = tiles.shape[0]
    if n == 0:
        return
    h_kv, page, d = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3] // 2
    h = params.num_heads
    ks, ks_stride = _scale(k_scale, seq_lens)
    vs, vs_stride = _scale(v_scale, seq_lens)
    fp8 = is_fp8(kv_cache.dtype)
    lse_t = lse if lse is not None else out
    _prefix_prefill_kernel[(n, h)](
        q, kv_cache, out, lse_t, tiles, query_start_loc, seq_lens, block_table,
        sinks if sinks is not None else seq_lens, ks, vs,
        params.scale, params.logits_soft_cap or 0.0, params.sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0), ks_stride, vs_stride,
        HEAD=d, HEAD_PAD=max(16, triton.next_power_of_2(d)), GROUP=h // h_kv, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, PAGE=page, VEC=vector_width(kv_cache), CAUSAL=params.causal,
        WINDOW=params.sliding_window is not None, SOFT_CAP=params.logits_soft_cap is not None,
        HAS_SINK=sinks is not None, K_SCALE=k_scale is not None and fp8, V_SCALE=v_scale is not None and fp8,
        WRITE_LSE=lse is not None, IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
