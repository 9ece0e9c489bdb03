"""A block table kept across steps: each running request owns one row, updated when its blocks change,
so a step's metadata costs host work per request in the step, not per block it holds.

``build_attention_metadata`` reads every block id of every request each step (65,536 ids for 256
requests of 4,096 tokens) and checks them again. ``BlockTable`` instead checks ids once, when a request
gets them (``add``/``append``: in range, not listed twice, not held by another row), keeps them in a host
mirror and a device tensor, and copies to the device only the rows that changed. A step then names its
requests by id with their token counts; the step's table rows are gathered on the device.

Ownership is exclusive: a block is in at most one row. That makes the schedule rules of
``build_attention_metadata`` hold by construction (no block twice in one request, no write into a block
another request reads). Requests that share prefix blocks go through ``build_attention_metadata`` with
``shared_block_ids``.

    table = BlockTable(plan, max_num_reqs=256, max_blocks_per_request=512, device="cuda")
    table.add("a", pool.allocate(group, 4))          # on admission
    table.append("a", pool.allocate(group, 1))       # when it grows past its last block
    meta = table.build(["a"], num_computed=[63], num_new=[1])   # once per step
    table.remove("a")                                # when it finishes (then free its blocks)
"""

from __future__ import annotations

import array
from dataclasses import dataclass
from operator import itemgetter
from typing import Hashable, Optional, Sequence, Union

import numpy as np
import torch

from .errors import KVLayoutError
from .metadata import (AttentionMetadata, aligned_words, as_device, new_token_slots, resolve_group, seal,
                       token_counts)
from .page_pool import PagePool
from .planner import KVCachePlan
from .values import require_int


SYNC_CHUNK = 1 << 16          # (index, id) pairs per host-to-device copy of changed table entries


