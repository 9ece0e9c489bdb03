"""Tree attention for speculative decoding (EAGLE/Medusa-style draft trees) over the packed paged cache.

A request's draft tokens form a tree rooted at its last accepted token: ``parents[i]`` is the index (among
the request's drafts) of draft ``i``'s parent, or -1 when its parent is the last accepted token, and a
parent comes before its children (``parents[i] < i``). Draft ``i`` is appended at position ``ctx + i``
(``ctx`` = the request's cached tokens), in draft order, through the request's pages; it attends to the
whole cached prefix and to its ancestors in the tree, itself included. The compact form of that mask, one
int64 per draft token, has bit ``j`` set when draft ``j`` is visible (``tree_masks``); at most 64 drafts per
request. The draft's RoPE position (``ctx + depth``) is the caller's business: the mask decides what is seen.

Worked example, drafts ``a b c d`` with ``parents = [-1, 0, 0, 1]`` (``a`` the root, ``b`` and ``c`` its
children, ``d`` under ``b``)::

    masks = [0b0001, 0b0011, 0b0101, 0b1011]        # a: a;  b: a b;  c: a c;  d: a b d

After verification the engine keeps one path: ``accept_drafts`` moves the accepted drafts' K/V to
positions ``ctx, ctx + 1, ...`` (one gather, then one scatter, so nothing is overwritten before it is read)
and the request's length becomes ``ctx + len(accepted)``; pages past that can be dropped
(``BlockTable.truncate``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from . import ops_reference as ref
from .cache_ops import check_kv_cache, gather_kv, write_kv
from .conventions import soft_cap_value, softmax_scale
from .errors import KVLayoutError
from .ops import _index_tensor, _run_attention, _use_triton, check_paged_prefill_with_append
from .reference import dense_attention

MAX_DRAFTS = 64


def tree_masks(parents: Sequence[Sequence[int]], device="cpu") -> torch.Tensor:
    """The ancestor bit masks (int64 ``[T]``, drafts of every request packed in order) of per-request
    parent lists; refuses a parent that does not come before its child and more than 64 drafts."""
    out = []
    for r, par in enumerate(parents):
        par = list(par)
        if len(par) > MAX_DRAFTS:
            raise KVLayoutError(f"request {r} has {len(par)} draft tokens; tree attention takes at most {MAX_DRAFTS}")
        masks = []
        for i, p in enumerate(par):
            if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not -1 <= p < i:
                raise KVLayoutError(f"request {r}: draft {i}'s parent must be -1 (the last accepted token) or an "
                                    f"earlier draft 0..{i - 1}, got {p!r}")
            masks.append((masks[p] if p >= 0 else 0) | (1 << i))
        out += [m - (1 << 64) if m >= 1 << 63 else m for m in masks]      # bit 63 as int64's sign bit
    return torch.tensor(out, dtype=torch.int64, device=device)


def check_tree_attention(q, k_new, v_new, kv_cache, cu_seqlens_q, cache_seqlens, block_table, tree_mask,
                         logits_soft_cap=None, out=None, lse=None, k_scale=None, v_scale=None) -> int:
    """Every check ``tree_attention`` makes, without touching memory; returns the most drafts of a request.
    The schedule is held to ``paged_prefill_with_append``'s rules (pages in range, none twice, no shared
    page written), and each token's mask must set its own bit and no bit of a later draft."""
    check_paged_prefill_with_append(q, k_new, v_new, kv_cache, cu_seqlens_q, cache_seqlens, block_table,
                                    logits_soft_cap, out, lse, fp8_ok=True, k_scale=k_scale, v_scale=v_scale,
                                    what="tree_attention")
    _index_tensor(tree_mask, "tree_mask", 1, kv_cache.device)
    if tree_mask.dtype != torch.int64 or tree_mask.shape[0] != q.shape[0]:
        raise KVLayoutError(f"tree_mask must be int64 [{q.shape[0]}] (one ancestor bit mask per draft token, "
                            f"kvlayout.tree.tree_masks), got {tree_mask.dtype} {tuple(tree_mask.shape)}")
    cu = cu_seqlens_q.cpu().long()
    lens = (cu[1:] - cu[:-1])
    most = int(lens.max()) if lens.numel() else 0
    if most > MAX_DRAFTS:
        raise KVLayoutError(f"a request has {most} draft tokens; tree attention takes at most {MAX_DRAFTS}")
    masks = tree_mask.cpu().numpy().view(np.uint64)
    idx = np.arange(q.shape[0]) - np.repeat(cu[:-1].numpy(), lens.numpy())      # draft index within its request
    own = (masks >> idx.astype(np.uint64)) & np.uint64(1)
    later = np.where(idx < 63, masks >> (idx + 1).astype(np.uint64), np.uint64(0))
    bad = (own == 0) | (later != 0)
    if bad.any():
        t = int(np.argmax(bad))
        raise KVLayoutError(f"tree_mask[{t}] (draft {int(idx[t])} of its request) = {int(tree_mask[t])} must set its "
                            f"own bit and no bit of a later draft (parents come before their children)")
    return most


