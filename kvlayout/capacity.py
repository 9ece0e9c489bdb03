"""What a plan can serve: one long request, or many requests of one context length (never both at once).

Counted as the pool hands pages out: a request holds ``ceil(context / block_size)`` blocks in every
token-indexed group and one state block in every state group. In a page pool a state block is one aligned
large page, and attention pages are carved from large pages, so ``r`` requests fit when
``r * state_groups + ceil(r * attention_pages / k) <= large_pages``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from .errors import KVLayoutError
from .values import require_int

DEFAULT_CONTEXT_TOKENS = 8192


@dataclass(frozen=True)
class Capacity:
    """Capacity of a plan at ``context_tokens`` tokens per request.

    ``concurrent_requests`` and ``max_tokens_one_request`` are alternatives: each can be had alone.
    ``held_bytes_per_request`` is what one request's pages take; ``data_bytes_per_request`` what its K/V
    and states really need; the difference is padding (partial last blocks, state pages rounded up to a
    large page, empty group slots). ``max_tokens_one_request`` is None for a model without attention."""

    context_tokens: int
    concurrent_requests: int
    max_tokens_one_request: Optional[int]
    attention_block_size: Optional[int]
    prefix_granularity_tokens: Optional[int]
    held_bytes_per_request: int
    data_bytes_per_request: int

    @property
    def padding_bytes_per_request(self) -> int:
        return self.held_bytes_per_request - self.data_bytes_per_request

    @property
    def padding_fraction(self) -> float:
        return self.padding_bytes_per_request / max(self.held_bytes_per_request, 1)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["padding_bytes_per_request"] = self.padding_bytes_per_request
        return out


def plan_capacity(plan, context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> Capacity:
    """``plan``: a ``KVCachePlan``. See the module docstring for how requests are counted."""
    if not hasattr(plan, "groups") or not hasattr(plan, "layout"):
        raise KVLayoutError(f"plan_capacity needs a KVCachePlan, got {type(plan).__name__}")
    require_int(context_tokens, "context_tokens", minimum=1)
    specs, groups = plan.specs, plan.groups
    token = [g for g in groups if g.block_size is not None]
    blocks = {g.index: (-(-context_tokens // g.block_size) if g.block_size else 1) for g in groups}
    data = sum(context_tokens * specs[n].token_bytes if g.block_size else specs[n].state_bytes
               for g in groups for n in g.layer_names)
    pool = plan.layout.pool
    if pool is not None:
        k, large = pool.large_page_pages, pool.num_large_pages
        n_state = sum(1 for g in groups if g.block_size is None)
        attn_pages = sum(blocks[g.index] for g in token)
        held = (n_state * k + attn_pages) * pool.num_slots * pool.page_bytes
        r = large * k // (n_state * k + attn_pages)
        while r > 0 and r * n_state + -(-r * attn_pages // k) > large:
            r -= 1
        free_pages = (large - n_state) * k
        max_tokens = _max_tokens(free_pages, [g.block_size for g in token]) if token else None
    else:
        held = sum(blocks[g.index] * g.page_size_bytes * g.num_layers for g in groups)
        r = min(g.num_blocks // blocks[g.index] for g in groups)
        max_tokens = min(g.num_blocks * g.block_size for g in token) if token else None
    sizes = {g.block_size for g in token}
    return Capacity(context_tokens, int(r), max_tokens, min(sizes) if sizes else None,
                    max(sizes) if sizes else None, int(held), int(data))


def _max_tokens(pages: int, block_sizes: list[int]) -> int:
    """Most tokens ``T`` with ``sum(ceil(T / b) for b in block_sizes) <= pages``."""
    lo, hi = 0, pages * max(block_sizes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(-(-mid // b) for b in block_sizes) <= pages:
            lo = mid
        else:
            hi = mid - 1
    return lo

