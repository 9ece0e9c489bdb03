"""The interface every attention backend implements, and the input checks they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Union

import torch

from kvlayout.cache_ops import check_kv_cache, write_kv
from kvlayout.capabilities import BackendCapabilities
from kvlayout.checks import check_out_buffer
from kvlayout.errors import KVLayoutError, UnsupportedFeatureError
from kvlayout.fp8 import check_scales
from kvlayout.metadata import AttentionMetadata, require_validated
from kvlayout.params import AttentionParams
from kvlayout.specs import dtype_name, is_fp8

AttentionOutput = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def padded_out(q: torch.Tensor, num_tokens: int, out: Optional[torch.Tensor]) -> torch.Tensor:
    """The output buffer ``[T, H, D]`` of ``q``'s shape and dtype: ``out`` or a new one, with the rows from
    ``num_tokens`` on (padding rows no request owns, e.g. of a CUDA-graph batch) set to 0."""
    out = torch.empty_like(q) if out is None else out
    if out.shape[0] > num_tokens:
        out[num_tokens:].zero_()
    return out


def padded_lse(q: torch.Tensor, num_tokens: int, lse: Optional[torch.Tensor]) -> torch.Tensor:
    """The LSE buffer ``[T, H]`` float32 for ``q``: ``lse`` or a new one, padding rows from ``num_tokens``
    on set to -inf."""
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if lse is None else lse
    if lse.shape[0] > num_tokens:
        lse[num_tokens:].fill_(float("-inf"))
    return lse


def output_buffers(q: torch.Tensor, num_tokens: int, out: Optional[torch.Tensor], lse: Optional[torch.Tensor],
                   want_lse: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(out, lse)`` for a forward that writes the rows of the step's ``num_tokens`` tokens: the caller's
    buffers or new ones (``lse`` only when ``want_lse`` or given), padding rows 0 and -inf."""
    out = padded_out(q, num_tokens, out)
    if want_lse or lse is not None:
        lse = padded_lse(q, num_tokens, lse)
    return out, lse


