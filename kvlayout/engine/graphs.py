"""Whole-step CUDA graphs for the engine: every layer of a model step captured once per padded size and
replayed with new contents in the same buffers.

Sizes: decode-only graphs for batches of ``decode_sizes`` requests (one token each), and mixed graphs
for ``mixed_token_sizes`` tokens over up to ``max_num_reqs`` requests (prefill chunks with decodes). A step
is padded to the smallest captured size that holds it (``StepBuffers`` pads the metadata; the token ids
and positions are padded with 0); a step that fits no captured size runs eagerly. Before each replay the
host only builds the step's metadata into the persistent buffers and copies the token ids: no Python
runs between layers, and no launch choice depends on the step (``PaddedStep``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import torch

from ..block_table import BlockTable
from ..custom_ops import step_context
from ..errors import KVLayoutError
from ..metadata import AttentionMetadata, ScheduledRequest, require_validated
from ..page_pool import PagePool
from ..step_buffers import StepBuffers


@dataclass(frozen=True)
class GraphKey:
    """A captured size: padded requests and tokens, and whether the step is decode-only."""

    num_reqs: int
    num_tokens: int
    decode_only: bool


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    logits: torch.Tensor                   # [num_reqs, vocab], the captured output


def capture_graph(fn: Callable[[], object], pool=None) -> tuple["torch.cuda.CUDAGraph", object]:
    """``(graph, output)`` of one ``fn()`` call captured in a CUDA graph, after two warm-up calls on a side
    stream (they compile kernels and settle lazy state outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def default_decode_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every multiple of 8 up to 64 and of 32 above, up to ``max_num_seqs``."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    sizes += list(range(8, min(max_num_seqs, 64) + 1, 8)) + list(range(96, max_num_seqs + 1, 32))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return tuple(sorted(set(sizes)))


class StepGraphs:
    """Captured steps of ``run(input_ids [T], positions [T], keep [R]) -> logits [R, V]`` (the model's
    forward under a ``step_context``) over one ``StepBuffers``."""

    def __init__(self, run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], backend,
                 buffers: StepBuffers, *, decode_sizes: Sequence[int], mixed_token_sizes: Sequence[int]):
        if buffers.device.type != "cuda":
            raise KVLayoutError(f"CUDA graphs need a CUDA device, the engine runs on {buffers.device}")
        if "cuda_graphs" not in backend.capabilities.features:
            raise KVLayoutError(f"the {backend.name!r} attention backend cannot be captured in CUDA graphs (its "
                                f"launches read per-step host data); use 'triton' or 'rocm', or cuda_graphs=False")
        self.run, self.backend, self.buffers = run, backend, buffers
        b = buffers
        keys = [GraphKey(s, s, True) for s in sorted(set(decode_sizes))]
        keys += [GraphKey(b.max_num_reqs, t, False) for t in sorted(set(mixed_token_sizes))]
        for k in keys:
            if not 1 <= k.num_reqs <= b.max_num_reqs or not 1 <= k.num_tokens <= b.max_num_tokens:
                raise KVLayoutError(f"graph size {k} does not fit the step buffers ({b.max_num_reqs} requests, "
                                    f"{b.max_num_tokens} tokens)")
        self.keys = keys
        self.input_ids = torch.zeros(b.max_num_tokens, dtype=torch.long, device=b.device)
        self.positions = torch.zeros(b.max_num_tokens, dtype=torch.long, device=b.device)
        self._host = torch.zeros(2, b.max_num_tokens, dtype=torch.long, pin_memory=True)
        self._copied = torch.cuda.Event()
        self._graphs: dict[GraphKey, _Captured] = {}
        self.num_replays = 0

    @torch.inference_mode()
    def capture(self, progress: Optional[Callable[[GraphKey], None]] = None) -> None:
        """Capture every size, largest first, into one memory pool. Each capture runs an all-padding
        step (no request, every slot -1), so capturing writes no page of the cache. Runs under
        ``torch.inference_mode``, as the engine's steps do (the attention ops have no backward)."""
        pool = torch.cuda.graph_pool_handle()
        for key in sorted(self.keys, key=lambda k: (k.num_tokens, k.num_reqs), reverse=True):
            meta = self.buffers.build([], num_reqs=key.num_reqs, num_tokens=key.num_tokens,
                                      decode_only=key.decode_only)
            ids, pos = self.input_ids[:key.num_tokens], self.positions[:key.num_tokens]

            def step():
                with step_context(meta, self.backend, validate=False):
                    return self.run(ids, pos, meta.query_start_loc[1:].long() - 1)

            graph, logits = capture_graph(step, pool)
            self._graphs[key] = _Captured(graph, logits)
            if progress is not None:
                progress(key)

    def pick(self, num_reqs: int, num_tokens: int, decode_only: bool) -> Optional[GraphKey]:
        """The smallest captured size that holds the step (None: none does)."""
        fits = [k for k in self._graphs if k.num_reqs >= num_reqs and k.num_tokens >= num_tokens
                and (k.decode_only == decode_only or not k.decode_only)]
        if not fits:
            return None
        return min(fits, key=lambda k: (not k.decode_only if decode_only else False, k.num_tokens, k.num_reqs))

    def replay(self, key: GraphKey, sched: Sequence[ScheduledRequest], input_ids: Sequence[int],
               positions: Sequence[int], pool: Optional[PagePool] = None) -> torch.Tensor:
        """Run the step ``sched`` (token ids and positions of its ``T`` tokens) in the graph of ``key``;
        returns the logits of each request's last token, ``[len(sched), V]`` (a view of the graph's
        output, valid until the next replay)."""
        self._graph(key)
        meta = self.buffers.build(sched, num_reqs=key.num_reqs, num_tokens=key.num_tokens,
                                  decode_only=key.decode_only, pool=pool)
        return self.replay_metadata(key, meta, input_ids, positions)

    def replay_table(self, key: GraphKey, table: BlockTable, request_ids: Sequence[Hashable],
                     num_computed: Sequence[int], num_new: Sequence[int], input_ids: Sequence[int],
                     positions: Sequence[int]) -> torch.Tensor:
        """``replay`` for requests whose block ids ``table`` holds (``StepBuffers.build_from_table``: host
        work per request, not per block)."""
        self._graph(key)
        meta = self.buffers.build_from_table(table, request_ids, num_computed, num_new, num_reqs=key.num_reqs,
                                             num_tokens=key.num_tokens, decode_only=key.decode_only)
        return self.replay_metadata(key, meta, input_ids, positions)

    def replay_metadata(self, key: GraphKey, meta: AttentionMetadata, input_ids: Sequence[int],
                        positions: Sequence[int]) -> torch.Tensor:
        """``replay`` for metadata the caller built into this object's ``buffers`` (the last build):
        metadata of other buffers, of an earlier build, or of other sizes than ``key`` is refused."""
        captured = self._graph(key)
        if not self.buffers.owns(meta):
            raise KVLayoutError("this metadata was not built into these graphs' StepBuffers: the captured "
                                "launches read only their own buffers; build it with graphs.buffers.build")
        require_validated(meta)
        p = meta.padded
        if (meta.num_reqs, meta.num_actual_tokens, p.decode_only) != (key.num_reqs, key.num_tokens, key.decode_only):
            raise KVLayoutError(f"metadata padded to {meta.num_reqs} requests and {meta.num_actual_tokens} tokens "
                                f"(decode_only={p.decode_only}) does not match the captured size {key}")
        total = len(input_ids)
        if len(positions) != total or total != p.num_tokens:
            raise KVLayoutError(f"{total} token ids and {len(positions)} positions for a step of {p.num_tokens} "
                                f"tokens")
        self._copied.synchronize()                    # the last replay's ids have left the staging buffer
        host = self._host.numpy()
        host[0, :total] = input_ids
        host[1, :total] = positions
        host[:, total:key.num_tokens] = 0
        self.input_ids[:key.num_tokens].copy_(self._host[0, :key.num_tokens], non_blocking=True)
        self.positions[:key.num_tokens].copy_(self._host[1, :key.num_tokens], non_blocking=True)
        self._copied.record()
        captured.graph.replay()
        self.num_replays += 1
        return captured.logits[:p.num_reqs]

    def _graph(self, key: GraphKey) -> _Captured:
        captured = self._graphs.get(key)
        if captured is None:
            raise KVLayoutError(f"no graph was captured for {key}; captured: {self.captured}")
        return captured

    @property
    def captured(self) -> list[GraphKey]:
        return sorted(self._graphs, key=lambda k: (k.decode_only, k.num_tokens))
