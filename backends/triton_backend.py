"""The ``triton`` attention backend: kvlayout's own Triton kernels over the packed cache views.

``forward`` routes on host integers of the metadata only (no sync, CUDA-graph capturable): the decode
part (the leading one-token requests) goes to the split-KV decode kernel, the rest to the unified kernel;
when every query tile is already decode-sized (short chunks), the whole mixed batch is one unified launch.
LSE is returned in base e.

Plan once, run many: the first layer of a step makes a ``TritonStepPlan`` (in ``meta.step_state``) with the
route, the launch settings, the metadata slices of each part and the split-KV workspace; the step's other
layers reuse it. The workspace is shared by the layers of a step, which run one after another on one
stream (each layer's merge reads it before the next layer's decode writes it, and leaves the arrival
counters at zero).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from kvlayout.capabilities import BackendCapabilities
from kvlayout.errors import KVLayoutError
from kvlayout.kernels import INTERPRET_ENV, interpreter_requested, interpreting
from kvlayout.kernels.decode import (DecodeConfig, SplitWorkspace, choose_num_splits, decode_config, device_sms,
                                     split_kv_decode)
from kvlayout.kernels.unified import UnifiedConfig, unified_attention, unified_config
from kvlayout.kernels.write import write_kv as triton_write_kv
from kvlayout.metadata import AttentionMetadata
from kvlayout.specs import FP8_DTYPES

from .base import AttentionBackend, AttentionOutput, output_buffers

TRITON_CAPABILITIES = BackendCapabilities(
    name="triton",
    kv_dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, *FP8_DTYPES}),
    q_dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    head_sizes=frozenset({64, 80, 96, 128, 256}),
    block_sizes=None,
    features=frozenset({"non_causal", "sliding_window", "soft_cap", "sinks", "fp8_kv", "lse", "cross_layer",
                        "padded_steps", "cuda_graphs"}),
    lse_base="e",
)


@functools.lru_cache(maxsize=1024)
def split_decodes(num_decodes: int, num_reqs: int, max_query_len: int, group: int, head_size: int,
                  elem_bytes: int, interpret: bool) -> bool:
    """Whether the decode part goes to the split-KV kernel (True) or rides in the unified launch."""
    if num_decodes == 0:
        return False
    if num_decodes == num_reqs:
        return True
    cfg = unified_config(max_query_len, group, head_size, elem_bytes, interpret)
    return cfg.block_q * triton.next_power_of_2(group) > 16


@dataclass(frozen=True)
class TritonStepKey:
    """Key of the triton backend's per-step plan: what the launch choices depend on besides the step, and
    whether a CUDA graph is being captured (a workspace made by an eager warm-up must not be baked into a
    graph that outlives it)."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    q_dtype: torch.dtype
    capturing: bool = False


@dataclass(frozen=True)
class TritonStepPlan:
    """Host decisions and views made once per step: the decode part (``num_decodes`` requests on the
    split-KV kernel, or 0 when everything rides in the unified launch) and the rest."""

    num_decodes: int
    num_decode_tokens: int
    decode_rows: tuple            # (query_start_loc, seq_lens, block_table) of the decode part
    num_splits: int
    decode_config: DecodeConfig
    workspace: Optional[SplitWorkspace]   # split-KV partials and arrival counters, or None unsplit
    rest_rows: tuple              # (query_start_loc, seq_lens, block_table) of the unified part
    unified_config: UnifiedConfig


def make_step_plan(meta: AttentionMetadata, key: TritonStepKey) -> TritonStepPlan:
    """The plan of ``meta``'s step for the shape in ``key`` (host integers only; no sync)."""
    nd, nr = meta.num_decodes, meta.num_reqs
    group = key.num_heads // key.num_kv_heads
    elem, interp = key.q_dtype.itemsize, interpreting()
    split = split_decodes(nd, nr, meta.max_query_len, group, key.head_size, elem, interp)
    nd = nd if split else 0
    splits = choose_num_splits(nd, key.num_kv_heads, meta.max_seq_len, device_sms(meta.device)) if nd else 1
    workspace = None
    if splits > 1:
        workspace = SplitWorkspace.make(nd, key.num_heads, key.num_kv_heads, splits, key.head_size, meta.device)
    qsl, lens, table = meta.query_start_loc, meta.seq_lens, meta.block_table
    return TritonStepPlan(nd, meta.num_decode_tokens if nd else 0, (qsl[:nd], lens[:nd], table[:nd]), splits,
                          decode_config(key.head_size, elem, interp), workspace, (qsl[nd:], lens[nd:], table[nd:]),
                          unified_config(meta.max_query_len, group, key.head_size, elem, interp))


