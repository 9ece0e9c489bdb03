"""The online-softmax building blocks every Triton attention kernel of kvlayout uses, and the kernels' side
of the conventions of ``kvlayout.conventions`` (window edge, soft-cap, LSE base) and ``kvlayout.fp8`` (K
scale folded into the softmax scale, V scale on the output).

State of one tile of query rows: running max ``m [M]``, running denominator ``l [M]`` and the unnormalized
output ``acc [M, D]``, all float32. Scores are kept in log2 units (``exp2`` is the cheap instruction), so
``m`` and every LSE these helpers return are base 2; kernels convert to base e when they store an LSE
(``kernels.tiles.store_rows``). A row that sees no key keeps ``m = -inf`` and ``l = 0`` and finalizes to
output 0 and LSE -inf (or the sink's logit, when there is a sink).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvlayout import conventions

# constexpr, so @triton.jit code may read them (a plain global float compiles under the interpreter only)
LOG2E = tl.constexpr(conventions.LOG2E)   # log2(e): natural-log units -> log2 units
LN2 = tl.constexpr(conventions.LN2)       # ln(2): log2 units -> natural-log units


@triton.jit
def softmax_init(M: tl.constexpr, D: tl.constexpr):
    """Empty state for ``M`` rows of head size ``D``: ``(m, l, acc)``."""
    m = tl.full([M], float("-inf"), tl.float32)
    l = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    return m, l, acc


@triton.jit
def window_lo(q_pos, window):
    """``kvlayout.conventions.window_start``: the first key position the query at ``q_pos`` sees through
    a sliding window of ``window`` tokens, itself included: ``max(q_pos - window + 1, 0)``."""
    return tl.maximum(q_pos - window + 1, 0)


@triton.jit
def window_tiles(q_first, q_last, window, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """The window's lower edge for the query rows at positions ``q_first .. q_last``, in key tiles of
    ``BLOCK_N``: ``(lo, vis_lo)`` with ``lo`` the first row's edge rounded down to a tile (no row sees a key
    below it) and ``vis_lo`` the last row's edge rounded up (every row sees every key from it on, as far as
    the window goes). ``(0, 0)`` without ``WINDOW``."""
    lo = q_first * 0
    vis_lo = lo
    if WINDOW:
        lo = window_lo(q_first, window) // BLOCK_N * BLOCK_N
        vis_lo = tl.cdiv(window_lo(q_last, window), BLOCK_N) * BLOCK_N
    return lo, vis_lo


@triton.jit
def fold_k_scale(sm_scale, k_scale_ptr, kvh, k_scale_stride, K_SCALE: tl.constexpr):
    """The softmax scale of KV head ``kvh``'s query heads with the fp8 K scale folded in (``kvlayout.fp8``):
    ``sm_scale * k_scale[kvh * k_scale_stride]`` (stride 0 for a per-tensor scale); ``sm_scale`` itself
    without ``K_SCALE``."""
    if K_SCALE:
        sm_scale = sm_scale * tl.load(k_scale_ptr + kvh * k_scale_stride)
    return sm_scale


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): saturates to +-1 without overflow trouble (exp2 -> inf gives 1, -> 0 gives -1)
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


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
    ``WINDOW``: when ``j >= window_lo(i, window)``.
    """
    if SOFT_CAP:
        s = soft_cap * _tanh(s * (sm_scale / soft_cap)) * LOG2E
    else:
        s = s * (sm_scale * LOG2E)
    if MASK:
        visible = (k_pos < k_end)[None, :]
        if CAUSAL:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        if WINDOW:
            visible = visible & (k_pos[None, :] >= window_lo(q_pos, window)[:, None])
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _finite_or_zero(m):
    """``m`` where it is finite, 0 where it is -inf (a row that has seen no key yet): the offset to
    subtract before ``exp2``, so -inf - -inf never happens."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _normalizer(m, l):
    """``(1 / l, m + log2(l))`` of rows with a denominator ``l > 0``; ``(1, -inf)`` for rows that saw nothing
    (their output is then ``acc * 1 = 0``); a NaN denominator (a NaN score) stays NaN in both."""
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    return 1.0 / l_safe, tl.where(empty, float("-inf"), m + tl.log2(l_safe))


@triton.jit
def softmax_update(m, l, acc, s, v, IEEE: tl.constexpr):
    """Fold one tile of log2 scores ``s [M, N]`` with values ``v [N, D]`` into the state: rescale the old
    denominator and output by ``2^(m_old - m_new)`` and accumulate ``p @ v``."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use = _finite_or_zero(m_new)
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
    return m_new, l, acc