class BlockTable:
    """Rows of block ids for up to ``max_num_reqs`` requests of up to ``max_blocks_per_request`` blocks.

    With ``pool`` (the ``PagePool`` the ids come from), ``add``/``append`` also check that the attention
    group holds each id. ``build`` writes the step's metadata into persistent buffers (the previous
    step's metadata is refused from then on, as with ``StepBuffers``).

    On a GPU (``staged``, the default there) a step costs one host-to-device copy of its staged metadata
    and one gather of its table rows, plus one copy and one scatter when table entries changed since the
    last step. ``staged=True`` on the CPU runs those same copies between CPU tensors (for tests)."""

    def __init__(self, plan: Union[KVCachePlan, int], *, max_num_reqs: int, max_blocks_per_request: int,
                 max_num_tokens: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                 num_blocks: Optional[int] = None, group: Optional[int] = None, pool: Optional[PagePool] = None,
                 staged: Optional[bool] = None):
        self.block_size, self.num_blocks, self.group = resolve_group(plan, group, num_blocks, pool)
        self.max_num_reqs = require_int(max_num_reqs, "max_num_reqs", minimum=1)
        self.width = require_int(max_blocks_per_request, "max_blocks_per_request", minimum=1)
        self.max_num_tokens = require_int(max_num_tokens if max_num_tokens is not None
                                          else max_num_reqs * self.width * self.block_size, "max_num_tokens",
                                          minimum=1)
        self.device = as_device(device)
        self.pool = pool
        r, w = self.max_num_reqs, self.width
        self._rows: dict[Hashable, int] = {}
        self._free_rows = list(range(r - 1, -1, -1))
        self._host = np.zeros((r, w), dtype=np.int32)            # the table's host mirror
        self._lens = np.zeros(r, dtype=np.int64)                  # blocks per row
        self._owner = np.full(self.num_blocks, -1, dtype=np.int32)
        self._dirty: list[np.ndarray] = []                         # flat indices of entries written
        self._seen = np.zeros(r, dtype=np.int64)                  # scratch of build's duplicate check
        self._order = np.arange(r + 1, dtype=np.int64)
        self._views: dict[tuple[int, int], _StepViews] = {}
        # staged: the metadata is written into host staging and copied to device buffers, and changed table
        # entries are copied to a device table (on a GPU; staged=True runs the same copies on the CPU). On the
        # CPU by default the host mirror is the table and the staging is the metadata: nothing moves.
        self.staged = self.device.type != "cpu" if staged is None else bool(staged)
        pin = self.device.type == "cuda"
        self._at_slots = aligned_words(3 * r + 1)
        words = self._at_slots + 2 * self.max_num_tokens
        self._entries_chunk = min(r * w, SYNC_CHUNK)
        with torch.inference_mode(False):
            self._table = torch.zeros((r, w), dtype=torch.int32, device=self.device) if self.staged else \
                torch.from_numpy(self._host)
            self._step_table = torch.zeros((r, w), dtype=torch.int32, device=self.device)
            # one int32 staging buffer, one copy per step (words):
            #   [ rows of the step: r | query_start_loc: r+1 | seq_lens: r | slots: int64 pairs, from _at_slots ]
            self._host_words = torch.zeros(words, dtype=torch.int32, pin_memory=pin)
            self._dev_words = torch.zeros(words, dtype=torch.int32, device=self.device) if self.staged else \
                self._host_words
            # changed table entries, one copy per chunk: [ flat indices: int64 pairs | block ids: int32 ]
            self._host_entries = torch.zeros(3 * self._entries_chunk, dtype=torch.int32, pin_memory=pin) \
                if self.staged else None
            self._dev_entries = torch.zeros(3 * self._entries_chunk, dtype=torch.int32, device=self.device) \
                if self.staged else None
        self._copied = torch.cuda.Event() if pin else None

    # ---- rows -------------------------------------------------------------------------------------
    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def block_ids(self, request_id: Hashable) -> list[int]:
        """The blocks ``request_id`` holds, in order."""
        row = self._row(request_id)
        return self._host[row, :self._lens[row]].tolist()

    def add(self, request_id: Hashable, block_ids: Sequence[int] = ()) -> None:
        """Give ``request_id`` a row holding ``block_ids`` (checked; nothing changes if refused)."""
        if request_id in self._rows:
            raise KVLayoutError(f"request {request_id!r} already has a row in the block table")
        if not self._free_rows:
            raise KVLayoutError(f"the block table holds {self.max_num_reqs} requests already; remove finished "
                                f"ones or make it with a larger max_num_reqs")
        ids = self._checked(request_id, block_ids, 0)
        row = self._free_rows.pop()
        self._rows[request_id] = row
        self._lens[row] = 0
        self._put(row, ids)

    def append(self, request_id: Hashable, block_ids: Sequence[int]) -> None:
        """Add ``block_ids`` at the end of ``request_id``'s row (checked; nothing changes if refused)."""
        row = self._row(request_id)
        self._put(row, self._checked(request_id, block_ids, int(self._lens[row])))

    def remove(self, request_id: Hashable) -> list[int]:
        """Drop ``request_id``'s row; returns the block ids it held (free them in the pool)."""
        row = self._row(request_id)
        n = int(self._lens[row])
        ids = self._host[row, :n].copy()
        self._owner[ids] = -1
        self._lens[row] = 0
        del self._rows[request_id]
        self._free_rows.append(row)
        return ids.tolist()

    def truncate(self, request_id: Hashable, num_blocks: int) -> list[int]:
        """Keep the first ``num_blocks`` blocks of ``request_id``'s row (e.g. after rejected draft tokens);
        returns the dropped block ids (free them in the pool)."""
        row = self._row(request_id)
        have = int(self._lens[row])
        require_int(num_blocks, "num_blocks", minimum=0)
        if num_blocks > have:
            raise KVLayoutError(f"request {request_id!r} holds {have} blocks, cannot keep {num_blocks}")
        dropped = self._host[row, num_blocks:have].copy()
        self._owner[dropped] = -1
        self._lens[row] = num_blocks
        return dropped.tolist()

    def _row(self, request_id: Hashable) -> int:
        row = self._rows.get(request_id)
        if row is None:
            raise KVLayoutError(f"request {request_id!r} has no row in the block table; add it first")
        return row

    def _checked(self, request_id: Hashable, block_ids, have: int) -> np.ndarray:
        ids = self._as_ids(request_id, block_ids)
        if have + ids.size > self.width:
            raise KVLayoutError(f"request {request_id!r} would hold {have + ids.size} blocks; the table's rows hold "
                                f"{self.width} (max_blocks_per_request)")
        if ids.size:
            self._check_free(ids, f"request {request_id!r}")
        return ids

    @staticmethod
    def _as_ids(request_id: Hashable, block_ids) -> np.ndarray:
        """``block_ids`` as a 1-D int64 array; refuses anything that is not a sequence of integers."""
        try:
            ids = np.asarray(block_ids if not isinstance(block_ids, torch.Tensor) else block_ids.cpu().numpy())
        except (TypeError, ValueError):
            raise KVLayoutError(f"request {request_id!r}: block ids must be a sequence of integers") from None
        if ids.size == 0:
            return np.zeros(0, dtype=np.int64)
        if ids.ndim != 1 or ids.dtype.kind not in "iu" or isinstance(block_ids, (str, bytes)):
            raise KVLayoutError(f"request {request_id!r}: block ids must be a 1-D sequence of integers, got "
                                f"{type(block_ids).__name__} of {ids.dtype}")
        return ids.astype(np.int64)

    def _check_free(self, ids: np.ndarray, who: str) -> None:
        """Refuse ``ids`` (new ids for ``who``, not empty) unless each is in range, listed once, in no row yet
        and, with a pool, held by the group."""
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.num_blocks:
            raise KVLayoutError(f"{who}: block id {lo if lo < 0 else hi} is out of range; the cache has blocks "
                                f"0..{self.num_blocks - 1}")
        if ids.size > 1 and np.unique(ids).size != ids.size:
            raise KVLayoutError(f"{who}: a block id is listed twice in {ids.tolist()[:16]}")
        taken = self._owner[ids] >= 0
        if taken.any():
            b = int(ids[np.argmax(taken)])
            other = next(r for r, row in self._rows.items() if row == self._owner[b])
            raise KVLayoutError(f"{who}: block {b} is already in request {other!r}'s row; a block belongs to one "
                                f"request (shared prefixes go through build_attention_metadata)")
        if self.pool is not None:
            self.pool.check_held(self.group, ids, who)

    def append_many(self, request_ids: Sequence[Hashable], block_ids: Sequence[Sequence[int]]) -> None:
        """``append`` for several requests at once, each listed once: ``block_ids[i]`` go at the end of
        ``request_ids[i]``'s row. All the new ids are checked and written together, so a step in which ``k``
        requests cross a block boundary costs one call instead of ``k``. Nothing changes if refused."""
        n = len(request_ids)
        if len(block_ids) != n:
            raise KVLayoutError(f"{n} request ids but {len(block_ids)} lists of block ids; give one list per request")
        if n <= 1:
            if n:
                self.append(request_ids[0], block_ids[0])
            return
        try:
            rows = np.array(itemgetter(*request_ids)(self._rows), dtype=np.int64)
        except KeyError as e:
            raise KVLayoutError(f"request {e.args[0]!r} has no row in the block table; add it first") from None
        if np.unique(rows).size != n:
            seen: set = set()
            dup = next(r for r in request_ids if r in seen or seen.add(r))
            raise KVLayoutError(f"request {dup!r} is listed twice; give each request's new blocks in one list")
        flat = array.array("q")              # fromlist refuses floats and strings, never truncates
        counts = np.empty(n, dtype=np.int64)
        end = 0
        for i, ids in enumerate(block_ids):
            if type(ids) is list and not any(type(x) is bool for x in ids):
                try:
                    flat.fromlist(ids)
                except TypeError:
                    self._as_ids(request_ids[i], ids)          # raises, naming the request
                    raise
            else:
                flat.frombytes(self._as_ids(request_ids[i], ids).tobytes())
            counts[i], end = len(flat) - end, len(flat)
        have = self._lens[rows]
        over = have + counts > self.width
        if over.any():
            i = int(np.argmax(over))
            raise KVLayoutError(f"request {request_ids[i]!r} would hold {int(have[i] + counts[i])} blocks; the "
                                f"table's rows hold {self.width} (max_blocks_per_request)")
        if not len(flat):
            return
        ids = np.frombuffer(flat, dtype=np.int64)
        try:
            self._check_free(ids, f"requests {list(request_ids)[:8]!r}")
        except KVLayoutError:                        # name the request at fault where one alone is
            ends = np.cumsum(counts)
            for r, e, c in zip(request_ids, ends.tolist(), counts.tolist()):
                if c:
                    self._check_free(ids[e - c:e], f"request {r!r}")
            raise
        # entry k of the new ids goes to row rows_of[k], at column have[...] + its index within its list
        rows_of = np.repeat(rows, counts)
        starts = np.cumsum(counts) - counts
        cols = np.arange(ids.size) - np.repeat(starts - have, counts)
        self._host[rows_of, cols] = ids
        self._lens[rows] = have + counts
        self._owner[ids] = rows_of
        if self.staged:
            self._dirty.append(rows_of * self.width + cols)

    def _put(self, row: int, ids: np.ndarray) -> None:
        n = int(self._lens[row])
        self._host[row, n:n + ids.size] = ids
        self._lens[row] = n + ids.size
        self._owner[ids] = row
        if ids.size and self.staged:
            self._dirty.append(np.arange(row * self.width + n, row * self.width + n + ids.size))

    # ---- one step ---------------------------------------------------------------------------------
    def build(self, request_ids: Sequence[Hashable], num_computed: Sequence[int], num_new: Sequence[int]
              ) -> AttentionMetadata:
        """The step's metadata for ``request_ids`` (decodes first, as ``order_decodes_first`` orders them),
        each with ``num_computed`` tokens in the cache and ``num_new`` computed now. Checked on the host:
        every request has a row, appears once, and holds the blocks its tokens need."""
        step = self.schedule(request_ids, num_computed, num_new)
        v = self._step_views(step.num_reqs, step.num_tokens)
        if self._copied is not None:
            self._copied.synchronize()              # the previous step's copies have left the staging buffers
        v.rows[:] = step.rows
        v.qsl[:] = step.qsl
        v.seq[:] = step.seq
        self.slots(step, out=v.slots)
        return self._upload(v, step)

    def schedule(self, request_ids: Sequence[Hashable], num_computed: Sequence[int], num_new: Sequence[int]
                 ) -> "TableStep":
        """The host side of a step, checked as ``build`` checks it (``build`` and
        ``StepBuffers.build_from_table`` write it out)."""
        n = len(request_ids)
        if not (len(num_computed) == len(num_new) == n):
            raise KVLayoutError(f"{n} request ids, {len(num_computed)} num_computed and {len(num_new)} num_new: "
                                f"give one count of each per request")
        try:
            rows = np.array([self._rows[request_ids[0]]] if n == 1 else itemgetter(*request_ids)(self._rows)
                            if n else (), dtype=np.int64)
        except KeyError as e:
            raise KVLayoutError(f"request {e.args[0]!r} has no row in the block table; add it first") from None
        computed = token_counts(num_computed, lambda i: f"num_computed[{i}]")
        new = token_counts(num_new, lambda i: f"num_new[{i}]")
        if n > 1:                                    # a row listed twice: its later index overwrites the earlier
            order = self._order[:n]
            self._seen[rows] = order
            if (self._seen[rows] != order).any():
                dup = request_ids[int(np.argmax(self._seen[rows] != order))]
                raise KVLayoutError(f"request {dup!r} is listed twice in the step")
        seq = computed + new
        bs = self.block_size
        short = seq > self._lens[rows] * bs
        if short.any():
            i = int(np.argmax(short))
            raise KVLayoutError(f"request {request_ids[i]!r} holds {int(seq[i])} tokens after this step, which need "
                                f"{-(-int(seq[i]) // bs)} blocks of {bs}, but its row has {int(self._lens[rows[i]])}; "
                                f"append blocks first")
        total = int(new.sum())
        if n > self.max_num_reqs or total > self.max_num_tokens:
            raise KVLayoutError(f"the step has {total} tokens; the table's buffers hold {self.max_num_tokens}")
        if total == n and (n == 0 or int(new.min()) == 1):   # decode-only: no cumsum, no search for a prefill
            qsl, num_decodes, max_query_len = self._order[:n + 1], n, int(n > 0)
        else:
            qsl = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(new, out=qsl[1:])
            not_decode = np.flatnonzero(new != 1)
            num_decodes, max_query_len = (int(not_decode[0]) if not_decode.size else n), int(new.max(initial=0))
        return TableStep(rows, computed, new, qsl, seq, n, total, num_decodes, max_query_len,
                         int(seq.max(initial=0)))

    def slots(self, step: "TableStep", out: Optional[np.ndarray] = None) -> np.ndarray:
        """The cache slots of ``step``'s new tokens (into ``out``, int64, if given)."""
        return new_token_slots(self._host, step.rows, step.computed, step.new, step.qsl, self.block_size, out=out)

    def sync_rows(self) -> torch.Tensor:
        """Copy the entries written since the last call to the device table; returns the device table
        ``[max_num_reqs, max_blocks_per_request]`` (int32), whose row ``i`` is request row ``i`` (when not
        ``staged`` it is the host mirror itself). Only the new entries move: a decode step that crosses a block
        boundary for ``k`` requests copies ``k`` (index, id) pairs, not ``k`` rows."""
        if not self._dirty:
            return self._table
        chunk = self._entries_chunk
        flat = np.concatenate(self._dirty) if len(self._dirty) > 1 else self._dirty[0]
        self._dirty.clear()
        stage = self._host_entries.numpy()
        table = self._table.view(-1)
        with torch.inference_mode(False):
            for at in range(0, flat.size, chunk):
                part = flat[at:at + chunk]
                m = part.size
                if self._copied is not None:
                    self._copied.synchronize()      # the last copy has left the staging buffer
                stage[:2 * m].view(np.int64)[:] = part
                stage[2 * m:3 * m] = self._host.reshape(-1)[part]
                dev = self._dev_entries[:3 * m]
                dev.copy_(self._host_entries[:3 * m], non_blocking=True)
                table.index_copy_(0, dev[:2 * m].view(torch.int64), dev[2 * m:])
                if self._copied is not None:
                    self._copied.record()
        return self._table

    def _step_views(self, n: int, total: int) -> "_StepViews":
        """The staging and device views of a step of ``n`` requests and ``total`` tokens (made once per
        size: slicing tensors costs about a microsecond each)."""
        v = self._views.get((n, total))
        if v is None:
            r, at, end = self.max_num_reqs, self._at_slots, self._at_slots + 2 * total
            host, dev = self._host_words, self._dev_words
            words = host.numpy()
            with torch.inference_mode(False):
                v = _StepViews(rows=words[:n], qsl=words[r:r + n + 1], seq=words[2 * r + 1:2 * r + 1 + n],
                               slots=words[at:end].view(np.int64), qsl_cpu=host[r:r + n + 1],
                               seq_cpu=host[2 * r + 1:2 * r + 1 + n], host_used=host[:end], dev_used=dev[:end],
                               dev_rows=dev[:n], dev_qsl=dev[r:r + n + 1], dev_seq=dev[2 * r + 1:2 * r + 1 + n],
                               dev_slots=dev[at:end].view(torch.int64), step_table=self._step_table[:n])
            if len(self._views) >= 4096:
                self._views.clear()
            self._views[(n, total)] = v
        return v

    def _upload(self, v: "_StepViews", step: "TableStep") -> AttentionMetadata:
        table = self.sync_rows()
        with torch.inference_mode(False):
            if self.staged:                                         # else the staging is the metadata
                v.dev_used.copy_(v.host_used, non_blocking=True)
            torch.index_select(table, 0, v.dev_rows, out=v.step_table)
            if self._copied is not None:
                self._copied.record()
            meta = AttentionMetadata(
                block_size=self.block_size, num_blocks=self.num_blocks, query_start_loc=v.dev_qsl,
                seq_lens=v.dev_seq, block_table=v.step_table, slot_mapping=v.dev_slots, query_start_loc_cpu=v.qsl_cpu,
                seq_lens_cpu=v.seq_cpu, max_query_len=step.max_query_len, max_seq_len=step.max_seq_len,
                num_decodes=step.num_decodes, num_decode_tokens=step.num_decodes, num_actual_tokens=step.num_tokens)
            return seal(meta)


