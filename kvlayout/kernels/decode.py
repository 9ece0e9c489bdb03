"""Split-KV (flash-decoding) paged decode in Triton: each decode request's keys are cut into ``num_splits``
ranges computed in parallel, and the partial outputs are combined by their log-sum-exp (``kernels.merge``).

Program ``(request, kv_head, split)`` handles the ``GROUP`` query heads of one KV head (padded to at least
16 rows for the tensor cores) over one key range, reading the packed cache in place. With one split the
kernel finalizes directly into ``out``; otherwise partials go to a float32 ``SplitWorkspace``
(``[requests, heads, splits, D]`` outputs, ``[requests, heads, splits]`` log2 LSEs) and, by default, the
last split of each (request, KV head) to finish merges them in the same launch (``merge_on_last_arrival``).
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
from .merge import merge_on_last_arrival, merge_states_launch
from .softmax import finalize_heads, fold_k_scale, softmax_init, window_lo
from .tiles import attend_paged_span, dot_pad, full_tiles_end, load_group_query, store_rows, wide_rows


@triton.jit
def _split_kv_decode_kernel(
        q_ptr, kv_ptr, out_ptr, lse_ptr, ws_o_ptr, ws_l_ptr, arrivals_ptr, qsl_ptr, seq_lens_ptr, bt_ptr,
        sinks_ptr, k_scale_ptr, v_scale_ptr,
        num_splits, sm_scale, soft_cap, window,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_lh,
        stride_wr, stride_wh, stride_ws, stride_wlr, stride_wlh, stride_wls,
        stride_kb, stride_kh, stride_kn, stride_bt, k_scale_stride, v_scale_stride,
        HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr,
        HAS_SINK: tl.constexpr, K_SCALE: tl.constexpr, V_SCALE: tl.constexpr, PARTIAL: tl.constexpr,
        FUSED_MERGE: tl.constexpr, WRITE_LSE: tl.constexpr, IEEE: tl.constexpr):
    D_MASK: tl.constexpr = HEAD_PAD != HEAD
    req = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    tok = tl.load(qsl_ptr + req).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + req)
    q_pos = seq_len - 1
    # The one query sees keys [lo, seq_len): causal or not (it is the last position), window included.
    lo = q_pos * 0
    if WINDOW:
        lo = window_lo(q_pos, window)
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    s_lo = lo + split * chunk
    s_hi = tl.minimum(s_lo + chunk, seq_len)

    q, head, row_ok, d, d_ok = load_group_query(q_ptr, tok, kvh, stride_qt, stride_qh, GROUP, M, HEAD, HEAD_PAD)
    sm_scale = fold_k_scale(sm_scale, k_scale_ptr, kvh, k_scale_stride, K_SCALE)
    m, l, acc = softmax_init(M, HEAD_PAD)
    # The split's whole tiles unmasked, then its last partial tile masked (no causal or window mask needed).
    m, l, acc = attend_paged_span(m, l, acc, q, tl.zeros([M], tl.int32) + q_pos, s_lo, s_lo,
                                  full_tiles_end(s_lo, s_hi, BLOCK_N), s_hi, kv_ptr,
                                  bt_ptr + req.to(tl.int64) * stride_bt, kvh.to(tl.int64) * stride_kh, stride_kb,
                                  stride_kn, d, d_ok, sm_scale, soft_cap, window, HEAD, PAGE, BLOCK_N, False, False,
                                  SOFT_CAP, D_MASK, IEEE, False, False, 1, False)
    # The sink joins the denominator once: here when unsplit, in the merge of the splits otherwise
    out, lse = finalize_heads(m, l, acc, sinks_ptr, head, row_ok, v_scale_ptr, kvh * v_scale_stride,
                              HAS_SINK and not PARTIAL, V_SCALE)
    out_off, lse_off = tok * stride_ot + head * stride_oh, tok * stride_lt + head * stride_lh
    if PARTIAL:           # rows are (request, head, split) in the workspace; LSE stays in log2 units
        row = req.to(tl.int64)
        ws_o_off, ws_l_off = row * stride_wr + head * stride_wh, row * stride_wlr + head * stride_wlh
        store_rows(ws_o_ptr, ws_l_ptr, ws_o_off + split * stride_ws, ws_l_off + split * stride_wls, d, row_ok,
                   d_ok, out, lse, True, False)
        if FUSED_MERGE:   # the last split of (request, KV head) to finish merges them all
            merge_on_last_arrival(ws_o_ptr, ws_l_ptr, ws_o_off, ws_l_off, stride_ws, stride_wls,
                                  arrivals_ptr + req * tl.num_programs(1) + kvh, num_splits, out_ptr, lse_ptr,
                                  out_off, lse_off, sinks_ptr, head, d, row_ok, d_ok, M, HEAD_PAD, HAS_SINK,
                                  WRITE_LSE)
    else:                 # rows are tokens of the final output
        store_rows(out_ptr, lse_ptr, out_off, lse_off, d, row_ok, d_ok, out, lse, WRITE_LSE, True)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch settings of the split-KV decode kernel. ``fused_merge``: with several splits, the last split
    of each (request, KV head) to finish merges the partials itself (one launch); otherwise a merge kernel
    runs after the decode kernel (two launches)."""

    block_n: int
    num_warps: int
    num_stages: int
    fused_merge: bool = True


