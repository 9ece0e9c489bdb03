"""Tile helpers the attention kernels share: which query rows a program holds, where a key tile's rows
lie in the packed cache ``(B, H_kv, N, 2*D)`` (K = ``[..., :D]``, V = ``[..., D:]``), which key ranges need a
mask, and how output rows are stored. All are ``@triton.jit`` and inlined into the kernels that call them.

Packed query rows: a program that takes ``BLOCK_Q`` query tokens and all ``GROUP`` query heads of one KV
head holds them as ``BLOCK_Q * GROUP_PAD`` rows, row ``r`` being token ``r // GROUP_PAD`` and head
``r % GROUP_PAD`` of the group (``packed_rows``), so every K/V tile loaded serves the whole group.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .softmax import LN2, fold_tile

DOT_MIN = 16            # the smallest dot dimension Triton takes (the tensor-core minimum on a GPU)


def dot_pad(n: int) -> int:
    """A dot dimension of ``n`` (head size, rows of a query group) padded to a power of two, at least
    ``DOT_MIN``."""
    return max(DOT_MIN, triton.next_power_of_2(n))


def wide_rows(head_size: int, elem_bytes: int) -> bool:
    """Whether a K/V row of ``head_size`` elements of ``elem_bytes`` (padded to a power of two) is wider than
    256 bytes: D=256 in 16 bits, or float32 with D >= 128. Such rows take smaller key tiles."""
    return triton.next_power_of_2(head_size) * elem_bytes > 256


@triton.jit
def packed_rows(qb, kvh, M: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr):
    """The ``M = BLOCK_Q * GROUP_PAD`` packed rows of query tile ``qb`` and KV head ``kvh``: ``(tok, head,
    g_ok)``: each row's token within the request, its query head, and whether it is a real head (not
    padding of the group)."""
    rows = tl.arange(0, M)
    tok = qb * BLOCK_Q + rows // GROUP_PAD
    g = rows % GROUP_PAD
    return tok, kvh * GROUP + g, g < GROUP


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
def key_range(q_first, q_last, num_keys, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For query rows at positions ``q_first .. q_last`` over keys ``0 .. num_keys`` (positions counted
    from the range's first key): ``(end, full_end)``, no row sees a key at or past ``end``, and every row
    sees every key below ``full_end`` (a multiple of ``BLOCK_N``), as far as causality and the range's end
    go. Causal: ``end = q_last + 1`` and the tiles up to the first row's own position."""
    if CAUSAL:
        end = q_last + 1
        full_end = (q_first + 1) // BLOCK_N * BLOCK_N
    else:
        end = num_keys
        full_end = num_keys // BLOCK_N * BLOCK_N
    return end, full_end


@triton.jit
def full_tiles_end(lo, hi, BLOCK_N: tl.constexpr):
    """The end of the whole tiles of ``BLOCK_N`` keys from ``lo`` inside ``[lo, hi)`` (``lo`` when none)."""
    return lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N


