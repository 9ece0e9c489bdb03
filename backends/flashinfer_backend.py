"""FlashInfer attention backend over the packed views.

FlashInfer reads the packed cache ``(B, H, N, 2·D)`` as it is: ``(kv[..., :D], kv[..., D:])`` with
``kv_layout="HND"``; the two views carry the cache's own strides (cross-layer block strides and storage
offsets included), so nothing is copied. Per step and per attention variant (heads, scale, window,
soft-cap, dtypes, sinks) one plan (``FlashInferStepPlan``) is made from the shared metadata and kept in
``meta.step_state``; every layer with the same variant reuses it. The decode part (the ``meta.num_decodes`` leading
requests) runs through ``BatchDecodeWithPagedKVCacheWrapper`` (CUDA cores, or tensor cores for wide
GQA groups), the rest through ``BatchPrefillWithPagedKVCacheWrapper`` (fa3 on Hopper, fa2 elsewhere).
Layers with learned sinks run both parts through FlashInfer's attention-sink variant.

FlashInfer is imported lazily, so kvlayout imports and the other backends work without it. LSE is
returned in natural log (FlashInfer computes base 2; it is converted here). fp8 scales are applied
on the query (K) and the output (V) (``kvlayout.fp8``), so per-tensor and per-head scales cost no host
sync.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from kvlayout.cache_ops import check_write_kv, write_kv
from kvlayout import conventions
from kvlayout.capabilities import FEATURES, BackendCapabilities
from kvlayout.errors import BackendUnavailableError, KVLayoutError, UnsupportedFeatureError
from kvlayout.fp8 import apply_v_scale_, fold_k_scale_into_query
from kvlayout.metadata import AttentionMetadata
from kvlayout.params import AttentionParams
from kvlayout.specs import AttentionSpec, MLASpec, dtype_name, is_fp8

from .base import AttentionBackend, AttentionOutput, output_buffers

INSTALL_HINT = 'pip install "kvlayout[flashinfer]"'
WORKSPACE_BYTES = 256 << 20
# Decode runs on tensor cores when this many query heads (or more) share one KV head. H200, 8 KV heads of 128,
# bf16, TB/s CUDA cores / tensor cores (tools/bench_flashinfer.py), batch 64 x 4096: group 1 4.37/4.28,
# 2 4.21/4.27, 4 2.82/4.26, 8 1.59/4.25; batch 256 x 512: 4.12/3.85, 3.87/3.83, 2.92/3.80, 1.63/3.74.
TENSOR_CORE_MIN_GROUP = 4

FLASHINFER_CAPABILITIES = BackendCapabilities(
    name="flashinfer",
    kv_dtypes=frozenset({torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}),
    q_dtypes=frozenset({torch.float16, torch.bfloat16}),
    head_sizes=frozenset({64, 128, 256}),
    features=frozenset(FEATURES),
    lse_base="e",
)


def _flashinfer():
    try:
        import flashinfer
    except ImportError as e:
        raise BackendUnavailableError(f"FlashInfer is not installed ({e}); install it with: {INSTALL_HINT}") from e
    return flashinfer


def window_left(params: AttentionParams) -> int:
    """FlashInfer's ``window_left`` for our ``sliding_window`` W (query i sees keys j > i - W):
    ``conventions.window_left(W) = W - 1``; -1 means no window."""
    left = conventions.window_left(params.sliding_window)
    return -1 if left is None else left


@dataclass(frozen=True)
class Variant:
    """Everything a FlashInfer plan depends on besides the step's sequences. Layers whose variant is
    equal share one plan per step."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    scale: float
    causal: bool
    window_left: int
    soft_cap: float                 # 0.0 = off
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    sinks: bool

    @classmethod
    def of(cls, params: AttentionParams, block_size: int, q_dtype: torch.dtype, kv_dtype: torch.dtype,
           sinks: bool) -> "Variant":
        return cls(params.num_heads, params.num_kv_heads, params.head_size, block_size, float(params.scale),
                   bool(params.causal), window_left(params), float(params.logits_soft_cap or 0.0), q_dtype,
                   kv_dtype, bool(sinks))

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class PagedInputs:
    """FlashInfer's CSR page table for some requests of a step: ``indptr`` and ``last_page_len`` on
    the host (plan() reads them there), ``indices`` on the device (gathered from the block table)."""

    indptr: torch.Tensor            # int32 [n + 1], host
    indices: torch.Tensor           # int32 [indptr[-1]], device
    last_page_len: torch.Tensor     # int32 [n], host
    seq_lens: np.ndarray            # int64 [n]


