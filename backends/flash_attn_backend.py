"""FlashAttention backend: the library's paged kernels fed with NHD views of the packed cache.

The packed cache ``(B, H, N, 2*D)`` is handed to FlashAttention as ``k = kv[..., :D].transpose(1, 2)`` and
``v = kv[..., D:].transpose(1, 2)``: ``(B, N, H, D)`` views with strides ``(block_stride, 2*D, N*2*D, 1)``.
Every generation reads the token and head strides separately (FA2/FA3 take row, head and batch strides;
FA4 builds CuTe tensors from the strides), so no copy is needed, provided the views are 16-byte aligned:
FA2/FA3 load rows with 128-bit copies (a misaligned row faults), and FA4 silently copies a misaligned
tensor to a contiguous one, which we refuse instead. Which generation runs is detected at construction:

- ``fa3`` (``flash_attn_interface``, Hopper): ``flash_attn_with_kvcache`` with ``page_table`` and
  ``cu_seqlens_q``, one call for the mixed batch (split-KV decode by its own heuristic).
- ``fa4`` (``flash_attn.cute``, CuTe DSL): ``flash_attn_varlen_func`` with ``page_table`` and
  ``seqused_k``, one call; paged KV on sm90/sm100; learned sinks.
- ``fa2`` (``flash_attn``): paged block size must be a multiple of 256; decodes through
  ``flash_attn_with_kvcache`` (split-KV), prefills through ``flash_attn_varlen_func`` with ``block_table``.

All return the natural-log LSE as ``[H, T]``; we hand back ``[T, H]``. New K/V go into the cache through
the project's Triton ``write_kv`` kernel (FlashAttention's Python API has no cache writer of its own). FlashAttention allocates its own
output, so a caller's ``out``/``lse`` buffer costs one copy of the output (never of the cache). fp8 caches
are refused (FA3 wants fp8 queries too, FA4 runs fp8 on sm100 only).

With FA4, pages loaded by TMA (block size equal to the kernel's key tile) must hold finite values past a
sequence's end inside its last page: ``allocate_kv_cache`` zeroes the cache and ``write_kv`` writes finite
values, which keeps that true.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from kvlayout.capabilities import BackendCapabilities
from kvlayout.conventions import window_left
from kvlayout.errors import BackendUnavailableError, UnsupportedFeatureError
from kvlayout.kernels.write import write_kv as triton_write_kv
from kvlayout.metadata import AttentionMetadata
from kvlayout.params import AttentionParams

from .base import AttentionBackend, AttentionOutput, padded_lse, padded_out

VERSION_ENV = "KVLAYOUT_FLASH_ATTN_VERSION"      # "2", "3" or "4": use that generation only
ALIGN_BYTES = 16


_COMMON_KW = ("softmax_scale", "causal", "window_size", "softcap")


@dataclass(frozen=True)
class Generation:
    """One FlashAttention generation: its module, the entry points (and keywords) this backend calls,
    and its limits."""

    name: str                           # "fa2" | "fa3" | "fa4"
    module: str
    entries: tuple                      # ((function name, keywords it must accept), ...)
    archs: frozenset                    # compute-capability majors on which it pages KV
    block_size_multiple: int = 1
    sinks: bool = False
    copies_misaligned: bool = False     # True: the library copies a misaligned K/V instead of failing


GENERATIONS: dict[str, Generation] = {
    "fa3": Generation("fa3", "flash_attn_interface",
                      (("flash_attn_with_kvcache", _COMMON_KW + ("cache_seqlens", "page_table", "cu_seqlens_q",
                                                                 "max_seqlen_q", "return_softmax_lse")),),
                      frozenset({9})),
    "fa4": Generation("fa4", "flash_attn.cute",
                      (("flash_attn_varlen_func", _COMMON_KW + ("cu_seqlens_q", "seqused_k", "max_seqlen_q",
                                                                "max_seqlen_k", "page_table", "learnable_sink",
                                                                "return_lse")),),
                      frozenset({9, 10, 11}), sinks=True, copies_misaligned=True),
    "fa2": Generation("fa2", "flash_attn",
                      (("flash_attn_with_kvcache", _COMMON_KW + ("cache_seqlens", "block_table",
                                                                 "return_softmax_lse")),
                       ("flash_attn_varlen_func", _COMMON_KW + ("block_table", "return_attn_probs"))),
                      frozenset({8, 9}), block_size_multiple=256),
}
PREFERENCE = ("fa3", "fa4", "fa2")      # FA3 first on Hopper: it also splits long decodes across SMs


def capabilities_for(gen: Generation, arch_major: Optional[int] = None) -> BackendCapabilities:
    """What ``flash_attn`` supports when running ``gen`` on a GPU of compute capability ``arch_major``."""
    dtypes = frozenset({torch.float16, torch.bfloat16})
    heads = frozenset(range(8, 257, 8))
    if gen.name == "fa4" and arch_major in (10, 11):
        heads = frozenset(range(8, 129, 8)) | {256}
    features = {"non_causal", "sliding_window", "soft_cap", "lse", "cross_layer"}
    if gen.sinks:
        features.add("sinks")
    return BackendCapabilities(name="flash_attn", kv_dtypes=dtypes, q_dtypes=dtypes, head_sizes=heads,
                               block_size_multiple=gen.block_size_multiple, features=frozenset(features),
                               lse_base="e")


def nhd_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, v)``: ``(B, N, H, D)`` views of the packed ``(B, H, N, 2D)`` cache, no copy."""
    d = kv_cache.shape[-1] // 2
    return kv_cache[..., :d].transpose(1, 2), kv_cache[..., d:].transpose(1, 2)