@triton.jit
def tile_rows(bt_row_ptr, start, k_pos, k_end, head_off, stride_kb, stride_kn, PAGE: tl.constexpr,
              BLOCK_N: tl.constexpr, MASK: tl.constexpr, ONE_PAGE: tl.constexpr):
    """Where the cache rows of keys ``k_pos = start + arange(BLOCK_N)`` of one sequence and one KV head (at
    ``head_off`` inside a page) lie: ``(base, rows)``, element offsets ``base + rows [N]``. The page of
    position ``p`` is ``bt_row_ptr[p // PAGE]``. ``ONE_PAGE``: the caller promises the tile lies inside one
    page (``start`` a multiple of ``BLOCK_N`` and ``BLOCK_N`` dividing ``PAGE``), so one block-table lookup
    serves it: ``base`` is that page's head offset (int64) and ``rows`` one strided run (int32). Otherwise
    each key looks its page up (``MASK``: none past ``k_end``): ``base`` 0, ``rows`` int64."""
    if ONE_PAGE:
        base = tl.load(bt_row_ptr + start // PAGE).to(tl.int64) * stride_kb + head_off
        rows = (start % PAGE + tl.arange(0, BLOCK_N)) * stride_kn
    else:
        if MASK:
            blk = tl.load(bt_row_ptr + k_pos // PAGE, mask=k_pos < k_end, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row_ptr + k_pos // PAGE).to(tl.int64)
        base = 0
        rows = blk * stride_kb + head_off + (k_pos % PAGE) * stride_kn
    return base, rows


@triton.jit
def load_tile(ptrs, key_ok, d_ok, MASK: tl.constexpr, D_MASK: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """Load a tile of keys (or values) ``[N, D]`` (``KEYS_FIRST``; else transposed, ``[D, N]``). ``MASK``:
    keys where ``key_ok`` is False read 0; ``D_MASK``: columns where ``d_ok`` is False read 0."""
    if MASK:
        if D_MASK:
            if KEYS_FIRST:
                x = tl.load(ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            else:
                x = tl.load(ptrs, mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        else:
            if KEYS_FIRST:
                x = tl.load(ptrs, mask=key_ok[:, None], other=0.0)
            else:
                x = tl.load(ptrs, mask=key_ok[None, :], other=0.0)
    elif D_MASK:
        if KEYS_FIRST:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=d_ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def attend_paged_range(m, l, acc, q, q_pos, lo, hi, k_end, kv_ptr, bt_row_ptr, head_off, stride_kb, stride_kn,
                       d, d_ok, sm_scale, soft_cap, window,
                       HEAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, MASK: tl.constexpr, D_MASK: tl.constexpr,
                       IEEE: tl.constexpr, ONE_PAGE: tl.constexpr, K_T: tl.constexpr, VEC: tl.constexpr):
    """Fold keys ``lo .. hi`` (tiles of ``BLOCK_N`` from ``lo``) of one paged sequence and one KV head into
    the softmax state of the query rows ``q [M, D_PAD]`` at positions ``q_pos [M]``. ``head_off`` is the
    head's offset inside a page; pages as in ``tile_rows`` (``ONE_PAGE``). With ``MASK`` False every key of
    the range must exist and be visible to every row (no mask is built); with it, keys at or past
    ``k_end`` read 0 and score -inf. ``D_MASK``: only ``d_ok`` columns are read. ``K_T``: K is loaded
    transposed (``[D_PAD, N]``, so the score tile is one ``q @ k_t``; the AMD shape). ``VEC`` > 1: every row
    offset is a multiple of ``VEC`` elements (16-byte loads). fp8 keys/values are widened to q's dtype."""
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < k_end
        base, rows = tile_rows(bt_row_ptr, start, k_pos, k_end, head_off, stride_kb, stride_kn, PAGE, BLOCK_N,
                               MASK, ONE_PAGE)
        if VEC > 1:
            rows = tl.multiple_of(rows, VEC)
        ptr = kv_ptr + base
        if K_T:
            k_t = load_tile(ptr + rows[None, :] + d[:, None], k_ok, d_ok, MASK, D_MASK, False)
            v = load_tile(ptr + HEAD + rows[:, None] + d[None, :], k_ok, d_ok, MASK, D_MASK, True)
            k_t = k_t.to(q.dtype)
        else:
            k_ptrs = ptr + rows[:, None] + d[None, :]
            k = load_tile(k_ptrs, k_ok, d_ok, MASK, D_MASK, True)
            v = load_tile(k_ptrs + HEAD, k_ok, d_ok, MASK, D_MASK, True)
            k_t = tl.trans(k.to(q.dtype))
        m, l, acc = fold_tile(m, l, acc, q, k_t, v.to(q.dtype), q_pos, k_pos, k_end, sm_scale, soft_cap, window,
                              CAUSAL, WINDOW, SOFT_CAP, MASK, IEEE)
    return m, l, acc


@triton.jit
def attend_paged_span(m, l, acc, q, q_pos, lo, vis_lo, vis_hi, hi, kv_ptr, bt_row_ptr, head_off, stride_kb,
                      stride_kn, d, d_ok, sm_scale, soft_cap, window,
                      HEAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                      WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, D_MASK: tl.constexpr, IEEE: tl.constexpr,
                      ONE_PAGE: tl.constexpr, K_T: tl.constexpr, VEC: tl.constexpr, MASK_HEAD: tl.constexpr):
    """Fold keys ``[lo, hi)`` where every row sees every key of ``[vis_lo, vis_hi)`` (``lo``, ``vis_lo`` and
    ``vis_hi`` multiples of ``BLOCK_N`` from the same origin, ``vis_hi <= hi``): masked tiles in
    ``[lo, vis_lo)`` (the window's lower edge; only with ``MASK_HEAD``, else ``lo`` must equal
    ``vis_lo``), unmasked ones in ``[vis_lo, vis_hi)``, masked ones from there to ``hi`` (the causal
    diagonal, the sequence end). Keys at or past ``hi`` do not count. Tile loads as in
    ``attend_paged_range``."""
    if MASK_HEAD:
        m, l, acc = attend_paged_range(m, l, acc, q, q_pos, lo, tl.minimum(vis_lo, hi), hi, kv_ptr, bt_row_ptr,
                                       head_off, stride_kb, stride_kn, d, d_ok, sm_scale, soft_cap, window, HEAD,
                                       PAGE, BLOCK_N, CAUSAL, WINDOW, SOFT_CAP, True, D_MASK, IEEE, ONE_PAGE, K_T,
                                       VEC)
    m, l, acc = attend_paged_range(m, l, acc, q, q_pos, vis_lo, vis_hi, hi, kv_ptr, bt_row_ptr, head_off,
                                   stride_kb, stride_kn, d, d_ok, sm_scale, soft_cap, window, HEAD, PAGE, BLOCK_N,
                                   CAUSAL, WINDOW, SOFT_CAP, False, D_MASK, IEEE, ONE_PAGE, K_T, VEC)
    m, l, acc = attend_paged_range(m, l, acc, q, q_pos, tl.maximum(vis_lo, vis_hi), hi, hi, kv_ptr, bt_row_ptr,
                                   head_off, stride_kb, stride_kn, d, d_ok, sm_scale, soft_cap, window, HEAD, PAGE,
                                   BLOCK_N, CAUSAL, WINDOW, SOFT_CAP, True, D_MASK, IEEE, ONE_PAGE, K_T, VEC)
    return m, l, acc


@triton.jit
def store_rows(out_ptr, lse_ptr, o_off, l_off, d, row_ok, d_ok, out, lse, WRITE_LSE: tl.constexpr,
               LSE_BASE_E: tl.constexpr):
    """Store ``out [M, D]`` at ``out_ptr + o_off[:, None] + d`` (in ``out_ptr``'s dtype) and, with
    ``WRITE_LSE``, the softmax's log2 LSE ``lse [M]`` at ``lse_ptr + l_off``: in natural log with
    ``LSE_BASE_E`` (what backends and ops return), else in base 2 (partial states the merge kernel reads).
    Only rows ``row_ok`` and columns ``d_ok`` are written."""
    tl.store(out_ptr + o_off[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        if LSE_BASE_E:
            lse = lse * LN2
        tl.store(lse_ptr + l_off, lse, mask=row_ok)