class AttentionBackend(ABC):
    """A way to run paged attention over the packed views.

    ``forward`` computes attention for the step's mixed batch (decodes first, then prefills) from the
    cache alone; ``write_kv`` appends the step's new K/V first. LSE, when asked for, is ``[T, H]`` float32
    in the base named by ``capabilities.lse_base``.
    """

    name: str = "?"
    capabilities: BackendCapabilities
    kv_writer = staticmethod(write_kv)      # what ``write_kv`` runs: kvlayout's PyTorch write by default

    @classmethod
    def unavailable_reason(cls, device: Optional[torch.device] = None) -> Optional[str]:
        """Why this backend cannot run here (None when it can)."""
        return None

    def check_spec(self, layer_name: str, spec) -> None:
        problems = self.capabilities.problems(spec)
        if problems:
            raise UnsupportedFeatureError(f"backend {self.name!r} cannot serve layer {layer_name!r}: "
                                          + "; ".join(problems))

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                 k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
                 validate: bool = True) -> None:
        self.kv_writer(kv_cache, k, v, slot_mapping, k_scale, v_scale, validate=validate)

    @abstractmethod
    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, params: AttentionParams,
                *, sinks: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None,
                v_scale: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                lse: Optional[torch.Tensor] = None, return_lse: bool = False, validate: bool = True
                ) -> AttentionOutput:
        ...

    def forward_mla(self, q: torch.Tensor, latent_cache: torch.Tensor, meta: AttentionMetadata,
                    kv_lora_rank: int, scale: float, *, causal: bool = True, return_lse: bool = False
                    ) -> AttentionOutput:
        raise UnsupportedFeatureError(f"backend {self.name!r} does not run MLA; use 'torch'")

    def check_forward_mla(self, q, latent_cache, meta, kv_lora_rank: int) -> None:
        """Shape, dtype and metadata checks for ``forward_mla``; raises before any work."""
        if not isinstance(latent_cache, torch.Tensor) or latent_cache.dim() != 4 or latent_cache.shape[1] != 1 \
                or not isinstance(q, torch.Tensor) or q.dim() != 3 or q.shape[2] != latent_cache.shape[3]:
            raise KVLayoutError(f"MLA needs q [T, H, L+R] and a latent cache [B, 1, N, L+R]; got q "
                                f"{tuple(getattr(q, 'shape', ()))} and cache {tuple(getattr(latent_cache, 'shape', ()))}")
        b, _, n, c = latent_cache.shape
        if not 0 < kv_lora_rank < c:
            raise KVLayoutError(f"kv_lora_rank {kv_lora_rank} must be inside the latent size {c}")
        require_validated(meta)
        if q.shape[0] < meta.num_actual_tokens:
            raise KVLayoutError(f"q has {q.shape[0]} tokens but the metadata schedules {meta.num_actual_tokens}")
        if meta.block_size != n or meta.num_blocks > b:
            raise KVLayoutError(f"metadata was built for {meta.num_blocks} blocks of {meta.block_size} tokens, "
                                f"but the latent cache has {b} blocks of {n}")
        if q.device != latent_cache.device or meta.device != latent_cache.device:
            raise KVLayoutError(f"q ({q.device}), metadata ({meta.device}) and latent cache ({latent_cache.device}) "
                                f"must be on one device")
        if not is_fp8(latent_cache.dtype) and q.dtype != latent_cache.dtype:
            raise KVLayoutError(f"q is {dtype_name(q.dtype)} but the latent cache is {dtype_name(latent_cache.dtype)}")

    def check_forward(self, q, kv_cache, meta, params, sinks=None, k_scale=None, v_scale=None, out=None,
                      lse=None) -> None:
        """Shape, dtype and feature checks shared by every backend; raises before any work."""
        caps = self.capabilities
        b, h, n, d = check_kv_cache(kv_cache)
        require_validated(meta)
        if not isinstance(params, AttentionParams):
            raise KVLayoutError(f"params must be AttentionParams, got {type(params).__name__}")
        if (params.num_kv_heads, params.head_size) != (h, d):
            raise KVLayoutError(f"params say {params.num_kv_heads} KV heads of size {params.head_size}, "
                                f"but the cache holds {h} of size {d}")
        if not isinstance(q, torch.Tensor) or q.dim() != 3 or tuple(q.shape[1:]) != (params.num_heads, d):
            raise KVLayoutError(f"q must be [num_tokens, {params.num_heads}, {d}], got {tuple(getattr(q, 'shape', ()))}")
        if q.shape[0] < meta.num_actual_tokens:
            raise KVLayoutError(f"q has {q.shape[0]} tokens but the metadata schedules {meta.num_actual_tokens}")
        if q.device != kv_cache.device or meta.device != kv_cache.device:
            raise KVLayoutError(f"q ({q.device}), metadata ({meta.device}) and cache ({kv_cache.device}) "
                                f"must be on one device")
        if meta.block_size != n or meta.num_blocks > b:
            raise KVLayoutError(f"metadata was built for {meta.num_blocks} blocks of {meta.block_size} tokens, "
                                f"but the cache has {b} blocks of {n}")
        if q.dtype not in caps.q_dtypes:
            raise UnsupportedFeatureError(f"backend {self.name!r} does not take {dtype_name(q.dtype)} queries "
                                          f"(supported: {', '.join(sorted(map(dtype_name, caps.q_dtypes)))})")
        if kv_cache.dtype not in caps.kv_dtypes:
            raise UnsupportedFeatureError(f"backend {self.name!r} does not read a {dtype_name(kv_cache.dtype)} cache")
        if not is_fp8(kv_cache.dtype) and kv_cache.dtype != q.dtype:
            raise KVLayoutError(f"q is {dtype_name(q.dtype)} but the cache is {dtype_name(kv_cache.dtype)}")
        if caps.head_sizes is not None and d not in caps.head_sizes:
            raise UnsupportedFeatureError(f"backend {self.name!r} does not support head size {d}")
        if not caps.block_size_ok(n):
            raise UnsupportedFeatureError(f"backend {self.name!r} needs block size {caps.block_size_rule()}, got {n}")
        wanted = {"non_causal": not params.causal, "sliding_window": params.sliding_window is not None,
                  "soft_cap": params.logits_soft_cap is not None, "sinks": sinks is not None,
                  "fp8_kv": is_fp8(kv_cache.dtype), "lse": lse is not None,
                  "padded_steps": meta.padded is not None}
        missing = [f for f, on in wanted.items() if on and f not in caps.features]
        if missing:
            raise UnsupportedFeatureError(f"backend {self.name!r} does not support: {', '.join(missing)}")
        if sinks is not None and sinks.device != kv_cache.device:
            raise KVLayoutError(f"sinks are on {sinks.device} but the cache is on {kv_cache.device}")
        if sinks is not None and (sinks.shape != (params.num_heads,) or sinks.dtype != torch.float32):
            raise KVLayoutError(f"sinks must be float32 [{params.num_heads}], got {sinks.dtype} {tuple(sinks.shape)}")
        check_scales(k_scale, v_scale, kv_cache.dtype, h, kv_cache.device)
        check_out_buffer(out, tuple(q.shape), q.dtype, q.device, "out")
        check_out_buffer(lse, tuple(q.shape[:2]), torch.float32, q.device, "lse")
