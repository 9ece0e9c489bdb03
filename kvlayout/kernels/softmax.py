"""The online-softmax building blocks every Triton attention kernel of kvlayout uses.

State of one tile of query rows: running max ``m [M]``, running denominator ``l [M]`` and the unnormalized
output ``acc [M, D]``, all float32. Scores are kept in log2 units (``exp2`` is the cheap instruction), so
``m`` and every LSE these helpers return are base 2; kernels convert to base e when they store an LSE.
A row that sees no key keeps ``m = -inf`` and ``l = 0`` and finalizes to output 0 and LSE -inf (or the
sink's logit, when there is a sink).
"""

from __future__ import annotations

import triton
import triton.language as tl

# constexpr, so @triton.jit code may read them (a plain global float compiles under the interpreter only)
LOG2E = tl.constexpr(1.4426950408889634)   # log2(e): natural-log units -> log2 units
LN2 = tl.constexpr(0.6931471805599453)     # ln(2): log2 units -> natural-log units


@triton.jit
def softmax_init(M: tl.constexpr, D: tl.constexpr):
    """Empty state for ``M`` rows of head size ``D``: ``(m, l, acc)``."""
    m = tl.full([M], float("-inf"), tl.float32)
    l = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    return m, l, acc


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): saturates to +-1 without overflow trouble (exp2 -> inf gives 1, -> 0 gives -1)
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b``; ``IEEE`` keeps float32 operands in full precision (no tf32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def score_tile(s, q_pos, k_pos, k_end, sm_scale, soft_cap, window,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, MASK: tl.constexpr):
    """Raw ``q . k`` scores ``s [M, N]`` -> scaled scores in log2 units, invisible keys at -inf.

    ``sm_scale`` is the softmax scale (natural units, fp8 K scale folded in); ``soft_cap`` c turns
    ``x = s * sm_scale`` into ``c * tanh(x / c)``. ``q_pos [M]`` and ``k_pos [N]`` are absolute positions;
    keys at ``k_pos >= k_end`` do not exist. With ``MASK`` False the caller promises every key of the tile
    is visible to every row (no mask is computed). ``CAUSAL``: key j visible to query i when ``j <= i``;
    ``WINDOW``: when ``j > i - window``.
    """
    if SOFT_CAP:
        s = soft_cap * _tanh(s * (sm_scale / soft_cap)) * 1.4426950408889634
    else:
        s = s * (sm_scale * 1.4426950408889634)
    if MASK:
        visible = (k_pos < k_end)[None, :]
        if CAUSAL:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        if WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def softmax_update(m, l, acc, s, v, IEEE: tl.constexpr):
    """Fold one tile of log2 scores ``s [M, N]`` with values ``v [N, D]`` into the state: rescale the old
    denominator and output by ``2^(m_old - m_new)`` and accumulate ``p @ v``."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)      # no key seen yet: avoid -inf - -inf
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
    return m_new, l, acc


@triton.jit
def softmax_finalize(m, l, acc, sink, HAS_SINK: tl.constexpr):
    """``(out [M, D], lse [M])`` of the state; ``lse`` in log2 units. ``sink [M]`` (log2 units) is an
    extra logit in the denominator that contributes no value (learned attention sinks)."""
    if HAS_SINK:
        m_new = tl.maximum(m, sink)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        l = l * alpha + tl.exp2(sink - m_use)
        acc = acc * alpha[:, None]
        m = m_new
    seen = l > 0.0
    out = acc * (1.0 / tl.where(seen, l, 1.0))[:, None]
    lse = tl.where(seen, m + tl.log2(tl.where(seen, l, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def finalize_heads(m, l, acc, sinks_ptr, head, row_ok, v_scale_ptr, v_scale_off,
                   HAS_SINK: tl.constexpr, V_SCALE: tl.constexpr):
    """``softmax_finalize`` for rows that belong to query heads ``head [M]``: loads the layer's learned sinks
    (natural-log logits) for those heads and applies the fp8 V scale at ``v_scale_ptr + v_scale_off``.
    Returns ``(out [M, D], lse [M])`` with ``lse`` in log2 units."""
    sink = m * 0.0
    if HAS_SINK:
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=float("-inf")) * LOG2E
    out, lse = softmax_finalize(m, l, acc, sink, HAS_SINK)
    if V_SCALE:
        out = out * tl.load(v_scale_ptr + v_scale_off)
    return out, lse


@triton.jit
def merge_partials(lse, o, sink, HAS_SINK: tl.constexpr):
    """Merge ``S`` normalized partial states of one row: ``lse [S]`` (log2 units, -inf for an empty part)
    and ``o [S, D]``. Returns ``(out [D], lse)`` in log2 units, a sink logit (log2 units) included."""
    m = tl.max(lse, 0)
    if HAS_SINK:
        m = tl.maximum(m, sink)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_use)
    total = tl.sum(w, 0)
    if HAS_SINK:
        total = total + tl.exp2(sink - m_use)
    seen = total > 0.0
    out = tl.sum(o * w[:, None], 0) * (1.0 / tl.where(seen, total, 1.0))
    lse_out = tl.where(seen, m_use + tl.log2(tl.where(seen, total, 1.0)), float("-inf"))
    return out, lse_out
