"""Layer classes that own cache views. Use them as mixins: ``class MyAttn(kvl.AttentionLayer, nn.Module)``.
Each binds its own views in ``bind_kv_cache(tensor)``; the runner never reaches inside a layer's cache."""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from .cache_ops import check_write_kv
from .checks import check_slot_values
from .conventions import softmax_scale
from .errors import KVLayoutError
from .metadata import AttentionMetadata
from .params import AttentionParams
from .registry import resolve_backend
from .specs import AttentionSpec, MambaSpec, MLASpec, is_fp8


def _check_bound_shape(layer_name: str, tensor: torch.Tensor, block_shape: tuple, dtype: torch.dtype) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or tuple(tensor.shape[1:]) != tuple(block_shape):
        raise KVLayoutError(f"layer {layer_name!r} expects a cache of shape (blocks, {', '.join(map(str, block_shape))}), "
                            f"got {tuple(getattr(tensor, 'shape', ()))}")
    if tensor.dtype != dtype:
        raise KVLayoutError(f"layer {layer_name!r} expects a {dtype} cache, got {tensor.dtype}")


class AttentionLayer:
    """Keeps the packed cache ``(B, H, N, 2·D)`` and its K and V views, plus fp8 scales and sinks."""

    def __init__(self, *args, layer_name: str, spec: AttentionSpec, num_heads: int, scale: Optional[float] = None,
                 sinks: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None,
                 v_scale: Optional[torch.Tensor] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(spec, AttentionSpec):
            raise KVLayoutError(f"AttentionLayer {layer_name!r} needs an AttentionSpec, got {type(spec).__name__}")
        self.layer_name = layer_name
        self.kv_spec = spec
        self.attn_params = AttentionParams(num_heads, spec.num_kv_heads, spec.head_size, scale, spec.causal,
                                           spec.sliding_window, spec.logits_soft_cap)
        if spec.has_sinks and sinks is None:
            sinks = torch.zeros(num_heads, dtype=torch.float32)
        self.sinks = sinks
        if is_fp8(spec.dtype):
            k_scale = torch.ones(1) if k_scale is None else k_scale
            v_scale = torch.ones(1) if v_scale is None else v_scale
        self.k_scale, self.v_scale = k_scale, v_scale
        self.kv_cache: Optional[torch.Tensor] = None
        self._checked_backends: set[str] = set()

    def bind_kv_cache(self, tensor: torch.Tensor) -> None:
        _check_bound_shape(self.layer_name, tensor, self.kv_spec.block_shape(), self.kv_spec.dtype)
        d = self.kv_spec.head_size
        self.kv_cache = tensor
        self.k_cache = tensor[..., :d]             # (B, H, N, D) views, HND order
        self.v_cache = tensor[..., d:]
        dev = tensor.device
        for attr in ("k_scale", "v_scale", "sinks"):
            val = getattr(self, attr)
            if val is not None and val.device != dev:
                setattr(self, attr, val.to(dev))

    def attend(self, q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], meta: AttentionMetadata,
               backend, *, return_lse: bool = False, out: Optional[torch.Tensor] = None, validate: bool = True):
        """Append ``k``, ``v`` (``[T, H_kv, D]``; None to skip, e.g. cross-attention after its first step)
        through ``meta.slot_mapping``, then return attention of ``q [T, H, D]`` over the cache.
        ``backend`` is a backend or its name. Every check runs before the write, so a refused call
        changes nothing; ``meta`` must come from ``build_attention_metadata`` (its slots are then trusted,
        with no device read). ``validate=False`` skips the per-call checks for a hot loop whose inputs
        the caller already trusts."""
        if self.kv_cache is None:
            raise KVLayoutError(f"layer {self.layer_name!r} has no cache bound; call bind_kv_cache first")
        backend = _checked_backend(self, backend, self.kv_cache.device)
        return attend_paged(q, k, v, self.kv_cache, meta, backend, self.attn_params, sinks=self.sinks,
                            k_scale=self.k_scale, v_scale=self.v_scale, return_lse=return_lse, out=out,
                            validate=validate)

    def attend_op(self, q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], *,
                  return_lse: bool = False):
        """``attend`` as the custom op ``torch.ops.kvlayout.attend``, for models run under ``torch.compile``
        or captured in CUDA graphs: the step's metadata, backend and ``validate`` come from the
        ``kvlayout.step_context`` the caller opened around the model call, so the compiled graph holds one
        opaque op per layer and no host integer of the step. Check the backend against the layer's spec
        once beforehand (``check_backend``)."""
        if self.kv_cache is None:
            raise KVLayoutError(f"layer {self.layer_name!r} has no cache bound; call bind_kv_cache first")
        p = self.attn_params
        out, lse = torch.ops.kvlayout.attend(q, k, v, self.kv_cache, self.sinks, self.k_scale, self.v_scale,
                                             p.num_heads, p.scale, p.causal, p.sliding_window or 0,
                                             p.logits_soft_cap or 0.0, return_lse)
        return (out, lse) if return_lse else out

    def check_backend(self, backend) -> None:
        """Refuse ``backend`` (or its name) now if it cannot serve this layer's spec."""
        _checked_backend(self, backend, self.kv_cache.device if self.kv_cache is not None else None)