@dataclass(slots=True)                                 # not frozen: its __init__ is on the hot path
class TableStep:
    """A step checked against a ``BlockTable``: the requests' table rows, token counts and ``query_start_loc``
    (host arrays), and the host integers of its metadata."""

    rows: np.ndarray
    computed: np.ndarray
    new: np.ndarray
    qsl: np.ndarray
    seq: np.ndarray
    num_reqs: int
    num_tokens: int
    num_decodes: int
    max_query_len: int
    max_seq_len: int


@dataclass(frozen=True)
class _StepViews:
    """Views of ``BlockTable``'s persistent buffers for one step size: numpy views of the staging (written
    by ``build``), the staging tensors the metadata's ``*_cpu`` fields are, and the device views."""

    rows: np.ndarray
    qsl: np.ndarray
    seq: np.ndarray
    slots: np.ndarray
    qsl_cpu: torch.Tensor
    seq_cpu: torch.Tensor
    host_used: torch.Tensor        # the staging words this step uses, and where they go on the device
    dev_used: torch.Tensor
    dev_rows: torch.Tensor
    dev_qsl: torch.Tensor
    dev_seq: torch.Tensor
    dev_slots: torch.Tensor
    step_table: torch.Tensor


__all__ = ["BlockTable", "TableStep"]
