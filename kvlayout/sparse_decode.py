"""Block-sparse decode: each decoding request attends only to the pages a selector picked (top-k page
selection in the style of Quest or NSA's selected blocks), so its cost follows the tokens it reads, not its
context length.

``selected [B, S]`` lists, per request, indices into its block-table row (page ``i`` holds positions
``i*N .. i*N + N``), increasing, padded at the end with -1. The request attends to every valid key of the
selected pages (the last page only up to the request's length) and to nothing else; with every page
selected it is plain decode. One selection serves all heads of a request. Positions only order pages here:
sparse decode takes no sliding window (the selection is the window). A request that selects nothing gets
output 0 and LSE -inf.

Worked example, page size 4, a request of 10 tokens (pages 0, 1, 2; page 2 holds 2 tokens),
``selected = [0, 2, -1]``: keys at positions 0-3 and 8-9 are seen, 6 keys in all.

The Triton path is two launches and no host sync: one builds a block table of the selected pages with each
request's length recounted (``kernels/sparse.py``), then the split-KV decode kernel runs over it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .cache_ops import gather_kv
from .conventions import soft_cap_value, softmax_scale
from .errors import KVLayoutError
from .ops import _index_tensor, _run_attention, _use_triton, check_paged_decode
from .params import AttentionParams
from .reference import dense_attention


def check_sparse_decode(q, kv_cache, block_table, seq_lens, selected, logits_soft_cap=None, out=None,
                        lse=None, k_scale=None, v_scale=None) -> None:
    """Every check ``sparse_decode`` makes, without touching memory (reads the index tensors on the host)."""
    _, pages, _ = check_paged_decode(q, kv_cache, block_table, seq_lens, out, lse, k_scale, v_scale,
                                     what="sparse_decode")
    soft_cap_value(logits_soft_cap)
    _index_tensor(selected, "selected", 2, kv_cache.device)
    if selected.shape[0] != q.shape[0]:
        raise KVLayoutError(f"q has {q.shape[0]} requests but selected has {selected.shape[0]} rows")
    sel = selected.cpu().long()
    valid = sel >= 0
    if bool((sel < -1).any()) or bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise KVLayoutError("selected must hold page indices >= 0, padded only at the end with -1")
    if bool((valid & (sel >= pages[:, None])).any()):
        r = int(torch.nonzero(valid & (sel >= pages[:, None]))[0, 0])
        raise KVLayoutError(f"request {r} selects a page past its {int(pages[r])} pages")
    if sel.shape[1] > 1 and bool((valid[:, 1:] & (sel[:, 1:] <= sel[:, :-1])).any()):
        raise KVLayoutError("selected page indices must increase along each row (each page once)")


def selected_pages(block_table: torch.Tensor, seq_lens: torch.Tensor, selected: torch.Tensor, page: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(table [B, S] int32, lens [B] int32)``: the selected pages as a block table of their own and the
    keys each request sees in them: page ``p`` holds ``min(page, seq_len - p * page)`` of them (the request's
    last page up to its length), -1 entries none. Device ops only, eight small ones: on a host-bound step
    each costs a launch."""
    sel = selected.clamp(min=0).long()
    table = torch.gather(block_table.to(torch.int32), 1, sel)
    keys = (seq_lens[:, None].long() - sel * page).clamp_(0, page)
    lens = torch.where(selected >= 0, keys, 0).sum(1, dtype=torch.int32)
    return table, lens


def sparse_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  selected: torch.Tensor, *, scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                  out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None, return_lse: bool = False,
                  k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
                  impl=None, validate: bool = True):
    """Decode attention of ``q [B, H, D]`` (one token per request, already in the cache at position
    ``seq_lens[b] - 1``) over the selected pages only (see the module docstring). Returns ``out [B, H,
    D]`` (and ``lse [B, H]`` float32, base e, with ``return_lse`` or ``lse`` given). GQA; soft cap as in
    ``kvlayout.conventions``; fp8 caches with their ``k_scale``/``v_scale`` (``kvlayout.fp8``); ``impl`` as
    in ``kvlayout.ops``."""
    if validate:
        check_sparse_decode(q, kv_cache, block_table, seq_lens, selected, logits_soft_cap, out, lse, k_scale,
                            v_scale)
    scale = softmax_scale(scale, q.shape[2])
    cap = soft_cap_value(logits_soft_cap)
    page = kv_cache.shape[2]
    if _use_triton(impl, q.device, "sparse_decode", q.dtype):
        from .kernels.decode import split_kv_decode
        from .kernels.sparse import selected_pages_launch
        table, lens, rows = selected_pages_launch(block_table, seq_lens, selected, page)
        params = AttentionParams(q.shape[1], kv_cache.shape[1], q.shape[2], scale, False, None, cap)

        def launch(o, l):
            split_kv_decode(q, kv_cache, rows, lens, table, params, max_seq_len=selected.shape[1] * page,
                            k_scale=k_scale, v_scale=v_scale, out=o, lse=l)
        return _run_attention(q, q.shape[:2], out, lse, return_lse, launch=launch)
    table, lens = selected_pages(block_table, seq_lens, selected, page)
    return _run_attention(q, q.shape[:2], out, lse, return_lse,
                          reference=lambda: _reference(q, kv_cache, table, lens, scale, cap, k_scale, v_scale))


def _reference(q, kv_cache, table, lens, scale: float, cap: Optional[float], k_scale=None, v_scale=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float32 attention of each request over the keys of its selected pages (fp8 dequantized)."""
    n = kv_cache.shape[2]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), device=q.device)
    for r, s in enumerate(lens.tolist()):
        if s == 0:
            continue
        k, v = gather_kv(kv_cache, table[r, : -(-s // n)], s, k_scale, v_scale, dtype=torch.float32)
        o, l = dense_attention(q[r:r + 1].float(), k, v, scale, q_offset=s - 1, causal=False, soft_cap=cap)
        out[r] = o[0].to(out.dtype)
        lse[r] = l[0]
    return out, lse


__all__ = ["check_sparse_decode", "selected_pages", "sparse_decode"]