def attend_paged(q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], kv_cache: torch.Tensor,
                 meta: AttentionMetadata, backend, params: AttentionParams, *, sinks: Optional[torch.Tensor] = None,
                 k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
                 return_lse: bool = False, out: Optional[torch.Tensor] = None, validate: bool = True):
    """The body of ``AttentionLayer.attend`` (and of the ``kvlayout::attend`` op) for a resolved backend:
    every check before the K/V write, then the write, then the forward."""
    if (k is None) != (v is None):
        raise KVLayoutError("pass both k and v, or neither")
    if validate:
        backend.check_forward(q, kv_cache, meta, params, sinks, k_scale, v_scale, out)
        if k is not None:
            _check_step_rows(meta, k=k, v=v)
            check_write_kv(kv_cache, k, v, meta.slot_mapping, k_scale, v_scale, trusted_slots=True)
    if k is not None:
        backend.write_kv(kv_cache, k, v, meta.slot_mapping, k_scale, v_scale, validate=False)
    return backend.forward(q, kv_cache, meta, params, sinks=sinks, k_scale=k_scale, v_scale=v_scale, out=out,
                           return_lse=return_lse, validate=False)


def _checked_backend(layer, backend, device: torch.device):
    """``backend`` resolved (a name is looked up) and checked once per layer against the layer's spec."""
    backend = resolve_backend(backend, device)
    if backend.name not in layer._checked_backends:
        backend.check_spec(layer.layer_name, layer.kv_spec)
        layer._checked_backends.add(backend.name)
    return backend


def _check_step_rows(meta: AttentionMetadata, **rows: torch.Tensor) -> None:
    """Each tensor of new rows covers the step's tokens (padding rows past them are allowed up to the
    length of ``slot_mapping``): fewer rows would leave scheduled slots holding stale bytes."""
    lo, hi = meta.num_actual_tokens, meta.slot_mapping.shape[0]
    for name, t in rows.items():
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise KVLayoutError(f"{name} must be a tensor with one row per scheduled token, got {type(t).__name__}")
        if not lo <= t.shape[0] <= hi:
            raise KVLayoutError(f"{name} has {t.shape[0]} rows but the step schedules {lo} tokens"
                                + (f" (at most {hi} with padding)" if hi > lo else "")
                                + "; pass one row per scheduled token")


