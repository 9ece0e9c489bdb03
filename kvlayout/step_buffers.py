"""Persistent metadata buffers for CUDA graphs: the step's metadata written in place into tensors that
keep their addresses, padded to sizes fixed at capture, so one captured graph serves every step that fits.

A captured graph replays the exact launches it recorded: the same tensor addresses and the same host
integers (grid sizes, split counts, tile heights). ``StepBuffers.build`` therefore writes each step into
the same device tensors and pads it to the captured ``(num_reqs, num_tokens)``:

- padding requests have no new token and no cached token: ``query_start_loc`` repeats the real total and
  ``seq_lens`` is 0, so no kernel reads a page for them;
- padding slots are -1, so no K/V is written for padding tokens;
- the host integers are those of the padded step (``PaddedStep``), never of the real one.

Worked example: 3 real decodes padded to a decode graph of 4, block size 16, buffers 8 blocks wide::

    query_start_loc = [0, 1, 2, 3, 3]      seq_lens = [17, 5, 40, 0]      slot_mapping = [s0, s1, s2, -1]
    num_decodes = num_actual_tokens = 4,   max_query_len = 1,   max_seq_len = 8 * 16 = 128

The host arrays go to the device from pinned staging memory, one copy per step from a ``BlockTable``
(whose rows are gathered on the device) and two from block ids; no sync: the next build waits only for
the previous copy to have left the staging buffer.
"""

from __future__ import annotations

from typing import Hashable, Optional, Sequence, Union

import numpy as np
import torch

from .block_table import BlockTable
from .errors import KVLayoutError
from .metadata import (AttentionMetadata, PaddedStep, ScheduledRequest, aligned_words, as_device, host_schedule,
                       resolve_group, seal)
from .page_pool import PagePool
from .planner import KVCachePlan
from .values import require_int


