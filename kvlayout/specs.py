"""Per-layer cache specs: what one layer needs to store per block, and how many bytes that is."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum
from typing import Mapping, Sequence, Union

import torch

from .conventions import soft_cap_value
from .errors import KVLayoutError
from .values import require_int

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32) + FP8_DTYPES

_DTYPE_NAMES = {
    "auto": None,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2, "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}


def parse_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    """Turn a dtype name such as ``"bf16"`` or ``"fp8_e5m2"`` into a ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES or _DTYPE_NAMES[key] is None:
        known = ", ".join(k for k, v in _DTYPE_NAMES.items() if v is not None)
        raise KVLayoutError(f"unknown dtype {name!r}; use one of: {known}")
    return _DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


class AttentionKind(str, Enum):
    DECODER = "decoder"          # causal self-attention
    ENCODER = "encoder"          # non-causal self-attention
    CROSS = "cross"              # decoder queries over cached encoder K/V (non-causal)


@dataclass(frozen=True)
class AttentionSpec:
    """Packed K/V cache of one attention layer: per block ``(H, N, 2·D)`` of ``dtype``.

    ``sliding_window`` is the number of keys a query sees, itself included (``None`` = all).
    ``logits_soft_cap`` and ``has_sinks`` describe the attention the layer will run, so a backend can
    refuse them when the plan is made rather than mid-step.
    """

    num_kv_heads: int
    head_size: int
    dtype: torch.dtype = torch.bfloat16
    block_size: int = 16
    sliding_window: int | None = None
    kind: AttentionKind = AttentionKind.DECODER
    logits_soft_cap: float | None = None
    has_sinks: bool = False

    def __post_init__(self):
        require_int(self.num_kv_heads, "AttentionSpec.num_kv_heads", minimum=1)
        require_int(self.head_size, "AttentionSpec.head_size", minimum=1)
        require_int(self.block_size, "AttentionSpec.block_size", minimum=1)
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        object.__setattr__(self, "kind", AttentionKind(self.kind))
        if self.dtype not in ATTENTION_DTYPES:
            raise KVLayoutError(
                f"AttentionSpec.dtype {self.dtype} is not a KV-cache dtype; use one of "
                f"{', '.join(dtype_name(d) for d in ATTENTION_DTYPES)}")
        if self.sliding_window is not None:
            require_int(self.sliding_window, "AttentionSpec.sliding_window", minimum=1)
        object.__setattr__(self, "logits_soft_cap", soft_cap_value(self.logits_soft_cap))

    @property
    def causal(self) -> bool:
        return self.kind == AttentionKind.DECODER

    @property
    def token_bytes(self) -> int:
        """Bytes of one token across all KV heads (K and V)."""
        return self.num_kv_heads * 2 * self.head_size * self.dtype.itemsize

    @property
    def page_size_bytes(self) -> int:
        return self.block_size * self.token_bytes

    def block_shape(self) -> tuple[int, ...]:
        """Shape of one block: ``(H, N, 2·D)``."""
        return (self.num_kv_heads, self.block_size, 2 * self.head_size)

    def with_block_size(self, block_size: int) -> "AttentionSpec":
        return replace(self, block_size=block_size)


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention cache: per block ``(1, N, kv_lora_rank + rope_dim)``; no K/V split."""

    kv_lora_rank: int
    rope_dim: int
    dtype: torch.dtype = torch.bfloat16
    block_size: int = 16

    def __post_init__(self):
        require_int(self.kv_lora_rank, "MLASpec.kv_lora_rank", minimum=1)
        require_int(self.rope_dim, "MLASpec.rope_dim", minimum=1)
        require_int(self.block_size, "MLASpec.block_size", minimum=1)
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.dtype not in ATTENTION_DTYPES:
            raise KVLayoutError(f"MLASpec.dtype {self.dtype} is not a KV-cache dtype")

    @property
    def latent_size(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    @property
    def token_bytes(self) -> int:
        return self.latent_size * self.dtype.itemsize

    @property
    def page_size_bytes(self) -> int:
        return self.block_size * self.token_bytes

    def block_shape(self) -> tuple[int, ...]:
        return (1, self.block_size, self.latent_size)

    def with_block_size(self, block_size: int) -> "MLASpec":
        return replace(self, block_size=block_size)


STATE_ALIGN_BYTES = 16   # each Mamba state starts on a 16-byte boundary inside its page


@dataclass(frozen=True)
class StateSlice:
    """Where one named state lives inside a Mamba page."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    byte_offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class MambaSpec:
    """Mamba / linear-attention state: one raw int8 page per block holding every named state.

    ``states`` maps a name to ``(shape, dtype)``, e.g. ``{"conv": ((dim, k - 1), torch.bfloat16),
    "ssm": ((heads, head_dim, d_state), torch.float32)}``. ``pad_to_bytes`` (set by the planner in
    hybrid models) grows the page to a whole large page of the pool.

    ``tp_rows`` says how tensor parallelism cut a state's first dimension, so a connector can slice states
    between engines of different TP sizes: per state, the global row blocks ``((rows, sharded), ...)`` in
    order; a sharded block is split evenly over the ranks (rank ``t`` of ``T`` holds its ``t``-th ``rows /
    T``), a replicated one is held whole by every rank. E.g. a Mamba2 conv state over ``x | B | C`` at TP 2
    with 8 heads of 64 and 2 groups of d_state 128: shape ``(256 + 128 + 128, 3)``, ``tp_rows={"conv":
    ((512, True), (256, True), (256, True)), "ssm": ((8, True),)}``. None: states are not sliced (equal
    shapes on both sides are copied whole).
    """

    states: Mapping[str, tuple[Sequence[int], torch.dtype]]
    pad_to_bytes: int | None = None
    tp_rows: Mapping[str, tuple[tuple[int, bool], ...]] | None = None

    def __post_init__(self):
        if not self.states:
            raise KVLayoutError("MambaSpec.states is empty: give at least one (shape, dtype) state")
        norm = {}
        for name, entry in self.states.items():
            try:
                shape, dtype = entry
                shape = tuple(int(s) for s in shape)
            except (TypeError, ValueError):
                raise KVLayoutError(f"MambaSpec state {name!r} must be (shape, dtype), got {entry!r}") from None
            if not shape or any(s <= 0 for s in shape):
                raise KVLayoutError(f"MambaSpec state {name!r} has a bad shape {shape}; all sizes must be > 0")
            norm[name] = (shape, parse_dtype(dtype))
        object.__setattr__(self, "states", dict(norm))
        if self.tp_rows is not None:
            rows = {}
            for name, blocks in dict(self.tp_rows).items():
                if name not in norm:
                    raise KVLayoutError(f"MambaSpec.tp_rows names {name!r}, which is not a state")
                try:
                    blocks = tuple((int(n), bool(sh)) for n, sh in blocks)
                except (TypeError, ValueError):
                    raise KVLayoutError(f"MambaSpec.tp_rows[{name!r}] must be ((rows, sharded), ...), got "
                                        f"{blocks!r}") from None
                if not blocks or any(n <= 0 for n, _ in blocks):
                    raise KVLayoutError(f"MambaSpec.tp_rows[{name!r}] needs row blocks of at least one row")
                rows[name] = blocks
            object.__setattr__(self, "tp_rows", rows)
        if self.pad_to_bytes is not None and self.pad_to_bytes < self.state_bytes:
            raise KVLayoutError(
                f"MambaSpec.pad_to_bytes={self.pad_to_bytes} is smaller than its states ({self.state_bytes} bytes)")

    def __hash__(self):
        rows = None if self.tp_rows is None else tuple(sorted(self.tp_rows.items()))
        return hash((tuple((k, v[0], v[1]) for k, v in self.states.items()), self.pad_to_bytes, rows))

    def slices(self) -> tuple[StateSlice, ...]:
        """The states in order, each at a 16-byte-aligned offset inside the page."""
        out, offset = [], 0
        for name, (shape, dtype) in self.states.items():
            offset = _round_up(offset, max(STATE_ALIGN_BYTES, dtype.itemsize))
            out.append(StateSlice(name, shape, dtype, offset))
            offset += math.prod(shape) * dtype.itemsize
        return tuple(out)

    @property
    def state_bytes(self) -> int:
        """Bytes the states need (with alignment), before any padding."""
        last = self.slices()[-1]
        return _round_up(last.byte_offset + last.nbytes, STATE_ALIGN_BYTES)

    @property
    def page_size_bytes(self) -> int:
        return self.pad_to_bytes or self.state_bytes

    @property
    def padding_bytes(self) -> int:
        return self.page_size_bytes - self.state_bytes

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8

    def block_shape(self) -> tuple[int, ...]:
        return (1, 1, self.page_size_bytes)

    def padded_to(self, nbytes: int) -> "MambaSpec":
        return replace(self, pad_to_bytes=nbytes)


KVCacheSpec = Union[AttentionSpec, MLASpec, MambaSpec]


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m