@triton.jit
def fold_tile(m, l, acc, q, k_t, v, q_pos, k_pos, k_end, sm_scale, soft_cap, window, CAUSAL: tl.constexpr,
              WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr):
    """Fold one key tile into the state of the rows ``q [M, D]``: scores ``q @ k_t`` (``k_t [D, N]`` and
    ``v [N, D]`` in q's dtype) through ``score_tile`` (keys at ``k_pos [N]``, rows at ``q_pos [M]``), then
    ``softmax_update``."""
    s = dot(q, k_t, None, IEEE)
    s = score_tile(s, q_pos, k_pos, k_end, sm_scale, soft_cap, window, CAUSAL, WINDOW, SOFT_CAP, MASK)
    return softmax_update(m, l, acc, s, v, IEEE)


@triton.jit
def softmax_finalize(m, l, acc, sink, HAS_SINK: tl.constexpr):
    """``(out [M, D], lse [M])`` of the state; ``lse`` in log2 units. ``sink [M]`` (log2 units) is an
    extra logit in the denominator that contributes no value (learned attention sinks)."""
    if HAS_SINK:
        m_new = tl.maximum(m, sink)
        m_use = _finite_or_zero(m_new)
        alpha = tl.exp2(m - m_use)
        l = l * alpha + tl.exp2(sink - m_use)
        acc = acc * alpha[:, None]
        m = m_new
    inv_l, lse = _normalizer(m, l)
    return acc * inv_l[:, None], lse


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
    if V_SCALE:                 # kvlayout.fp8: the V scale multiplies the output
        out = out * tl.load(v_scale_ptr + v_scale_off)
    return out, lse


@triton.jit
def merge_fold(m, total, acc, lse, o):
    """Fold one normalized partial state per row (``lse [M]`` in log2 units, -inf for an empty part, and
    ``o [M, D]``) into a running merge ``(m [M], total [M], acc [M, D])`` that starts at ``softmax_init``:
    ``acc / total`` is the merged output so far and ``m + log2(total)`` its LSE (``merge_finish``). A sink
    folds in as a state with ``o = 0``."""
    m_new = tl.maximum(m, lse)
    m_use = _finite_or_zero(m_new)
    alpha = tl.exp2(m - m_use)
    w = tl.exp2(lse - m_use)
    return m_new, total * alpha + w, acc * alpha[:, None] + o * w[:, None]


@triton.jit
def merge_finish(m, total, acc):
    """``(out [M, D], lse [M])`` of a running merge of ``merge_fold``; ``lse`` in log2 units."""
    inv_total, lse = _normalizer(_finite_or_zero(m), total)
    return acc * inv_total[:, None], lse


@triton.jit
def merge_partials(lse, o, sink, HAS_SINK: tl.constexpr):
    """Merge ``S`` normalized partial states of one row: ``lse [S]`` (log2 units, -inf for an empty part)
    and ``o [S, D]``. Returns ``(out [D], lse)`` in log2 units, a sink logit (log2 units) included."""
    m = tl.max(lse, 0)
    if HAS_SINK:
        m = tl.maximum(m, sink)
    m_use = _finite_or_zero(m)
    w = tl.exp2(lse - m_use)
    total = tl.sum(w, 0)
    if HAS_SINK:
        total = total + tl.exp2(sink - m_use)
    inv_total, lse_out = _normalizer(m_use, total)
    return tl.sum(o * w[:, None], 0) * inv_total, lse_out
