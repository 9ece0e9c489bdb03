"""What one attention call computes, independent of where its cache lives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .conventions import soft_cap_value, softmax_scale
from .errors import KVLayoutError
from .values import require_int


@dataclass(frozen=True)
class AttentionParams:
    """Head counts and the attention variant, in the conventions of ``kvlayout.conventions``.

    ``scale`` defaults to ``1 / sqrt(head_size)``. ``sliding_window`` W: query at position i sees keys j
    with ``i - W < j`` (W keys, itself included, when causal). ``logits_soft_cap`` c: scores become
    ``c * tanh(s / c)`` after scaling (None or 0 = off).
    """

    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: Optional[float] = None
    causal: bool = True
    sliding_window: Optional[int] = None
    logits_soft_cap: Optional[float] = None

    def __post_init__(self):
        for name in ("num_heads", "num_kv_heads", "head_size"):
            object.__setattr__(self, name, require_int(getattr(self, name), f"AttentionParams.{name}", minimum=1))
        if self.num_heads % self.num_kv_heads:
            raise KVLayoutError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}; "
                                f"GQA needs each KV head shared by the same number of query heads")
        object.__setattr__(self, "scale", softmax_scale(self.scale, self.head_size))
        if not isinstance(self.causal, bool):
            raise KVLayoutError(f"AttentionParams.causal must be True or False, got {self.causal!r}")
        w = self.sliding_window
        if w is not None:
            object.__setattr__(self, "sliding_window", require_int(w, "sliding_window (tokens seen, the query "
                                                                   "included, or None)", minimum=1))
        object.__setattr__(self, "logits_soft_cap", soft_cap_value(self.logits_soft_cap))

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads
