"""Triton kernels of the ``rocm`` backend, in the shape AMD GPUs favour (64-wide wavefronts).

- ``paged_decode``: a 2-D paged decode kernel, one program per (sequence, KV head) serving all query heads
  of that KV head. Long contexts with too few such programs to fill the device are cut into partitions of
  a fixed number of tokens (the sequence axis of the grid becomes sequence x partition); the partial
  states are merged by their LSE with the project's merge kernel (``kernels.merge``).
- ``prefix_prefill``: one program per (tile of ``BLOCK_M`` query tokens of one request, query head). It
  first sweeps the keys every row of the tile sees (the cached prefix and earlier new tokens) without a
  mask, then the keys on the causal diagonal (and the window's lower edge) with one. The tiles are listed
  once per step on the host (``prefill_tiles``), so no program idles.

Tiles are 64x64 (32 keys for head size 256) with 4 warps, i.e. four 64-wide wavefronts on AMD; key tiles
are aligned to ``BLOCK_N`` so that one block-table lookup serves a whole tile when a page holds it. K and V
rows are read in place from the packed cache through its strides; when the 2*D row stride, the head stride
and the block stride are all multiples of 16 bytes the row offsets are declared multiples of a 16-byte
vector, so loads along D are 16 bytes wide. The online softmax is ``kernels.softmax``'s and the tile
loops are ``kernels.tiles``' (``attend_paged_span`` with K loaded transposed).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from kvlayout.fp8 import scale_arg
from kvlayout.params import AttentionParams

from .merge import merge_states_launch
from .softmax import finalize_heads, fold_k_scale, softmax_init, window_tiles
from .tiles import attend_paged_span, dot_pad, full_tiles_end, key_range, load_group_query, store_rows, wide_rows

VECTOR_BYTES = 16
MAX_PARTITIONS = 64


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
    w_lo, w_vis = window_tiles(q_pos, q_pos, window, BLOCK_N, WINDOW)
    lo = tl.maximum(p_lo, w_lo)
    vis_lo = tl.maximum(p_lo, w_vis)
    vis_hi = full_tiles_end(p_lo, p_hi, BLOCK_N)

    q, head, row_ok, d, d_ok = load_group_query(q_ptr, tok, kvh, stride_qt, stride_qh, GROUP, M, HEAD, HEAD_PAD)
    sm_scale = fold_k_scale(sm_scale, k_scale_ptr, kvh, k_scale_stride, K_SCALE)
    m, l, acc = softmax_init(M, HEAD_PAD)
    m, l, acc = attend_paged_span(m, l, acc, q, tl.zeros([M], tl.int32) + q_pos, lo, vis_lo, vis_hi, p_hi,
                                  kv_ptr + kvh.to(tl.int64) * stride_kh, bt_ptr + seq.to(tl.int64) * stride_bt, 0,
                                  stride_kb, stride_kn, d, d_ok, sm_scale, soft_cap, window, HEAD, PAGE, BLOCK_N,
                                  False, WINDOW, SOFT_CAP, HEAD_PAD != HEAD, IEEE, PAGE >= BLOCK_N, True, VEC, True)
    out, lse = finalize_heads(m, l, acc, sinks_ptr, head, row_ok, v_scale_ptr, kvh * v_scale_stride, HAS_SINK,
                              V_SCALE)
    if PARTIAL:
        row = seq.to(tl.int64)
    else:
        row = tok
    store_rows(out_ptr, lse_ptr, row * stride_o0 + part * stride_o1 + head * stride_oh,
               row * stride_l0 + part * stride_l1 + head * stride_lh, d, row_ok, d_ok, out, lse, WRITE_LSE,
               not PARTIAL)


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
    if qb >= q_len:                # a padding tile (device_prefill_tiles)
        return
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
    sm_scale = fold_k_scale(sm_scale, k_scale_ptr, kvh, k_scale_stride, K_SCALE)
    # Keys every row sees: up to the first row's position (causal) or all (non-causal), from the last
    # row's window edge on; before it the window's lower edge is masked, after it the diagonal.
    hi, vis_hi = key_range(q_first, q_last, seq_len, BLOCK_N, CAUSAL)
    lo, vis_lo = window_tiles(q_first, q_last, window, BLOCK_N, WINDOW)
    m, l, acc = softmax_init(BLOCK_M, HEAD_PAD)
    m, l, acc = attend_paged_span(m, l, acc, q, q_pos, lo, vis_lo, vis_hi, hi, kv_ptr + kvh.to(tl.int64) * stride_kh,
                                  bt_ptr + req.to(tl.int64) * stride_bt, 0, stride_kb, stride_kn, d, d_ok, sm_scale,
                                  soft_cap, window, HEAD, PAGE, BLOCK_N, CAUSAL, WINDOW, SOFT_CAP, HEAD_PAD != HEAD,
                                  IEEE, PAGE >= BLOCK_N, True, VEC, True)
    out, lse = finalize_heads(m, l, acc, sinks_ptr, h + tok * 0, row_ok, v_scale_ptr, kvh * v_scale_stride,
                              HAS_SINK, V_SCALE)
    store_rows(out_ptr, lse_ptr, t_glob * stride_ot + h * stride_oh, t_glob * stride_lt + h * stride_lh, d, row_ok,
               d_ok, out, lse, WRITE_LSE, True)


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
    return RocmConfig(64, 32 if wide_rows(head_size, elem_bytes) else 64, 4, 2)


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


def device_prefill_tiles(query_start_loc: torch.Tensor, first_req: int, block_m: int, num_tiles: int
                         ) -> torch.Tensor:
    """``prefill_tiles`` computed on the device with a fixed length ``num_tiles`` (at least the tiles of
    the step, e.g. ``prefill tokens // block_m + prefill requests``): no host sync, CUDA-graph capturable.
    Rows past the step's tiles are ``(last request, 2**30)``, a tile past its request's end, which the
    kernel skips."""
    lens = (query_start_loc[first_req + 1:] - query_start_loc[first_req:-1]).to(torch.int64)
    n = lens.shape[0]
    if n == 0 or num_tiles == 0:
        return torch.zeros((0, 2), dtype=torch.int32, device=query_start_loc.device)
    counts = (lens + block_m - 1) // block_m
    ends = torch.cumsum(counts, 0)
    i = torch.arange(num_tiles, device=query_start_loc.device)
    req = torch.searchsorted(ends, i, right=True)
    valid = req < n
    req = req.clamp(max=n - 1)
    qb = torch.where(valid, (i - (ends[req] - counts[req])) * block_m, 1 << 30)
    return torch.stack([req + first_req, qb], dim=1).to(torch.int32)


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
    ks, vs = scale_arg(k_scale, kv_cache.dtype, seq_lens), scale_arg(v_scale, kv_cache.dtype, seq_lens)
    _paged_decode_kernel[(n * num_parts, h_kv)](
        q, kv_cache, o_dst, l_dst, query_start_loc, seq_lens, block_table,
        sinks if sinks is not None else seq_lens, ks.tensor, vs.tensor,
        num_parts, partition_size, params.scale, params.logits_soft_cap or 0.0, params.sliding_window or 0,
        q.stride(0), q.stride(1), *o_strides, *l_strides,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0), ks.stride, vs.stride,
        HEAD=d, HEAD_PAD=dot_pad(d), GROUP=h // h_kv, M=dot_pad(h // h_kv), BLOCK_N=cfg.block_n, PAGE=page,
        VEC=vector_width(kv_cache), WINDOW=params.sliding_window is not None,
        SOFT_CAP=params.logits_soft_cap is not None, HAS_SINK=sinks is not None and not partial, K_SCALE=ks.on,
        V_SCALE=vs.on, PARTIAL=partial, WRITE_LSE=partial or lse is not None,
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
    ks, vs = scale_arg(k_scale, kv_cache.dtype, seq_lens), scale_arg(v_scale, kv_cache.dtype, seq_lens)
    lse_t = lse if lse is not None else out
    _prefix_prefill_kernel[(n, h)](
        q, kv_cache, out, lse_t, tiles, query_start_loc, seq_lens, block_table,
        sinks if sinks is not None else seq_lens, ks.tensor, vs.tensor,
        params.scale, params.logits_soft_cap or 0.0, params.sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0), ks.stride, vs.stride,
        HEAD=d, HEAD_PAD=dot_pad(d), GROUP=h // h_kv, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, PAGE=page, VEC=vector_width(kv_cache), CAUSAL=params.causal,
        WINDOW=params.sliding_window is not None, SOFT_CAP=params.logits_soft_cap is not None,
        HAS_SINK=sinks is not None, K_SCALE=ks.on, V_SCALE=vs.on,
        WRITE_LSE=lse is not None, IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
