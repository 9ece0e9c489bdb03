"""What a backend supports, and what a connector wants from the layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import FrozenSet, Optional

import torch

from .specs import AttentionKind, AttentionSpec, KVCacheSpec, MambaSpec, MLASpec, dtype_name, is_fp8

FEATURES = ("non_causal", "sliding_window", "soft_cap", "sinks", "fp8_kv", "lse", "mla", "cross_layer")


@dataclass(frozen=True)
class BackendCapabilities:
    """Declared limits of an attention backend; ``None`` means any value is accepted."""

    name: str
    kv_dtypes: FrozenSet[torch.dtype]
    q_dtypes: FrozenSet[torch.dtype]
    head_sizes: Optional[FrozenSet[int]] = None
    block_sizes: Optional[FrozenSet[int]] = None
    block_size_multiple: int = 1
    features: FrozenSet[str] = field(default_factory=frozenset)
    lse_base: str = "e"                      # base of the log-sum-exp the backend returns

    def block_size_ok(self, block_size: int) -> bool:
        if self.block_sizes is not None and block_size not in self.block_sizes:
            return False
        return block_size % self.block_size_multiple == 0

    def block_size_rule(self) -> str:
        parts = []
        if self.block_sizes is not None:
            parts.append("one of " + ", ".join(map(str, sorted(self.block_sizes))))
        if self.block_size_multiple > 1:
            parts.append(f"a multiple of {self.block_size_multiple}")
        return " and ".join(parts) or "any"

    def problems(self, spec: KVCacheSpec) -> list[str]:
        """Everything about ``spec`` this backend cannot do (empty when it is supported)."""
        out: list[str] = []
        if isinstance(spec, MambaSpec):
            return out                      # state pages are the layer's own business, not attention's
        if isinstance(spec, MLASpec) and "mla" not in self.features:
            out.append("MLA latent caches are not supported")
        if spec.dtype not in self.kv_dtypes:
            out.append(f"KV dtype {dtype_name(spec.dtype)} is not supported "
                       f"(supported: {', '.join(sorted(dtype_name(d) for d in self.kv_dtypes))})")
        if not self.block_size_ok(spec.block_size):
            out.append(f"block_size {spec.block_size} is not supported (must be {self.block_size_rule()})")
        if isinstance(spec, AttentionSpec):
            if self.head_sizes is not None and spec.head_size not in self.head_sizes:
                out.append(f"head_size {spec.head_size} is not supported "
                           f"(supported: {', '.join(map(str, sorted(self.head_sizes)))})")
            if spec.kind != AttentionKind.DECODER and "non_causal" not in self.features:
                out.append(f"{spec.kind.value} (non-causal) attention is not supported")
            if spec.sliding_window is not None and "sliding_window" not in self.features:
                out.append("sliding window is not supported")
            if spec.logits_soft_cap is not None and "soft_cap" not in self.features:
                out.append("logits soft-cap is not supported")
            if spec.has_sinks and "sinks" not in self.features:
                out.append("learned sinks are not supported")
            if is_fp8(spec.dtype) and "fp8_kv" not in self.features:
                out.append("fp8 KV cache is not supported")
        return out


@dataclass(frozen=True)
class ConnectorWishes:
    """What a transfer connector asks of the layout (a connector states its own, e.g.
    ``NixlConnector.layout_wishes()``; ``plan_kv_cache(connector=...)`` takes them).

    ``cross_layer``: True asks for one allocation per group of identical layers (one descriptor per
    block instead of one per layer), None leaves it to the caller. ``block_size``: the block size the
    peer engines use, which must match.
    """

    name: str
    cross_layer: Optional[bool] = None
    block_size: Optional[int] = None