def step_plan(meta: AttentionMetadata, params, q_dtype: torch.dtype) -> TritonStepPlan:
    """The step's plan for this attention shape, made on the first layer's call and reused by the rest."""
    capturing = meta.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = TritonStepKey(params.num_heads, params.num_kv_heads, params.head_size, q_dtype, capturing)
    plan = meta.step_state.get(key, TritonStepPlan)
    if plan is None:
        plan = meta.step_state.put(key, make_step_plan(meta, key))
    return plan


class TritonBackend(AttentionBackend):
    name = "triton"
    capabilities = TRITON_CAPABILITIES
    kv_writer = staticmethod(triton_write_kv)

    @classmethod
    def unavailable_reason(cls, device: Optional[torch.device] = None) -> Optional[str]:
        env_interp = interpreter_requested()
        if env_interp != interpreting():
            return (f"{INTERPRET_ENV} changed after kvlayout's Triton kernels were defined; set it before "
                    "importing kvlayout.backends.triton_backend")
        kind = device.type if device is not None else None
        if kind in (None, "cuda") and torch.cuda.is_available() and not env_interp:
            return None
        if kind in (None, "cpu") and env_interp:
            return None
        if kind == "cuda" or (kind is None and not env_interp):
            return "no CUDA device, and TRITON_INTERPRET is not '1' (set it to run the kernels on the CPU)"
        if kind == "cpu":
            return "on the CPU the kernels need Triton's interpreter: set TRITON_INTERPRET=1 before importing them"
        return f"runs on CUDA devices (or the CPU under TRITON_INTERPRET=1), not on {kind}"

    def check_forward(self, q, kv_cache, meta, params, sinks=None, k_scale=None, v_scale=None, out=None,
                      lse=None) -> None:
        """The shared checks, plus what the Triton launches need (device, strides, int32 metadata)."""
        super().check_forward(q, kv_cache, meta, params, sinks, k_scale, v_scale, out, lse)
        want = "cpu" if interpreting() else "cuda"
        if kv_cache.device.type != want:
            raise KVLayoutError(f"the {self.name} backend runs on {want} tensors here "
                                f"({'interpreter' if want == 'cpu' else 'compiled kernels'}), got {kv_cache.device}")
        if q.stride(-1) != 1 or (out is not None and out.stride(-1) != 1):
            raise KVLayoutError("q and out need a contiguous last dim (stride 1)")
        for name, t in (("sinks", sinks), ("k_scale", k_scale), ("v_scale", v_scale)):
            if t is not None and (t.device != kv_cache.device or not t.is_contiguous()):
                raise KVLayoutError(f"{name} must be a contiguous tensor on {kv_cache.device}")

    def forward(self, q, kv_cache, meta, params, *, sinks=None, k_scale=None, v_scale=None, out=None,
                lse=None, return_lse=False, validate=True) -> AttentionOutput:
        if validate:
            self.check_forward(q, kv_cache, meta, params, sinks, k_scale, v_scale, out, lse)
        want_lse = return_lse or lse is not None
        total = meta.num_actual_tokens
        out, lse = output_buffers(q, total, out, lse, want_lse)
        if total == 0:
            return (out, lse) if want_lse else out
        plan = step_plan(meta, params, q.dtype)
        if plan.num_decodes:
            qsl, lens, table = plan.decode_rows
            split_kv_decode(q, kv_cache, qsl, lens, table, params, max_seq_len=meta.max_seq_len,
                            num_splits=plan.num_splits, sinks=sinks, k_scale=k_scale, v_scale=v_scale, out=out,
                            lse=lse, workspace=plan.workspace, config=plan.decode_config)
        if plan.num_decodes < meta.num_reqs:
            qsl, lens, table = plan.rest_rows
            t0 = plan.num_decode_tokens
            unified_attention(q, kv_cache, out, qsl, lens, table, params, num_tokens=total - t0, tok_lo=t0,
                              max_query_len=meta.max_query_len, sinks=sinks, k_scale=k_scale, v_scale=v_scale,
                              lse=lse, config=plan.unified_config)
        return (out, lse) if want_lse else out
