"""Reference backend: plain PyTorch, float32 math, one request at a time. The oracle for every other
backend and the CPU default; not fast."""

from __future__ import annotations


import torch

from kvlayout.cache_ops import gather_kv
from kvlayout.capabilities import BackendCapabilities
from kvlayout.reference import dense_attention
from kvlayout.specs import ATTENTION_DTYPES

from .base import AttentionBackend, AttentionOutput, output_buffers

TORCH_CAPABILITIES = BackendCapabilities(
    name="torch",
    kv_dtypes=frozenset(ATTENTION_DTYPES),
    q_dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    features=frozenset({"non_causal", "sliding_window", "soft_cap", "sinks", "fp8_kv", "lse", "mla",
                        "cross_layer", "padded_steps"}),
    lse_base="e",
)


def scheduled_requests(meta):
    """``(r, q0, q1, s)`` for each request ``r`` of the step with query rows ``q0 .. q1`` (skipping requests
    with none) and ``s`` tokens in the cache after this step."""
    qsl, seq_lens = meta.query_start_loc_cpu.tolist(), meta.seq_lens_cpu.tolist()
    for r in range(meta.num_reqs):
        if qsl[r + 1] > qsl[r]:
            yield r, qsl[r], qsl[r + 1], seq_lens[r]


class TorchBackend(AttentionBackend):
    name = "torch"
    capabilities = TORCH_CAPABILITIES

    def forward(self, q, kv_cache, meta, params, *, sinks=None, k_scale=None, v_scale=None, out=None,
                lse=None, return_lse=False, validate=True) -> AttentionOutput:
        if validate:
            self.check_forward(q, kv_cache, meta, params, sinks, k_scale, v_scale, out, lse)
        out, lse_out = output_buffers(q, meta.num_actual_tokens, out, lse, return_lse)
        for r, q0, q1, s in scheduled_requests(meta):
            k, v = gather_kv(kv_cache, meta.block_table[r, : -(-s // meta.block_size)], s, k_scale, v_scale,
                             dtype=torch.float32)
            o, l = dense_attention(q[q0:q1].float(), k, v, params.scale, q_offset=s - (q1 - q0),
                                   causal=params.causal, sliding_window=params.sliding_window,
                                   soft_cap=params.logits_soft_cap, sinks=sinks)
            out[q0:q1] = o.to(out.dtype)
            if lse_out is not None:
                lse_out[q0:q1] = l
        return (out, lse_out) if (return_lse or lse is not None) else out

    def forward_mla(self, q, latent_cache, meta, kv_lora_rank, scale, *, causal=True, return_lse=False):
        """MLA in absorbed form: ``q [T, H, L+R]`` over latents ``[B, 1, N, L+R]``; keys are the whole
        latent, values its first ``kv_lora_rank`` entries. Returns ``[T, H, L]``."""
        self.check_forward_mla(q, latent_cache, meta, kv_lora_rank)
        out = torch.zeros(q.shape[0], q.shape[1], kv_lora_rank, dtype=q.dtype, device=q.device)
        lse_out = torch.full(q.shape[:2], float("-inf"), device=q.device)
        n = latent_cache.shape[2]
        for r, q0, q1, s in scheduled_requests(meta):
            ids = meta.block_table[r, : -(-s // n)].long()
            lat = latent_cache[ids, 0].reshape(-1, latent_cache.shape[3])[:s].float().unsqueeze(1)
            o, l = dense_attention(q[q0:q1].float(), lat, lat[..., :kv_lora_rank], scale,
                                   q_offset=s - (q1 - q0), causal=causal)
            out[q0:q1], lse_out[q0:q1] = o.to(out.dtype), l
        return (out, lse_out) if return_lse else out
