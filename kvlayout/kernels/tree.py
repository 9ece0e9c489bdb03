"""Tree attention in Triton: speculative-decoding draft tokens over a paged cache, each draft seeing the
request's cached prefix and its own ancestors in the draft tree (itself included).

Program ``(request, query tile, kv_head)`` packs ``BLOCK_Q`` draft tokens x the ``GROUP`` query heads of one
KV head into rows (as the unified kernel does). It folds the prefix keys ``[0, ctx)`` unmasked (every draft
sees the whole prefix), then the request's drafts, which were appended at positions ``ctx .. ctx + n``, as
one tile of ``BLOCK_T >= n`` keys masked by the drafts' ancestor bit masks: draft ``i`` sees draft ``j``
when bit ``j`` of ``tree_mask[i]`` is set. LSE is returned in base e.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvlayout.fp8 import scale_arg

from . import interpreting
from .softmax import dot, finalize_heads, fold_k_scale, score_tile, softmax_init, softmax_update
from .tiles import attend_paged_span, dot_pad, full_tiles_end, load_tile, packed_rows, store_rows, tile_rows
from .unified import unified_config


@triton.jit
def _tree_attention_kernel(
        q_ptr, kv_ptr, out_ptr, lse_ptr, qsl_ptr, ctx_ptr, bt_ptr, mask_ptr, k_scale_ptr, v_scale_ptr, sm_scale,
        soft_cap, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_lh, stride_kb, stride_kh, stride_kn,
        stride_bt, k_scale_stride, v_scale_stride, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, PAGE: tl.constexpr,
        SOFT_CAP: tl.constexpr, K_SCALE: tl.constexpr, V_SCALE: tl.constexpr, WRITE_LSE: tl.constexpr,
        IEEE: tl.constexpr):
    M: tl.constexpr = BLOCK_Q * GROUP_PAD
    D_MASK: tl.constexpr = HEAD_PAD != HEAD
    req = tl.program_id(0)
    qb = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(qsl_ptr + req)
    n = tl.load(qsl_ptr + req + 1) - q_start
    if qb * BLOCK_Q >= n:
        return
    ctx = tl.load(ctx_ptr + req)
    tok, head, g_ok = packed_rows(qb, kvh, M, BLOCK_Q, GROUP, GROUP_PAD)
    row_ok = (tok < n) & g_ok
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD
    t_glob = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + t_glob[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx + tok
    bt_row = bt_ptr + req.to(tl.int64) * stride_bt
    head_off = kvh.to(tl.int64) * stride_kh
    sm_scale = fold_k_scale(sm_scale, k_scale_ptr, kvh, k_scale_stride, K_SCALE)
    m, l, acc = softmax_init(M, HEAD_PAD)
    # the cached prefix: every draft sees all of it
    m, l, acc = attend_paged_span(m, l, acc, q, q_pos, 0, 0, full_tiles_end(0, ctx, BLOCK_N), ctx, kv_ptr, bt_row,
                                  head_off, stride_kb, stride_kn, d, d_ok, sm_scale, soft_cap, 0, HEAD, PAGE, BLOCK_N,
                                  False, False, SOFT_CAP, D_MASK, IEEE, False, False, 1, False)
    # the drafts, masked by the tree
    j = tl.arange(0, BLOCK_T)
    k_pos = ctx + j
    k_end = ctx + n
    k_ok = k_pos < k_end
    base, rows = tile_rows(bt_row, ctx, k_pos, k_end, head_off, stride_kb, stride_kn, PAGE, BLOCK_T, True, False)
    k_ptrs = kv_ptr + base + rows[:, None] + d[None, :]
    k = load_tile(k_ptrs, k_ok, d_ok, True, D_MASK, True)
    v = load_tile(k_ptrs + HEAD, k_ok, d_ok, True, D_MASK, True)
    s = dot(q, tl.trans(k.to(q.dtype)), None, IEEE)
    s = score_tile(s, q_pos, k_pos, k_end, sm_scale, soft_cap, 0, False, False, SOFT_CAP, True)
    tree = tl.load(mask_ptr + t_glob, mask=row_ok, other=0)
    seen = ((tree[:, None] >> j[None, :].to(tl.int64)) & 1) != 0
    s = tl.where(seen, s, float("-inf"))
    m, l, acc = softmax_update(m, l, acc, s, v.to(q.dtype), IEEE)
    out, lse = finalize_heads(m, l, acc, q_ptr, head, row_ok, v_scale_ptr, kvh * v_scale_stride, False, V_SCALE)
    store_rows(out_ptr, lse_ptr, t_glob * stride_ot + head * stride_oh, t_glob * stride_lt + head * stride_lh, d,
               row_ok, d_ok, out, lse, WRITE_LSE, True)


def tree_attention_launch(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cache_seqlens: torch.Tensor, block_table: torch.Tensor, tree_mask: torch.Tensor,
                          out: torch.Tensor, lse: Optional[torch.Tensor], *, max_drafts: int, scale: float,
                          soft_cap: Optional[float], k_scale: Optional[torch.Tensor] = None,
                          v_scale: Optional[torch.Tensor] = None) -> None:
    """Launch over requests ``0 .. len(cache_seqlens)`` whose drafts (at most ``max_drafts`` each, a host
    bound) are already in the cache; inputs are trusted (``kvlayout.tree`` validates)."""
    num_reqs = cache_seqlens.shape[0]
    if num_reqs == 0 or q.shape[0] == 0:
        return
    h_kv, page, d = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3] // 2
    group = q.shape[1] // h_kv
    group_pad = triton.next_power_of_2(group)
    # the unified kernel's tiles for a chunk of max_drafts queries: every program reads the whole prefix,
    # so the more drafts per program the fewer times the prefix is read (4 drafts x 4 heads by 16 keys
    # in one stage read it 16 times for 64 drafts and ran 3.4x slower than FlashInfer's custom mask, H100)
    cfg = unified_config(max_drafts, group, d, q.dtype.itemsize, interpreting())
    block_t = max(16, triton.next_power_of_2(max(max_drafts, 1)))
    lse_t = lse if lse is not None else out
    ks, vs = scale_arg(k_scale, kv_cache.dtype, cache_seqlens), scale_arg(v_scale, kv_cache.dtype, cache_seqlens)
    grid = (num_reqs, triton.cdiv(max(max_drafts, 1), cfg.block_q), h_kv)
    _tree_attention_kernel[grid](
        q, kv_cache, out, lse_t, cu_seqlens_q, cache_seqlens, block_table, tree_mask, ks.tensor, vs.tensor, scale,
        soft_cap or 0.0, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        lse_t.stride(0) if lse is not None else 0, lse_t.stride(1) if lse is not None else 0,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0), ks.stride, vs.stride,
        HEAD=d, HEAD_PAD=dot_pad(d), GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n,
        BLOCK_T=block_t,
        PAGE=page, SOFT_CAP=soft_cap is not None, K_SCALE=ks.on, V_SCALE=vs.on, WRITE_LSE=lse is not None, IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
