"""The ``rocm`` attention backend: Triton kernels in the shape AMD GPUs favour (``rocm_kernels``), over the
packed cache views, with the same feature matrix as the ``triton`` backend.

``forward`` launches the 2-D paged decode kernel for the leading one-token requests and the prefix-prefill
kernel for the rest, one after the other on the stream (no host sync). The prefill tile list and the
decode contexts' longest length are host data made once per step (``meta.backend_state``) and shared by
every layer. LSE is returned in base e. Validated on NVIDIA GPUs and under Triton's CPU interpreter; not
yet run on AMD hardware.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from kvlayout.errors import KVLayoutError
from kvlayout.metadata import AttentionMetadata

from .base import AttentionBackend, AttentionOutput
from .rocm_kernels import (RocmConfig, decode_partition_size, paged_decode, prefill_tiles, prefix_prefill,
                           rocm_config)
from .triton_attention import interpreting
from .triton_backend import TRITON_CAPABILITIES, TritonBackend
from .triton_cache import write_kv as triton_write_kv
from .triton_decode import device_sms

ROCM_CAPABILITIES = dataclasses.replace(TRITON_CAPABILITIES, name="rocm")


@dataclass(frozen=True)
class RocmStepPlan:
    """Host decisions for one step and one prefill tile height: the prefill tiles (on the device) and
    the longest decode context."""

    tiles: torch.Tensor
    decode_max_seq_len: int


def step_plan(meta: AttentionMetadata, block_m: int) -> RocmStepPlan:
    """The step's plan for ``block_m``, made on the first call and reused by every later layer."""
    key = ("rocm", block_m)
    plan = meta.backend_state.get(key)
    if plan is None:
        tiles = torch.from_numpy(prefill_tiles(meta.query_start_loc_cpu, meta.num_decodes, block_m))
        if meta.device.type == "cuda":
            tiles = tiles.pin_memory().to(meta.device, non_blocking=True)
        nd = meta.num_decodes
        longest = int(meta.seq_lens_cpu[:nd].max()) if nd else 0
        plan = RocmStepPlan(tiles, longest)
        meta.backend_state[key] = plan
    return plan


class RocmBackend(AttentionBackend):
    name = "rocm"
    capabilities = ROCM_CAPABILITIES

    @classmethod
    def unavailable_reason(cls, device: Optional[torch.device] = None) -> Optional[str]:
        return TritonBackend.unavailable_reason(device)        # the same Triton runtime, on CUDA or HIP

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                 k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
                 validate: bool = True) -> None:
        triton_write_kv(kv_cache, k, v, slot_mapping, k_scale, v_scale, validate=validate)

    def _check_launch(self, q, kv_cache, meta, sinks, k_scale, v_scale, out) -> None:
        want = "cpu" if interpreting() else "cuda"
        if kv_cache.device.type != want:
            raise KVLayoutError(f"the rocm backend runs on {want} tensors here, got {kv_cache.device}")
        if q.stride(-1) != 1 or (out is not None and out.stride(-1) != 1):
            raise KVLayoutError("q and out need a contiguous last dim (stride 1)")
        if meta.query_start_loc.shape[0] != meta.num_reqs + 1 or meta.block_table.shape[0] != meta.num_reqs \
                or meta.query_start_loc_cpu.shape[0] != meta.num_reqs + 1:
            raise KVLayoutError(f"metadata is inconsistent: {meta.num_reqs} requests but query_start_loc has "
                                f"{meta.query_start_loc.shape[0]} entries and the block table "
                                f"{meta.block_table.shape[0]} rows; build it with build_attention_metadata")
        for name, t in (("query_start_loc", meta.query_start_loc), ("seq_lens", meta.seq_lens),
                        ("block_table", meta.block_table)):
            if t.dtype != torch.int32 or t.stride(-1) != 1:
                raise KVLayoutError(f"metadata {name} must be int32 with a contiguous last dim")
        if meta.num_decode_tokens != meta.num_decodes:
            raise KVLayoutError(f"metadata says {meta.num_decodes} decodes with {meta.num_decode_tokens} tokens; "
                                f"decodes have one token each")
        for name, t in (("sinks", sinks), ("k_scale", k_scale), ("v_scale", v_scale)):
            if t is not None and (t.device != kv_cache.device or not t.is_contiguous()):
                raise KVLayoutError(f"{name} must be a contiguous tensor on {kv_cache.device}")

    def config(self, q: torch.Tensor, head_size: int) -> RocmConfig:
        return rocm_config(head_size, q.dtype.itemsize, interpreting())

    def forward(self, q, kv_cache, meta, params, *, sinks=None, k_scale=None, v_scale=None, out=None,
                lse=None, return_lse=False, validate=True, partition_size: Optional[int] = None
                ) -> AttentionOutput:
        """See ``AttentionBackend.forward``. ``partition_size`` overrides the decode partitioning (0: one
        program per sequence and KV head; else keys per partition, a multiple of the key tile)."""
        if validate:
            self.check_forward(q, kv_cache, meta, params, sinks, k_scale, v_scale, out, lse)
            self._check_launch(q, kv_cache, meta, sinks, k_scale, v_scale, out)
        cfg = self.config(q, params.head_size)
        if validate and partition_size and partition_size % cfg.block_n:
            raise KVLayoutError(f"partition_size {partition_size} must be a multiple of the key tile {cfg.block_n}")
        want_lse = return_lse or lse is not None
        out = torch.empty_like(q) if out is None else out
        if want_lse and lse is None:
            lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        total = meta.num_actual_tokens
        if q.shape[0] > total:                     # rows no request owns: defined values
            out[total:].zero_()
            if lse is not None:
                lse[total:].fill_(float("-inf"))
        plan = step_plan(meta, cfg.block_m)
        nd = meta.num_decodes
        if nd:
            part = partition_size
            if part is None:
                part = decode_partition_size(nd, kv_cache.shape[1], plan.decode_max_seq_len, cfg.block_n,
                                             device_sms(q.device))
            paged_decode(q, kv_cache, out, lse, meta.query_start_loc[:nd], meta.seq_lens[:nd],
                         meta.block_table[:nd], params, cfg, max_seq_len=plan.decode_max_seq_len,
                         partition_size=part, sinks=sinks, k_scale=k_scale, v_scale=v_scale)
        prefix_prefill(q, kv_cache, out, lse, plan.tiles, meta.query_start_loc, meta.seq_lens, meta.block_table,
                       params, cfg, sinks=sinks, k_scale=k_scale, v_scale=v_scale)
        return (out, lse) if want_lse else out
