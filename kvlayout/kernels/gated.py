"""Gated paged decode in Triton: decode attention whose scores carry a per-(query head, key) gate.

Program ``(request, kv_head)`` takes the ``GROUP`` query heads of one KV head (padded to at least 16 rows)
over every key of the request, reading K/V from the packed cache and the keys' gate values ``delta`` from a
companion paged tensor ``(blocks, H_kv, N)`` with the same block table. Score of head ``h`` and key ``j``:
``scale * (q_h . k_j + G(alpha_h * delta_j))``, ``G`` log-sigmoid (``LOGSIGMOID``) or the identity. One
program per request and KV head (no split of the keys): long single requests leave most of the GPU idle.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .softmax import LOG2E, dot, finalize_heads, softmax_init, softmax_update
from .tiles import dot_pad, load_group_query, load_tile, store_rows, tile_rows


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _gated_decode_kernel(
        q_ptr, kv_ptr, delta_ptr, alpha_ptr, out_ptr, lse_ptr, seq_lens_ptr, bt_ptr, sm_scale,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_lh, stride_kb, stride_kh, stride_kn,
        stride_db, stride_dh, stride_at, stride_bt,
        HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGE: tl.constexpr, LOGSIGMOID: tl.constexpr, WRITE_LSE: tl.constexpr, IEEE: tl.constexpr):
    D_MASK: tl.constexpr = HEAD_PAD != HEAD
    req = tl.program_id(0)
    kvh = tl.program_id(1)
    tok = req.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + req)
    q, head, row_ok, d, d_ok = load_group_query(q_ptr, tok, kvh, stride_qt, stride_qh, GROUP, M, HEAD, HEAD_PAD)
    alpha = tl.load(alpha_ptr + tok * stride_at + head, mask=row_ok, other=0.0)
    bt_row = bt_ptr + tok * stride_bt
    head_off = kvh.to(tl.int64) * stride_kh
    m, l, acc = softmax_init(M, HEAD_PAD)
    for start in range(0, seq_len, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < seq_len
        base, rows = tile_rows(bt_row, start, k_pos, seq_len, head_off, stride_kb, stride_kn, PAGE, BLOCK_N, True,
                               False)
        k_ptrs = kv_ptr + base + rows[:, None] + d[None, :]
        k = load_tile(k_ptrs, k_ok, d_ok, True, D_MASK, True)
        v = load_tile(k_ptrs + HEAD, k_ok, d_ok, True, D_MASK, True)
        blk = tl.load(bt_row + k_pos // PAGE, mask=k_ok, other=0).to(tl.int64)
        delta = tl.load(delta_ptr + blk * stride_db + kvh * stride_dh + k_pos % PAGE, mask=k_ok, other=0.0)
        gate = alpha[:, None] * delta[None, :]
        if LOGSIGMOID:
            gate = _log_sigmoid(gate)
        s = dot(q, tl.trans(k.to(q.dtype)), gate, IEEE) * (sm_scale * LOG2E)
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m, l, acc = softmax_update(m, l, acc, s, v.to(q.dtype), IEEE)
    out, lse = finalize_heads(m, l, acc, q_ptr, head, row_ok, q_ptr, 0, False, False)
    store_rows(out_ptr, lse_ptr, tok * stride_ot + head * stride_oh, tok * stride_lt + head * stride_lh, d, row_ok,
               d_ok, out, lse, WRITE_LSE, True)


def gated_decode_launch(q: torch.Tensor, kv_cache: torch.Tensor, delta_cache: torch.Tensor, alpha: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor,
                        lse: Optional[torch.Tensor], *, scale: float, logsigmoid: bool) -> None:
    """Launch for requests ``0 .. len(seq_lens)`` (query ``q[r]``); inputs are trusted
    (``kvlayout.gated_decode`` validates)."""
    num_reqs = seq_lens.shape[0]
    if num_reqs == 0:
        return
    h_kv, page, d = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3] // 2
    group = q.shape[1] // h_kv
    lse_t = lse if lse is not None else out
    _gated_decode_kernel[(num_reqs, h_kv)](
        q, kv_cache, delta_cache, alpha, out, lse_t, seq_lens, block_table, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        lse_t.stride(0) if lse is not None else 0, lse_t.stride(1) if lse is not None else 0,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), delta_cache.stride(0), delta_cache.stride(1),
        alpha.stride(0), block_table.stride(0),
        HEAD=d, HEAD_PAD=dot_pad(d), GROUP=group, M=dot_pad(group), BLOCK_N=16, PAGE=page, LOGSIGMOID=logsigmoid,
        WRITE_LSE=lse is not None, IEEE=q.dtype == torch.float32, num_warps=4, num_stages=1)
