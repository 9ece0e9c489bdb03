"""Gated decode: decode attention whose scores carry a learned gate per (query head, key), as in
flash-sparse-attn's gated attention.

Each cached key ``j`` of KV head ``g`` carries a gate value ``delta[g, j]`` (float32), kept in a companion
paged tensor ``delta_cache (blocks, H_kv, N)`` that uses the same block ids as the K/V cache
(``write_gates`` appends new tokens' values through ``slot_mapping``, like ``write_kv``). The decoding
query of head ``h`` brings ``alpha[h]``. Score of key ``j`` for head ``h`` (in KV head ``g = h // group``)::

    s = scale * (q_h . k_j + G(alpha_h * delta[g, j]))      G = log-sigmoid (default) or the identity

then softmax over the request's keys as usual; LSE in base e. With log-sigmoid the gate only ever lowers a
score (``G <= 0``): a key whose gate product is very negative is effectively dropped, which is what
makes the attention sparse. flash-sparse-attn additionally skips key tiles whose largest possible gate is
below a threshold (an approximation that saves time); this op computes every gate exactly, so its result
does not depend on tile order or split counts.
"""

from __future__ import annotations

from typing import Optional

import torch

from .cache_ops import gather_kv
from .checks import check_slot_values
from .conventions import softmax_scale
from .errors import KVLayoutError
from .ops import _index_tensor, _run_attention, _use_triton, check_paged_decode
from .reference import dense_attention

GATES = ("logsigmoid", "linear")


def check_gated_decode(q, kv_cache, delta_cache, alpha, block_table, seq_lens, gate="logsigmoid", out=None,
                       lse=None, k_scale=None, v_scale=None) -> int:
    """Every check ``gated_decode`` makes, without touching memory (reads the index tensors on the host);
    returns the longest request."""
    if gate not in GATES:
        raise KVLayoutError(f"gate must be one of {GATES}, got {gate!r}")
    lens, _, _ = check_paged_decode(q, kv_cache, block_table, seq_lens, out, lse, k_scale, v_scale,
                                    what="gated_decode")
    b, h = q.shape[:2]
    num_blocks, h_kv, page = kv_cache.shape[:3]
    dev = kv_cache.device
    for name, t, shape in (("delta_cache", delta_cache, (num_blocks, h_kv, page)), ("alpha", alpha, (b, h))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != torch.float32 \
                or t.device != dev or t.stride(-1) != 1:
            raise KVLayoutError(f"{name} must be float32 {list(shape)} on {dev} with a contiguous last dim, got "
                                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    return int(lens.max()) if b else 0


def gated_decode(q: torch.Tensor, kv_cache: torch.Tensor, delta_cache: torch.Tensor, alpha: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, *, gate: str = "logsigmoid",
                 scale: Optional[float] = None, out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                 return_lse: bool = False, k_scale: Optional[torch.Tensor] = None,
                 v_scale: Optional[torch.Tensor] = None, impl=None, validate: bool = True):
    """Gated decode of ``q [B, H, D]`` (one token per request, already in the cache at ``seq_lens[b] - 1``)
    over every cached key of its request, with ``alpha [B, H]`` and the keys' ``delta_cache`` gates (see
    the module docstring). Returns ``out [B, H, D]`` (and ``lse [B, H]``, base e). fp8 caches take their
    ``k_scale``/``v_scale`` (``kvlayout.fp8``)."""
    if validate:
        max_seq_len = check_gated_decode(q, kv_cache, delta_cache, alpha, block_table, seq_lens, gate, out, lse,
                                         k_scale, v_scale)
    else:
        max_seq_len = block_table.shape[1] * kv_cache.shape[2]     # a host bound without reading seq_lens
    scale = softmax_scale(scale, q.shape[2])
    logsigmoid = gate == "logsigmoid"
    if _use_triton(impl, q.device, "gated_decode", q.dtype):
        from .kernels.gated import gated_decode_launch

        def launch(o, l):
            gated_decode_launch(q, kv_cache, delta_cache, alpha, block_table, seq_lens, o, l, scale=scale,
                                logsigmoid=logsigmoid, max_seq_len=max_seq_len, k_scale=k_scale, v_scale=v_scale)
        return _run_attention(q, q.shape[:2], out, lse, return_lse, launch=launch)
    return _run_attention(q, q.shape[:2], out, lse, return_lse, reference=lambda: gated_decode_reference(
        q, kv_cache, delta_cache, alpha, block_table, seq_lens, scale=scale, logsigmoid=logsigmoid, k_scale=k_scale,
        v_scale=v_scale))


def gated_decode_reference(q, kv_cache, delta_cache, alpha, block_table, seq_lens, *, scale: float,
                           logsigmoid: bool, k_scale=None, v_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch reference, float32 math (fp8 dequantized), one request at a time: dense attention with
    the gate terms ``scale * G(alpha * delta)`` added to the scaled scores."""
    n = kv_cache.shape[2]
    group = q.shape[1] // kv_cache.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), device=q.device)
    for r, s in enumerate(seq_lens.tolist()):
        if s == 0:
            continue
        pos = torch.arange(s, device=q.device)
        blk = block_table[r].long()[pos // n]
        k, v = gather_kv(kv_cache, block_table[r, : -(-s // n)], s, k_scale, v_scale, dtype=torch.float32)
        g = alpha[r][:, None] * delta_cache[blk, :, pos % n].repeat_interleave(group, dim=1).T     # [H, S]
        if logsigmoid:
            g = torch.nn.functional.logsigmoid(g)
        o, l = dense_attention(q[r:r + 1].float(), k, v, scale, q_offset=s - 1, causal=False,
                               score_bias=(scale * g)[:, None, :])
        out[r] = o[0].to(out.dtype)
        lse[r] = l[0]
    return out, lse


def write_gates(delta_cache: torch.Tensor, delta_new: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write the new tokens' gate values ``delta_new [T, H_kv]`` float32 into slots ``slot_mapping[:T]``
    (block ``slot // N``, offset ``slot % N``; -1 skips a token); checked before anything is written."""
    if not isinstance(delta_cache, torch.Tensor) or delta_cache.dim() != 3 or delta_cache.dtype != torch.float32:
        raise KVLayoutError(f"delta_cache must be float32 (blocks, H_kv, N), got "
                            f"{getattr(delta_cache, 'dtype', type(delta_cache).__name__)}")
    nb, h_kv, n = delta_cache.shape
    if not isinstance(delta_new, torch.Tensor) or delta_new.dim() != 2 or delta_new.shape[1] != h_kv \
            or delta_new.dtype != torch.float32 or delta_new.device != delta_cache.device:
        raise KVLayoutError(f"delta_new must be float32 [T, {h_kv}] on {delta_cache.device}, got "
                            f"{getattr(delta_new, 'dtype', type(delta_new).__name__)} "
                            f"{tuple(getattr(delta_new, 'shape', ()))}")
    _index_tensor(slot_mapping, "slot_mapping", 1, delta_cache.device)
    t = delta_new.shape[0]
    if slot_mapping.shape[0] < t:
        raise KVLayoutError(f"slot_mapping has {slot_mapping.shape[0]} slots for {t} tokens")
    check_slot_values(slot_mapping, t, nb, n)
    slots = slot_mapping[:t].long()
    keep = torch.nonzero(slots >= 0).squeeze(1)
    s = slots[keep]
    delta_cache[s // n, :, s % n] = delta_new[keep]


__all__ = ["GATES", "check_gated_decode", "gated_decode", "gated_decode_reference", "write_gates"]