def window_size(gen: Generation, params: AttentionParams) -> tuple[Optional[int], Optional[int]]:
    """FlashAttention's ``(left, right)`` window: key j is visible to query i when
    ``i - left <= j <= i + right``. Our window W means ``i - W < j``, so ``left = window_left(W) = W - 1``
    (``kvlayout.conventions``); causal adds ``right = 0``. FA2/FA3 write "unbounded" as -1, FA4 as None."""
    unbounded = None if gen.name == "fa4" else -1
    if params.sliding_window is None:
        return unbounded, unbounded
    return window_left(params.sliding_window), 0 if params.causal else unbounded


def layout_problems(gen: Generation, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Why ``gen`` cannot read the NHD views ``k``/``v`` in place (empty when it can): block size, a
    non-unit last stride, or pointers/strides that are not 16-byte aligned."""
    out = []
    page = k.shape[1]
    if page % gen.block_size_multiple:
        out.append(f"{gen.name} pages KV only in blocks that are a multiple of {gen.block_size_multiple} "
                   f"tokens, the cache has blocks of {page}; plan the cache with block_size="
                   f"{gen.block_size_multiple} (or a multiple) for this backend, or use another backend")
    elem = k.element_size()
    for name, t in (("K", k), ("V", v)):
        if t.stride(-1) != 1:
            out.append(f"the {name} view's last dim is not contiguous (stride {t.stride(-1)})")
            continue
        bad = [f"{s * elem} B" for s in t.stride()[:-1] if s * elem % ALIGN_BYTES]
        if t.data_ptr() % ALIGN_BYTES:
            bad.insert(0, f"address {t.data_ptr() % ALIGN_BYTES} B past a {ALIGN_BYTES}-B boundary")
        if bad:
            what = ("would copy the cache to a contiguous tensor on every call" if gen.copies_misaligned
                    else "would fault on misaligned 128-bit loads")
            out.append(f"{gen.name} needs {ALIGN_BYTES}-byte aligned K/V pointers and strides, but the {name} "
                       f"view has {', '.join(bad)} (it {what}); use a head size whose 2*D row is a multiple "
                       f"of {ALIGN_BYTES} bytes and an aligned allocation, or another backend")
    return out


@dataclass
class FlashCall:
    """One library call: entry point name, the query tokens ``[t0, t1)`` it covers, its arguments, and
    where its LSE comes out (``"h_t"``: ``[H, T]``; ``"b_h_1"``: ``[B, H, 1]`` for one-token decodes)."""

    fn: str
    t0: int
    t1: int
    args: tuple
    kwargs: dict = field(default_factory=dict)
    lse_layout: str = "h_t"


@dataclass(frozen=True)
class FlashAttnStepKey:
    """Key of a FlashAttention generation's per-step state in ``meta.step_state``."""

    generation: str


@dataclass(frozen=True)
class Fa2PrefillOffsets:
    """What FA2's varlen prefill call needs besides the metadata, for the step's prefill part (the requests
    after the decodes): made once per step on the device, reused by every layer."""

    cu_seqlens_q: torch.Tensor      # int32 [P + 1]: query offsets, counted from the first prefill token
    cu_seqlens_k: torch.Tensor      # int32 [P + 1]: cumulative context lengths


def fa2_prefill_offsets(meta: AttentionMetadata) -> Fa2PrefillOffsets:
    """The step's ``Fa2PrefillOffsets``, made on first use."""
    def make() -> Fa2PrefillOffsets:
        nd = meta.num_decodes
        seq = meta.seq_lens[nd:]
        cu_k = torch.zeros(seq.shape[0] + 1, dtype=torch.int32, device=seq.device)
        torch.cumsum(seq, 0, out=cu_k[1:])
        return Fa2PrefillOffsets(meta.query_start_loc[nd:] - meta.num_decode_tokens, cu_k)
    return meta.step_state.get_or_make(FlashAttnStepKey("fa2"), make)


def plan_calls(gen: Generation, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
               params: AttentionParams, sinks: Optional[torch.Tensor], want_lse: bool) -> list[FlashCall]:
    """The library calls that compute attention for the step (no tensor is read or written here beyond
    the tiny per-step FA2 offsets)."""
    t = meta.num_actual_tokens
    if t == 0:
        return []
    common = dict(softmax_scale=params.scale, causal=params.causal, window_size=window_size(gen, params),
                  softcap=params.logits_soft_cap or 0.0)
    if gen.name == "fa4":
        kw = dict(common, cu_seqlens_q=meta.query_start_loc, seqused_k=meta.seq_lens,
                  max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_seq_len, page_table=meta.block_table,
                  learnable_sink=sinks, return_lse=want_lse)
        return [FlashCall("flash_attn_varlen_func", 0, t, (q[:t], k, v), kw)]
    if gen.name == "fa3":
        kw = dict(common, cache_seqlens=meta.seq_lens, page_table=meta.block_table,
                  cu_seqlens_q=meta.query_start_loc, max_seqlen_q=meta.max_query_len,
                  return_softmax_lse=want_lse)
        return [FlashCall("flash_attn_with_kvcache", 0, t, (q[:t], k, v), kw)]
    calls = []
    nd, ndt = meta.num_decodes, meta.num_decode_tokens
    if nd:
        kw = dict(common, cache_seqlens=meta.seq_lens[:nd], block_table=meta.block_table[:nd],
                  return_softmax_lse=want_lse)
        calls.append(FlashCall("flash_attn_with_kvcache", 0, ndt, (q[:ndt].unsqueeze(1), k, v), kw, "b_h_1"))
    if t > ndt:
        offsets = fa2_prefill_offsets(meta)
        kw = dict(common, block_table=meta.block_table[nd:], return_attn_probs=want_lse)
        calls.append(FlashCall("flash_attn_varlen_func", ndt, t,
                               (q[ndt:t], k, v, offsets.cu_seqlens_q, offsets.cu_seqlens_k,
                                meta.max_query_len, meta.max_seq_len), kw))
    return calls


def lse_tokens_major(lse: torch.Tensor, layout: str) -> torch.Tensor:
    """The library's LSE as ``[T, H]`` (a view)."""
    if layout == "b_h_1":
        return lse[:, :, 0]
    return lse.transpose(0, 1)


@functools.lru_cache(maxsize=None)
def _import_generation(name: str) -> tuple[Optional[Any], Optional[str]]:
    """``(module, None)`` when generation ``name`` imports and its entry points take the keywords this
    backend passes (paged KV included), else ``(None, reason)``."""
    gen = GENERATIONS[name]
    try:
        mod = importlib.import_module(gen.module)
    except Exception as e:          # ImportError, or a broken CUDA extension raising something else
        return None, f"{gen.module} does not import ({type(e).__name__}: {e})"
    for fn, keywords in gen.entries:
        f = getattr(mod, fn, None)
        if not callable(f):
            return None, f"{gen.module} has no {fn}"
        missing = [k for k in keywords if k not in inspect.signature(f).parameters]
        if missing:
            return None, (f"{gen.module}.{fn} takes no {', '.join(missing)}; this backend was written for "
                          f"a version with paged KV through those arguments")
    return mod, None


def _candidates() -> tuple[str, ...]:
    forced = os.environ.get(VERSION_ENV, "").strip().lower().lstrip("fa")
    if forced:
        name = "fa" + forced
        if name not in GENERATIONS:
            raise BackendUnavailableError(f"{VERSION_ENV}={os.environ[VERSION_ENV]!r}: expected 2, 3 or 4")
        return (name,)
    return PREFERENCE


def detect_generation(device: Optional[torch.device] = None) -> tuple[Optional[Generation], list[str]]:
    """The first generation in preference order that imports and pages KV on ``device``'s architecture,
    and the reasons the others were passed over."""
    reasons = []
    if device is not None and device.type != "cuda":
        return None, [f"FlashAttention runs on CUDA GPUs only, not on {device.type}"]
    if not torch.cuda.is_available():
        return None, ["no CUDA device"]
    major = torch.cuda.get_device_capability(device)[0]
    for name in _candidates():
        gen = GENERATIONS[name]
        if major not in gen.archs:
            reasons.append(f"{name} has no paged KV on compute capability {major}.x")
            continue
        mod, why = _import_generation(name)
        if mod is None:
            reasons.append(f"{name}: {why}")
            continue
        return gen, reasons
    return None, reasons


class FlashAttnBackend(AttentionBackend):
    """Paged attention through the installed FlashAttention generation (see the module docstring)."""

    name = "flash_attn"
    capabilities = capabilities_for(GENERATIONS["fa3"])     # replaced per instance by the detected one
    kv_writer = staticmethod(triton_write_kv)               # the library has no cache writer of its own

    def __init__(self, generation: Optional[str] = None, device: Optional[torch.device] = None):
        if generation is not None:
            if generation not in GENERATIONS:
                raise BackendUnavailableError(f"unknown FlashAttention generation {generation!r}; "
                                              f"known: {', '.join(GENERATIONS)}")
            mod, why = _import_generation(generation)
            if mod is None:
                raise BackendUnavailableError(f"FlashAttention generation {generation} is not usable: {why}")
            gen = GENERATIONS[generation]
        else:
            gen, reasons = detect_generation(device)
            if gen is None:
                raise BackendUnavailableError("no usable FlashAttention generation: " + "; ".join(reasons))
        self.generation = gen
        self._module = _import_generation(gen.name)[0]
        major = torch.cuda.get_device_capability(device)[0] if torch.cuda.is_available() else None
        self.capabilities = capabilities_for(gen, major)

    @classmethod
    def unavailable_reason(cls, device: Optional[torch.device] = None) -> Optional[str]:
        gen, reasons = detect_generation(device)
        return None if gen is not None else "; ".join(reasons)

    def _fn(self, name: str) -> Callable:
        return getattr(self._module, name)

    def check_forward(self, q, kv_cache, meta, params, sinks=None, k_scale=None, v_scale=None, out=None,
                      lse=None) -> None:
        """The shared checks, plus whether this generation can read the NHD views in place."""
        super().check_forward(q, kv_cache, meta, params, sinks, k_scale, v_scale, out, lse)
        problems = layout_problems(self.generation, *nhd_views(kv_cache))
        if problems:
            raise UnsupportedFeatureError(f"backend 'flash_attn' ({self.generation.name}) cannot read this "
                                          f"cache in place: " + "; ".join(problems))

    def forward(self, q, kv_cache, meta, params, *, sinks=None, k_scale=None, v_scale=None, out=None,
                lse=None, return_lse=False, validate=True) -> AttentionOutput:
        if validate:
            self.check_forward(q, kv_cache, meta, params, sinks, k_scale, v_scale, out, lse)
        k, v = nhd_views(kv_cache)
        want_lse = return_lse or lse is not None
        t = meta.num_actual_tokens
        if t == 0:                                   # an empty step: nothing to launch
            out = padded_out(q, 0, out)
            return (out, padded_lse(q, 0, lse)) if want_lse else out
        calls = plan_calls(self.generation, q, k, v, meta, params, sinks, want_lse)
        results = []
        for c in calls:
            res = self._fn(c.fn)(*c.args, **c.kwargs)
            o, l = (res[0], res[1]) if isinstance(res, tuple) else (res, None)
            results.append((c, o.reshape(c.t1 - c.t0, *q.shape[1:]), l))
        if out is None and len(results) == 1 and q.shape[0] == t:
            out = results[0][1]
        else:
            out = padded_out(q, t, out)
            for c, o, _ in results:
                out[c.t0:c.t1].copy_(o)
        if not want_lse:
            return out
        if lse is None and len(results) == 1 and q.shape[0] == t:
            return out, lse_tokens_major(results[0][2], results[0][0].lse_layout)
        lse_out = padded_lse(q, t, lse)
        for c, _, l in results:
            lse_out[c.t0:c.t1].copy_(lse_tokens_major(l, c.lse_layout))
        return out, lse_out

