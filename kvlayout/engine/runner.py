"""A small inference engine over the paged cache: plan -> allocate -> bind, block ids from the page pool,
continuous batching with chunked prefill and decode (decodes first each step), greedy sampling.

One step: schedule (a token budget shared by running requests, then waiting ones), build the metadata once,
run the model once, sample. A request whose blocks run out is preempted (latest admitted first): its
blocks are freed and it is recomputed later from its prompt and the tokens it already produced.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ..allocation import allocate_kv_cache
from ..capabilities import ConnectorWishes
from ..registry import get_attention_backend
from ..errors import KVLayoutError
from ..layers import bind_kv_cache
from ..metadata import ScheduledRequest, order_decodes_first
from ..page_pool import PagePool
from ..block_table import BlockTable
from ..step_buffers import StepBuffers
from .graphs import GraphKey, StepGraphs, default_decode_sizes
from .hf_model import HFCausalLM, build_model
from .tensor_parallel import TensorParallel
from ..planner import plan_kv_cache


@dataclass
class Request:
    """One generation request. ``tokens`` = prompt + output; ``num_computed`` of them have K/V in the cache."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int
    keep_blocks: bool = False            # on finish, hold the blocks until release() (disaggregated prefill)
    output: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    stopped: bool = False                # hit the end-of-sequence token

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def token_slice(self, start: int, stop: int) -> list[int]:
        p = len(self.prompt)
        return (self.prompt[start:min(stop, p)] if start < p else []) + self.output[max(start - p, 0):max(stop - p, 0)]

    @property
    def finished(self) -> bool:
        return self.stopped or len(self.output) >= self.max_new_tokens


@dataclass
class StepResult:
    """What one ``Engine.step()`` did: new tokens per request, requests that finished, sizes and time."""

    new_tokens: dict[str, int]
    finished: list[str]
    num_tokens: int
    num_decodes: int
    num_prefills: int
    seconds: float
    graph: Optional[GraphKey] = None     # the captured size the step replayed (None: it ran eagerly)


