"""Per-step attention metadata, built once from the scheduled requests and shared by all layers."""

from __future__ import annotations

import array
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence, TypeVar, Union

import numpy as np
import torch

from .checks import check_schedule
from .errors import KVLayoutError
from .values import require_int
from .page_pool import PagePool
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
    """One request in this step: tokens already in the cache, tokens computed now, its block ids (a
    sequence of ints, or a 1-D integer array or tensor; ids past the ones its tokens need are ignored)."""

    num_computed_tokens: int
    num_new_tokens: int
    block_ids: Sequence[int]
    request_id: Optional[str] = None


_SEAL = object()      # marks metadata made (or checked) by this module; see AttentionMetadata.is_validated


@dataclass(frozen=True)
class PaddedStep:
    """Marks metadata built into persistent buffers (``kvlayout.StepBuffers``) and padded to fixed sizes,
    for CUDA-graph capture and replay: ``num_reqs`` requests and ``num_tokens`` tokens are real, the rest
    up to the metadata's shapes is padding (requests of no token and no cached token, slots -1).
    ``decode_only``: every real request decodes one token and the whole step takes the decode path.
    ``owner`` is the ``StepBuffers`` the tensors live in."""

    num_reqs: int
    num_tokens: int
    decode_only: bool
    owner: object = field(repr=False, compare=False)


