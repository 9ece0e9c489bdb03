"""Cache operations in PyTorch: append K/V through ``slot_mapping``, gather for checks (page copies and\nzeroing are ``kvlayout.ops``)."""

from __future__ import annotations

from typing import Optional

import torch

from . import fp8
from .checks import check_block_ids, check_slot_values
from .errors import KVLayoutError
from .specs import dtype_name, is_fp8
from .values import require_int


def check_kv_cache(kv_cache: torch.Tensor, what: str = "kv_cache") -> tuple[int, int, int, int]:
    """Check a packed attention cache ``(B, H, N, 2·D)`` and return ``(B, H, N, D)``."""
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 4:
        raise KVLayoutError(f"{what} must be a 4-D packed cache (blocks, kv_heads, block_size, 2*head_size), "
                            f"got {getattr(kv_cache, 'shape', type(kv_cache))}")
    b, h, n, c = kv_cache.shape
    if c % 2:
        raise KVLayoutError(f"{what}: last dim {c} is not 2*head_size (K and V side by side)")
    if kv_cache.stride(-1) != 1:
        raise KVLayoutError(f"{what}: the last dim must be contiguous (stride 1), got stride {kv_cache.stride(-1)}")
    return b, h, n, c // 2


def check_write_kv(kv_cache, k, v, slot_mapping, k_scale=None, v_scale=None, *, trusted_slots: bool = False
                   ) -> None:
    """Every check ``write_kv`` makes, without touching memory. The slot values are read on the host
    (each in range, no slot named twice) unless ``trusted_slots`` says they come from validated metadata."""
    b, h, n, d = check_kv_cache(kv_cache)
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or tuple(t.shape[1:]) != (h, d):
            raise KVLayoutError(f"{name} must be [num_tokens, {h}, {d}] to match the cache, got "
                                f"{tuple(getattr(t, 'shape', ()))}")
        if t.device != kv_cache.device:
            raise KVLayoutError(f"{name} is on {t.device} but the cache is on {kv_cache.device}")
        if not is_fp8(kv_cache.dtype) and t.dtype != kv_cache.dtype:
            raise KVLayoutError(f"{name} is {dtype_name(t.dtype)} but the cache is {dtype_name(kv_cache.dtype)}; "
                                f"cast it first (only fp8 caches quantize on write)")
        if is_fp8(kv_cache.dtype) and not t.dtype.is_floating_point:
            raise KVLayoutError(f"{name} must be floating point, got {dtype_name(t.dtype)}")
    if k.shape[0] != v.shape[0]:
        raise KVLayoutError(f"k has {k.shape[0]} tokens but v has {v.shape[0]}")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1 or \
            slot_mapping.dtype not in (torch.int32, torch.int64):
        raise KVLayoutError("slot_mapping must be a 1-D int32/int64 tensor")
    if slot_mapping.device != kv_cache.device:
        raise KVLayoutError(f"slot_mapping is on {slot_mapping.device} but the cache is on {kv_cache.device}")
    if slot_mapping.shape[0] < k.shape[0]:
        raise KVLayoutError(f"slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[0]} tokens")
    fp8.check_scales(k_scale, v_scale, kv_cache.dtype, h, kv_cache.device)
    if not trusted_slots:
        check_slot_values(slot_mapping, k.shape[0], b, n)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
             validate: bool = True) -> None:
    """Write token ``t``'s K and V into slot ``slot_mapping[t]`` (block = slot // N, offset = slot % N).
    Slot -1 is skipped; a slot named for two tokens is refused (``validate=True``; with ``validate=False``
    the caller promises there is none, and which token lands is undefined). fp8 caches quantize with
    per-tensor or per-head scales (``kvlayout.fp8``): finite values beyond the format's range and +-inf
    saturate to its largest finite value, NaN stays NaN, identically on every path."""
    if validate:
        check_write_kv(kv_cache, k, v, slot_mapping, k_scale, v_scale)
    n, d = kv_cache.shape[2], kv_cache.shape[3] // 2
    slots = slot_mapping[: k.shape[0]]
    keep = torch.nonzero(slots >= 0).squeeze(1)
    slots = slots[keep].long()
    kk, vv = k[keep], v[keep]
    if is_fp8(kv_cache.dtype):
        kk, vv = fp8.quantize(kk, k_scale, kv_cache.dtype), fp8.quantize(vv, v_scale, kv_cache.dtype)
    blk, off = slots // n, slots % n
    kv_cache[..., :d][blk, :, off] = kk
    kv_cache[..., d:][blk, :, off] = vv


def gather_kv(kv_cache: torch.Tensor, block_ids, num_tokens: int, k_scale: Optional[torch.Tensor] = None,
              v_scale: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_tokens`` K and V of a sequence whose blocks are ``block_ids``, as ``[S, H, D]``
    each (for debugging and tests). fp8 caches are dequantized to ``dtype`` (default float32)."""
    b, h, n, d = check_kv_cache(kv_cache)
    ids = check_block_ids(block_ids, b, kv_cache.device, "gather_kv")
    require_int(num_tokens, "gather_kv num_tokens")
    if num_tokens > ids.numel() * n:
        raise KVLayoutError(f"gather_kv: {num_tokens} tokens do not fit in {ids.numel()} blocks of {n}")
    pages = kv_cache[ids]                                   # [nb, H, N, 2D]
    flat = pages.permute(0, 2, 1, 3).reshape(-1, h, 2 * d)[:num_tokens]
    k, v = flat[..., :d], flat[..., d:]
    if is_fp8(kv_cache.dtype) or dtype is not None:
        out = dtype or torch.float32
        k, v = fp8.dequantize(k, k_scale, out), fp8.dequantize(v, v_scale, out)
    return k, v