def tree_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, kv_cache: torch.Tensor,
                   cu_seqlens_q: torch.Tensor, cache_seqlens: torch.Tensor, block_table: torch.Tensor,
                   tree_mask: torch.Tensor, *, scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                   out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None, return_lse: bool = False,
                   k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
                   impl=None, validate: bool = True, max_drafts: Optional[int] = None):
    """Append each request's draft K/V (``k_new``/``v_new [T, H_kv, D]``, packed by ``cu_seqlens_q``) at
    positions ``cache_seqlens[b] + i`` of its pages, then attend every draft query ``q [T, H, D]`` over the
    prefix and its tree ancestors (``tree_mask``, see the module docstring). GQA, soft cap, LSE (base e)
    as in ``kvlayout.ops.paged_prefill_with_append``; fp8 caches with ``k_scale``/``v_scale`` (the drafts
    are quantized as ``write_kv`` quantizes); ``impl`` as there. ``max_drafts`` (a host bound on
    drafts per request; read from ``cu_seqlens_q`` when validating) sizes the launch."""
    if validate:
        max_drafts = check_tree_attention(q, k_new, v_new, kv_cache, cu_seqlens_q, cache_seqlens, block_table,
                                          tree_mask, logits_soft_cap, out, lse, k_scale, v_scale)
    elif max_drafts is None:
        raise KVLayoutError("tree_attention(validate=False) needs max_drafts (a host bound on drafts per request)")
    scale = softmax_scale(scale, q.shape[2])
    cap = soft_cap_value(logits_soft_cap)
    n = kv_cache.shape[2]
    slots = ref.append_slots(cu_seqlens_q, cache_seqlens, block_table, n, q.shape[0])     # no host sync
    if _use_triton(impl, q.device, "tree_attention", q.dtype):
        from .kernels.tree import tree_attention_launch
        from .kernels.write import write_kv as triton_write_kv

        def launch(o, l):
            triton_write_kv(kv_cache, k_new, v_new, slots, k_scale, v_scale, validate=False)
            tree_attention_launch(q, kv_cache, cu_seqlens_q, cache_seqlens, block_table, tree_mask, o, l,
                                  max_drafts=max_drafts, scale=scale, soft_cap=cap, k_scale=k_scale, v_scale=v_scale)
        return _run_attention(q, q.shape[:2], out, lse, return_lse, launch=launch)
    return _run_attention(q, q.shape[:2], out, lse, return_lse, reference=lambda: tree_attention_reference(
        q, k_new, v_new, kv_cache, cu_seqlens_q, cache_seqlens, block_table, tree_mask, slots, scale=scale,
        logits_soft_cap=cap, k_scale=k_scale, v_scale=v_scale))


