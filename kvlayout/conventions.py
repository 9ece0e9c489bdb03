"""The attention conventions every kvlayout path shares, each written once: the references, the Triton
kernels (``kvlayout.kernels.softmax`` holds their ``@triton.jit`` twins, built from the constants here)
and the backends that translate them into a library's own convention.

Softmax scale
    Scores are ``(q . k) * scale``; the default scale is ``1 / sqrt(head_size)`` (``default_softmax_scale``).

Soft-cap
    A logits soft-cap ``c > 0`` turns a scaled score ``x`` into ``c * tanh(x / c)`` (``soft_cap``), so every
    score lies in ``(-c, c)``. ``None`` or 0 means off (``soft_cap_value`` normalizes both to ``None``).

Sliding window
    A window of ``W`` tokens includes the query itself: the query at position ``i`` sees the keys at
    positions ``j`` with ``i - W < j``, i.e. from ``window_start(i, W) = max(i - W + 1, 0)`` on (causal
    attention adds ``j <= i``). Example, ``W = 3``: the query at position 5 sees keys 3, 4, 5; the query at
    position 1 sees keys 0, 1. Libraries count the keys *left* of the query instead: ``window_left(W) =
    W - 1`` (FlashInfer's ``window_left``, FlashAttention's ``window_size[0]``).

LSE bases
    A log-sum-exp is kept in one of two bases: ``"e"`` (natural log, what kvlayout's backends and ops
    return) or ``"2"`` (what the Triton kernels compute internally, ``exp2`` being the cheap instruction,
    and what FlashInfer returns). ``log2(x) = ln(x) * LOG2E`` and ``ln(x) = log2(x) * LN2``;
    ``lse_factor(src, dst)`` is the factor that takes an LSE from base ``src`` to base ``dst``. Example: a
    natural-log LSE of 1.0 is ``1.0 * lse_factor("e", "2") = 1.4427`` in base 2.

Non-finite inputs
    Nothing is checked or cleaned on the device. A NaN in a query row makes that row's output and LSE NaN;
    a NaN in the K or V of a key makes the output of every query that sees the key NaN, on every backend
    (a NaN in V may also reach queries of the same request that do not see the key, through ``0 * NaN``
    in the products; queries of other requests are never affected). +-inf follow IEEE arithmetic through
    the same formulas. fp8 caches store NaN as NaN and saturate +-inf (``kvlayout.fp8``).

fp8 K/V scales are in ``kvlayout.fp8``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .errors import KVLayoutError

LOG2E = 1.0 / math.log(2.0)      # log2(e) = 1.4426950408889634: natural-log units -> log2 units
LN2 = math.log(2.0)              # ln(2) = 0.6931471805599453: log2 units -> natural-log units
LSE_BASES = ("e", "2")

Position = Union[int, torch.Tensor]


# ---------------------------------------------------------------------------------------- softmax scale

def default_softmax_scale(head_size: int) -> float:
    """The softmax scale when none is given: ``1 / sqrt(head_size)``."""
    return 1.0 / math.sqrt(head_size)


def softmax_scale(scale, head_size: int) -> float:
    """``scale`` checked (a positive finite number), or the default for ``head_size`` when None."""
    if scale is None:
        return default_softmax_scale(head_size)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise KVLayoutError(f"scale must be a positive number (default 1/sqrt(head_size)), got {scale!r}")
    return float(scale)


# --------------------------------------------------------------------------------------------- soft-cap

def soft_cap_value(logits_soft_cap) -> Optional[float]:
    """The soft-cap to apply: ``None`` or 0 disable it (None); a positive finite number enables it (as a
    float); anything else is refused."""
    if logits_soft_cap is None:
        return None
    if isinstance(logits_soft_cap, bool) or not isinstance(logits_soft_cap, (int, float)) \
            or not math.isfinite(logits_soft_cap) or logits_soft_cap < 0:
        raise KVLayoutError(f"logits_soft_cap must be None or 0 (off) or a positive number, got {logits_soft_cap!r}")
    return float(logits_soft_cap) or None


def soft_cap(scores: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """Scaled scores through the soft-cap: ``cap * tanh(scores / cap)`` (unchanged when ``cap`` is None)."""
    if cap is None:
        return scores
    return cap * torch.tanh(scores / cap)


# --------------------------------------------------------------------------------------- sliding window

def window_start(q_pos: Position, window: int) -> Position:
    """The first key position the query at ``q_pos`` sees through a sliding window of ``window`` tokens
    (itself included): ``max(q_pos - window + 1, 0)``. ``q_pos`` is an int or an integer tensor."""
    lo = q_pos - window + 1
    return lo.clamp_min(0) if isinstance(lo, torch.Tensor) else max(lo, 0)


def window_left(window: Optional[int]) -> Optional[int]:
    """How many keys left of the query's own position a window of ``window`` tokens shows: ``window - 1``
    (None for no window). FlashInfer's ``window_left`` and FlashAttention's left window size."""
    return None if window is None else window - 1


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool, window: Optional[int]) -> torch.Tensor:
    """Which keys each query sees: ``[Q, S]`` bool for query positions ``q_pos [Q, 1]`` and key positions
    ``k_pos [1, S]`` (causal: ``k <= q``; window: ``k >= window_start(q, window)``)."""
    vis = torch.ones(q_pos.shape[0], k_pos.shape[-1], dtype=torch.bool, device=q_pos.device)
    if causal:
        vis &= k_pos <= q_pos
    if window is not None:
        vis &= k_pos >= window_start(q_pos, window)
    return vis


# -------------------------------------------------------------------------------------------- LSE bases

def check_lse_base(base) -> str:
    if base not in LSE_BASES:
        raise KVLayoutError(f"an LSE base is 'e' or '2', got {base!r}")
    return base


def lse_factor(src: str, dst: str) -> float:
    """The factor that takes an LSE from base ``src`` to base ``dst`` ("e" or "2"): ``LOG2E`` for e -> 2,
    ``LN2`` for 2 -> e, 1 for the same base."""
    if check_lse_base(src) == check_lse_base(dst):
        return 1.0
    return LOG2E if src == "e" else LN2
