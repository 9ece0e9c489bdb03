"""Gated paged decode in Triton: decode attention whose scores carry a per-(query head, key) gate.

Program ``(request, kv_head)`` takes the ``GROUP`` query heads of one KV head (padded to at least 16 rows)
over every key of the request, reading K/V from the packed cache and the keys' gate values ``delta`` from a
companion paged tensor ``(blocks, H_kv, N)`` with the same block table. Score of head ``h`` and key ``j``:
``scale * (q_h . k_j + G(alpha_h * delta_j))``, ``G`` log-sigmoid (``LOGSIGMOID``) or the identity. Split-KV as in
``kernels/decode.py``: with ``num_splits > 1`` each program takes one key range and writes a partial state
(log2 LSE) to a float32 workspace, and the last split to finish merges them (``merge_on_last_arrival``).
fp8 caches: the K scale multiplies ``q . k`` (not the gate), the V scale the output.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvlayout.fp8 import scale_arg

from . import interpreting
from .decode import SplitWorkspace, choose_num_splits, decode_config, device_sms
from .merge import merge_on_last_arrival, merge_states_launch
from .softmax import LOG2E, dot, finalize_heads, softmax_init, softmax_update
from .tiles import dot_pad, full_tiles_end, load_group_query, load_tile, store_rows, tile_rows


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _gated_tiles(m, l, acc, q, alpha, lo, hi, k_end, kv_ptr, delta_ptr, bt_row, head_off, delta_head_off,
                 stride_kb, stride_kn, stride_db, d, d_ok, k_scale, sm_scale, HEAD: tl.constexpr,
                 PAGE: tl.constexpr, BLOCK_N: tl.constexpr, LOGSIGMOID: tl.constexpr, K_SCALE: tl.constexpr,
                 MASK: tl.constexpr, D_MASK: tl.constexpr, IEEE: tl.constexpr):
    """Fold keys ``lo .. hi`` (tiles of ``BLOCK_N``) with their gates into the softmax state; ``MASK``: keys at
    or past ``k_end`` read 0 and score -inf (without it every key of the range must exist)."""
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < k_end
        base, rows = tile_rows(bt_row, start, k_pos, k_end, head_off, stride_kb, stride_kn, PAGE, BLOCK_N, MASK,
                               False)
        k_ptrs = kv_ptr + base + rows[:, None] + d[None, :]
        k = load_tile(k_ptrs, k_ok, d_ok, MASK, D_MASK, True)
        v = load_tile(k_ptrs + HEAD, k_ok, d_ok, MASK, D_MASK, True)
        if MASK:
            blk = tl.load(bt_row + k_pos // PAGE, mask=k_ok, other=0).to(tl.int64)
            delta = tl.load(delta_ptr + blk * stride_db + delta_head_off + k_pos % PAGE, mask=k_ok, other=0.0)
        else:
            blk = tl.load(bt_row + k_pos // PAGE).to(tl.int64)
            delta = tl.load(delta_ptr + blk * stride_db + delta_head_off + k_pos % PAGE)
        gate = alpha[:, None] * delta[None, :]
        if LOGSIGMOID:
            gate = _log_sigmoid(gate)
        if K_SCALE:
            s = (dot(q, tl.trans(k.to(q.dtype)), None, IEEE) * k_scale + gate) * (sm_scale * LOG2E)
        else:
            s = dot(q, tl.trans(k.to(q.dtype)), gate, IEEE) * (sm_scale * LOG2E)
        if MASK:
            s = tl.where(k_ok[None, :], s, float("-inf"))
        m, l, acc = softmax_update(m, l, acc, s, v.to(q.dtype), IEEE)
    return m, l, acc


@triton.jit
def _gated_decode_kernel(
        q_ptr, kv_ptr, delta_ptr, alpha_ptr, out_ptr, lse_ptr, ws_o_ptr, ws_l_ptr, arrivals_ptr, seq_lens_ptr,
        bt_ptr, k_scale_ptr, v_scale_ptr, num_splits, sm_scale, stride_qt, stride_qh,
        stride_ot, stride_oh, stride_lt, stride_lh, stride_wr, stride_wh, stride_ws, stride_wlr, stride_wlh, stride_wls,
        stride_kb, stride_kh, stride_kn, stride_db, stride_dh, stride_at, stride_bt, k_scale_stride, v_scale_stride,
        HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGE: tl.constexpr, LOGSIGMOID: tl.constexpr, K_SCALE: tl.constexpr, V_SCALE: tl.constexpr,
        PARTIAL: tl.constexpr, FUSED_MERGE: tl.constexpr, WRITE_LSE: tl.constexpr, IEEE: tl.constexpr):
    D_MASK: tl.constexpr = HEAD_PAD != HEAD
    req = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    tok = req.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + req)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    s_lo = split * chunk
    s_hi = tl.minimum(s_lo + chunk, seq_len)
    q, head, row_ok, d, d_ok = load_group_query(q_ptr, tok, kvh, stride_qt, stride_qh, GROUP, M, HEAD, HEAD_PAD)
    alpha = tl.load(alpha_ptr + tok * stride_at + head, mask=row_ok, other=0.0)
    bt_row = bt_ptr + tok * stride_bt
    head_off = kvh.to(tl.int64) * stride_kh
    k_scale = 1.0
    if K_SCALE:
        k_scale = tl.load(k_scale_ptr + kvh * k_scale_stride)
    m, l, acc = softmax_init(M, HEAD_PAD)
    # whole tiles without masks, then the split's last partial tile masked
    full_end = full_tiles_end(s_lo, s_hi, BLOCK_N)
    m, l, acc = _gated_tiles(m, l, acc, q, alpha, s_lo, full_end, s_hi, kv_ptr, delta_ptr, bt_row, head_off,
                             kvh * stride_dh, stride_kb, stride_kn, stride_db, d, d_ok, k_scale, sm_scale, HEAD,
                             PAGE, BLOCK_N, LOGSIGMOID, K_SCALE, False, D_MASK, IEEE)
    m, l, acc = _gated_tiles(m, l, acc, q, alpha, full_end, s_hi, s_hi, kv_ptr, delta_ptr, bt_row, head_off,
                             kvh * stride_dh, stride_kb, stride_kn, stride_db, d, d_ok, k_scale, sm_scale, HEAD,
                             PAGE, BLOCK_N, LOGSIGMOID, K_SCALE, True, D_MASK, IEEE)
    out, lse = finalize_heads(m, l, acc, q_ptr, head, row_ok, v_scale_ptr, kvh * v_scale_stride, False, V_SCALE)
    out_off, lse_off = tok * stride_ot + head * stride_oh, tok * stride_lt + head * stride_lh
    if PARTIAL:           # rows (request, head, split) of the workspace; LSE stays in log2 units
        ws_o_off, ws_l_off = tok * stride_wr + head * stride_wh, tok * stride_wlr + head * stride_wlh
        store_rows(ws_o_ptr, ws_l_ptr, ws_o_off + split * stride_ws, ws_l_off + split * stride_wls, d, row_ok,
                   d_ok, out, lse, True, False)
        if FUSED_MERGE:
            merge_on_last_arrival(ws_o_ptr, ws_l_ptr, ws_o_off, ws_l_off, stride_ws, stride_wls,
                                  arrivals_ptr + req * tl.num_programs(1) + kvh, num_splits, out_ptr, lse_ptr,
                                  out_off, lse_off, q_ptr, head, d, row_ok, d_ok, M, HEAD_PAD, False, WRITE_LSE)
    else:
        store_rows(out_ptr, lse_ptr, out_off, lse_off, d, row_ok, d_ok, out, lse, WRITE_LSE, True)


def gated_decode_launch(q: torch.Tensor, kv_cache: torch.Tensor, delta_cache: torch.Tensor, alpha: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor,
                        lse: Optional[torch.Tensor], *, scale: float, logsigmoid: bool, max_seq_len: int,
                        k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
                        num_splits: Optional[int] = None) -> None:
    """Launch for requests ``0 .. len(seq_lens)`` (query ``q[r]``); ``max_seq_len`` (a host bound on the
    lengths) steers the split count. Inputs are trusted (``kvlayout.gated_decode`` validates)."""
    num_reqs = seq_lens.shape[0]
    if num_reqs == 0:
        return
    h_kv, page, d = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3] // 2
    h = q.shape[1]
    group = h // h_kv
    cfg = decode_config(d, q.dtype.itemsize, interpreting())      # the dense decode kernel's tiles
    if num_splits is None:
        num_splits = choose_num_splits(num_reqs, h_kv, max_seq_len, device_sms(q.device))
    partial = num_splits > 1
    ws = SplitWorkspace.make(num_reqs, h, h_kv, num_splits, d, q.device) if partial else None
    ws_o, ws_l, arrivals = (ws.o, ws.lse, ws.arrivals) if partial else (out, out, seq_lens)
    fused = partial and cfg.fused_merge
    ks, vs = scale_arg(k_scale, kv_cache.dtype, seq_lens), scale_arg(v_scale, kv_cache.dtype, seq_lens)
    _gated_decode_kernel[(num_reqs, h_kv, num_splits)](
        q, kv_cache, delta_cache, alpha, out, lse if lse is not None else out, ws_o, ws_l, arrivals, seq_lens,
        block_table, ks.tensor, vs.tensor, num_splits, scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *((lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)),
        *(ws_o.stride()[:3] if partial else (0, 0, 0)), *(ws_l.stride() if partial else (0, 0, 0)),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), delta_cache.stride(0), delta_cache.stride(1),
        alpha.stride(0), block_table.stride(0), ks.stride, vs.stride,
        HEAD=d, HEAD_PAD=dot_pad(d), GROUP=group, M=dot_pad(group), BLOCK_N=cfg.block_n, PAGE=page,
        LOGSIGMOID=logsigmoid,
        K_SCALE=ks.on, V_SCALE=vs.on, PARTIAL=partial, FUSED_MERGE=fused, WRITE_LSE=lse is not None,
        IEEE=q.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if partial and not fused:
        merge_states_launch(ws_o.permute(0, 2, 1, 3), ws_l.permute(0, 2, 1), out, lse, in_base="2", out_base="e",
                            sinks=None, num_states=num_splits)
