"""Dense attention in plain PyTorch: the math every backend and kernel is checked against."""

from __future__ import annotations

from typing import Optional

import torch

from .conventions import soft_cap as apply_soft_cap
from .conventions import visible


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, q_offset: int,
                    causal: bool = True, sliding_window: Optional[int] = None,
                    soft_cap: Optional[float] = None, sinks: Optional[torch.Tensor] = None,
                    key_mask: Optional[torch.Tensor] = None, score_bias: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [Q, Hq, D]`` over ``k [S, Hkv, D]``, ``v [S, Hkv, Dv]`` in the dtype of the inputs
    (pass float32 or float64). Query t sits at position ``q_offset + t``. Returns ``(out [Q, Hq, Dv],
    lse [Q, Hq])`` with the natural-log LSE of the whole softmax denominator (sink included). Scale, window
    and soft-cap follow ``kvlayout.conventions``. A NaN in ``q``, or in the K or V of a key a query sees,
    makes that query's output NaN (``kvlayout.conventions``, "Non-finite inputs"). ``key_mask [Q, S]`` bool,
    when given, says which keys each query sees instead of ``causal``/``sliding_window`` (tree attention);
    ``score_bias [Hq, Q, S]`` is added to the scaled (and capped) scores (gated decode's gate terms)."""
    nq, hq, _ = q.shape
    s, hk, dv = v.shape
    g = hq // hk
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scores = apply_soft_cap(torch.einsum("qhd,khd->hqk", q, k) * scale, soft_cap)
    if score_bias is not None:
        scores = scores + score_bias
    qpos = torch.arange(nq, device=q.device).unsqueeze(1) + q_offset
    kpos = torch.arange(s, device=q.device).unsqueeze(0)
    seen = key_mask if key_mask is not None else visible(qpos, kpos, causal=causal, window=sliding_window)
    scores = scores.masked_fill(~seen, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(hq, 1, 1).expand(hq, nq, 1)
        lse = torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(scores, dim=-1)
    empty = lse == float("-inf")            # a query that sees no key: output 0, LSE -inf
    probs = torch.exp(scores - torch.where(empty, torch.zeros_like(lse), lse).unsqueeze(-1))
    probs = torch.where(empty.unsqueeze(-1), torch.zeros_like(probs), probs)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, lse.transpose(0, 1)