def paged_inputs(meta: AttentionMetadata, reqs: np.ndarray) -> PagedInputs:
    """Page table of requests ``reqs`` (indices into the step's requests, each with >= 1 token)."""
    bs = meta.block_size
    seq = meta.seq_lens_cpu.numpy().astype(np.int64)[reqs]
    pages = (seq + bs - 1) // bs
    indptr = np.zeros(len(reqs) + 1, dtype=np.int64)
    np.cumsum(pages, out=indptr[1:])
    last = seq - (pages - 1) * bs
    width = meta.block_table.shape[1]
    # entry j of request i's pages is block_table[reqs[i], j], at flat index reqs[i] * width + j; page k of
    # the packed list is entry k - indptr[i] of the request i it falls in. E.g. reqs [0, 2], pages [1, 2],
    # width 4: indptr [0, 1, 3], flat = [0 - 0, 8 - 1, 8 - 1] + [0, 1, 2] = [0, 8, 9]. O(pages), not
    # O(requests x width): CUDA-graph tables are as wide as the longest request allowed.
    base = (reqs.astype(np.int32) * np.int32(width) - indptr[:-1].astype(np.int32))
    flat = np.repeat(base, pages) + np.arange(int(indptr[-1]), dtype=np.int32)
    flat_dev = torch.from_numpy(flat).to(meta.block_table.device, non_blocking=True)
    indices = meta.block_table.reshape(-1).index_select(0, flat_dev)
    return PagedInputs(torch.from_numpy(indptr.astype(np.int32)), indices,
                       torch.from_numpy(last.astype(np.int32)), seq)


class _Slot:
    """One FlashInfer wrapper, made once, and the part it is currently planned for."""

    __slots__ = ("wrapper", "planned", "capacity")

    def __init__(self, wrapper, capacity: int = 0):
        self.wrapper, self.planned, self.capacity = wrapper, None, capacity


@dataclass(frozen=True, eq=False)
class _Part:
    """One wrapper's share of a step: query rows ``[t0, t1)`` and the plan() call that sets it up."""

    slot: _Slot
    t0: int
    t1: int
    takes_sinks: bool               # the sink variant: run() takes the sinks as an extra input
    plan_args: tuple
    plan_kwargs: dict

    def ensure_planned(self, capturing: bool) -> None:
        if self.slot.planned is self:
            return
        if capturing:
            raise KVLayoutError("flashinfer: a wrapper was re-planned for another step while a CUDA graph is "
                                "being captured; call backend.plan(meta, ...) for this step before capture")
        self.slot.wrapper.plan(*self.plan_args, **self.plan_kwargs)
        self.slot.planned = self


@dataclass(frozen=True, eq=False)
class FlashInferStepPlan:
    """One step's plan for one attention variant (or one MLA configuration): the wrappers' shares of the
    step's query rows, each with the plan() call that sets its wrapper up for this step. Made once per step
    and reused by every layer of the variant; a part whose wrapper was re-planned for another step since is
    planned again on use (never during CUDA-graph capture)."""

    parts: tuple[_Part, ...] = ()
    cuda_graph: bool = False        # planned for CUDA-graph replay (wrappers with fixed buffers)


@dataclass(frozen=True)
class FlashInferStepKey:
    """Key of a ``FlashInferStepPlan`` in ``meta.step_state``: which backend instance (its wrappers) and
    which attention variant."""

    backend: int                    # id() of the FlashInferBackend
    variant: Variant


@dataclass(frozen=True)
class FlashInferMLAKey:
    """Key of an MLA ``FlashInferStepPlan`` in ``meta.step_state``."""

    backend: int                    # id() of the FlashInferBackend
    num_heads: int
    kv_lora_rank: int
    latent_size: int                # kv_lora_rank + rope dim
    scale: float
    causal: bool
    q_dtype: torch.dtype


