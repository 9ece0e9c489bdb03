"""Cache-aware functional ops for callers that drive the paged cache themselves (not through a backend's
``forward``): paged prefill that appends its chunk in the same call, masked (right-padded) encoder prefill,
merging attention states by their LSE, and whole-page ops (copy, compact, zero) for every cache kind.

Each op takes ``impl="triton" | "torch" | None``: None picks Triton where it can run (a CUDA device, or the
CPU interpreter with ``TRITON_INTERPRET=1``; bf16 attention not under the interpreter, whose ``tl.dot`` is
wrong for bf16), otherwise the PyTorch reference (``kvlayout.ops_reference``). With ``validate=True`` (the
default) every input is checked before any memory is touched, so a rejected call changes nothing; the
checks read small index tensors on the host. ``validate=False`` trusts the caller and skips them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from . import ops_reference as ref
from .allocation import KVCache
from .checks import check_block_ids, check_out_buffer, check_schedule
from .cache_ops import check_kv_cache
from .conventions import LSE_BASES, lse_factor, soft_cap_value, softmax_scale
from .errors import KVLayoutError, UnsupportedFeatureError
from .kernels import interpreting
from .fp8 import check_scales
from .specs import dtype_name, is_fp8

ATTENTION_OP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_STATES = 256
DEFAULT_STAGING_BYTES = 256 << 20

Impl = Optional[str]
BlockIds = Union[Sequence[int], torch.Tensor]


# ----------------------------------------------------------------------------------------------- dispatch

def _use_triton(impl: Impl, device: torch.device, what: str, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether to run the Triton kernel; raises if ``impl="triton"`` was asked for and cannot run here."""
    if impl not in (None, "triton", "torch"):
        raise KVLayoutError(f"{what}: impl must be 'triton', 'torch' or None (pick), got {impl!r}")
    if impl == "torch":
        return False
    reason = None
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        reason = f"Triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors); the inputs are on {device}"
    elif device.type == "cpu" and dtype == torch.bfloat16:
        reason = "the Triton CPU interpreter computes bf16 matrix products wrongly; use fp16/fp32 or impl='torch'"
    if reason is None:
        try:
            import triton  # noqa: F401
        except ImportError as e:                                # pragma: no cover - triton is a dependency
            reason = f"triton cannot be imported ({e})"
    if reason is not None and impl == "triton":
        raise UnsupportedFeatureError(f"{what}: impl='triton' cannot run here: {reason}")
    return reason is None


# ------------------------------------------------------------------------------------------ small checks