def tree_attention_reference(q, k_new, v_new, kv_cache, cu_seqlens_q, cache_seqlens, block_table, tree_mask, slots,
                             *, scale: float, logits_soft_cap: Optional[float], k_scale=None, v_scale=None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch reference (float32 math): write the drafts (``write_kv``, fp8 quantized), then dense
    attention per request with the prefix visible and the drafts masked by the tree."""
    n = kv_cache.shape[2]
    write_kv(kv_cache, k_new, v_new, slots, k_scale, v_scale, validate=False)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    cu, lens = cu_seqlens_q.tolist(), cache_seqlens.tolist()
    masks = tree_mask.cpu()
    for r in range(len(lens)):
        q0, q1 = cu[r], cu[r + 1]
        if q1 == q0:
            continue
        ctx, nd = lens[r], q1 - q0
        k, v = gather_kv(kv_cache, block_table[r, : -(-(ctx + nd) // n)], ctx + nd, k_scale, v_scale,
                         dtype=torch.float32)
        bits = (masks[q0:q1, None] >> torch.arange(nd)) & 1                       # [drafts, drafts]
        seen = torch.cat([torch.ones(nd, ctx, dtype=torch.bool), bits.bool()], dim=1).to(q.device)
        o, l = dense_attention(q[q0:q1].float(), k, v, scale, q_offset=ctx, causal=False,
                               soft_cap=logits_soft_cap, key_mask=seen)
        out[q0:q1] = o.to(out.dtype)
        lse[q0:q1] = l
    return out, lse


def accept_drafts(kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                  accepted: Sequence[Sequence[int]]) -> None:
    """Keep the accepted path of every request: the K/V of drafts ``accepted[b]`` (increasing draft
    indices) move to positions ``cache_seqlens[b], cache_seqlens[b] + 1, ...`` of request ``b``'s pages.
    Checked before anything moves; all sources are read before any destination is written."""
    num_blocks, _, n, _ = check_kv_cache(kv_cache)
    _index_tensor(block_table, "block_table", 2, kv_cache.device)
    _index_tensor(cache_seqlens, "cache_seqlens", 1, kv_cache.device)
    b = cache_seqlens.shape[0]
    if block_table.shape[0] != b or len(accepted) != b:
        raise KVLayoutError(f"{b} requests (cache_seqlens) but block_table has {block_table.shape[0]} rows and "
                            f"accepted {len(accepted)} lists")
    lens = cache_seqlens.cpu().long().tolist()
    table = block_table.cpu().long()
    rows, sp, dp = [], [], []
    for r, acc in enumerate(accepted):
        acc = list(acc)
        if any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) or a < 0 for a in acc) or \
                any(x >= y for x, y in zip(acc, acc[1:])):
            raise KVLayoutError(f"accepted[{r}] must be increasing draft indices >= 0, got {acc}")
        if acc and lens[r] + acc[-1] >= table.shape[1] * n:
            raise KVLayoutError(f"request {r}: draft {acc[-1]} at position {lens[r] + acc[-1]} is past its "
                                f"{table.shape[1]} pages")
        rows += [r] * len(acc)
        sp += [lens[r] + a for a in acc]
        dp += [lens[r] + i for i in range(len(acc))]
    if not rows:
        return
    rows, sp, dp = torch.tensor(rows), torch.tensor(sp), torch.tensor(dp)
    sblk, dblk = table[rows, sp // n], table[rows, dp // n]
    if int(torch.cat([sblk, dblk]).min()) < 0 or int(torch.cat([sblk, dblk]).max()) >= num_blocks:
        raise KVLayoutError(f"block_table names a block outside the cache's {num_blocks}")
    dev = kv_cache.device
    sblk, dblk, so, do = sblk.to(dev), dblk.to(dev), (sp % n).to(dev), (dp % n).to(dev)
    moved = kv_cache[sblk, :, so].clone()                 # every source read before any destination is written
    kv_cache[dblk, :, do] = moved


__all__ = ["MAX_DRAFTS", "accept_drafts", "check_tree_attention", "tree_attention", "tree_attention_reference",
           "tree_masks"]