@dataclass(frozen=True)
class SplitWorkspace:
    """Scratch of the split-KV decode for ``R`` requests, ``H`` query heads (``H_kv`` KV heads) and up to
    ``S`` splits: partial outputs ``o [R, H, S, D]`` and log2 LSEs ``lse [R, H, S]`` (float32), and the
    fused merge's arrival counters ``arrivals [R, H_kv]`` (int32, zero between launches: every launch
    leaves them as it found them). One workspace serves launches that run one after another on one stream
    (the layers of a step), not concurrent ones."""

    o: torch.Tensor
    lse: torch.Tensor
    arrivals: torch.Tensor

    @classmethod
    def make(cls, num_reqs: int, num_heads: int, num_kv_heads: int, num_splits: int, head_size: int,
             device: torch.device) -> "SplitWorkspace":
        return cls(torch.empty(num_reqs, num_heads, num_splits, head_size, dtype=torch.float32, device=device),
                   torch.empty(num_reqs, num_heads, num_splits, dtype=torch.float32, device=device),
                   torch.zeros(num_reqs, num_kv_heads, dtype=torch.int32, device=device))


@functools.lru_cache(maxsize=64)
def decode_config(head_size: int, elem_bytes: int, interpret: bool) -> DecodeConfig:
    if interpret:
        return DecodeConfig(16, 4, 1)
    return DecodeConfig(32 if wide_rows(head_size, elem_bytes) else 64, 4, 3)


@functools.lru_cache(maxsize=1)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """Multiprocessor count of ``device`` (8 under the CPU interpreter, so splitting is still exercised)."""
    if device.type != "cuda":
        return 8
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=1024)
def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      min_tokens_per_split: int = 512, max_splits: int = 128) -> int:
    """How many key ranges to cut each decode into. With two programs per multiprocessor or more the
    sequences are not split (64 x 4096 on an H200: 4.16 TB/s unsplit, 4.04 in two); otherwise aim at
    about four programs per multiprocessor (1 x 128k: 3.46 TB/s with 33 splits, 3.71 with 66), with no
    range shorter than ``min_tokens_per_split``."""
    programs = max(1, num_seqs * num_kv_heads)
    if programs >= 2 * num_sms:
        return 1
    want = -(-4 * num_sms // programs)
    by_len = max(1, max_seq_len // min_tokens_per_split)
    return max(1, min(want, by_len, max_splits))


def split_kv_decode(q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor, params: AttentionParams, *, max_seq_len: int,
                    num_splits: Optional[int] = None, sinks: Optional[torch.Tensor] = None,
                    k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                    workspace: Optional[SplitWorkspace] = None,
                    config: Optional[DecodeConfig] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Decode attention for requests ``0 .. len(seq_lens)``, each with exactly one query token (token
    ``query_start_loc[r]`` of ``q``). Writes ``out`` (allocated if None) and ``lse`` (base e, if given).
    ``max_seq_len`` (a host integer) only steers the split count; any ``seq_lens`` are served correctly.
    ``workspace``: a preallocated ``SplitWorkspace`` for at least these requests and ``num_splits`` splits
    (made here when None and the decode is split). Inputs are trusted (the backend validates); no host
    sync."""
    if out is None:
        out = torch.empty_like(q)
    num_reqs = seq_lens.shape[0]
    if num_reqs == 0:
        return out, lse
    h_kv, page, d = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3] // 2
    h = params.num_heads
    group = h // h_kv
    cfg = config or decode_config(d, q.dtype.itemsize, interpreting())
    if num_splits is None:
        num_splits = choose_num_splits(num_reqs, h_kv, max_seq_len, device_sms(q.device))
    partial = num_splits > 1
    if partial and workspace is None:
        workspace = SplitWorkspace.make(num_reqs, h, h_kv, num_splits, d, q.device)
    ws_o, ws_l, arrivals = (workspace.o, workspace.lse, workspace.arrivals) if partial else (out, out, seq_lens)
    lse_dst = lse if lse is not None else out
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    fused = partial and cfg.fused_merge
    ks, vs = scale_arg(k_scale, kv_cache.dtype, seq_lens), scale_arg(v_scale, kv_cache.dtype, seq_lens)
    _split_kv_decode_kernel[(num_reqs, h_kv, num_splits)](
        q, kv_cache, out, lse_dst, ws_o, ws_l, arrivals, query_start_loc, seq_lens, block_table,
        sinks if sinks is not None else seq_lens, ks.tensor, vs.tensor,
        num_splits, params.scale, params.logits_soft_cap or 0.0, params.sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *lse_strides,
        *(ws_o.stride()[:3] if partial else (0, 0, 0)), *(ws_l.stride() if partial else (0, 0, 0)),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0), ks.stride, vs.stride,
        HEAD=d, HEAD_PAD=dot_pad(d), GROUP=group, M=dot_pad(group),
        BLOCK_N=cfg.block_n, PAGE=page, WINDOW=params.sliding_window is not None,
        SOFT_CAP=params.logits_soft_cap is not None, HAS_SINK=sinks is not None,
        K_SCALE=ks.on, V_SCALE=vs.on, PARTIAL=partial, FUSED_MERGE=fused,
        WRITE_LSE=lse is not None, IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if partial and not fused:   # merge the splits (log2 LSEs) into the output rows of the requests' tokens
        merge_states_launch(ws_o.permute(0, 2, 1, 3), ws_l.permute(0, 2, 1), out, lse, in_base="2", out_base="e",
                            rows=query_start_loc, sinks=sinks, num_states=num_splits)
    return out, lse
