"""Per-step attention metadata, built once from the scheduled requests and shared by all layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence, TypeVar, Union

import numpy as np
import torch

from .errors import KVLayoutError
from .planner import KVCachePlan


S = TypeVar("S")


class StepStateCache:
    """Per-step state that a backend makes once from a step's metadata and every layer of the step reuses
    (plan once, run many): FlashInfer's plans, the rocm backend's prefill tile list, FlashAttention-2's
    key offsets.

    Each entry is keyed by a frozen dataclass that its backend defines: the key's type says whose state
    it is (keys of two backends never compare equal, even with equal fields) and its fields say what the
    state depends on besides the step (a tile height, an attention variant). Each backend defines a
    dataclass for the state too; ``get(key, kind)`` checks the entry is of that type. The cache lives on
    the ``AttentionMetadata``, so a new step (new metadata) starts empty::

        plan = meta.step_state.get_or_make(RocmStepKey(block_m), lambda: make_plan(meta, block_m))
    """

    __slots__ = ("_entries",)

    def __init__(self):
        self._entries: dict[Hashable, Any] = {}

    def get(self, key: Hashable, kind: type[S]) -> Optional[S]:
        """The state under ``key`` (None when there is none yet); it must be a ``kind``."""
        state = self._entries.get(key)
        if state is not None and not isinstance(state, kind):
            raise TypeError(f"step state under {key!r} is a {type(state).__name__}, not a {kind.__name__}")
        return state

    def get_or_make(self, key: Hashable, make: Callable[[], S]) -> S:
        """The state under ``key``, made by ``make()`` and kept on first use."""
        if key not in self._entries:
            self._entries[key] = make()
        return self._entries[key]

    def put(self, key: Hashable, state: S) -> S:
        """Keep ``state`` under ``key``, replacing what was there (e.g. a plan made again in another mode)."""
        self._entries[key] = state
        return state

    def states(self, kind: Optional[type[S]] = None) -> list[S]:
        """Every state kept (of type ``kind`` only, when given), in the order they were first made."""
        return [v for v in self._entries.values() if kind is None or isinstance(v, kind)]

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"StepStateCache({', '.join(type(k).__name__ for k in self._entries)})"


@dataclass(frozen=True)
class ScheduledRequest:
    """One request in this step: tokens already in the cache, tokens computed now, its block ids."""

    num_computed_tokens: int
    num_new_tokens: int
    block_ids: Sequence[int]
    request_id: Optional[str] = None


@dataclass
class AttentionMetadata:
    """What every attention layer of one group needs for one step.

    Decode requests (one new token) come first, ``num_decodes`` of them; the rest are the prefill part
    (a request of one token after a prefill is served correctly by the prefill part too). Device tensors:
    ``query_start_loc`` [B+1] int32, ``seq_lens`` [B] int32 (cached + new), ``block_table`` [B, max_blocks]
    int32, ``slot_mapping`` [T] int64 (-1 = do not write). ``step_state`` holds the per-step state that a
    backend makes once (e.g. FlashInfer's ``plan()``) and every layer reuses (``StepStateCache``).
    """

    block_size: int
    num_blocks: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    max_query_len: int
    max_seq_len: int
    num_decodes: int
    num_decode_tokens: int
    num_actual_tokens: int
    step_state: StepStateCache = field(default_factory=StepStateCache, repr=False, compare=False)

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_prefills(self) -> int:
        return self.num_reqs - self.num_decodes

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_actual_tokens - self.num_decode_tokens

    @property
    def device(self) -> torch.device:
        return self.seq_lens.device


def order_decodes_first(requests: Sequence[ScheduledRequest]) -> list[int]:
    """A stable order that puts one-token (decode) requests first; schedule in this order."""
    return sorted(range(len(requests)), key=lambda i: requests[i].num_new_tokens != 1)


def build_attention_metadata(
    requests: Sequence[ScheduledRequest],
    plan: Union[KVCachePlan, int],
    device: Union[str, torch.device] = "cpu",
    *,
    num_blocks: Optional[int] = None,
    max_blocks_per_request: Optional[int] = None,
    pad_tokens_to: Optional[int] = None,
) -> AttentionMetadata:
    """Build the step's metadata. ``plan`` is a ``KVCachePlan`` (its token-indexed group) or a block size
    (then ``num_blocks`` bounds the ids). ``max_blocks_per_request`` fixes the block table width and
    ``pad_tokens_to`` pads ``slot_mapping`` with -1, so buffers keep one shape across steps (CUDA graphs)."""
    if isinstance(plan, KVCachePlan):
        group = plan.attention_group()
        block_size, num_blocks = group.block_size, group.num_blocks
    else:
        block_size = plan
        if num_blocks is None:
            raise KVLayoutError("build_attention_metadata: with a bare block size, pass num_blocks too")
    if not isinstance(block_size, int) or block_size <= 0:
        raise KVLayoutError(f"block size must be a positive integer, got {block_size!r}")
    n = len(requests)
    computed = np.array([r.num_computed_tokens for r in requests], dtype=np.int64)
    new = np.array([r.num_new_tokens for r in requests], dtype=np.int64)
    if (computed < 0).any() or (new < 0).any():
        bad = int(np.nonzero((computed < 0) | (new < 0))[0][0])
        raise KVLayoutError(f"request {bad}: token counts must be >= 0, got computed={computed[bad]}, new={new[bad]}")
    seq = computed + new
    need = -(-seq // block_size)
    have = np.array([len(r.block_ids) for r in requests], dtype=np.int64)
    short = np.nonzero(have < need)[0]
    if short.size:
        i = int(short[0])
        raise KVLayoutError(f"request {i} holds {seq[i]} tokens, which need {need[i]} blocks of {block_size}, "
                            f"but it has {have[i]} block ids; allocate more blocks before scheduling it")
    width = int(max(need.max(initial=0), 1))
    if max_blocks_per_request is not None:
        if max_blocks_per_request < width:
            raise KVLayoutError(f"max_blocks_per_request={max_blocks_per_request} is less than the {width} "
                                f"blocks the longest request needs")
        width = max_blocks_per_request
    if width > num_blocks:
        raise KVLayoutError(f"block table width {width} is longer than the cache ({num_blocks} blocks)")
    table = np.zeros((n, width), dtype=np.int32)
    for i, r in enumerate(requests):
        ids = np.asarray(r.block_ids[:need[i]], dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= num_blocks):
            bad = int(ids[(ids < 0) | (ids >= num_blocks)][0])
            raise KVLayoutError(f"request {i}: block id {bad} is out of range; the cache has blocks 0..{num_blocks - 1}")
        table[i, :ids.size] = ids
    qsl = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(new, out=qsl[1:])
    total = int(qsl[-1])
    # slot of every new token: block_table[req, pos // bs] * bs + pos % bs
    req_of_tok = np.repeat(np.arange(n), new)
    pos = (np.arange(total) - qsl[:-1][req_of_tok] + computed[req_of_tok]) if total else np.zeros(0, np.int64)
    slots = table[req_of_tok, pos // block_size].astype(np.int64) * block_size + pos % block_size
    if pad_tokens_to is not None:
        if pad_tokens_to < total:
            raise KVLayoutError(f"pad_tokens_to={pad_tokens_to} is less than the {total} scheduled tokens")
        slots = np.concatenate([slots, np.full(pad_tokens_to - total, -1, np.int64)])
    num_decodes = 0
    while num_decodes < n and new[num_decodes] == 1:
        num_decodes += 1
    device = torch.device(device)
    pin = device.type == "cuda"

    def to_dev(a, dtype):
        t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
        return (t.pin_memory() if pin else t).to(device, non_blocking=True), t

    qsl_d, qsl_c = to_dev(qsl, torch.int32)
    seq_d, seq_c = to_dev(seq, torch.int32)
    table_d, _ = to_dev(table, torch.int32)
    slot_d, _ = to_dev(slots, torch.int64)
    return AttentionMetadata(
        block_size=block_size, num_blocks=num_blocks, query_start_loc=qsl_d, seq_lens=seq_d,
        block_table=table_d, slot_mapping=slot_d, query_start_loc_cpu=qsl_c, seq_lens_cpu=seq_c,
        max_query_len=int(new.max(initial=0)), max_seq_len=int(seq.max(initial=0)),
        num_decodes=num_decodes, num_decode_tokens=num_decodes, num_actual_tokens=total)