def _tensor(t, what: str, dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != dim:
        raise KVLayoutError(f"{what} must be a {dim}-D tensor, got {tuple(getattr(t, 'shape', ())) or type(t).__name__}")
    return t


def _index_tensor(t, what: str, dim: int, device: torch.device) -> torch.Tensor:
    _tensor(t, what, dim)
    if t.dtype not in (torch.int32, torch.int64):
        raise KVLayoutError(f"{what} must be int32 or int64, got {dtype_name(t.dtype)}")
    if t.device != device:
        raise KVLayoutError(f"{what} is on {t.device} but the data is on {device}")
    return t


def _check_same_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise KVLayoutError(f"{name} is on {t.device} but the other inputs are on {device}")


def _check_inner_contiguous(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.numel() and t.stride(-1) != 1:
            raise KVLayoutError(f"{name}: the last dim must be contiguous (stride 1), got stride {t.stride(-1)}")


# ------------------------------------------------------------------------------ decode-request checks

def check_paged_decode(q, kv_cache, block_table, seq_lens, out=None, lse=None, k_scale=None, v_scale=None, *,
                       what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checks a decode op over paged requests shares (one query token per request, ``q [B, H, D]``,
    ``seq_lens [B]`` tokens in the cache, ``block_table [B, W]``): the cache (fp16/bf16/fp32, or fp8 with
    its scales and 16/32-bit queries), q's shape, dtype and device, the index tensors, ``out``/``lse``,
    and every page a request's tokens need is in its row and in the cache. Returns the host copies
    ``(lens, pages per request, table)`` (int64) for the op's own checks."""
    num_blocks, h_kv, page, d = check_kv_cache(kv_cache)
    fp8 = is_fp8(kv_cache.dtype)
    if kv_cache.dtype not in ATTENTION_OP_DTYPES and not fp8:
        raise UnsupportedFeatureError(f"{what} does not take a {dtype_name(kv_cache.dtype)} cache (fp16, bf16, fp32 "
                                      f"or fp8 with scales)")
    check_scales(k_scale, v_scale, kv_cache.dtype, h_kv, kv_cache.device)
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.shape[2] != d or q.shape[1] % h_kv:
        raise KVLayoutError(f"q must be [requests, heads, {d}] with heads a multiple of the cache's {h_kv} KV heads, "
                            f"got {tuple(getattr(q, 'shape', ()))}")
    if (q.dtype not in ATTENTION_OP_DTYPES if fp8 else q.dtype != kv_cache.dtype) or q.device != kv_cache.device:
        raise KVLayoutError(f"q is {dtype_name(q.dtype)} on {q.device}; the cache is {dtype_name(kv_cache.dtype)} on "
                            f"{kv_cache.device}" + (" (fp16, bf16 or fp32 queries over an fp8 cache)" if fp8 else ""))
    _check_inner_contiguous(q=q)
    dev = kv_cache.device
    _index_tensor(block_table, "block_table", 2, dev)
    _index_tensor(seq_lens, "seq_lens", 1, dev)
    b = q.shape[0]
    if seq_lens.shape[0] != b or block_table.shape[0] != b:
        raise KVLayoutError(f"q has {b} requests but seq_lens has {seq_lens.shape[0]} and block_table "
                            f"{block_table.shape[0]} rows")
    check_out_buffer(out, tuple(q.shape), q.dtype, dev, "out")
    check_out_buffer(lse, tuple(q.shape[:2]), torch.float32, dev, "lse")
    lens = seq_lens.cpu().long()
    table = block_table.cpu().long()
    if b and int(lens.min()) < 0:
        raise KVLayoutError(f"seq_lens has a negative length ({int(lens.min())})")
    pages = (lens + page - 1) // page
    if b and int(pages.max()) > table.shape[1]:
        r = int(torch.argmax((pages > table.shape[1]).int()))
        raise KVLayoutError(f"request {r} holds {int(lens[r])} tokens, {int(pages[r])} pages, but its block-table row "
                            f"has {table.shape[1]}")
    used = table[torch.arange(table.shape[1])[None, :] < pages[:, None]]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
        raise KVLayoutError(f"block_table names a block outside the cache's {num_blocks}")
    return lens, pages, table


# ------------------------------------------------------------------------------ paged prefill with append

def _run_attention(q: torch.Tensor, lse_shape, out, lse, return_lse: bool, *, launch=None, reference=None):
    """Run an attention op into ``out``/``lse`` (allocated when not given): ``launch(out, lse)`` for the
    Triton kernel (``lse`` None when not wanted), or ``reference() -> (out, lse)`` copied into them."""
    want_lse = return_lse or lse is not None
    if launch is not None:
        out = torch.empty_like(q) if out is None else out
        if want_lse and lse is None:
            lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
        launch(out, lse)
    else:
        o, l = reference()
        out = o if out is None else out.copy_(o)
        lse = l if lse is None else lse.copy_(l)
    return (out, lse) if want_lse else out


def check_paged_prefill_with_append(q, k_new, v_new, kv_cache, cu_seqlens_q, cache_seqlens, block_table,
                                    logits_soft_cap=None, out=None, lse=None, shared_block_ids=None, *,
                                    fp8_ok: bool = False, k_scale=None, v_scale=None, what: str =
                                    "paged_prefill_with_append") -> None:
    """Every check ``paged_prefill_with_append`` makes, without touching memory (reads the index tensors
    on the host). The schedule is held to the rules of ``build_attention_metadata`` (``check_schedule``),
    so a step the backends refuse is refused here too."""
    num_blocks, h_kv, page, d = check_kv_cache(kv_cache)
    fp8 = fp8_ok and is_fp8(kv_cache.dtype)
    if kv_cache.dtype not in ATTENTION_OP_DTYPES and not fp8:
        raise UnsupportedFeatureError(f"{what} does not take a {dtype_name(kv_cache.dtype)} cache "
                                      f"(fp16, bf16 or fp32{', or fp8 with scales' if fp8_ok else ''}); run quantized "
                                      f"caches through a backend")
    check_scales(k_scale, v_scale, kv_cache.dtype, h_kv, kv_cache.device)
    io_dtype = q.dtype if fp8 and isinstance(q, torch.Tensor) and q.dtype in ATTENTION_OP_DTYPES else kv_cache.dtype
    _tensor(q, "q", 3)
    t, h = q.shape[:2]
    if q.shape[2] != d:
        raise KVLayoutError(f"q has head size {q.shape[2]} but the cache holds head size {d}")
    if h % h_kv:
        raise KVLayoutError(f"q has {h} heads, not a multiple of the cache's {h_kv} KV heads (GQA needs H % H_kv == 0)")
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        _tensor(x, name, 3)
        if tuple(x.shape) != (t, h_kv, d):
            raise KVLayoutError(f"{name} must be [{t}, {h_kv}, {d}] (q's tokens, the cache's KV heads and head size), "
                                f"got {tuple(x.shape)}")
    for name, x in (("q", q), ("k_new", k_new), ("v_new", v_new)):
        if x.dtype != io_dtype:
            raise KVLayoutError(f"{name} is {dtype_name(x.dtype)} but the cache is {dtype_name(kv_cache.dtype)}"
                                + (f" (fp16, bf16 or fp32 inputs, all of one dtype, over an fp8 cache)" if fp8 else ""))
    dev = kv_cache.device
    _check_same_device(dev, q=q, k_new=k_new, v_new=v_new)
    _check_inner_contiguous(q=q, k_new=k_new, v_new=v_new)
    _index_tensor(cu_seqlens_q, "cu_seqlens_q", 1, dev)
    _index_tensor(cache_seqlens, "cache_seqlens", 1, dev)
    _index_tensor(block_table, "block_table", 2, dev)
    b = cache_seqlens.shape[0]
    if cu_seqlens_q.shape[0] != b + 1:
        raise KVLayoutError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries; {b} requests (cache_seqlens) need {b + 1}")
    if block_table.shape[0] != b:
        raise KVLayoutError(f"block_table has {block_table.shape[0]} rows for {b} requests")
    soft_cap_value(logits_soft_cap)
    check_out_buffer(out, tuple(q.shape), q.dtype, dev, "out")
    check_out_buffer(lse, (t, h), torch.float32, dev, "lse")

    cu = cu_seqlens_q.cpu().long()
    if int(cu[0]) != 0 or int(cu[-1]) != t:
        raise KVLayoutError(f"cu_seqlens_q must start at 0 and end at the token count {t}; got {int(cu[0])} .. "
                            f"{int(cu[-1])}")
    q_lens = cu[1:] - cu[:-1]
    if b and int(q_lens.min()) < 0:
        r = int(torch.nonzero(q_lens < 0)[0])
        raise KVLayoutError(f"cu_seqlens_q decreases at request {r} ({int(cu[r])} -> {int(cu[r + 1])}); it must be "
                            f"non-decreasing")
    lens = cache_seqlens.cpu().long()
    if b and int(lens.min()) < 0:
        raise KVLayoutError(f"cache_seqlens has a negative length ({int(lens.min())})")
    check_schedule(lens.numpy(), q_lens.numpy(), block_table.cpu().long().numpy(), num_blocks, page,
                   shared_block_ids)


def paged_prefill_with_append(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, kv_cache: torch.Tensor,
                              cu_seqlens_q: torch.Tensor, cache_seqlens: torch.Tensor, block_table: torch.Tensor, *,
                              causal: bool = True, scale: Optional[float] = None,
                              logits_soft_cap: Optional[float] = None, out: Optional[torch.Tensor] = None,
                              lse: Optional[torch.Tensor] = None, return_lse: bool = False, impl: Impl = None,
                              shared_block_ids=None, validate: bool = True):
    """Attention of each request's new tokens over its cached prefix plus themselves, appending the new
    K/V into the request's pages in the same call.

    ``q [T, H, D]``, ``k_new``/``v_new [T, H_kv, D]`` are packed over ``B`` requests by ``cu_seqlens_q
    [B+1]``; ``kv_cache`` is one layer's packed cache ``(blocks, H_kv, block_size, 2*D)``; ``cache_seqlens
    [B]`` the tokens each request had cached before this call; ``block_table [B, max_pages]`` its pages.
    New token ``i`` of request ``b`` sits at position ``cache_seqlens[b] + i`` and is written to that
    position's page slot. ``causal``: it sees positions up to its own (else the whole prefix and chunk).
    ``logits_soft_cap`` c > 0 turns scaled scores into ``c*tanh(s/c)``; None or 0 disables it. The op
    neither allocates pages nor advances ``cache_seqlens``. Returns ``out [T, H, D]`` (and, with
    ``return_lse`` or ``lse`` given, ``lse [T, H]`` float32, natural log). Two requests may list one page
    only when it holds a prefix they share and is named in ``shared_block_ids``; nobody appends into it
    (``kvlayout.checks.check_schedule`` has the rules).
    """
    if validate:
        check_paged_prefill_with_append(q, k_new, v_new, kv_cache, cu_seqlens_q, cache_seqlens, block_table,
                                        logits_soft_cap, out, lse, shared_block_ids)
    scale = softmax_scale(scale, q.shape[2])
    cap = soft_cap_value(logits_soft_cap)
    if _use_triton(impl, q.device, "paged_prefill_with_append", q.dtype):
        from .kernels.prefill import paged_prefill_append_launch

        def launch(o, l):
            paged_prefill_append_launch(q, k_new, v_new, kv_cache, cu_seqlens_q, cache_seqlens, block_table, o, l,
                                        scale=scale, causal=causal, soft_cap=cap)
        return _run_attention(q, q.shape[:2], out, lse, return_lse, launch=launch)
    return _run_attention(q, q.shape[:2], out, lse, return_lse, reference=lambda: ref.paged_prefill_with_append(
        q, k_new, v_new, kv_cache, cu_seqlens_q, cache_seqlens, block_table, causal=causal, scale=scale,
        logits_soft_cap=cap))


# ------------------------------------------------------------------------------ masked sequence prefill

def check_masked_sequence_prefill(q, k, v, valid_lens, logits_soft_cap=None, out=None, lse=None) -> None:
    """Every check ``masked_sequence_prefill`` makes (reads ``valid_lens`` on the host)."""
    _tensor(q, "q", 4)
    bsz, s, h, d = q.shape
    for name, x in (("k", k), ("v", v)):
        _tensor(x, name, 4)
        if tuple(x.shape[:2]) != (bsz, s) or x.shape[3] != d:
            raise KVLayoutError(f"{name} must be [{bsz}, {s}, H_kv, {d}] like q [B, S, H, D], got {tuple(x.shape)}")
    h_kv = k.shape[2]
    if v.shape[2] != h_kv:
        raise KVLayoutError(f"k has {h_kv} heads but v has {v.shape[2]}")
    if h % h_kv:
        raise KVLayoutError(f"q has {h} heads, not a multiple of k's {h_kv} (GQA needs H % H_kv == 0)")
    if q.dtype not in ATTENTION_OP_DTYPES:
        raise UnsupportedFeatureError(f"masked_sequence_prefill takes fp16, bf16 or fp32, got {dtype_name(q.dtype)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise KVLayoutError(f"{name} is {dtype_name(x.dtype)} but q is {dtype_name(q.dtype)}")
    _check_same_device(q.device, k=k, v=v)
    _check_inner_contiguous(q=q, k=k, v=v)
    _index_tensor(valid_lens, "valid_lens", 1, q.device)
    if valid_lens.shape[0] != bsz:
        raise KVLayoutError(f"valid_lens has {valid_lens.shape[0]} entries for a batch of {bsz}")
    soft_cap_value(logits_soft_cap)
    check_out_buffer(out, tuple(q.shape), q.dtype, q.device, "out")
    check_out_buffer(lse, (bsz, s, h), torch.float32, q.device, "lse")
    if bsz:
        lo, hi = int(valid_lens.min()), int(valid_lens.max())
        if lo < 0 or hi > s:
            raise KVLayoutError(f"valid_lens must lie in 0..{s} (the padded length), got {lo if lo < 0 else hi}")


def masked_sequence_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_lens: torch.Tensor, *,
                            causal: bool = False, scale: Optional[float] = None,
                            logits_soft_cap: Optional[float] = None, out: Optional[torch.Tensor] = None,
                            lse: Optional[torch.Tensor] = None, return_lse: bool = False, impl: Impl = None,
                            validate: bool = True):
    """Attention for a right-padded batch ``q [B, S, H, D]``, ``k``/``v [B, S, H_kv, D]``: sample ``b`` has
    ``valid_lens[b]`` real tokens; padded keys are left out of every softmax and padded query rows get
    output 0 (LSE -inf), so a ``valid_len`` of 0 gives zeros, never NaN. Non-causal by default (encoders).
    No mask tensor is built. Returns ``out`` (and ``lse [B, S, H]`` float32, natural log, when asked)."""
    if validate:
        check_masked_sequence_prefill(q, k, v, valid_lens, logits_soft_cap, out, lse)
    scale = softmax_scale(scale, q.shape[3])
    cap = soft_cap_value(logits_soft_cap)
    if _use_triton(impl, q.device, "masked_sequence_prefill", q.dtype):
        from .kernels.prefill import masked_prefill_launch

        def launch(o, l):
            masked_prefill_launch(q, k, v, valid_lens, o, l, scale=scale, causal=causal, soft_cap=cap)
        return _run_attention(q, q.shape[:3], out, lse, return_lse, launch=launch)
    return _run_attention(q, q.shape[:3], out, lse, return_lse, reference=lambda: ref.masked_sequence_prefill(
        q, k, v, valid_lens, causal=causal, scale=scale, logits_soft_cap=cap))


# -------------------------------------------------------------------------------------------- merge state

def _bases(lse_base, count: int) -> tuple[str, ...]:
    bases = (lse_base,) * count if isinstance(lse_base, str) else tuple(lse_base)
    if len(bases) != count or any(b not in LSE_BASES for b in bases):
        raise KVLayoutError("lse_base must be 'e' or '2'" + (" (or a pair of them, one per state)" if count == 2 else "")
                            + f", got {lse_base!r}")
    return bases


def _check_state(v, s, what: str, lead: int) -> None:
    _tensor(v, f"{what} values", lead + 1)
    _tensor(s, f"{what} LSE", lead)
    if not v.dtype.is_floating_point:
        raise KVLayoutError(f"{what} values must be floating point, got {dtype_name(v.dtype)}")
    if s.dtype != torch.float32:
        raise KVLayoutError(f"{what} LSE must be float32, got {dtype_name(s.dtype)}")
    if tuple(s.shape) != tuple(v.shape[:-1]):
        raise KVLayoutError(f"{what} LSE must have shape {tuple(v.shape[:-1])} (the values without head_size), "
                            f"got {tuple(s.shape)}")
    _check_same_device(v.device, **{f"{what} LSE": s})
    _check_inner_contiguous(**{f"{what} values": v})


def merge_state(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor, *,
                lse_base: Union[str, tuple[str, str]] = "e", out_lse_base: Optional[str] = None,
                out: Optional[torch.Tensor] = None, lse_out: Optional[torch.Tensor] = None, impl: Impl = None,
                validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention states over disjoint key sets: outputs ``v_a, v_b [T, H, D]`` with LSEs ``s_a,
    s_b [T, H]`` float32. ``lse_base`` says the base of the LSEs: "e" (natural log) or "2", or a pair when
    the two states come from backends with different bases (e.g. ``("e", "2")``); the merged LSE is in
    ``out_lse_base`` (default: state a's base). A state with LSE -inf counts for nothing. ``out`` (may be
    ``v_a``) and ``lse_out`` (may be ``s_a``) receive the result in place when given."""
    base_a, base_b = _bases(lse_base, 2)
    base_out = base_a if out_lse_base is None else _bases(out_lse_base, 1)[0]
    if validate:
        _check_state(v_a, s_a, "state a", 2)
        _check_state(v_b, s_b, "state b", 2)
        if v_b.shape != v_a.shape or v_b.dtype != v_a.dtype or v_b.device != v_a.device:
            raise KVLayoutError(f"the two states differ: {dtype_name(v_a.dtype)} {tuple(v_a.shape)} on {v_a.device} "
                                f"vs {dtype_name(v_b.dtype)} {tuple(v_b.shape)} on {v_b.device}")
        check_out_buffer(out, tuple(v_a.shape), v_a.dtype, v_a.device, "out")
        check_out_buffer(lse_out, tuple(s_a.shape), torch.float32, v_a.device, "lse_out")
    if out is None:
        out = torch.empty_like(v_a)
    if lse_out is None:
        lse_out = torch.empty_like(s_a)
    if _use_triton(impl, v_a.device, "merge_state"):
        from .kernels.merge import merge_two_launch
        merge_two_launch(v_a, s_a, v_b, s_b, out, lse_out, base_a=base_a, base_b=base_b, out_base=base_out)
    else:
        factors = torch.tensor([lse_factor(base_a, "2"), lse_factor(base_b, "2")], device=v_a.device)
        o, l = ref.merge_states(torch.stack([v_a, v_b], 1), torch.stack([s_a, s_b], 1), in_scale=factors,
                                out_base=base_out)
        out.copy_(o)
        lse_out.copy_(l)
    return out, lse_out


def merge_states(v: torch.Tensor, s: torch.Tensor, *, lse_base: str = "e", out: Optional[torch.Tensor] = None,
                 lse_out: Optional[torch.Tensor] = None, impl: Impl = None, validate: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``K`` states per row: ``v [T, K, H, D]`` (any strides, head dim contiguous) with LSEs ``s [T, K,
    H]`` float32 in ``lse_base`` ("e" or "2"), into ``out [T, H, D]`` and ``lse_out [T, H]`` (same base),
    written in place when given (``out`` may be ``v[:, 0]``). States with LSE -inf count for nothing; a row
    with none gets 0 and -inf."""
    (base,) = _bases(lse_base, 1)
    if validate:
        _check_state(v, s, "merge_states", 3)
        if v.shape[1] < 1:
            raise KVLayoutError("merge_states needs at least one state (v is [T, K, H, D] with K >= 1)")
        t, _, h, d = v.shape
        out_dtype = out.dtype if isinstance(out, torch.Tensor) and out.dtype.is_floating_point else v.dtype
        check_out_buffer(out, (t, h, d), out_dtype, v.device, "out")
        check_out_buffer(lse_out, (t, h), torch.float32, v.device, "lse_out")
    t, k, h, d = v.shape
    if out is None:
        out = torch.empty(t, h, d, dtype=v.dtype, device=v.device)
    if lse_out is None:
        lse_out = torch.empty(t, h, dtype=torch.float32, device=v.device)
    if k <= MAX_TRITON_STATES and _use_triton(impl, v.device, "merge_states"):
        from .kernels.merge import merge_states_launch
        merge_states_launch(v, s, out, lse_out, in_base=base, out_base=base)
    else:
        if impl == "triton":
            raise UnsupportedFeatureError(f"merge_states: the Triton kernel merges at most {MAX_TRITON_STATES} "
                                          f"states per row, got {k}; use impl='torch' or merge in steps")
        o, l = ref.merge_states(v, s, in_scale=torch.full((k,), lse_factor(base, "2"), device=v.device),
                                out_base=base)
        out.copy_(o)
        lse_out.copy_(l)
    return out, lse_out


# ---------------------------------------------------------------------------------------------- page ops

def page_bytes_view(cache: Union[KVCache, torch.Tensor], group: int = 0) -> torch.Tensor:
    """Any cache as an int8 view ``[X, B, P]`` of its pages: a ``KVCache`` group (every layer of it: ``X`` =
    layers for a layer-major group, 1 for a cross-layer one) or one layer's tensor (attention ``(B, H, N,
    2D)``, MLA ``(B, 1, N, C)``, Mamba ``(B, 1, 1, P)``; ``X`` = 1). No copy."""
    if isinstance(cache, KVCache):
        groups = cache.layout.groups
        if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < len(groups):
            raise KVLayoutError(f"group {group!r} does not exist; this cache has {len(groups)} groups")
        view = cache.group_blocks_view(group)
        return view.unsqueeze(0) if groups[group].cross_layer else view
    if not isinstance(cache, torch.Tensor) or cache.dim() < 2:
        raise KVLayoutError("page ops need a KVCache or a layer's cache tensor (blocks first, as "
                            f"allocate_kv_cache makes them), got {type(cache).__name__}")
    inner = cache.shape[1:]
    expect = torch.empty(inner, device="meta").stride()
    if any(sz > 1 and st != e for sz, st, e in zip(inner, cache.stride()[1:], expect)):
        raise KVLayoutError(f"one block of this cache tensor is not one contiguous span (shape {tuple(cache.shape)}, "
                            f"strides {cache.stride()}); pass the layer's view as allocate_kv_cache made it")
    size = cache.element_size()
    flat = torch.empty(0, dtype=torch.int8, device=cache.device).set_(cache.untyped_storage())
    return torch.as_strided(flat, (1, cache.shape[0], math.prod(inner) * size), (0, cache.stride(0) * size, 1),
                            cache.storage_offset() * size)


def _ids(block_ids, num_blocks: int, device, what: str, validate: bool) -> torch.Tensor:
    if validate:
        return check_block_ids(block_ids, num_blocks, device, what)
    return torch.as_tensor(block_ids, dtype=torch.int64, device=device)


def copy_blocks(cache: Union[KVCache, torch.Tensor], src: BlockIds, dst: BlockIds, *, group: int = 0,
                impl: Impl = None, validate: bool = True) -> None:
    """Copy page ``src[i]`` to page ``dst[i]`` for every ``i`` (fork / copy-on-write; the whole page, so a
    partly filled last page comes along with its filled slots). On a ``KVCache`` every layer of ``group``
    is copied, on a tensor that one layer. Acts as if all pages were read before any is written: with
    ``validate=True`` a source that is also a destination is staged first; with ``validate=False`` the
    caller promises there is none."""
    view = page_bytes_view(cache, group)
    nb = view.shape[1]
    s = _ids(src, nb, view.device, "copy_blocks src", validate)
    t = _ids(dst, nb, view.device, "copy_blocks dst", validate)
    if validate:
        if s.numel() != t.numel():
            raise KVLayoutError(f"copy_blocks: {s.numel()} source blocks but {t.numel()} destinations")
        if t.unique().numel() != t.numel():
            raise KVLayoutError("copy_blocks: a destination block appears twice")
    if not _use_triton(impl, view.device, "copy_blocks"):
        ref.copy_pages(view, s, view, t)
        return
    from .kernels.pages import copy_pages, word_view
    words = word_view(view)
    overlap = torch.isin(s, t) & (s != t) if validate else None
    if overlap is not None and bool(overlap.any()):
        staged = s[overlap].unique()
        aux = torch.empty((words.shape[0], staged.numel(), words.shape[2]), dtype=words.dtype, device=view.device)
        copy_pages(words, staged, aux, torch.arange(staged.numel(), device=view.device))
        copy_pages(words, s[~overlap], words, t[~overlap])
        copy_pages(aux, torch.searchsorted(staged, s[overlap]), words, t[overlap])
    else:
        copy_pages(words, s, words, t)


def zero_blocks(cache: Union[KVCache, torch.Tensor], block_ids: BlockIds, *, group: int = 0, impl: Impl = None,
                validate: bool = True) -> None:
    """Zero pages ``block_ids`` (of every layer of ``group`` on a ``KVCache``, or of one layer's tensor):
    new Mamba state must never start from stale bytes."""
    view = page_bytes_view(cache, group)
    ids = _ids(block_ids, view.shape[1], view.device, "zero_blocks", validate)
    if not _use_triton(impl, view.device, "zero_blocks"):
        ref.zero_pages(view, ids)
        return
    from .kernels.pages import word_view, zero_pages
    zero_pages(word_view(view), ids)


@dataclass(frozen=True)
class CompactRound:
    """One round of a compaction: first ``stage`` (cache page -> staging slot, for sources this round
    overwrites, and cycle-break saves), then, in parallel, ``direct`` (cache -> cache) and ``staged``
    (staging slot -> cache) moves. Pairs are ``(from, to)``."""

    stage: tuple[tuple[int, int], ...]
    direct: tuple[tuple[int, int], ...]
    staged: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class CompactPlan:
    rounds: tuple[CompactRound, ...]
    staging_blocks: int


def plan_compact(src: Sequence[int], dst: Sequence[int], round_moves: int) -> CompactPlan:
    """Order the moves ``src[i] -> dst[i]`` (sources distinct, destinations distinct) so that they run in
    parallel rounds of at most ``round_moves`` moves with at most ``round_moves + 2`` pages of staging.

    The moves form disjoint chains (``a -> b -> c``: ``a`` moves to ``b``, whose page moves to ``c``) and
    cycles. A chain is done tail first (``b -> c`` before ``a -> b``), so a page is never overwritten before
    its own move has read it; rounds are consecutive slices of that order, so no round can clobber a page
    a later round still has to read. Inside a round the moves run in parallel, so each source that
    another move of the same round overwrites is first copied to a staging slot (at most ``round_moves``).
    A cycle of at most ``round_moves`` moves is kept inside one round, where that staging resolves it. A
    longer cycle ``x0 -> x1 -> .. -> x(k-1) -> x0`` is cut: ``x(k-1)`` is saved to a cycle slot in the
    round where the cycle starts, the rest runs as the chain ``x(k-2) -> x(k-1)``, .., ``x0 -> x1``, and
    the saved page goes to ``x0`` last. Such a cycle spans more than one round, so at most two are open at
    any time: two cycle slots, alternating, suffice.
    """
    k_max = max(1, int(round_moves))
    moves = {int(s): int(d) for s, d in zip(src, dst) if int(s) != int(d)}
    targets = set(moves.values())
    order: list[tuple[str, list]] = []            # ("chain" | "cycle" | "long", [(from, to), ...])
    seen: set[int] = set()
    for head in moves:
        if head in targets:
            continue
        chain, s = [], head
        while s in moves:
            seen.add(s)
            chain.append((s, moves[s]))
            s = moves[s]
        order.append(("chain", chain[::-1]))
    for start in moves:
        if start in seen:
            continue
        cycle, s = [], start
        while s not in seen:
            seen.add(s)
            cycle.append((s, moves[s]))
            s = moves[s]
        order.append(("cycle" if len(cycle) <= k_max else "long", cycle))

    rounds: list[CompactRound] = []
    cur: list[tuple[tuple[str, int], int]] = []   # ((("page" | "slot"), id), to)
    saves: list[tuple[int, int]] = []
    max_staged, long_cycles = 0, 0

    def flush():
        nonlocal cur, saves, max_staged
        if not cur:
            return
        written = {to for _, to in cur}
        stage, direct, staged = list(saves), [], []
        for (kind, frm), to in cur:
            if kind == "slot":
                staged.append((frm, to))
            elif frm in written:
                slot = 2 + len(stage) - len(saves)
                stage.append((frm, slot))
                staged.append((slot, to))
            else:
                direct.append((frm, to))
        max_staged = max(max_staged, len(stage) - len(saves))
        rounds.append(CompactRound(tuple(stage), tuple(direct), tuple(staged)))
        cur, saves = [], []

    for kind, seq in order:
        if kind == "cycle" and len(cur) + len(seq) > k_max:
            flush()
        if kind == "long":
            slot = long_cycles % 2
            long_cycles += 1
            k = len(seq)
            seq_moves = [(("page", seq[i][0]), seq[i][1]) for i in range(k - 2, -1, -1)] + [(("slot", slot), seq[0][0])]
            for i, mv in enumerate(seq_moves):
                if len(cur) == k_max:
                    flush()
                if i == 0:
                    saves.append((seq[k - 1][0], slot))
                cur.append(mv)
        else:
            for frm, to in seq:
                if len(cur) == k_max:
                    flush()
                cur.append((("page", frm), to))
    flush()
    return CompactPlan(tuple(rounds), (2 + max_staged) if (long_cycles or max_staged) else 0)


def compact(cache: Union[KVCache, torch.Tensor], src: BlockIds, dst: Optional[BlockIds] = None, *, group: int = 0,
            max_staging_bytes: int = DEFAULT_STAGING_BYTES, impl: Impl = None, validate: bool = True) -> None:
    """Move page ``src[i]`` to page ``dst[i]`` in place (default ``dst[i] = i``: the live pages ``src``, in
    that order, become a dense prefix). Acts as one simultaneous move, overlaps included (``dst`` may name
    pages that are themselves sources, cycles too); pages that are no destination keep their bytes.
    Sources must be distinct, and destinations too. Triton moves in rounds through at most
    ``max_staging_bytes`` of staging (see ``plan_compact``); reads the ids on the host."""
    view = page_bytes_view(cache, group)
    nb = view.shape[1]
    s = _ids(src, nb, view.device, "compact src", validate)
    t = torch.arange(s.numel(), device=view.device) if dst is None else _ids(dst, nb, view.device, "compact dst",
                                                                              validate)
    if validate:
        if s.numel() != t.numel():
            raise KVLayoutError(f"compact: {s.numel()} source blocks but {t.numel()} destinations")
        if s.numel() > nb:
            raise KVLayoutError(f"compact: {s.numel()} moves but the cache has only {nb} blocks")
        if s.unique().numel() != s.numel():
            raise KVLayoutError("compact: a source block appears twice (a move reads each page once; use copy_blocks "
                                "to fork a page)")
        if t.unique().numel() != t.numel():
            raise KVLayoutError("compact: a destination block appears twice")
        if isinstance(max_staging_bytes, bool) or not isinstance(max_staging_bytes, int) or max_staging_bytes < 0:
            raise KVLayoutError(f"compact: max_staging_bytes must be a non-negative integer, got {max_staging_bytes!r}")
    if not _use_triton(impl, view.device, "compact"):
        ref.copy_pages(view, s, view, t)
        return
    from .kernels.pages import copy_pages, word_view
    words = word_view(view)
    span = max(1, view.shape[0] * view.shape[2])
    plan = plan_compact(s.tolist(), t.tolist(), max(1, max_staging_bytes // span - 2))
    aux = torch.empty((words.shape[0], plan.staging_blocks, words.shape[2]), dtype=words.dtype, device=view.device)
    parts = [(part, frm, to) for r in plan.rounds
             for part, frm, to in ((r.stage, words, aux), (r.direct, words, words), (r.staged, aux, words))]
    pairs = [pair for part, _, _ in parts for pair in part]
    ids = torch.tensor([p[0] for p in pairs] + [p[1] for p in pairs], dtype=torch.int64).to(view.device)
    pos, n = 0, len(pairs)
    for part, frm, to in parts:
        copy_pages(frm, ids[pos: pos + len(part)], to, ids[n + pos: n + pos + len(part)])
        pos += len(part)


_VARIANT_OPS = {"tree_attention": "tree", "tree_masks": "tree", "accept_drafts": "tree",
                "check_tree_attention": "tree", "sparse_decode": "sparse_decode",
                "check_sparse_decode": "sparse_decode", "gated_decode": "gated_decode",
                "check_gated_decode": "gated_decode", "write_gates": "gated_decode"}


def __getattr__(name: str):
    """The attention variants (tree attention in ``kvlayout.tree``, block-sparse decode in
    ``kvlayout.sparse_decode``, gated decode in ``kvlayout.gated_decode``) build on this module's checks;
    they are reachable here too, imported on first use."""
    if name in _VARIANT_OPS:
        import importlib
        return getattr(importlib.import_module(f"kvlayout.{_VARIANT_OPS[name]}"), name)
    raise AttributeError(f"module 'kvlayout.ops' has no attribute {name!r}")
