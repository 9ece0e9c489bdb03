"""kvlayout's cache-writing calls as torch custom ops, so ``torch.compile(fullgraph=True)`` traces a model
built on kvlayout layers without a graph break and CUDA graphs can capture whole steps.

Ops (``torch.ops.kvlayout.*``; each declares the cache it writes as mutated and has a fake implementation
that only makes output shapes):

- ``attend(q, k, v, kv_cache!, sinks, k_scale, v_scale, num_heads, scale, causal, sliding_window,
  logits_soft_cap, return_lse) -> (out [T, H, D], lse [T, H] or [0])``: ``AttentionLayer.attend``.
- ``mla_attend(q, latent, latent_cache!, kv_lora_rank, scale, return_lse) -> (out, lse)``:
  ``MLALayer.attend``.
- ``write_kv(kv_cache!, k, v, slot_mapping, k_scale, v_scale, backend)``: a backend's K/V write.

``attend`` and ``mla_attend`` take the step's metadata, backend and ``validate`` from the innermost
``step_context`` (a context variable the caller sets around the model call, outside any compiled graph, as
serving engines pass their per-step "forward context"): the traced graph then holds no host integer of
the step, and one compiled graph (or one captured CUDA graph) serves every step whose tensors have its
shapes. ``sliding_window`` 0 and ``logits_soft_cap`` 0.0 mean off (custom ops take no ``None`` scalars).

    with kvl.step_context(meta, backend):
        logits = compiled_model(input_ids, positions)      # each layer calls layer.attend_op(q, k, v)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .errors import KVLayoutError
from .layers import attend_latent, attend_paged
from .metadata import AttentionMetadata, require_validated
from .params import AttentionParams
from .registry import resolve_backend


@dataclass(frozen=True)
class StepContext:
    """What the attention ops of one step read: the step's metadata, the backend, whether to check inputs."""

    meta: AttentionMetadata
    backend: object
    validate: bool = True


_STEP: contextvars.ContextVar[Optional[StepContext]] = contextvars.ContextVar("kvlayout_step", default=None)


@contextlib.contextmanager
def step_context(meta: AttentionMetadata, backend, *, validate: bool = True) -> Iterator[StepContext]:
    """Run the attention ops inside with ``meta`` (from ``build_attention_metadata``) on ``backend`` (a
    backend or its name). ``validate=False`` skips the per-call input checks (the metadata itself was
    checked when it was built)."""
    require_validated(meta)
    if not isinstance(validate, bool):
        raise KVLayoutError(f"validate must be True or False, got {validate!r}")
    ctx = StepContext(meta, resolve_backend(backend, meta.device), validate)
    token = _STEP.set(ctx)
    try:
        yield ctx
    finally:
        _STEP.reset(token)


def current_step(op: str = "kvlayout attention") -> StepContext:
    """The innermost ``step_context``; raises when there is none."""
    ctx = _STEP.get()
    if ctx is None:
        raise KVLayoutError(f"{op} runs inside kvlayout.step_context(meta, backend): open one around the model "
                            f"call with the step's metadata")
    return ctx


@functools.lru_cache(maxsize=1024)
def _params(num_heads: int, num_kv_heads: int, head_size: int, scale: float, causal: bool, sliding_window: int,
            logits_soft_cap: float) -> AttentionParams:
    return AttentionParams(num_heads, num_kv_heads, head_size, scale, causal, sliding_window or None,
                           logits_soft_cap or None)


def _no_lse(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("kvlayout::attend", mutates_args=("kv_cache",))
def attend(q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], kv_cache: torch.Tensor,
           sinks: Optional[torch.Tensor], k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor],
           num_heads: int, scale: float, causal: bool, sliding_window: int, logits_soft_cap: float,
           return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    step = current_step("kvlayout::attend")
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 4:
        raise KVLayoutError(f"kv_cache must be the packed (B, H, N, 2*D) cache, got "
                            f"{tuple(getattr(kv_cache, 'shape', ()))}")
    params = _params(num_heads, kv_cache.shape[1], kv_cache.shape[3] // 2, scale, causal, sliding_window,
                     logits_soft_cap)
    res = attend_paged(q, k, v, kv_cache, step.meta, step.backend, params, sinks=sinks, k_scale=k_scale,
                       v_scale=v_scale, return_lse=return_lse, validate=step.validate)
    return res if return_lse else (res, _no_lse(q))


@attend.register_fake
def _attend_fake(q, k, v, kv_cache, sinks, k_scale, v_scale, num_heads, scale, causal, sliding_window,
                 logits_soft_cap, return_lse):
    lse = q.new_empty(q.shape[:2], dtype=torch.float32) if return_lse else _no_lse(q)
    return torch.empty_like(q), lse


@torch.library.custom_op("kvlayout::mla_attend", mutates_args=("latent_cache",))
def mla_attend(q: torch.Tensor, latent: Optional[torch.Tensor], latent_cache: torch.Tensor, kv_lora_rank: int,
               scale: float, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    step = current_step("kvlayout::mla_attend")
    res = attend_latent(q, latent, latent_cache, step.meta, step.backend, kv_lora_rank, scale,
                        return_lse=return_lse)
    return res if return_lse else (res, _no_lse(q))


@mla_attend.register_fake
def _mla_attend_fake(q, latent, latent_cache, kv_lora_rank, scale, return_lse):
    lse = q.new_empty(q.shape[:2], dtype=torch.float32) if return_lse else _no_lse(q)
    return q.new_empty((q.shape[0], q.shape[1], kv_lora_rank)), lse


@torch.library.custom_op("kvlayout::write_kv", mutates_args=("kv_cache",))
def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], backend: str) -> None:
    resolve_backend(backend, kv_cache.device).write_kv(kv_cache, k, v, slot_mapping, k_scale, v_scale)


@write_kv.register_fake
def _write_kv_fake(kv_cache, k, v, slot_mapping, k_scale, v_scale, backend):
    return None


__all__ = ["StepContext", "attend", "current_step", "mla_attend", "step_context", "write_kv"]