def canonical_strides(t: torch.Tensor) -> torch.Tensor:
    """The same view with every size-1 dim given the stride a dense tensor would have there (FlashInfer
    reads strides of all dims; a degenerate one, e.g. the head stride when ``num_kv_heads == 1``, may
    be anything in torch). Returns ``t`` itself when nothing needs changing."""
    strides = list(t.stride())
    changed = False
    for i in range(t.dim() - 2, -1, -1):
        if t.shape[i] == 1:
            natural = strides[i + 1] * t.shape[i + 1]
            if strides[i] != natural:
                strides[i], changed = natural, True
    return t.as_strided(t.shape, strides, t.storage_offset()) if changed else t


def packed_kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, V)`` views ``(B, H, N, D)`` of the packed cache, as FlashInfer's HND tuple."""
    d = kv_cache.shape[-1] // 2
    return canonical_strides(kv_cache[..., :d]), canonical_strides(kv_cache[..., d:])


class FlashInferBackend(AttentionBackend):
    """FlashInfer over the packed views; see the module docstring.

    ``prefill_backend``: "auto" (fa3 on Hopper for 16-bit caches, else fa2), "fa2" or "fa3".
    ``decode_tensor_cores``: None picks by GQA group size (tensor cores from ``TENSOR_CORE_MIN_GROUP``).
    ``append``: how ``write_kv`` appends K/V: "auto" (the Triton kernel where available, else
    kvlayout's ``write_kv``), "torch", "triton" or "flashinfer" (FlashInfer's ``append_paged_kv_cache``;
    16-bit caches, no -1 slots). Measured on the same packed views (H200, 64k tokens, 8 KV heads of 128,
    bf16, bytes read + written): Triton 3.91 TB/s, FlashInfer 3.66, kvlayout's torch write_kv 0.55; the
    Triton kernel also skips -1 slots and quantizes fp8, so "auto" takes it.
    """

    name = "flashinfer"
    capabilities = FLASHINFER_CAPABILITIES

    def __init__(self, prefill_backend: str = "auto", decode_tensor_cores: Optional[bool] = None,
                 append: str = "auto", workspace_bytes: int = WORKSPACE_BYTES):
        if prefill_backend not in ("auto", "fa2", "fa3"):
            raise KVLayoutError(f"prefill_backend must be 'auto', 'fa2' or 'fa3', got {prefill_backend!r}")
        if append not in ("auto", "torch", "triton", "flashinfer"):
            raise KVLayoutError(f"append must be 'auto', 'torch', 'triton' or 'flashinfer', got {append!r}")
        self.prefill_backend = prefill_backend
        self.decode_tensor_cores = decode_tensor_cores
        self.append = append
        self.workspace_bytes = workspace_bytes
        self._workspaces: dict[torch.device, torch.Tensor] = {}
        self._slots: dict[tuple, _Slot] = {}
        self._append_ids: dict[tuple, tuple] = {}

    # ---- availability and refusals -------------------------------------------------------------

    @classmethod
    def unavailable_reason(cls, device: Optional[torch.device] = None) -> Optional[str]:
        try:
            installed = importlib.util.find_spec("flashinfer") is not None
        except (ImportError, ValueError):
            installed = False
        if not installed:
            return f"FlashInfer is not installed; install it with: {INSTALL_HINT}"
        if device is not None and torch.device(device).type != "cuda":
            return f"FlashInfer runs on CUDA GPUs only, not on {device}"
        if not torch.cuda.is_available():
            return "FlashInfer needs a CUDA GPU and none is visible"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"FlashInfer needs compute capability 8.0 or newer, this GPU has {major}.{minor}"
        return None

    def check_spec(self, layer_name: str, spec) -> None:
        super().check_spec(layer_name, spec)
        if isinstance(spec, AttentionSpec) and spec.has_sinks and spec.logits_soft_cap is not None:
            raise UnsupportedFeatureError(
                f"backend 'flashinfer' cannot serve layer {layer_name!r}: FlashInfer's attention-sink variant has "
                f"no logits soft-cap; use the 'triton' or 'torch' backend for sinks together with soft-cap")
        if isinstance(spec, MLASpec):
            self._check_mla_dims(spec.kv_lora_rank, spec.rope_dim, spec.dtype)

    @staticmethod
    def _check_mla_dims(rank: int, rope: int, dtype: torch.dtype) -> None:
        if rank % 128 or rope % 64 or dtype not in (torch.float16, torch.bfloat16):
            raise UnsupportedFeatureError(
                f"backend 'flashinfer' runs MLA for fp16/bf16 latents with kv_lora_rank a multiple of 128 and "
                f"rope_dim a multiple of 64; got {dtype_name(dtype)}, kv_lora_rank={rank}, rope_dim={rope}")

    def check_forward(self, q, kv_cache, meta, params, sinks=None, k_scale=None, v_scale=None, out=None,
                      lse=None) -> None:
        """The shared checks, plus FlashInfer's: no sinks with soft-cap, contiguous out/lse."""
        super().check_forward(q, kv_cache, meta, params, sinks, k_scale, v_scale, out, lse)
        if sinks is not None and params.logits_soft_cap is not None:
            raise UnsupportedFeatureError("backend 'flashinfer' cannot combine learned sinks with a logits "
                                          "soft-cap (FlashInfer's sink variant has none)")
        for name, t in (("out", out), ("lse", lse)):
            if t is not None and not t.is_contiguous():
                raise KVLayoutError(f"backend 'flashinfer' writes {name} in place and needs it contiguous")

    # ---- plans -----------------------------------------------------------------------------------

    def _workspace(self, device: torch.device) -> torch.Tensor:
        ws = self._workspaces.get(device)
        if ws is None:
            ws = self._workspaces[device] = torch.zeros(self.workspace_bytes, dtype=torch.uint8, device=device)
        return ws

    def _prefill_backend(self, device: torch.device, kv_dtype: torch.dtype) -> str:
        if self.prefill_backend != "auto":
            return self.prefill_backend
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9 and not is_fp8(kv_dtype):
            return "fa3"
        return "fa2"

    def _use_tensor_cores(self, v: Variant) -> bool:
        if self.decode_tensor_cores is not None:
            return self.decode_tensor_cores
        return v.group_size >= TENSOR_CORE_MIN_GROUP

    def _slot(self, kind: str, v: Variant, device: torch.device, graph_batch: Optional[int], capacity: int
              ) -> _Slot:
        """The wrapper for ``kind`` ("decode", "prefill", "sinks") and variant ``v``; made once. Graph-mode
        wrappers own fixed buffers for ``graph_batch`` requests and ``capacity`` pages."""
        tc = self._use_tensor_cores(v) if kind == "decode" else None
        pb = self._prefill_backend(device, v.kv_dtype) if kind != "decode" else "fa2"
        key = (kind, v, device, tc, pb, graph_batch)
        slot = self._slots.get(key)
        if slot is not None:
            if graph_batch is not None and capacity > slot.capacity:
                raise KVLayoutError(f"flashinfer: this CUDA-graph step needs {capacity} pages but the graph "
                                    f"buffers were sized for {slot.capacity}; keep max_blocks_per_request fixed")
            return slot
        fi = _flashinfer()
        ws = self._workspace(device)
        graph = {}
        if graph_batch is not None:
            i32 = dict(dtype=torch.int32, device=device)
            bufs = (torch.zeros(graph_batch + 1, **i32), torch.zeros(capacity, **i32),
                    torch.ones(graph_batch, **i32))
            if kind == "decode":
                graph = dict(use_cuda_graph=True, paged_kv_indptr_buffer=bufs[0], paged_kv_indices_buffer=bufs[1],
                             paged_kv_last_page_len_buffer=bufs[2])
            else:
                graph = dict(use_cuda_graph=True, qo_indptr_buf=torch.arange(graph_batch + 1, **i32),
                             paged_kv_indptr_buf=bufs[0], paged_kv_indices_buf=bufs[1],
                             paged_kv_last_page_len_buf=bufs[2])
        if kind == "decode":
            w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "HND", use_tensor_cores=tc, backend="fa2", **graph)
        elif kind == "prefill":
            w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "HND", backend=pb, **graph)
        else:
            w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "HND", backend=pb, **_sink_jit_args(v, pb), **graph)
        slot = self._slots[key] = _Slot(w, capacity)
        return slot

    def plan(self, meta: AttentionMetadata, params: AttentionParams, kv_dtype: torch.dtype,
             q_dtype: Optional[torch.dtype] = None, *, sinks: bool = False, cuda_graph: bool = False) -> None:
        """Plan this step for every layer of variant (params, dtypes, sinks); host work, once per step.

        ``forward`` calls it on first use. Call it yourself before capturing or replaying a CUDA graph,
        with ``cuda_graph=True``: decode-only steps then use wrappers with fixed buffers (one set per
        batch size), which plan() refills each step while the captured kernels stay valid."""
        q_dtype = kv_dtype if q_dtype is None else q_dtype
        if is_fp8(q_dtype):
            raise UnsupportedFeatureError("backend 'flashinfer' takes fp16/bf16 queries; give an fp8 cache a "
                                          "16-bit query")
        v = Variant.of(params, meta.block_size, q_dtype, kv_dtype, sinks)
        if v.sinks and v.soft_cap:
            raise UnsupportedFeatureError("backend 'flashinfer' cannot combine learned sinks with a logits "
                                          "soft-cap (FlashInfer's sink variant has none)")
        key = FlashInferStepKey(id(self), v)
        have = meta.step_state.get(key, FlashInferStepPlan)
        if have is not None and have.cuda_graph == cuda_graph:
            return
        meta.step_state.put(key, self._make_step_plan(meta, v, cuda_graph))

    def _make_step_plan(self, meta: AttentionMetadata, v: Variant, cuda_graph: bool) -> FlashInferStepPlan:
        device = meta.device
        qsl = meta.query_start_loc_cpu.numpy().astype(np.int64)
        new = np.diff(qsl)
        nd, total = meta.num_decodes, meta.num_actual_tokens
        graph_batch = None
        if cuda_graph:
            if meta.num_prefills:
                raise KVLayoutError(f"flashinfer: CUDA-graph steps must be decode-only, this one has "
                                    f"{meta.num_prefills} prefill requests; run mixed steps eagerly")
            graph_batch = meta.num_reqs
        parts = []
        common = dict(q_data_type=v.q_dtype, kv_data_type=v.kv_dtype, o_data_type=v.q_dtype, sm_scale=v.scale,
                      window_left=v.window_left, non_blocking=True)
        heads = (v.num_heads, v.num_kv_heads, v.head_size, v.block_size)
        # Sinks: one prefill-type plan over the whole batch (decode rows are one-token requests).
        if v.sinks:
            groups = [("sinks", np.nonzero(new > 0)[0], 0, total)]
        else:
            groups = [("decode", np.arange(nd), 0, nd),
                      ("prefill", nd + np.nonzero(new[nd:] > 0)[0], nd, total)]
        for kind, reqs, t0, t1 in groups:
            if t1 <= t0:
                continue
            pi = paged_inputs(meta, reqs)
            capacity = graph_batch * meta.block_table.shape[1] if graph_batch is not None else 0
            slot = self._slot(kind, v, device, graph_batch, capacity)
            if kind == "decode":
                args = (pi.indptr, pi.indices, pi.last_page_len) + heads
                kwargs = dict(common, logits_soft_cap=v.soft_cap or None)
            else:
                qo = torch.from_numpy(np.concatenate([[0], np.cumsum(new[reqs])]).astype(np.int32))
                args = (qo, pi.indptr, pi.indices, pi.last_page_len) + heads
                kwargs = dict(common, causal=v.causal)
                if kind == "prefill":
                    kwargs["logits_soft_cap"] = v.soft_cap or None
            part = _Part(slot, t0, t1, kind == "sinks", args, kwargs)
            part.ensure_planned(capturing=False)
            parts.append(part)
        return FlashInferStepPlan(tuple(parts), cuda_graph)

    def _step_plan(self, meta, params, q_dtype, kv_dtype, sinks: bool, capturing: bool) -> FlashInferStepPlan:
        key = FlashInferStepKey(id(self), Variant.of(params, meta.block_size, q_dtype, kv_dtype, sinks))
        step = meta.step_state.get(key, FlashInferStepPlan)
        if step is None:
            if capturing:
                raise KVLayoutError("flashinfer: plan the step before capturing a CUDA graph: call "
                                    "backend.plan(meta, params, kv_dtype, q_dtype, sinks=..., cuda_graph=True)")
            self.plan(meta, params, kv_dtype, q_dtype, sinks=sinks)
            step = meta.step_state.get(key, FlashInferStepPlan)
        return step

    # ---- attention -------------------------------------------------------------------------------

    def forward(self, q, kv_cache, meta, params, *, sinks=None, k_scale=None, v_scale=None, out=None,
                lse=None, return_lse=False, validate=True) -> AttentionOutput:
        if validate:
            self.check_forward(q, kv_cache, meta, params, sinks, k_scale, v_scale, out, lse)
        capturing = kv_cache.is_cuda and torch.cuda.is_current_stream_capturing()
        step = self._step_plan(meta, params, q.dtype, kv_cache.dtype, sinks is not None, capturing)
        total = meta.num_actual_tokens
        want_lse = return_lse or lse is not None
        out, lse = output_buffers(q, total, out, lse, want_lse)
        kv = packed_kv_views(kv_cache)
        qq = q[:total] if k_scale is None else fold_k_scale_into_query(q[:total], k_scale, params.num_kv_heads)
        for part in step.parts:
            part.ensure_planned(capturing)
            extra = (sinks,) if part.takes_sinks else ()
            part.slot.wrapper.run(qq[part.t0:part.t1], kv, *extra, out=out[part.t0:part.t1],
                                  lse=lse[part.t0:part.t1] if want_lse else None, return_lse=want_lse)
        if v_scale is not None and total:
            apply_v_scale_(out[:total], v_scale, params.num_kv_heads)
        if want_lse and total:
            lse[:total].mul_(conventions.lse_factor("2", "e"))
        return (out, lse) if want_lse else out

    # ---- MLA -------------------------------------------------------------------------------------

    def forward_mla(self, q, latent_cache, meta, kv_lora_rank, scale, *, causal=True, return_lse=False):
        """MLA through FlashInfer's MLA wrapper, reading the latent cache ``(B, 1, N, L+R)`` in place:
        the compressed part and the rope part are two strided views of it (no copy)."""
        self.check_forward_mla(q, latent_cache, meta, kv_lora_rank)
        c = latent_cache.shape[3]
        if latent_cache.stride(-1) != 1:
            raise KVLayoutError("MLA needs a latent cache with a contiguous last dim")
        self._check_mla_dims(kv_lora_rank, c - kv_lora_rank, latent_cache.dtype)   # fp16/bf16: q dtype must match
        total, h = meta.num_actual_tokens, q.shape[1]
        key = FlashInferMLAKey(id(self), h, kv_lora_rank, c, float(scale), bool(causal), q.dtype)
        step = meta.step_state.get_or_make(key, lambda: self._plan_mla(meta, h, kv_lora_rank, c - kv_lora_rank,
                                                                        scale, causal, q.dtype))
        out = torch.zeros(q.shape[0], h, kv_lora_rank, dtype=q.dtype, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        for part in step.parts:
            part.ensure_planned(latent_cache.is_cuda and torch.cuda.is_current_stream_capturing())
            qt = q[:total]
            lat = latent_cache[:, 0]
            part.slot.wrapper.run(query=(qt[..., :kv_lora_rank], qt[..., kv_lora_rank:]),
                                  kv_cache=(lat[..., :kv_lora_rank], lat[..., kv_lora_rank:]),
                                  out=out[:total], lse=lse[:total], return_lse=True, return_lse_base_on_e=True)
        return (out, lse) if return_lse else out

    def _plan_mla(self, meta, num_heads, rank, rope, scale, causal, dtype) -> FlashInferStepPlan:
        qsl = meta.query_start_loc_cpu.numpy().astype(np.int64)
        reqs = np.nonzero(np.diff(qsl) > 0)[0]
        if reqs.size == 0:
            return FlashInferStepPlan()
        device = meta.device
        pb = self._prefill_backend(device, dtype)
        key = ("mla", num_heads, rank, rope, float(scale), bool(causal), dtype, meta.block_size, device, pb)
        slot = self._slots.get(key)
        fi = _flashinfer()
        if slot is None:
            slot = self._slots[key] = _Slot(fi.BatchMLAPagedAttentionWrapper(self._workspace(device), backend=pb))
        pi = paged_inputs(meta, reqs)
        qo = torch.from_numpy(np.concatenate([[0], np.cumsum(np.diff(qsl)[reqs])]).astype(np.int32))
        from flashinfer.mla import MLAPlanMetadata
        md = MLAPlanMetadata.csr(qo, pi.indptr, pi.indices, torch.from_numpy(pi.seq_lens.astype(np.int32)))
        kwargs = dict(metadata=md, num_heads=num_heads, head_dim_ckv=rank, head_dim_kpe=rope,
                      page_size=meta.block_size, causal=causal, sm_scale=float(scale), q_data_type=dtype,
                      kv_data_type=dtype, query_layout="split", kv_cache_layout="split", lse_mode="basee")
        part = _Part(slot, 0, meta.num_actual_tokens, False, (), kwargs)
        part.ensure_planned(capturing=False)
        return FlashInferStepPlan((part,))

    # ---- K/V append ------------------------------------------------------------------------------

    def write_kv(self, kv_cache, k, v, slot_mapping, k_scale=None, v_scale=None, validate=True) -> None:
        how = self.append
        if how == "auto":
            how = "triton" if kv_cache.is_cuda and _triton_write_kv() is not None else "torch"
        if how == "torch":
            write_kv(kv_cache, k, v, slot_mapping, k_scale, v_scale, validate=validate)
        elif how == "triton":
            fn = _triton_write_kv()
            if fn is None:
                raise BackendUnavailableError("the Triton write_kv kernel (kvlayout.kernels.write) is not "
                                              "available; use append='torch'")
            fn(kv_cache, k, v, slot_mapping, k_scale, v_scale, validate=validate)
        else:
            self.append_flashinfer(kv_cache, k, v, slot_mapping, validate=validate)

    def append_flashinfer(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          slot_mapping: torch.Tensor, validate: bool = True) -> None:
        """K/V into their slots through FlashInfer's ``append_paged_kv_cache`` on the packed views. The
        slots are expressed as one request that owns every block in order (block = slot // N), so no
        per-step table is needed. 16-bit caches only; every one of the ``k.shape[0]`` slots must be >= 0."""
        if validate:
            check_write_kv(kv_cache, k, v, slot_mapping)
            if is_fp8(kv_cache.dtype):
                raise UnsupportedFeatureError("append='flashinfer' does not quantize; use 'torch' or 'triton' "
                                              "for fp8 caches")
            n_tok = k.shape[0]
            if n_tok and int(slot_mapping[:n_tok].min()) < 0:
                raise KVLayoutError("append='flashinfer' cannot skip slots (-1); pass only the tokens to write")
        b, n, t = kv_cache.shape[0], kv_cache.shape[2], k.shape[0]
        ids = self._append_ids.get((b, n, kv_cache.device))
        if ids is None or ids[0].numel() < t:
            i32 = dict(dtype=torch.int32, device=kv_cache.device)
            cap = max(t, 1 << 16)
            ids = self._append_ids[(b, n, kv_cache.device)] = (
                torch.zeros(cap, **i32), torch.arange(b, **i32), torch.tensor([0, b], **i32),
                torch.tensor([n], **i32))
        batch_idx, indices, indptr, last = ids
        _flashinfer().append_paged_kv_cache(k, v, batch_idx[:t], slot_mapping[:t].to(torch.int32),
                                            packed_kv_views(kv_cache), indices, indptr, last, kv_layout="HND")


def _sink_jit_args(v: Variant, backend: str) -> dict:
    """FlashInfer's attention-sink variant as a custom prefill module (extra input: the float32 sink
    logit per query head). The module name carries every compile-time choice, so variants of other
    dtypes or head sizes never share a build."""
    variants = importlib.import_module("flashinfer.jit.attention.variants")
    swa = v.window_left >= 0
    uri = (f"kvlayout_attention_sink_{backend}_{dtype_name(v.q_dtype)}_{dtype_name(v.kv_dtype)}_"
           f"hd{v.head_size}_swa{int(swa)}")
    jit_args = [uri, v.q_dtype, v.kv_dtype, v.q_dtype, torch.int32, v.head_size, v.head_size, ["sink"], ["float"],
                ["sm_scale"], ["double"], "AttentionSink", variants.attention_sink_decl[backend]]
    return dict(jit_args=jit_args, jit_kwargs=dict(use_sliding_window=swa, pos_encoding_mode=0))


def _triton_write_kv():
    """The Triton ``write_kv`` kernel when the triton backend ships one (kvlayout.kernels.write)."""
    try:
        from kvlayout.kernels import write as triton_cache
    except ImportError:
        return None
    return getattr(triton_cache, "write_kv", None)
