"""The ``rocm`` attention backend: Triton kernels in the shape AMD GPUs favour (``rocm_kernels``), over the
packed cache views, with the same feature matrix as the ``triton`` backend.

``forward`` launches the 2-D paged decode kernel for the leading one-token requests and the prefix-prefill
kernel for the rest, one after the other on the stream (no host sync). The prefill tile list and the
decode contexts' longest length are host data made once per step (``RocmStepPlan`` in ``meta.step_state``)
and shared by every layer; for padded metadata (``StepBuffers``, CUDA graphs) the tile list has a length
fixed by the padded sizes and is made on the device from ``query_start_loc``, so a captured step replays
with any schedule that fits. LSE is returned in base e. Validated on NVIDIA GPUs and under Triton's CPU interpreter; not
yet run on AMD hardware.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from kvlayout.errors import KVLayoutError
from kvlayout.metadata import AttentionMetadata

from kvlayout.kernels import interpreting
from kvlayout.kernels.decode import device_sms
from kvlayout.kernels.rocm import (RocmConfig, decode_partition_size, device_prefill_tiles, paged_decode,
                                   prefill_tiles, prefix_prefill, rocm_config)

from .base import AttentionOutput, output_buffers
from .triton_backend import TRITON_CAPABILITIES, TritonBackend

ROCM_CAPABILITIES = dataclasses.replace(TRITON_CAPABILITIES, name="rocm")


@dataclass(frozen=True)
class RocmStepKey:
    """Key of the rocm backend's per-step plan: the prefill tile height, and whether a CUDA graph is being
    captured (a padded step's tile list is device work the graph must record, not the warm-up's tensor)."""

    block_m: int
    capturing: bool = False


@dataclass(frozen=True)
class RocmStepPlan:
    """Host decisions for one step and one prefill tile height."""

    tiles: torch.Tensor             # int32 [n, 2] on the device: (request, first token) of each prefill tile
    decode_max_seq_len: int         # the longest context among the step's decode requests (0: none)


def _make_step_plan(meta: AttentionMetadata, block_m: int) -> RocmStepPlan:
    nd = meta.num_decodes
    if meta.padded is not None:           # CUDA-graph sizes: a tile list of fixed length made on the device
        num_tiles = (meta.num_actual_tokens - meta.num_decode_tokens) // block_m + meta.num_reqs - nd
        return RocmStepPlan(device_prefill_tiles(meta.query_start_loc, nd, block_m, num_tiles), meta.max_seq_len)
    tiles = torch.from_numpy(prefill_tiles(meta.query_start_loc_cpu, meta.num_decodes, block_m))
    if meta.device.type == "cuda":
        tiles = tiles.pin_memory().to(meta.device, non_blocking=True)
    return RocmStepPlan(tiles, int(meta.seq_lens_cpu[:nd].max()) if nd else 0)


def step_plan(meta: AttentionMetadata, block_m: int) -> RocmStepPlan:
    """The step's plan for ``block_m``, made on the first call and reused by every later layer."""
    capturing = meta.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return meta.step_state.get_or_make(RocmStepKey(block_m, capturing), lambda: _make_step_plan(meta, block_m))


class RocmBackend(TritonBackend):
    """The Triton backend's runtime, checks and ``write_kv``, with the AMD-shaped attention kernels."""

    name = "rocm"
    capabilities = ROCM_CAPABILITIES

    def config(self, q: torch.Tensor, head_size: int) -> RocmConfig:
        return rocm_config(head_size, q.dtype.itemsize, interpreting())

    def forward(self, q, kv_cache, meta, params, *, sinks=None, k_scale=None, v_scale=None, out=None,
                lse=None, return_lse=False, validate=True, partition_size: Optional[int] = None
                ) -> AttentionOutput:
        """See ``AttentionBackend.forward``. ``partition_size`` overrides the decode partitioning (0: one
        program per sequence and KV head; else keys per partition, a multiple of the key tile)."""
        if validate:
            self.check_forward(q, kv_cache, meta, params, sinks, k_scale, v_scale, out, lse)
        cfg = self.config(q, params.head_size)
        if validate and partition_size and partition_size % cfg.block_n:
            raise KVLayoutError(f"partition_size {partition_size} must be a multiple of the key tile {cfg.block_n}")
        want_lse = return_lse or lse is not None
        out, lse = output_buffers(q, meta.num_actual_tokens, out, lse, want_lse)
        if meta.num_actual_tokens == 0:
            return (out, lse) if want_lse else out
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