class StepBuffers:
    """Device tensors for the metadata of steps of up to ``max_num_reqs`` requests and ``max_num_tokens``
    tokens, each request at most ``max_blocks_per_request`` blocks long (the block table's fixed width).

    ``plan``/``group``/``num_blocks`` name the attention group, as for ``build_attention_metadata``.
    ``build`` returns sealed metadata whose tensors are views of these buffers; building the next step
    overwrites them, so metadata of an earlier step is refused from then on (its seal no longer holds)."""

    def __init__(self, plan: Union[KVCachePlan, int], *, max_num_reqs: int, max_num_tokens: int,
                 max_blocks_per_request: int, device: Union[str, torch.device] = "cpu",
                 num_blocks: Optional[int] = None, group: Optional[int] = None):
        self.block_size, self.num_blocks, self.group = resolve_group(plan, group, num_blocks)
        self.max_num_reqs = require_int(max_num_reqs, "max_num_reqs", minimum=1)
        self.max_num_tokens = require_int(max_num_tokens, "max_num_tokens", minimum=1)
        self.width = require_int(max_blocks_per_request, "max_blocks_per_request", minimum=1)
        if self.width > self.num_blocks:
            raise KVLayoutError(f"max_blocks_per_request={self.width} is more than the cache's {self.num_blocks} "
                                f"blocks")
        self.device = as_device(device)
        r, w = self.max_num_reqs, self.width
        # one int32 buffer on the host (staging) and one on the device, same layout (words):
        #   [ query_start_loc: r+1 | seq_lens: r | table rows of the step: r | slots: int64 pairs | block_table ]
        # so a step from a BlockTable is one copy (counts, rows and slots) and a gather
        self._at_rows = 2 * r + 1
        self._at_slots = aligned_words(3 * r + 1)
        self._at_table = aligned_words(self._at_slots + 2 * self.max_num_tokens)
        words = self._at_table + r * w
        pin = self.device.type == "cuda"
        with torch.inference_mode(False):           # version counters are part of the metadata's seal
            self._dev_words = torch.zeros(words, dtype=torch.int32, device=self.device)
            self._host_words = torch.zeros(words, dtype=torch.int32, pin_memory=pin)
            for buf in (self._dev_words, self._host_words):
                buf[self._at_slots:self._at_table].view(torch.int64).fill_(-1)
        self._copied = torch.cuda.Event() if pin else None
        r1 = r + 1
        self._qsl = self._dev_words[:r1]
        self._seq = self._dev_words[r1:r1 + r]
        self._dev_rows = self._dev_words[self._at_rows:self._at_rows + r]
        self._dev_slots = self._dev_words[self._at_slots:self._at_slots + 2 * self.max_num_tokens].view(torch.int64)
        self._table = self._dev_words[self._at_table:].view(r, w)

    @property
    def max_seq_len(self) -> int:
        """The longest request the buffers hold, in tokens (the padded steps' ``max_seq_len``)."""
        return self.width * self.block_size

    def build(self, requests: Sequence[ScheduledRequest], *, num_reqs: int, num_tokens: int,
              decode_only: bool = False, shared_block_ids: Optional[Sequence[int]] = None,
              pool: Optional[PagePool] = None) -> AttentionMetadata:
        """The step's metadata, checked as ``build_attention_metadata`` checks it, written into the
        buffers and padded to ``num_reqs`` requests and ``num_tokens`` tokens (the sizes of the graph
        that will replay it). ``decode_only``: every request decodes one token, ``num_tokens ==
        num_reqs``, and the whole step takes the backends' decode path."""
        self._check_sizes(num_reqs, num_tokens, decode_only)
        sched = host_schedule(requests, self.block_size, self.num_blocks, max_blocks_per_request=self.width,
                              shared_block_ids=shared_block_ids, group=self.group, pool=pool)
        self._check_fit(sched.num_reqs, sched.num_tokens, sched.num_decodes, sched.qsl, num_reqs, num_tokens,
                        decode_only)
        self._stage(sched, num_reqs, num_tokens)
        return self._finish(sched.num_reqs, sched.num_tokens, num_reqs, num_tokens, decode_only)

    def _check_sizes(self, num_reqs: int, num_tokens: int, decode_only: bool) -> None:
        require_int(num_reqs, "num_reqs", minimum=1)
        require_int(num_tokens, "num_tokens", minimum=1)
        if num_reqs > self.max_num_reqs or num_tokens > self.max_num_tokens:
            raise KVLayoutError(f"padded sizes ({num_reqs} requests, {num_tokens} tokens) exceed the buffers' "
                                f"({self.max_num_reqs} requests, {self.max_num_tokens} tokens); make StepBuffers "
                                f"for the largest captured step")
        if not isinstance(decode_only, bool):
            raise KVLayoutError(f"decode_only must be True or False, got {decode_only!r}")

    @staticmethod
    def _check_fit(n: int, total: int, num_decodes: int, qsl, num_reqs: int, num_tokens: int,
                   decode_only: bool) -> None:
        if n > num_reqs or total > num_tokens:
            raise KVLayoutError(f"the step has {n} requests and {total} tokens, more than the {num_reqs} requests "
                                f"and {num_tokens} tokens it is padded to; pick a larger captured size")
        if decode_only:
            if num_decodes != n:
                raise KVLayoutError(f"decode_only: request {num_decodes} schedules "
                                    f"{int(np.diff(qsl)[num_decodes])} tokens, not one")
            if num_tokens != num_reqs:
                raise KVLayoutError(f"decode_only: pad to as many tokens as requests, got {num_reqs} requests "
                                    f"and {num_tokens} tokens")

    def _finish(self, n: int, total: int, num_reqs: int, num_tokens: int, decode_only: bool) -> AttentionMetadata:
        """The sealed metadata of the padded step just written."""
        if self._copied is not None:
            self._copied.record()
        r1 = num_reqs + 1
        with torch.inference_mode(False):           # views and host copies that keep version counters
            meta = AttentionMetadata(
                block_size=self.block_size, num_blocks=self.num_blocks, query_start_loc=self._qsl[:r1],
                seq_lens=self._seq[:num_reqs], block_table=self._table[:num_reqs],
                slot_mapping=self._dev_slots[:num_tokens], query_start_loc_cpu=self._host_words[:r1].clone(),
                seq_lens_cpu=self._host_words[self.max_num_reqs + 1:][:num_reqs].clone(),
                max_query_len=1 if decode_only else num_tokens, max_seq_len=self.max_seq_len,
                num_decodes=num_reqs if decode_only else 0, num_decode_tokens=num_tokens if decode_only else 0,
                num_actual_tokens=num_tokens, padded=PaddedStep(n, total, decode_only, self))
            return seal(meta)

    def build_from_table(self, table: BlockTable, request_ids: Sequence[Hashable], num_computed: Sequence[int],
                         num_new: Sequence[int], *, num_reqs: int, num_tokens: int, decode_only: bool = False
                         ) -> AttentionMetadata:
        """``build`` for requests whose block ids a ``BlockTable`` holds (checked when they got them): the
        step costs host work per request, not per block. The step's table rows are gathered on the device
        from the table's device copy into these buffers (``table`` must be on the same device, with rows
        as wide as these buffers'); the rest is written and padded as ``build`` does."""
        self._check_sizes(num_reqs, num_tokens, decode_only)
        if not isinstance(table, BlockTable):
            raise KVLayoutError(f"table must be a kvlayout.BlockTable, got {type(table).__name__}")
        if (table.block_size, table.num_blocks, table.width, table.device) != \
                (self.block_size, self.num_blocks, self.width, self.device):
            raise KVLayoutError(f"the block table (block size {table.block_size}, {table.num_blocks} blocks, rows of "
                                f"{table.width}, on {table.device}) does not match these buffers (block size "
                                f"{self.block_size}, {self.num_blocks} blocks, rows of {self.width}, on {self.device})")
        step = table.schedule(request_ids, num_computed, num_new)
        self._check_fit(step.num_reqs, step.num_tokens, step.num_decodes, step.qsl, num_reqs, num_tokens, decode_only)
        if self._copied is not None:
            self._copied.synchronize()              # the previous step's copy has left the staging buffer
        n, total = step.num_reqs, step.num_tokens
        words = self._host_words.numpy()
        self._write_counts(words, step.qsl, step.seq, n, total, num_reqs)
        words[self._at_rows:self._at_rows + n] = step.rows
        end = self._at_slots + 2 * num_tokens
        slots = words[self._at_slots:end].view(np.int64)
        table.slots(step, out=slots[:total])
        slots[total:] = -1
        device_table = table.sync_rows()
        with torch.inference_mode(False):
            self._dev_words[:end].copy_(self._host_words[:end], non_blocking=True)
            torch.index_select(device_table, 0, self._dev_rows[:n], out=self._table[:n])
            if n < num_reqs:
                self._table[n:num_reqs].zero_()      # padding rows name no block
        return self._finish(n, total, num_reqs, num_tokens, decode_only)

    def _stage(self, sched, num_reqs: int, num_tokens: int) -> None:
        """Write the padded arrays into the pinned staging, then copy them to the device (counts and
        slots in one copy, the rows the padded step reads in another)."""
        if self._copied is not None:
            self._copied.synchronize()              # the previous step's copy has left the staging buffer
        n, total = sched.num_reqs, sched.num_tokens
        words = self._host_words.numpy()
        self._write_counts(words, sched.qsl, sched.seq, n, total, num_reqs)
        end = self._at_slots + 2 * num_tokens
        slots = words[self._at_slots:end].view(np.int64)
        slots[:total] = sched.slots
        slots[total:] = -1
        at, rows_end = self._at_table, self._at_table + num_reqs * self.width
        table = words[at:rows_end].reshape(num_reqs, self.width)
        table[:n] = sched.table
        table[n:] = 0
        with torch.inference_mode(False):
            self._dev_words[:end].copy_(self._host_words[:end], non_blocking=True)
            self._dev_words[at:rows_end].copy_(self._host_words[at:rows_end], non_blocking=True)

    def _write_counts(self, ints: np.ndarray, qsl, seq, n: int, total: int, num_reqs: int) -> None:
        """``query_start_loc`` and ``seq_lens`` of the padded step into the staging (padding requests:
        no token, no cached token)."""
        r = self.max_num_reqs
        ints[:n + 1] = qsl
        ints[n + 1:num_reqs + 1] = total
        ints[r + 1:r + 1 + n] = seq
        ints[r + 1 + n:r + 1 + num_reqs] = 0

    def owns(self, meta: AttentionMetadata) -> bool:
        """Whether ``meta`` was built into these buffers."""
        return meta.padded is not None and meta.padded.owner is self


__all__ = ["StepBuffers"]
