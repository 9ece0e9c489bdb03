"""Merging partial attention states by their log-sum-exp: the one kernel behind ``kvlayout.ops.merge_state``
/ ``merge_states`` and the combine step of the split-KV decode.

A state of one (row, head) is a normalized output ``o [D]`` and its LSE ``s``. ``K`` states merge to
``sum_k w_k o_k / sum_k w_k`` with ``w_k = 2^(s_k - max)``; the merged LSE is ``max + log2(sum_k w_k)``.
Each input LSE is multiplied by a per-input factor that puts it in log2 units (``lse_factor(base, "2")``:
``log2(e)`` for base e, 1 for base 2), and the merged one by ``lse_factor("2", out_base)`` (``ln(2)`` for
base e out, 1 for base 2 out); see ``kvlayout.conventions``. States with LSE -inf count for
nothing (their ``o`` is not even read); a row whose states are all -inf gets output 0 and LSE -inf.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvlayout.conventions import lse_factor

from .softmax import LOG2E, merge_finish, merge_fold, merge_partials, softmax_init
from .tiles import store_rows


@triton.jit
def _merge_states_kernel(
        v_ptr, v2_ptr, s_ptr, s2_ptr, out_ptr, lse_ptr, row_ptr, sinks_ptr,
        num_states, scale_a, scale_b, out_scale,
        stride_vt, stride_vk, stride_vh, stride_v2t, stride_v2h,
        stride_st, stride_sk, stride_sh, stride_s2t, stride_s2h,
        stride_ot, stride_oh, stride_lt, stride_lh,
        HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, STATES_PAD: tl.constexpr, TWO: tl.constexpr,
        ROW_INDEX: tl.constexpr, HAS_SINK: tl.constexpr, WRITE_LSE: tl.constexpr):
    # Program (row, head). TWO: state 0 is (v_ptr, s_ptr), state 1 is (v2_ptr, s2_ptr), each with its own
    # strides and LSE factor (scale_a, scale_b); otherwise the states are v_ptr[row, k, head] for
    # k < num_states, all with factor scale_a.
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    k = tl.arange(0, STATES_PAD)
    k_ok = k < num_states
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD
    if TWO:
        first = k == 0
        s_ptrs = tl.where(first, s_ptr + t * stride_st + h * stride_sh, s2_ptr + t * stride_s2t + h * stride_s2h)
        v_rows = tl.where(first, v_ptr + t * stride_vt + h * stride_vh, v2_ptr + t * stride_v2t + h * stride_v2h)
        factor = tl.where(first, scale_a, scale_b)
    else:
        s_ptrs = s_ptr + t * stride_st + k * stride_sk + h * stride_sh
        v_rows = v_ptr + t * stride_vt + k * stride_vk + h * stride_vh
        factor = scale_a
    lse = tl.load(s_ptrs, mask=k_ok, other=float("-inf")) * factor
    live = k_ok & (lse > float("-inf"))
    o = tl.load(v_rows[:, None] + d[None, :], mask=live[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    sink = 0.0
    if HAS_SINK:
        sink = tl.load(sinks_ptr + h) * LOG2E
    out, lse_out = merge_partials(lse, o, sink, HAS_SINK)
    row = t
    if ROW_INDEX:
        row = tl.load(row_ptr + t).to(tl.int64)
    tl.store(out_ptr + row * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    if WRITE_LSE:
        tl.store(lse_ptr + row * stride_lt + h * stride_lh, lse_out * out_scale)


@triton.jit
def merge_on_last_arrival(ws_o_ptr, ws_l_ptr, o_off, l_off, stride_os, stride_ls, arrivals_ptr, num_parts,
                          out_ptr, lse_ptr, out_off, lse_off, sinks_ptr, head, d, row_ok, d_ok,
                          M: tl.constexpr, HEAD_PAD: tl.constexpr, HAS_SINK: tl.constexpr,
                          WRITE_LSE: tl.constexpr):
    """Called by each of the ``num_parts`` programs that wrote one partial state of the same rows (``o`` at
    ``ws_o_ptr + o_off[:, None] + part * stride_os + d``, log2 LSE at ``ws_l_ptr + l_off + part * stride_ls``):
    the program that arrives last merges all parts into the output rows (``out_ptr + out_off[:, None] + d``,
    base-e LSE at ``lse_ptr + lse_off``), the learned sinks of ``head`` included, and sets the arrival
    counter ``arrivals_ptr`` (an int32 that is 0 between launches) back to 0. This replaces a merge launch.

    Ordering: a CTA barrier puts every thread's partial stores before the counter's release-acquire atomic
    (the CUDA grid-sync pattern); the last program then reads the parts through L2 (``.cg``), never a
    stale L1 line."""
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == num_parts - 1:
        m, total, acc = softmax_init(M, HEAD_PAD)
        for part in range(num_parts):
            lse = tl.load(ws_l_ptr + l_off + part * stride_ls, mask=row_ok, other=float("-inf"),
                          cache_modifier=".cg")
            live = row_ok & (lse > float("-inf"))
            o = tl.load(ws_o_ptr + o_off[:, None] + part * stride_os + d[None, :],
                        mask=live[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
            m, total, acc = merge_fold(m, total, acc, lse, o)
        if HAS_SINK:
            sink = tl.load(sinks_ptr + head, mask=row_ok, other=float("-inf")) * LOG2E
            m, total, acc = merge_fold(m, total, acc, sink, tl.zeros([M, HEAD_PAD], tl.float32))
        out, lse_out = merge_finish(m, total, acc)
        store_rows(out_ptr, lse_ptr, out_off, lse_off, d, row_ok, d_ok, out, lse_out, WRITE_LSE, True)
        tl.atomic_xchg(arrivals_ptr, 0)


def merge_states_launch(v: torch.Tensor, s: torch.Tensor, out: torch.Tensor, lse: Optional[torch.Tensor], *,
                        in_base: str = "e", out_base: str = "e", rows: Optional[torch.Tensor] = None,
                        sinks: Optional[torch.Tensor] = None, num_states: Optional[int] = None) -> None:
    """Merge ``v [R, K, H, D]`` (any strides, last dim contiguous) by ``s [R, K, H]`` into ``out [*, H, D]``
    and, if given, ``lse [*, H]``. Output row of input row ``r`` is ``rows[r]`` (default ``r``). ``sinks [H]``
    (natural-log logits) join every denominator without a value. Only the first ``num_states`` of ``K``
    are read. Inputs are trusted; no host sync."""
    r, k, h, d = v.shape
    if r == 0 or h == 0:
        return
    k = k if num_states is None else num_states
    lse_t = lse if lse is not None else s
    _merge_states_kernel[(r, h)](
        v, v, s, s, out, lse_t, rows if rows is not None else s, sinks if sinks is not None else s,
        k, lse_factor(in_base, "2"), 1.0, lse_factor("2", out_base),
        v.stride(0), v.stride(1), v.stride(2), 0, 0,
        s.stride(0), s.stride(1), s.stride(2), 0, 0,
        out.stride(0), out.stride(1), lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        HEAD=d, HEAD_PAD=triton.next_power_of_2(d), STATES_PAD=max(2, triton.next_power_of_2(k)), TWO=False,
        ROW_INDEX=rows is not None, HAS_SINK=sinks is not None, WRITE_LSE=lse is not None, num_warps=4)


def merge_two_launch(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor, out: torch.Tensor,
                     lse: Optional[torch.Tensor], *, base_a: str = "e", base_b: str = "e", out_base: str = "e"
                     ) -> None:
    """Merge two states ``v_a, v_b [T, H, D]`` (one dtype) with LSEs ``s_a, s_b [T, H]`` in their own bases
    into ``out [T, H, D]`` and, if given, ``lse [T, H]``. ``out`` may be ``v_a`` or ``v_b`` (each program
    reads its row before writing it). Inputs are trusted."""
    t, h, d = v_a.shape
    if t == 0 or h == 0:
        return
    lse_t = lse if lse is not None else s_a
    _merge_states_kernel[(t, h)](
        v_a, v_b, s_a, s_b, out, lse_t, s_a, s_a,
        2, lse_factor(base_a, "2"), lse_factor(base_b, "2"), lse_factor("2", out_base),
        v_a.stride(0), 0, v_a.stride(1), v_b.stride(0), v_b.stride(1),
        s_a.stride(0), 0, s_a.stride(1), s_b.stride(0), s_b.stride(1),
        out.stride(0), out.stride(1), lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        HEAD=d, HEAD_PAD=triton.next_power_of_2(d), STATES_PAD=2, TWO=True, ROW_INDEX=False, HAS_SINK=False,
        WRITE_LSE=lse is not None, num_warps=4)