class MLALayer:
    """Keeps the latent cache ``(B, 1, N, kv_lora_rank + rope_dim)``."""

    def __init__(self, *args, layer_name: str, spec: MLASpec, num_heads: int, scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(spec, MLASpec):
            raise KVLayoutError(f"MLALayer {layer_name!r} needs an MLASpec, got {type(spec).__name__}")
        self.layer_name, self.kv_spec, self.num_heads = layer_name, spec, num_heads
        if scale is None:
            raise KVLayoutError(f"MLALayer {layer_name!r} needs its softmax scale (MLA models set it from the "
                                f"un-absorbed head size, so there is no default)")
        self.scale = softmax_scale(scale, spec.kv_lora_rank + spec.rope_dim)
        self.latent_cache: Optional[torch.Tensor] = None
        self._checked_backends: set[str] = set()

    def bind_kv_cache(self, tensor: torch.Tensor) -> None:
        _check_bound_shape(self.layer_name, tensor, self.kv_spec.block_shape(), self.kv_spec.dtype)
        self.latent_cache = tensor

    def write_latent(self, latent: torch.Tensor, slot_mapping: torch.Tensor, *, trusted_slots: bool = False) -> None:
        """Write ``latent [T, L+R]`` into its slots (-1 skipped; each slot at most once). The slots are
        read on the host unless ``trusted_slots`` (validated metadata's slots)."""
        if self.latent_cache is None:
            raise KVLayoutError(f"layer {self.layer_name!r} has no cache bound; call bind_kv_cache first")
        check_latent(self.latent_cache, latent, slot_mapping, trusted_slots)
        store_latent(self.latent_cache, latent, slot_mapping)

    def attend(self, q: torch.Tensor, latent: Optional[torch.Tensor], meta: AttentionMetadata, backend,
               return_lse: bool = False):
        """Append ``latent [T, L+R]`` (None to skip) through ``meta.slot_mapping``, then attend ``q [T, H,
        L+R]`` over the latent cache; returns ``[T, H, L]``. ``backend`` is a backend or its name. Every
        check (the backend's MLA support included) runs before the write."""
        if self.latent_cache is None:
            raise KVLayoutError(f"layer {self.layer_name!r} has no cache bound; call bind_kv_cache first")
        backend = _checked_backend(self, backend, self.latent_cache.device)
        return attend_latent(q, latent, self.latent_cache, meta, backend, self.kv_spec.kv_lora_rank, self.scale,
                             return_lse=return_lse)

    def attend_op(self, q: torch.Tensor, latent: Optional[torch.Tensor], *, return_lse: bool = False):
        """``attend`` as the custom op ``torch.ops.kvlayout.mla_attend`` (see ``AttentionLayer.attend_op``)."""
        if self.latent_cache is None:
            raise KVLayoutError(f"layer {self.layer_name!r} has no cache bound; call bind_kv_cache first")
        out, lse = torch.ops.kvlayout.mla_attend(q, latent, self.latent_cache, self.kv_spec.kv_lora_rank,
                                                 self.scale, return_lse)
        return (out, lse) if return_lse else out

    def check_backend(self, backend) -> None:
        """Refuse ``backend`` (or its name) now if it cannot serve this layer's spec."""
        _checked_backend(self, backend, self.latent_cache.device if self.latent_cache is not None else None)


def attend_latent(q: torch.Tensor, latent: Optional[torch.Tensor], latent_cache: torch.Tensor,
                  meta: AttentionMetadata, backend, kv_lora_rank: int, scale: float, *, return_lse: bool = False):
    """The body of ``MLALayer.attend`` (and of the ``kvlayout::mla_attend`` op): every check (the
    backend's MLA support included) before the latent write, then the write, then the forward."""
    backend.check_forward_mla(q, latent_cache, meta, kv_lora_rank)
    if latent is not None:
        _check_step_rows(meta, latent=latent)
        check_latent(latent_cache, latent, meta.slot_mapping, trusted_slots=True)
        store_latent(latent_cache, latent, meta.slot_mapping)
    return backend.forward_mla(q, latent_cache, meta, kv_lora_rank, scale, return_lse=return_lse)


def store_latent(latent_cache: torch.Tensor, latent: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``latent [T, L+R]`` into slots ``slot_mapping[:T]`` of ``latent_cache`` (-1 skipped)."""
    n = latent_cache.shape[2]
    slots = slot_mapping[: latent.shape[0]]
    keep = torch.nonzero(slots >= 0).squeeze(1)
    s = slots[keep]
    latent_cache[s // n, 0, s % n] = latent[keep]


def check_latent(latent_cache: torch.Tensor, latent, slot_mapping, trusted_slots: bool) -> None:
    """Every check of a latent write, without touching memory."""
    b, _, n, c = latent_cache.shape
    if not isinstance(latent, torch.Tensor) or latent.dim() != 2 or latent.shape[1] != c \
            or latent.dtype != latent_cache.dtype or latent.device != latent_cache.device:
        raise KVLayoutError(f"latent must be [T, {c}] {latent_cache.dtype} on {latent_cache.device}, "
                            f"got {tuple(getattr(latent, 'shape', ()))} {getattr(latent, 'dtype', type(latent))}")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1 or \
            slot_mapping.dtype not in (torch.int32, torch.int64) or slot_mapping.shape[0] < latent.shape[0] \
            or slot_mapping.device != latent_cache.device:
        raise KVLayoutError(f"slot_mapping must be a 1-D int32/int64 tensor on {latent_cache.device} with at "
                            f"least {latent.shape[0]} entries, got {getattr(slot_mapping, 'dtype', type(slot_mapping))} "
                            f"{tuple(getattr(slot_mapping, 'shape', ()))}")
    if not trusted_slots:
        check_slot_values(slot_mapping, latent.shape[0], b, n)


def mamba_state_views(page_cache: torch.Tensor, spec: MambaSpec) -> dict[str, torch.Tensor]:
    """Slice each named state out of the raw pages ``(B, 1, 1, page_bytes)`` int8: ``{name: (B, *shape)}``,
    views with the page's block stride, at the spec's byte offsets."""
    if page_cache.dtype != torch.int8 or page_cache.dim() != 4 or page_cache.shape[1:3] != (1, 1) \
            or page_cache.shape[3] != spec.page_size_bytes:
        raise KVLayoutError(f"Mamba pages must be int8 (B, 1, 1, {spec.page_size_bytes}), got "
                            f"{page_cache.dtype} {tuple(page_cache.shape)}")
    block_stride = page_cache.stride(0)
    base = page_cache.storage_offset()
    views = {}
    for sl in spec.slices():
        item = sl.dtype.itemsize
        if (base + sl.byte_offset) % item or block_stride % item:
            raise KVLayoutError(f"state {sl.name!r} would not be aligned to its dtype {sl.dtype}")
        whole = torch.as_strided(page_cache, (page_cache.untyped_storage().nbytes(),), (1,), 0)
        inner = torch.empty(sl.shape, device="meta").stride()
        views[sl.name] = whole.view(sl.dtype).as_strided(
            (page_cache.shape[0],) + sl.shape, (block_stride // item,) + inner, (base + sl.byte_offset) // item)
    return views


class MambaLayer:
    """Keeps its raw pages and the named state views sliced from them (e.g. ``conv_state``, ``ssm_state``)."""

    def __init__(self, *args, layer_name: str, spec: MambaSpec, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(spec, MambaSpec):
            raise KVLayoutError(f"MambaLayer {layer_name!r} needs a MambaSpec, got {type(spec).__name__}")
        self.layer_name, self.kv_spec = layer_name, spec
        self.page_cache: Optional[torch.Tensor] = None
        self.states: dict[str, torch.Tensor] = {}

    def bind_kv_cache(self, tensor: torch.Tensor) -> None:
        self.states = mamba_state_views(tensor, self.kv_spec)
        self.page_cache = tensor


def bind_kv_cache(layers: Mapping[str, object], caches: Mapping[str, torch.Tensor]) -> None:
    """Call ``layers[name].bind_kv_cache(caches[name])`` for every layer; the two must name the same layers."""
    missing = sorted(set(caches) - set(layers))
    extra = sorted(set(layers) - set(caches))
    if missing or extra:
        raise KVLayoutError("layers and caches disagree: "
                            + (f"no layer for cache(s) {missing}" if missing else "")
                            + ("; " if missing and extra else "")
                            + (f"no cache for layer(s) {extra}" if extra else ""))
    for name, layer in layers.items():
        if not hasattr(layer, "bind_kv_cache"):
            raise KVLayoutError(f"layer {name!r} ({type(layer).__name__}) has no bind_kv_cache method; "
                                f"derive it from AttentionLayer, MLALayer or MambaLayer")
    for name, layer in layers.items():
        layer.bind_kv_cache(caches[name])