class Engine:
    """Model + paged cache + scheduler for one process and one device.

    The cache holds ``num_blocks`` blocks or what fits in ``memory_bytes``; block ids come from a
    ``PagePool`` (``self.pool``). ``block_order(num_blocks)`` may give the pool's initial order (a
    permutation), e.g. to scramble block ids in tests.
    ``validate=False`` skips the attention layers' per-call input checks and their host syncs (the step's
    metadata is still built and checked once per step); then one sync per step remains, for sampling.
    ``connector``: the wishes of the transfer connector that will move this cache's blocks (e.g.
    ``NixlConnector.layout_wishes()``), handed to ``plan_kv_cache``.
    ``compile=True`` runs the model under ``torch.compile(fullgraph=True, dynamic=True)``: each attention
    layer is one ``torch.ops.kvlayout.attend`` op, fed by the step's ``kvlayout.step_context``; a dict
    instead of True gives ``torch.compile`` more keyword arguments (e.g. ``{"backend": "aot_eager"}``).
    ``cuda_graphs=True`` captures whole steps (``kvlayout.engine.graphs``): decode-only steps of
    ``graph_decode_sizes`` requests (default 1, 2, 4, 8, 16, ... up to ``max_num_seqs``) and mixed steps of
    ``graph_mixed_token_sizes`` tokens (default: ``max_num_batched_tokens``) over up to ``max_num_seqs``
    requests; a step is padded to the smallest size that holds it, and one that fits none runs eagerly.
    The attention backend must support capture (``triton``, ``rocm``).
    ``tp``: this process's rank of a tensor-parallel group (``TensorParallel.from_env()`` under torchrun):
    the model is sharded, the cache holds this rank's KV heads, and every rank of the group must make the
    same calls (requests, releases, steps) in the same order, since each step all-reduces across them;
    the tokens each step samples are rank 0's, on every rank.
    """

    def __init__(self, config: Union[dict, str, Path], *, weights: Union[str, Path, None] = None,
                 seed: int = 0, backend: str = "torch", device: Union[str, torch.device] = "cpu",
                 dtype: Optional[torch.dtype] = None, block_size: int = 16, num_blocks: Optional[int] = None,
                 memory_bytes: Optional[int] = None, max_num_batched_tokens: int = 256, max_num_seqs: int = 64,
                 cross_layer: Optional[bool] = None, connector: Optional[ConnectorWishes] = None,
                 eos_token_id: Optional[int] = None,
                 block_order: Optional[Callable[[int], Sequence[int]]] = None, validate: bool = True,
                 compile: Union[bool, dict] = False, cuda_graphs: bool = False,
                 graph_decode_sizes: Optional[Sequence[int]] = None,
                 graph_mixed_token_sizes: Optional[Sequence[int]] = None,
                 tp: Optional[TensorParallel] = None):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise KVLayoutError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if (num_blocks is None) == (memory_bytes is None):
            raise KVLayoutError("give exactly one of num_blocks or memory_bytes for the cache size")
        self.device = torch.device(device)
        if cuda_graphs and self.device.type != "cuda":
            raise KVLayoutError(f"cuda_graphs=True needs a CUDA device, the engine runs on {self.device}")
        self.tp = tp or TensorParallel()
        if self.tp.enabled and cuda_graphs:
            raise KVLayoutError("cuda_graphs=True does not run with tensor parallelism yet (capturing the "
                                "all-reduces is untested); use tp with the eager or the compiled engine")
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model: HFCausalLM = build_model(config, weights=weights, seed=seed, dtype=self.dtype,
                                             block_size=block_size, device=self.device, tp=self.tp)
        specs = self.model.kv_specs
        self.backend = get_attention_backend(backend, self.device, specs)
        if num_blocks is not None:
            memory_bytes = num_blocks * sum(s.page_size_bytes for s in specs.values())
        self.plan = plan_kv_cache(specs, memory_bytes, backend=self.backend, connector=connector,
                                  cross_layer=cross_layer)
        self.caches = allocate_kv_cache(self.plan, self.device)
        bind_kv_cache(self.model.attention_layers(), self.caches)
        if compile:
            self.model.compile_model(self.backend, **(compile if isinstance(compile, dict) else {}))
        group = self.plan.attention_group()
        self.block_size, self.num_blocks, self.group = group.block_size, group.num_blocks, group.index
        self.pool = PagePool(self.plan, order=None if block_order is None else block_order(self.num_blocks),
                             cache=self.caches)
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        # every request holding blocks has a row (running, held for a transfer, or loading remote K/V)
        max_len = int(getattr(self.model.config, "max_position_embeddings", 0) or self.num_blocks * self.block_size)
        self.max_model_len = min(self.num_blocks, self._blocks_for(max_len)) * self.block_size
        self.table = BlockTable(self.plan, group=self.group, max_num_reqs=max(4 * max_num_seqs, 256),
                                max_blocks_per_request=self.max_model_len // self.block_size,
                                max_num_tokens=max_num_batched_tokens, device=self.device, pool=self.pool)
        self._new_blocks: dict[str, list[int]] = {}     # blocks given since the table's rows were last written
        self.eos_token_id = eos_token_id
        self.validate = validate
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.held: dict[str, Request] = {}             # finished with keep_blocks, or loading remote KV
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.graphs: Optional[StepGraphs] = None
        if cuda_graphs:
            self.graphs = self._capture(graph_decode_sizes or default_decode_sizes(max_num_seqs),
                                        graph_mixed_token_sizes or (max_num_batched_tokens,),
                                        max_num_seqs, max_num_batched_tokens)

    def _capture(self, decode_sizes: Sequence[int], mixed_token_sizes: Sequence[int], max_num_seqs: int,
                 max_num_batched_tokens: int) -> StepGraphs:
        self.model.check_backend(self.backend)
        width = self.max_model_len // self.block_size
        buffers = StepBuffers(self.plan, group=self.group, max_num_reqs=max(max_num_seqs, *decode_sizes),
                              max_num_tokens=max(max_num_batched_tokens, *mixed_token_sizes, *decode_sizes),
                              max_blocks_per_request=width, device=self.device)
        graphs = StepGraphs(self.model.run_step, self.backend, buffers, decode_sizes=decode_sizes,
                            mixed_token_sizes=mixed_token_sizes)
        graphs.capture()
        return graphs

    # ---- requests -------------------------------------------------------------------------------
    def _check_request(self, prompt: Sequence[int], max_new_tokens: int, request_id: Optional[str]) -> str:
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise KVLayoutError(f"request id {request_id!r} is already in use")
        if len(prompt) == 0:
            raise KVLayoutError(f"request {request_id!r}: the prompt is empty")
        vocab = self.model.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise KVLayoutError(f"request {request_id!r}: prompt token ids must be in 0..{vocab - 1}")
        if max_new_tokens < 1:
            raise KVLayoutError(f"request {request_id!r}: max_new_tokens must be >= 1, got {max_new_tokens}")
        need = self._blocks_for(len(prompt) + max_new_tokens - 1)
        if need > self.num_blocks:
            raise KVLayoutError(f"request {request_id!r} needs {need} blocks of {self.block_size} tokens, the cache "
                                f"has {self.num_blocks}; give the engine more memory or shorten the request")
        if len(prompt) + max_new_tokens - 1 > self.max_model_len:
            raise KVLayoutError(f"request {request_id!r} holds up to {len(prompt) + max_new_tokens - 1} tokens, more "
                                f"than the engine's longest request ({self.max_model_len} tokens: the model's "
                                f"max_position_embeddings, or the whole cache)")
        return request_id

    def add_request(self, prompt: Sequence[int], max_new_tokens: int, request_id: Optional[str] = None, *,
                    keep_blocks: bool = False) -> str:
        """Queue a request; returns its id. ``keep_blocks``: hold its blocks after it finishes (until
        ``release``), e.g. on a prefill engine whose blocks a decode engine still has to pull."""
        request_id = self._check_request(prompt, max_new_tokens, request_id)
        req = Request(request_id, [int(t) for t in prompt], int(max_new_tokens), keep_blocks)
        self.requests[request_id] = req
        self.waiting.append(req)
        return request_id

    def add_remote_request(self, prompt: Sequence[int], first_token: int, max_new_tokens: int,
                           request_id: str) -> list[int]:
        """Admit a request whose prompt K/V another engine computed: allocate blocks for the prompt and
        return their ids (load the K/V into them), then call ``start_remote``. ``first_token`` is the
        token the other engine sampled; it counts as the first of ``max_new_tokens``."""
        request_id = self._check_request(prompt, max_new_tokens, request_id)
        need = self._blocks_for(len(prompt))
        if need > self.num_free_blocks:
            raise KVLayoutError(f"request {request_id!r} needs {need} free blocks for its prompt, "
                                f"{self.num_free_blocks} are free; retry after requests finish")
        if not 0 <= int(first_token) < self.model.vocab_size:
            raise KVLayoutError(f"first_token {first_token} is not a token id")
        req = Request(request_id, [int(t) for t in prompt], int(max_new_tokens), output=[int(first_token)],
                      num_computed=len(prompt))
        self._grow(req, need)
        self._write_rows()
        self.requests[request_id] = req
        self.held[request_id] = req
        return list(req.block_ids)

    def start_remote(self, request_id: str) -> None:
        """The K/V of a request from ``add_remote_request`` has arrived: schedule its decode."""
        req = self.held.get(request_id)
        if req is None or req.finished:
            raise KVLayoutError(f"request {request_id!r} is not waiting for remote K/V")
        del self.held[request_id]
        self.running.append(req)

    def release(self, request_id: str) -> None:
        """Free the blocks of a held request (finished with ``keep_blocks``, or a remote load given up)."""
        req = self.held.pop(request_id, None)
        if req is None:
            raise KVLayoutError(f"request {request_id!r} holds no blocks")
        self._free(req)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks(self.group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling -----------------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _grow(self, req: Request, num_blocks: int) -> None:
        """Give ``req`` ``num_blocks`` more blocks from the pool, and a row in the block table; the row gets
        them in ``_write_rows`` (one ``append_many`` per step for every request that grew)."""
        if req.request_id not in self.table:
            self.table.add(req.request_id)
        if num_blocks == 0:                          # most decode steps: no pool or table call
            return
        ids = self.pool.allocate(self.group, num_blocks)
        self._new_blocks.setdefault(req.request_id, []).extend(ids)
        req.block_ids += ids

    def _write_rows(self) -> None:
        if self._new_blocks:
            self.table.append_many(list(self._new_blocks), list(self._new_blocks.values()))
            self._new_blocks.clear()

    def _free(self, req: Request) -> None:
        self._new_blocks.pop(req.request_id, None)
        if req.request_id in self.table:
            self.table.remove(req.request_id)
        self.pool.free(self.group, req.block_ids)
        req.block_ids = []

    def _preempt_last(self) -> Request:
        victim = self.running.pop()
        self._free(victim)
        victim.num_computed = 0
        victim.num_preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def _schedule(self) -> list[tuple[Request, int]]:
        """Running requests first (in admission order), then waiting ones while budget and blocks last.
        When a running request needs a block and none is free, the latest admitted request is preempted
        (possibly this one); no new request is admitted in a step that preempted."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            need = self._blocks_for(req.num_computed + n) - len(req.block_ids)
            while need > self.num_free_blocks and self.running[-1] is not req:
                self._preempt_last()
                preempted = True
            if need > self.num_free_blocks:
                self._preempt_last()                  # req itself: everything before it holds the blocks
                preempted = True
                break
            self._grow(req, need)
            scheduled.append((req, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed, budget)
            need = self._blocks_for(req.num_computed + n) - len(req.block_ids)
            if need > self.num_free_blocks:
                break
            self.waiting.popleft()
            self._grow(req, need)
            self.running.append(req)
            scheduled.append((req, n))
            budget -= n
        self._write_rows()
        return scheduled

    # ---- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> StepResult:
        """Schedule, build the metadata once, run the model once, sample greedily."""
        t0 = time.perf_counter()
        scheduled = self._schedule()
        if not scheduled:
            return StepResult({}, [], 0, 0, 0, time.perf_counter() - t0)
        sched = [ScheduledRequest(r.num_computed, n, r.block_ids, r.request_id) for r, n in scheduled]
        order = order_decodes_first(sched)
        scheduled = [scheduled[i] for i in order]
        sched = [sched[i] for i in order]
        ids, pos = [], []
        for req, n in scheduled:
            ids += req.token_slice(req.num_computed, req.num_computed + n)
            pos.append(np.arange(req.num_computed, req.num_computed + n))
        positions = np.concatenate(pos)
        num_decodes = next((i for i, (_, n) in enumerate(scheduled) if n != 1), len(scheduled))
        key = self.graphs.pick(len(sched), len(ids), num_decodes == len(sched)) if self.graphs else None
        step = ([r.request_id for r, _ in scheduled], [r.num_computed for r, _ in scheduled],
                [n for _, n in scheduled])
        if key is not None:
            logits = self.graphs.replay_table(key, self.table, *step, ids, positions)
        else:
            meta = self.table.build(*step)
            input_ids = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
            logits = self.model(input_ids, torch.from_numpy(positions).to(self.device, non_blocking=True), meta,
                                self.backend, validate=self.validate)
        sampled = self.tp.broadcast_(logits.argmax(dim=-1)).tolist()   # every rank goes on with rank 0's
        new_tokens, finished = {}, []
        for (req, n), tok in zip(scheduled, sampled):
            req.num_computed += n
            if req.num_computed < req.num_tokens:
                continue                              # a prefill chunk that does not end the prompt
            req.output.append(tok)
            new_tokens[req.request_id] = tok
            req.stopped = self.eos_token_id is not None and tok == self.eos_token_id
            if req.finished:
                finished.append(req.request_id)
                self.running.remove(req)
                if req.keep_blocks:
                    self.held[req.request_id] = req
                else:
                    self._free(req)
        return StepResult(new_tokens, finished, len(ids), num_decodes, len(sched) - num_decodes,
                          time.perf_counter() - t0, graph=key)

    def run(self, on_step: Optional[Callable[[StepResult], None]] = None) -> None:
        """Step until no request is waiting or running."""
        while self.has_unfinished():
            result = self.step()
            if result.num_tokens == 0:
                raise KVLayoutError("no request could be scheduled (the cache is full of held blocks); "
                                    "release finished requests or give the engine more memory")
            if on_step is not None:
                on_step(result)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy tokens for every prompt, batched continuously; returns the new tokens per prompt."""
        rids = [self.add_request(p, max_new_tokens) for p in prompts]
        self.run()
        return [self.requests[r].output for r in rids]
