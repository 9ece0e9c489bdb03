"""The ``triton`` attention backend: kvlayout's own Triton kernels over the packed cache views.

``forward`` routes on host integers of the metadata only (no sync, CUDA-graph capturable): the decode
part (the leading one-token requests) goes to the split-KV decode kernel, the rest to the unified kernel;
when every query tile is already decode-sized (short chunks), the whole mixed batch is one unified launch.
LSE is returned in base e.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

from kvlayout.capabilities import BackendCapabilities
from kvlayout.errors import KVLayoutError
from kvlayout.kernels import INTERPRET_ENV, interpreter_requested, interpreting
from kvlayout.kernels.decode import split_kv_decode
from kvlayout.kernels.unified import unified_attention, unified_config
from kvlayout.kernels.write import write_kv as triton_write_kv
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
        nd, nr = meta.num_decodes, meta.num_reqs
        group = params.num_heads // params.num_kv_heads
        r0 = t0 = 0
        if split_decodes(nd, nr, meta.max_query_len, group, params.head_size, q.dtype.itemsize, interpreting()):
            split_kv_decode(q, kv_cache, meta.query_start_loc[:nd], meta.seq_lens[:nd], meta.block_table[:nd],
                            params, max_seq_len=meta.max_seq_len, sinks=sinks, k_scale=k_scale, v_scale=v_scale,
                            out=out, lse=lse)
            r0, t0 = nd, meta.num_decode_tokens
        if r0 < nr:
            unified_attention(q, kv_cache, out, meta.query_start_loc[r0:], meta.seq_lens[r0:],
                              meta.block_table[r0:], params, num_tokens=total - t0, tok_lo=t0,
                              max_query_len=meta.max_query_len, sinks=sinks, k_scale=k_scale, v_scale=v_scale,
                              lse=lse)
        return (out, lse) if want_lse else out
