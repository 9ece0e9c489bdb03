"""The Triton ``write_kv`` kernel: reshape-and-cache into the packed layout, with fp8 quantization. Block
copies are ``kvlayout.ops.copy_blocks`` (the page kernels of ``triton_pages``)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvlayout.cache_ops import check_write_kv
from kvlayout.errors import KVLayoutError
from kvlayout.fp8 import fp8_format, scale_arg
from kvlayout.specs import is_fp8


@triton.jit
def _round_to_fp8_grid(x, MBITS: tl.constexpr, EMIN: tl.constexpr, FMAX: tl.constexpr):
    """Saturate ``x`` (float32; +-inf too) to +-FMAX and round it to nearest-even on the fp8 grid in float32, so the
    final cast is exact on every path (Triton's CPU interpreter drops the carry when a cast rounds up
    into the next power of two)."""
    bits = x.to(tl.int32, bitcast=True)
    a = tl.minimum(tl.abs(x), FMAX)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN) - MBITS                       # exponent of one unit in the last place
    ulp = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - e) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0                                    # 1.5 * 2^23: adding it rounds to an integer (RNE)
    r = ((a * inv_ulp + magic) - magic) * ulp             # exact: ulp is a power of two
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)  # sign back


@triton.jit
def _to_fp8(x, dtype: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, FMAX: tl.constexpr):
    """``x`` (float32) as fp8 ``dtype``: saturated and rounded (``_round_to_fp8_grid``), NaN as the format's
    NaN with x's sign (bits 0x7F / 0xFF in both e4m3fn and e5m2), as torch casts it. The NaN bits are set
    here because the interpreter's cast turns NaN into a finite value."""
    y = _round_to_fp8_grid(x, MBITS, EMIN, FMAX).to(dtype).to(tl.int8, bitcast=True)
    nan = tl.where(x.to(tl.int32, bitcast=True) < 0, -1, 127).to(tl.int8)
    return tl.where(x != x, nan, y).to(dtype, bitcast=True)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kv_ptr, slot_ptr, k_scale_ptr, v_scale_ptr, num_tokens,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch, stride_cn,
                     k_scale_stride, v_scale_stride,
                     HEAD: tl.constexpr, NUM_HEADS: tl.constexpr, PAGE: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_C: tl.constexpr, FP8: tl.constexpr, K_SCALE: tl.constexpr, V_SCALE: tl.constexpr,
                     MBITS: tl.constexpr, EMIN: tl.constexpr, FMAX: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)       # flattened (head, d)
    h = c // HEAD
    d = c % HEAD
    t_ok = t < num_tokens
    slot = tl.load(slot_ptr + t, mask=t_ok, other=-1).to(tl.int64)
    c_ok = c < NUM_HEADS * HEAD
    ok = (slot >= 0)[:, None] & c_ok[None, :]
    blk = slot // PAGE
    dst = kv_ptr + (blk * stride_cb + (slot % PAGE) * stride_cn)[:, None] + (h * stride_ch + d)[None, :]
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + (t64 * stride_kt)[:, None] + (h * stride_kh + d)[None, :], mask=ok)
    v = tl.load(v_ptr + (t64 * stride_vt)[:, None] + (h * stride_vh + d)[None, :], mask=ok)
    if FP8:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        if K_SCALE:       # div_rn: correctly rounded like torch (a plain fp32 '/' is approximate on GPUs)
            k = tl.math.div_rn(k, tl.load(k_scale_ptr + h * k_scale_stride, mask=c_ok, other=1.0)[None, :])
        if V_SCALE:
            v = tl.math.div_rn(v, tl.load(v_scale_ptr + h * v_scale_stride, mask=c_ok, other=1.0)[None, :])
        k = _to_fp8(k, kv_ptr.dtype.element_ty, MBITS, EMIN, FMAX)
        v = _to_fp8(v, kv_ptr.dtype.element_ty, MBITS, EMIN, FMAX)
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + HEAD, v.to(kv_ptr.dtype.element_ty), mask=ok)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
             validate: bool = True) -> None:
    """Write token ``t``'s K and V (``[T, H_kv, D]``, last dim contiguous) into slot ``slot_mapping[t]`` of
    the packed cache (block ``slot // N``, offset ``slot % N``); slot -1 is skipped. fp8 caches store
    ``x / scale`` (per-tensor or per-KV-head float32 scale) saturated and rounded to nearest-even
    (``kvlayout.fp8``).
    ``validate=False`` skips the checks (and their host sync) on the hot path."""
    if validate:
        check_write_kv(kv_cache, k, v, slot_mapping, k_scale, v_scale)
        if k.stride(-1) != 1 or v.stride(-1) != 1:
            raise KVLayoutError("write_kv: k and v need a contiguous last dim (stride 1)")
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    h, page, d = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3] // 2
    fp8 = is_fp8(kv_cache.dtype)
    mbits, emin, fmax = fp8_format(kv_cache.dtype) if fp8 else (0, 0, 0.0)
    width = h * d
    block_c = min(triton.next_power_of_2(width), 1024)
    block_t = max(1, 2048 // block_c)
    ks, vs = scale_arg(k_scale, kv_cache.dtype, slot_mapping), scale_arg(v_scale, kv_cache.dtype, slot_mapping)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(width, block_c))
    _write_kv_kernel[grid](
        k, v, kv_cache, slot_mapping, ks.tensor, vs.tensor, num_tokens,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), ks.stride, vs.stride,
        HEAD=d, NUM_HEADS=h, PAGE=page, BLOCK_T=block_t, BLOCK_C=block_c, FP8=fp8, K_SCALE=ks.on, V_SCALE=vs.on,
        MBITS=mbits, EMIN=emin, FMAX=fmax, num_warps=4)
