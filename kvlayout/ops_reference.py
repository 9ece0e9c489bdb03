"""PyTorch references for ``kvlayout.ops``: float32 math, one request at a time; the oracle for the Triton
kernels and the CPU fallback. Inputs are assumed valid (``kvlayout.ops`` checks them first)."""

from __future__ import annotations

from typing import Optional

import torch

from .conventions import lse_factor
from .reference import dense_attention


def append_slots(cu_seqlens_q: torch.Tensor, cache_seqlens: torch.Tensor, block_table: torch.Tensor,
                 block_size: int, num_tokens: Optional[int] = None) -> torch.Tensor:
    """The cache slot (``block * block_size + offset``) each packed new token is appended to, int64 [T].
    Device ops only when ``num_tokens`` (``T``, a host integer) is given; otherwise it is read back."""
    cu = cu_seqlens_q.long()
    q_lens = cu[1:] - cu[:-1]
    if num_tokens is None:
        num_tokens = int(cu[-1])
    req = torch.repeat_interleave(torch.arange(q_lens.numel(), device=cu.device), q_lens, output_size=num_tokens)
    pos = cache_seqlens.long()[req] + torch.arange(num_tokens, device=cu.device) - cu[:-1][req]
    blocks = block_table.long()[req, pos // block_size]
    return blocks * block_size + pos % block_size


def paged_prefill_with_append(q, k_new, v_new, kv_cache, cu_seqlens_q, cache_seqlens, block_table, *,
                              causal: bool = True, scale: float, logits_soft_cap: Optional[float] = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``k_new``/``v_new`` into the pages, then attend over prefix + chunk. Returns ``(o, lse)``, LSE
    in base e. Rows of an empty request do not exist; every query sees at least itself."""
    n = kv_cache.shape[2]
    d = q.shape[2]
    slots = append_slots(cu_seqlens_q, cache_seqlens, block_table, n)
    kv_cache[..., :d][slots // n, :, slots % n] = k_new
    kv_cache[..., d:][slots // n, :, slots % n] = v_new
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    cu, lens = cu_seqlens_q.tolist(), cache_seqlens.tolist()
    for r in range(len(lens)):
        q0, q1 = cu[r], cu[r + 1]
        if q1 == q0:
            continue
        s = lens[r] + q1 - q0
        pos = torch.arange(s, device=q.device)
        blk = block_table[r].long()[pos // n]
        kv = kv_cache[blk, :, pos % n].float()                      # [S, H_kv, 2D]
        o, l = dense_attention(q[q0:q1].float(), kv[..., :d], kv[..., d:], scale, q_offset=lens[r],
                               causal=causal, soft_cap=logits_soft_cap)
        out[q0:q1] = o.to(out.dtype)
        lse[q0:q1] = l
    return out, lse


def masked_sequence_prefill(q, k, v, valid_lens, *, causal: bool = False, scale: float,
                            logits_soft_cap: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention per sample over its first ``valid_lens[b]`` tokens; padded query rows get 0 and LSE -inf."""
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:1] + q.shape[2:3] + q.shape[1:2], float("-inf"), device=q.device)  # [B, H, S]
    for b, n in enumerate(valid_lens.tolist()):
        if n == 0:
            continue
        o, l = dense_attention(q[b, :n].float(), k[b, :n].float(), v[b, :n].float(), scale, q_offset=0,
                               causal=causal, soft_cap=logits_soft_cap)
        out[b, :n] = o.to(out.dtype)
        lse[b, :, :n] = l.transpose(0, 1)
    return out, lse.transpose(1, 2)                                 # lse [B, S, H]


def merge_states(v: torch.Tensor, s: torch.Tensor, *, in_scale: torch.Tensor, out_base: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``K`` states ``v [T, K, H, D]`` with LSEs ``s [T, K, H]``; ``in_scale [K]`` turns each state's
    LSE into base 2 (``lse_factor(base, "2")``); the result is in ``out_base``. States with LSE -inf count
    for nothing; if all are -inf the output is 0 and LSE -inf; a NaN LSE makes the row's output and LSE NaN."""
    s2 = s.double() * in_scale.double().view(1, -1, 1)
    m = s2.amax(dim=1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    w = torch.exp2(s2 - m)                                          # exp2(-inf) = 0
    total = w.sum(dim=1)                                            # [T, H]
    acc = (w.unsqueeze(-1) * torch.where(w.unsqueeze(-1) > 0, v.double(), torch.zeros_like(v, dtype=torch.float64))
           ).sum(dim=1)
    out = torch.where(total.unsqueeze(-1) == 0, torch.zeros_like(acc), acc / total.unsqueeze(-1))
    lse2 = m.squeeze(1) + torch.log2(total)                         # log2(0) = -inf
    lse = lse2 * lse_factor("2", out_base)
    return out.to(v.dtype), lse.float()


def copy_pages(src_view: torch.Tensor, src_ids: torch.Tensor, dst_view: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """``dst_view[:, dst_ids[i]] = src_view[:, src_ids[i]]`` for byte views ``[X, B, P]``, all reads first."""
    dst_view.index_copy_(1, dst_ids, src_view.index_select(1, src_ids))


def zero_pages(view: torch.Tensor, ids: torch.Tensor) -> None:
    view.index_fill_(1, ids, 0)