@dataclass(frozen=True)
class AttentionMetadata:
    """What every attention layer of one group needs for one step; build it with
    ``build_attention_metadata`` (or pass hand-made metadata through ``validate_attention_metadata``).

    Decode requests (one new token) come first, ``num_decodes`` of them; the rest are the prefill part
    (a request of one token after a prefill is served correctly by the prefill part too). Device tensors:
    ``query_start_loc`` [B+1] int32, ``seq_lens`` [B] int32 (cached + new), ``block_table`` [B, max_blocks]
    int32, ``slot_mapping`` [T] int64 (-1 = do not write). ``step_state`` holds the per-step state that a
    backend makes once (e.g. FlashInfer's ``plan()``) and every layer reuses (``StepStateCache``).

    ``padded`` is set on metadata that ``StepBuffers.build`` padded to captured sizes: then the host
    integers describe the padded step, so launch choices depend on the captured sizes only
    (``num_actual_tokens`` = rows of the padded token buffer, ``max_seq_len`` = the buffers' longest
    request, ``max_query_len`` = 1 for a decode-only step and the token count otherwise, ``num_decodes``
    = every request slot of a decode-only step and 0 otherwise).

    The metadata is immutable: its fields are frozen, and the builder records the identity and version
    counter of each tensor it made, so ``is_validated`` turns False when a tensor is edited in place or
    a field is replaced (``dataclasses.replace``). The backends refuse such metadata instead of checking
    its values again on the device (``require_validated``).
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
    padded: Optional[PaddedStep] = None
    _seal: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.query_start_loc, self.seq_lens, self.block_table, self.slot_mapping, self.query_start_loc_cpu,
                self.seq_lens_cpu)

    def _fingerprint(self) -> tuple:
        return tuple((id(t), t._version) for t in self._tensors())

    @property
    def is_validated(self) -> bool:
        """True when this object came from the builder (or the validator) and no tensor of it has been
        changed since: a host-only check of a few integers."""
        seal = self._seal
        return seal is not None and seal[0] is _SEAL and seal[1] == self._fingerprint()

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


def require_validated(meta, what: str = "meta") -> AttentionMetadata:
    """``meta`` if it is metadata the builder made and nobody changed since; raises otherwise."""
    if not isinstance(meta, AttentionMetadata):
        raise KVLayoutError(f"{what} must be AttentionMetadata from build_attention_metadata, got {type(meta).__name__}")
    if not meta.is_validated:
        raise KVLayoutError(f"{what} was not made by build_attention_metadata, or one of its tensors was changed "
                            f"after it was built; build the step's metadata again, or pass hand-made metadata "
                            f"through validate_attention_metadata")
    return meta


def order_decodes_first(requests: Sequence[ScheduledRequest]) -> list[int]:
    """A stable order that puts one-token (decode) requests first; schedule in this order."""
    return sorted(range(len(requests)), key=lambda i: requests[i].num_new_tokens != 1)


def token_counts(values: Sequence, name: Callable[[int], str]) -> np.ndarray:
    """``values`` (token counts, one per request) as an int64 array; refuses a non-integer or a negative
    count, naming it with ``name(i)``."""
    arr = np.array(values)
    if arr.size and (arr.dtype.kind not in "iu" or arr.ndim != 1):
        bad = next(i for i, x in enumerate(values) if isinstance(x, bool) or not isinstance(x, (int, np.integer)))
        raise KVLayoutError(f"{name(bad)} must be an integer, got {values[bad]!r}")
    arr = arr.astype(np.int64, copy=False).reshape(-1)
    if arr.size and arr.min() < 0:
        bad = int(np.nonzero(arr < 0)[0][0])
        raise KVLayoutError(f"{name(bad)}: token counts must be >= 0, got {int(arr[bad])}")
    return arr


def _count_array(requests: Sequence[ScheduledRequest], attr: str) -> np.ndarray:
    return token_counts([getattr(r, attr) for r in requests], lambda i: f"requests[{i}].{attr}")


def new_token_slots(table: np.ndarray, rows: np.ndarray, computed: np.ndarray, new: np.ndarray, qsl: np.ndarray,
                    block_size: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The cache slot (int64) of every new token of the step, packed in request order: request ``r``'s
    token ``i`` sits at position ``p = computed[r] + i`` of the sequence whose blocks are ``table[rows[r]]``,
    so in slot ``table[rows[r], p // block_size] * block_size + p % block_size``. E.g. block size 4, a
    request with blocks ``[7, 2]``, 5 cached and 2 new: positions 5, 6 -> slots ``2*4+1, 2*4+2`` = 9, 10.
    ``out``: an int64 array of the step's token count to write them into (returned)."""
    n = rows.shape[0]
    total = int(qsl[-1])
    if total == n and (n == 0 or int(new.min()) == 1):     # decode-only: one token per request, no repeat
        blocks_of, pos = rows, computed
    else:
        req = np.repeat(np.arange(n), new)
        blocks_of, pos = rows[req], np.arange(total) - qsl[:-1][req] + computed[req]
    out = np.empty(total, dtype=np.int64) if out is None else out
    if block_size & (block_size - 1) == 0:                  # a power of two: shifts and masks
        shift = block_size.bit_length() - 1
        np.left_shift(table[blocks_of, pos >> shift], shift, out=out, dtype=np.int64)
        out += pos & (block_size - 1)
    else:
        np.multiply(table[blocks_of, pos // block_size], block_size, out=out, dtype=np.int64)
        out += pos % block_size
    return out


def _block_id_rows(requests: Sequence[ScheduledRequest], need: np.ndarray, block_size: int) -> np.ndarray:
    """The first ``need[r]`` block ids of every request, concatenated (int64): one pass over the ids."""
    flat = array.array("q")          # fromlist refuses floats and strings, never truncates: strict and fast
    for i, r in enumerate(requests):
        ids = r.block_ids
        if isinstance(ids, torch.Tensor):
            ids = ids.numpy() if ids.device.type == "cpu" else ids.cpu().numpy()
        elif isinstance(ids, (str, bytes)) or not hasattr(ids, "__getitem__") or not hasattr(ids, "__len__"):
            _bad_block_ids(i, r.block_ids)
        if len(ids) < need[i]:
            raise KVLayoutError(f"request {i} holds {r.num_computed_tokens + r.num_new_tokens} tokens, which need "
                                f"{int(need[i])} blocks of {block_size}, but it has {len(ids)}; allocate more blocks "
                                f"before scheduling it")
        row = ids[: need[i]]
        if isinstance(row, np.ndarray):
            if row.ndim != 1 or (row.size and row.dtype.kind not in "iu"):
                _bad_block_ids(i, r.block_ids, row.dtype)
            flat.frombytes(np.ascontiguousarray(row, dtype=np.int64).tobytes())
            continue
        try:
            flat.fromlist(row if isinstance(row, list) else list(row))
        except (TypeError, OverflowError):
            _bad_block_ids(i, r.block_ids, "non-integers")
    return np.frombuffer(flat, dtype=np.int64)


def _bad_block_ids(i: int, ids, what=None):
    raise KVLayoutError(f"requests[{i}].block_ids must be a sequence of integer block ids (list, tuple, range, or "
                        f"a 1-D integer array or tensor), got {type(ids).__name__}" + (f" of {what}" if what else ""))


def resolve_group(plan: Union[KVCachePlan, int], group: Optional[int], num_blocks: Optional[int],
                  pool: Optional[PagePool] = None) -> tuple[int, int, Optional[int]]:
    """``(block size, number of blocks, group index)`` of the attention group metadata is built for: of
    ``plan.groups[group]`` (the plan's one token-indexed group when ``group`` is None), or a bare block
    size with ``num_blocks``."""
    if isinstance(plan, KVCachePlan):
        if group is None:
            gplan = plan.attention_group()
        elif isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < len(plan.groups):
            raise KVLayoutError(f"group {group!r} does not exist; the plan has groups 0..{len(plan.groups) - 1}")
        else:
            gplan = plan.groups[group]
        if gplan.block_size is None:
            raise KVLayoutError(f"group {gplan.index} holds recurrent states, not tokens: attention metadata is "
                                f"built for a group of attention layers")
        group = gplan.index
        block_size, num_blocks = gplan.block_size, gplan.num_blocks
    else:
        block_size = plan
        if num_blocks is None:
            raise KVLayoutError("build_attention_metadata: with a bare block size, pass num_blocks too")
    if pool is not None:
        if not isinstance(pool, PagePool):
            raise KVLayoutError(f"pool must be the PagePool the block ids came from, got {type(pool).__name__}")
        if group is None:
            raise KVLayoutError("build_attention_metadata: with a pool, pass the plan (or the group) too")
    require_int(block_size, "block size", minimum=1)
    require_int(num_blocks, "num_blocks", minimum=1)
    return block_size, num_blocks, group


def build_attention_metadata(
    requests: Sequence[ScheduledRequest],
    plan: Union[KVCachePlan, int],
    device: Union[str, torch.device] = "cpu",
    *,
    num_blocks: Optional[int] = None,
    max_blocks_per_request: Optional[int] = None,
    pad_tokens_to: Optional[int] = None,
    shared_block_ids: Optional[Sequence[int]] = None,
    group: Optional[int] = None,
    pool: Optional[PagePool] = None,
) -> AttentionMetadata:
    """Build the step's metadata, refusing a schedule that would read or write the wrong slots (the rules
    of ``kvlayout.checks.check_schedule``: ids in range, each listed once per request, a block in two
    requests only when declared in ``shared_block_ids``, no write into a block another request reads).

    ``plan`` is a ``KVCachePlan`` (its token-indexed ``group``; the only one when ``group`` is None) or a
    block size (then ``num_blocks`` bounds the ids). With ``pool`` (the ``PagePool`` the ids came from)
    every block id must be a block ``group`` holds now: a freed block, another group's block or a state
    page is refused, naming the group and the block. One metadata per attention group per step.
    ``max_blocks_per_request`` fixes the block table width and ``pad_tokens_to`` pads ``slot_mapping`` with -1, so buffers keep one shape across steps (CUDA graphs). All checks run on the
    host on data the caller passed in; nothing is read back from the device."""
    block_size, num_blocks, group = resolve_group(plan, group, num_blocks, pool)
    sched = host_schedule(requests, block_size, num_blocks, max_blocks_per_request=max_blocks_per_request,
                          shared_block_ids=shared_block_ids, group=group, pool=pool)
    device = as_device(device)
    slots = sched.slots
    total = sched.num_tokens
    if pad_tokens_to is not None:
        if isinstance(pad_tokens_to, bool) or not isinstance(pad_tokens_to, int) or pad_tokens_to < total:
            raise KVLayoutError(f"pad_tokens_to={pad_tokens_to!r} must be an integer, not less than the {total} "
                                f"scheduled tokens")
        slots = np.concatenate([slots, np.full(pad_tokens_to - total, -1, np.int64)])
    return _sealed_metadata(device, block_size, num_blocks, sched.qsl, sched.seq, sched.table, slots,
                            sched.num_decodes, max_query_len=sched.max_query_len, max_seq_len=sched.max_seq_len)


def as_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise KVLayoutError(f"device {device!r} is not a torch device ({e})") from None


@dataclass(frozen=True)
class HostSchedule:
    """A checked schedule as host arrays (int64): ``qsl [n+1]``, ``seq [n]`` (cached + new), ``table [n,
    width]`` (0 past each request's blocks), ``slots [T]``; the leading one-token requests and the maxima."""

    qsl: np.ndarray
    seq: np.ndarray
    table: np.ndarray
    slots: np.ndarray
    num_decodes: int
    max_query_len: int
    max_seq_len: int

    @property
    def num_reqs(self) -> int:
        return self.seq.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.qsl[-1])


def host_schedule(requests: Sequence[ScheduledRequest], block_size: int, num_blocks: int, *,
                  max_blocks_per_request: Optional[int] = None, shared_block_ids: Optional[Sequence[int]] = None,
                  group: Optional[int] = None, pool: Optional[PagePool] = None) -> HostSchedule:
    """The host half of ``build_attention_metadata``: every check, and the arrays it copies to the device."""
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
        raise KVLayoutError(f"requests must be a sequence of ScheduledRequest, got {type(requests).__name__}")
    bad = next((i for i, r in enumerate(requests) if not isinstance(r, ScheduledRequest)), None)
    if bad is not None:
        raise KVLayoutError(f"requests[{bad}] must be a ScheduledRequest, got {type(requests[bad]).__name__}")
    n = len(requests)
    computed = _count_array(requests, "num_computed_tokens")
    new = _count_array(requests, "num_new_tokens")
    seq = computed + new
    need = -(-seq // block_size)
    flat = _block_id_rows(requests, need, block_size)
    width = int(max(need.max(initial=0), 1))
    if max_blocks_per_request is not None:
        require_int(max_blocks_per_request, "max_blocks_per_request", minimum=1)
        if max_blocks_per_request < width:
            raise KVLayoutError(f"max_blocks_per_request={max_blocks_per_request} is less than the {width} "
                                f"blocks the longest request needs")
        width = max_blocks_per_request
    if width > num_blocks:
        raise KVLayoutError(f"block table width {width} is longer than the cache ({num_blocks} blocks)")
    if pool is not None:
        pool.check_held(group, flat, "build_attention_metadata")
    table = np.zeros((n, width), dtype=np.int64)
    table[np.arange(width) < need[:, None]] = flat          # row-major: request r's ids fill its first need[r]
    check_schedule(computed, new, table, num_blocks, block_size, shared_block_ids)

    qsl = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(new, out=qsl[1:])
    slots = new_token_slots(table, np.arange(n), computed, new, qsl, block_size)
    not_decode = np.nonzero(new != 1)[0]
    num_decodes = int(not_decode[0]) if not_decode.size else n
    return HostSchedule(qsl, seq, table, slots, num_decodes, max_query_len=int(new.max(initial=0)),
                        max_seq_len=int(seq.max(initial=0)))


def seal(meta: AttentionMetadata) -> AttentionMetadata:
    """Mark ``meta`` as made by the builder (see ``AttentionMetadata.is_validated``)."""
    object.__setattr__(meta, "_seal", (_SEAL, meta._fingerprint()))
    return meta


def aligned_words(words: int) -> int:
    """``words`` (int32) rounded up to a 16-byte boundary."""
    return -(-words // 4) * 4


def _sealed_metadata(device: torch.device, block_size: int, num_blocks: int, qsl: np.ndarray, seq: np.ndarray,
                     table: np.ndarray, slots: np.ndarray, num_decodes: int, *, max_query_len: int,
                     max_seq_len: int) -> AttentionMetadata:
    """The metadata tensors as views of one int32 buffer, moved to ``device`` in one copy.

    Layout (int32 words) for ``n`` requests, ``T`` slots and a ``width``-wide table::

        [ slots: 2*T (int64 pairs) | query_start_loc: n+1 | seq_lens: n | block_table: n*width ]

    each part starting on a 16-byte boundary (4 words), as a tensor of its own would, so kernels see the
    same pointer alignment on every step. One pinned staging buffer and one host-to-device copy replace
    four of each: on a GPU host every torch call of a step costs microseconds."""
    n, width, total = seq.shape[0], table.shape[1], slots.shape[0]
    at_qsl = aligned_words(2 * total)
    at_seq = aligned_words(at_qsl + n + 1)
    at_table = aligned_words(at_seq + n)
    host = np.zeros(at_table + n * width, dtype=np.int32)
    host[:2 * total].view(np.int64)[:] = slots
    host[at_qsl:at_qsl + n + 1] = qsl
    host[at_seq:at_seq + n] = seq
    host[at_table:].reshape(n, width)[:] = table
    with torch.inference_mode(False):     # inference tensors keep no version counter, which the seal reads
        staged = torch.from_numpy(host)
        if device.type == "cuda":
            staged = staged.pin_memory()
        packed = staged.to(device, non_blocking=True)
        meta = AttentionMetadata(
            block_size=int(block_size), num_blocks=int(num_blocks), query_start_loc=packed[at_qsl:at_qsl + n + 1],
            seq_lens=packed[at_seq:at_seq + n], block_table=packed[at_table:].view(n, width),
            slot_mapping=packed[:2 * total].view(torch.int64), query_start_loc_cpu=staged[at_qsl:at_qsl + n + 1],
            seq_lens_cpu=staged[at_seq:at_seq + n], max_query_len=max_query_len, max_seq_len=max_seq_len,
            num_decodes=num_decodes, num_decode_tokens=num_decodes, num_actual_tokens=int(qsl[-1]))
    return seal(meta)


def validate_attention_metadata(meta: AttentionMetadata, *,
                                shared_block_ids: Optional[Sequence[int]] = None) -> AttentionMetadata:
    """Check metadata made by hand (or edited) with the builder's rules and return a validated copy that
    owns its tensors. Everything is read back to the host once (a device sync), so use it off the hot
    path. Each field must be what ``build_attention_metadata`` would have made for the schedule that
    ``query_start_loc``, ``seq_lens`` and ``block_table`` describe: ``slot_mapping`` the slots of the new
    tokens (then -1 padding), ``num_decodes`` the leading one-token requests, the maxima exact."""
    if not isinstance(meta, AttentionMetadata):
        raise KVLayoutError(f"meta must be AttentionMetadata, got {type(meta).__name__}")
    if meta.padded is not None:
        raise KVLayoutError("padded metadata (StepBuffers) is checked when it is built; build the step again "
                            "with StepBuffers.build instead of validating an edited copy")
    require_int(meta.block_size, "meta.block_size", minimum=1)
    require_int(meta.num_blocks, "meta.num_blocks", minimum=1)
    shapes = {"query_start_loc": 1, "seq_lens": 1, "block_table": 2, "slot_mapping": 1, "query_start_loc_cpu": 1,
              "seq_lens_cpu": 1}
    for name, dim in shapes.items():
        t = getattr(meta, name)
        if not isinstance(t, torch.Tensor) or t.dim() != dim or t.dtype.is_floating_point or t.dtype == torch.bool \
                or t.is_complex():
            raise KVLayoutError(f"meta.{name} must be a {dim}-D integer tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    host = {name: getattr(meta, name).cpu().numpy().astype(np.int64) for name in shapes}
    qsl, seq, table = host["query_start_loc"], host["seq_lens"], host["block_table"]
    n = seq.shape[0]
    if qsl.shape[0] != n + 1 or table.shape[0] != n:
        raise KVLayoutError(f"meta has {n} requests (seq_lens) but query_start_loc has {qsl.shape[0]} entries and "
                            f"block_table {table.shape[0]} rows; they need {n + 1} and {n}")
    if not np.array_equal(host["query_start_loc_cpu"], qsl) or not np.array_equal(host["seq_lens_cpu"], seq):
        raise KVLayoutError("meta.query_start_loc_cpu / seq_lens_cpu differ from their device copies")
    if qsl[0] != 0 or (np.diff(qsl) < 0).any():
        raise KVLayoutError(f"meta.query_start_loc must start at 0 and never decrease, got {qsl.tolist()[:8]}")
    new = np.diff(qsl)
    computed = seq - new
    if (computed < 0).any():
        r = int(np.nonzero(computed < 0)[0][0])
        raise KVLayoutError(f"request {r} computes {int(new[r])} tokens but seq_lens says it holds {int(seq[r])}")
    rebuilt = build_attention_metadata(
        [ScheduledRequest(int(c), int(q), row) for c, q, row in zip(computed, new, table)], meta.block_size,
        meta.device, num_blocks=meta.num_blocks, max_blocks_per_request=max(table.shape[1], 1),
        pad_tokens_to=int(host["slot_mapping"].shape[0]) if host["slot_mapping"].shape[0] >= qsl[-1] else None,
        shared_block_ids=shared_block_ids)
    expect = {"slot_mapping": rebuilt.slot_mapping.cpu().numpy(), "num_actual_tokens": rebuilt.num_actual_tokens,
              "num_decodes": rebuilt.num_decodes, "num_decode_tokens": rebuilt.num_decode_tokens,
              "max_query_len": rebuilt.max_query_len, "max_seq_len": rebuilt.max_seq_len}
    for name, want in expect.items():
        got = host[name] if name in host else getattr(meta, name)
        same = np.array_equal(got, want) if isinstance(want, np.ndarray) else got == want
        if not same:
            shown = got.tolist()[:16] if isinstance(got, np.ndarray) else got
            wanted = want.tolist()[:16] if isinstance(want, np.ndarray) else want
            raise KVLayoutError(f"meta.{name} is {shown} but the schedule it describes needs {wanted}")
    return rebuilt
