"""fp8 KV caches: what is stored, what the scales mean, and how every path undoes the quantization.

An fp8 cache (``float8_e4m3fn`` or ``float8_e5m2``) stores ``k / k_scale`` and ``v / v_scale``, saturated
to the format's largest finite value (finite values beyond it and +-inf alike; NaN stays NaN) and rounded
to nearest-even (``quantize``; the Triton ``write_kv``
kernel rounds on the same grid, ``fp8_format``). A scale is a float32 tensor of one element (per tensor)
or ``H_kv`` elements (one per KV head, ``check_scale``); on 16-bit caches there are no scales.

Reading undoes it as ``k = k8 * k_scale`` (``dequantize``), but the attention paths never widen a whole
cache: since ``q . (s * k8) = s * (q . k8)``, the K scale folds into the softmax scale of the KV head's
query heads (the Triton kernels: ``sm_scale * k_scale[kvh]``, ``kernels.softmax.fold_k_scale``) or into the
query itself (``fold_k_scale_into_query``, for libraries planned with one softmax scale). Since the output
is a weighted sum of values, ``sum_j p_j (s * v8_j) = s * sum_j p_j v8_j``: the V scale multiplies the
output rows of the KV head's query heads (``apply_v_scale_``; in the kernels ``finalize_heads``). Example,
per-head scales ``k_scale = [0.5, 2.0]`` with 4 query heads over 2 KV heads: query heads 0 and 1 use
softmax scale ``0.5 * scale``, heads 2 and 3 ``2.0 * scale``.

Kernels get a scale as a pointer and a per-head stride (``scale_arg``): stride 1 reads ``scale[kvh]``,
stride 0 broadcasts the one per-tensor element.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple, Optional

import torch

from .errors import KVLayoutError
from .specs import is_fp8


# ------------------------------------------------------------------------------------------------ checks

def check_scale(scale: Optional[torch.Tensor], num_kv_heads: int, what: str,
                device: Optional[torch.device] = None) -> None:
    """A scale must be None or a float32 tensor of 1 or ``num_kv_heads`` elements and at most one dim
    (on ``device``, when given), its values finite and > 0."""
    if scale is None:
        return
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.numel() not in (1, num_kv_heads) \
            or scale.dim() > 1:
        raise KVLayoutError(f"{what} must be a float32 tensor with one element (per-tensor) or "
                            f"{num_kv_heads} (per KV head), got {getattr(scale, 'shape', scale)!r}")
    if device is not None and scale.device != device:
        raise KVLayoutError(f"{what} is on {scale.device} but the cache is on {device}")
    if not _values_known_good(scale):
        values = scale.detach().cpu()
        if not bool(torch.isfinite(values).all()) or bool((values <= 0).any()):
            raise KVLayoutError(f"{what} must hold finite values > 0 (a stored value is x / scale), got "
                                f"{values.tolist()}")
        _remember_good(scale)


# id(scale) -> (a weak reference to it, the version counter its values were last checked at): a layer's
# scales are read back to the host once (and again only after an in-place change), not on every call.
# Keyed by id because tensors compare elementwise; the weak reference proves the id was not reused.
_values_checked: dict[int, tuple["weakref.ref[torch.Tensor]", int]] = {}


def _values_known_good(scale: torch.Tensor) -> bool:
    entry = _values_checked.get(id(scale))
    return entry is not None and entry[0]() is scale and entry[1] == scale._version


def _remember_good(scale: torch.Tensor) -> None:
    key = id(scale)
    ref = weakref.ref(scale, lambda _ref, key=key: _values_checked.pop(key, None)
                      if _values_checked.get(key, (None,))[0] is _ref else None)
    _values_checked[key] = (ref, scale._version)


def check_scales(k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], cache_dtype: torch.dtype,
                 num_kv_heads: int, device: Optional[torch.device] = None) -> None:
    """The K and V scales of a cache of ``cache_dtype``: only fp8 caches take scales; each as ``check_scale``."""
    if (k_scale is not None or v_scale is not None) and not is_fp8(cache_dtype):
        raise KVLayoutError("k_scale/v_scale are only for fp8 caches")
    check_scale(k_scale, num_kv_heads, "k_scale", device)
    check_scale(v_scale, num_kv_heads, "v_scale", device)


# ---------------------------------------------------------------------------------------- the fp8 grid

def fp8_format(dtype: torch.dtype) -> tuple[int, int, float]:
    """``(mantissa bits, exponent of the smallest normal, largest finite value)`` of an fp8 dtype: e4m3fn
    ``(3, -6, 448.0)``, e5m2 ``(2, -14, 57344.0)``."""
    info = torch.finfo(dtype)
    return round(-math.log2(info.eps)), round(math.log2(info.smallest_normal)), float(info.max)


def scale_for_heads(scale: Optional[torch.Tensor], device) -> torch.Tensor:
    """A scale as a ``(H_kv or 1, 1)`` float32 tensor to broadcast over ``(..., H, D)``; 1.0 if None."""
    if scale is None:
        return torch.ones(1, 1, device=device)
    return scale.reshape(-1, 1).to(device)


def quantize(x: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` saturated to the fp8 range of ``dtype``; ``x`` is ``[T, H, D]``, scale per tensor or
    per head (None: 1)."""
    limit = torch.finfo(dtype).max
    return (x.float() / scale_for_heads(scale, x.device)).clamp_(-limit, limit).to(dtype)


def dequantize(x: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x * scale`` in ``dtype`` (computed in float32); ``x`` is ``[..., H, D]``, scale per tensor or per head."""
    return (x.float() * scale_for_heads(scale, x.device)).to(dtype)


# ------------------------------------------------------------------------------- attention over fp8 K/V

def fold_k_scale_into_query(q: torch.Tensor, k_scale: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``q [T, H, D]`` with each query head multiplied by its KV head's K scale (in float32, back to q's
    dtype): scores of the result over the stored keys equal scores of ``q`` over the dequantized keys."""
    t, h, d = q.shape
    s = k_scale.reshape(1, -1, 1, 1).float()
    return (q.reshape(t, num_kv_heads, h // num_kv_heads, d).float() * s).to(q.dtype).reshape(t, h, d)


def apply_v_scale_(out: torch.Tensor, v_scale: torch.Tensor, num_kv_heads: int) -> None:
    """Multiply each query head's rows of ``out [T, H, D]`` (contiguous) by its KV head's V scale, in place."""
    t, h, d = out.shape
    o = out.view(t, num_kv_heads, h // num_kv_heads, d)
    o.copy_(o.float() * v_scale.reshape(1, -1, 1, 1).float())


class ScaleArg(NamedTuple):
    """A scale as kernel arguments: the tensor to point at (a dummy when there is none), the per-KV-head
    stride (1: one scale per head, 0: one for all) and whether the kernel applies it at all."""

    tensor: torch.Tensor
    stride: int
    on: bool


def scale_arg(scale: Optional[torch.Tensor], cache_dtype: torch.dtype, dummy: torch.Tensor) -> ScaleArg:
    """The kernel arguments of ``scale`` for a cache of ``cache_dtype`` (applied only on fp8 caches)."""
    if scale is None:
        return ScaleArg(dummy, 0, False)
    return ScaleArg(scale, 1 if scale.numel() > 1 else 0, is_fp8(cache_dtype))
