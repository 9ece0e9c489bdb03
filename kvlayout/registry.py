"""Attention backend registry (names resolved to classes only when asked for, so the core never imports a
backend module). Select one with ``get_attention_backend(name)``, where ``name`` is
``"auto"``, a registered name, or None to read ``KVLAYOUT_ATTENTION_BACKEND`` (default ``auto``)."""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Mapping, Optional, Union

import torch

from .errors import BackendUnavailableError, KVLayoutError


ENV_VAR = "KVLAYOUT_ATTENTION_BACKEND"

# name -> "module:Class", imported only when asked for, so optional packages stay optional.
_REGISTRY: dict[str, str] = {
    "torch": "kvlayout.backends.torch_ref:TorchBackend",
    "triton": "kvlayout.backends.triton_backend:TritonBackend",
    "flashinfer": "kvlayout.backends.flashinfer_backend:FlashInferBackend",
    "flash_attn": "kvlayout.backends.flash_attn_backend:FlashAttnBackend",
    "rocm": "kvlayout.backends.rocm_backend:RocmBackend",
}
# Preference order for "auto" on a CUDA device; the CPU gets the reference backend.
AUTO_ORDER_CUDA = ("flashinfer", "triton", "torch")
_instances: dict[str, Any] = {}


def register_backend(name: str, target: Union[str, Callable[[], type]]) -> None:
    """Register ``"module:Class"`` (or a class) under ``name``."""
    _REGISTRY[name] = target
    _instances.pop(name, None)


def registered_backends() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _load(name: str) -> type:
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, cls = target.split(":")
        return getattr(importlib.import_module(module), cls)
    return target


def unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    if name not in _REGISTRY:
        return "not registered"
    try:
        cls = _load(name)
    except ImportError as e:                                # pragma: no cover - depends on installs
        return f"cannot be imported ({e})"
    return cls.unavailable_reason(device)


def available_backends(device: Union[str, torch.device, None] = None) -> dict[str, Optional[str]]:
    """``{name: None if usable on device, else the reason it is not}``."""
    dev = torch.device(device) if device is not None else None
    return {name: unavailable_reason(name, dev) for name in _REGISTRY}


def get_attention_backend(name: Optional[str] = None, device: Union[str, torch.device, None] = None,
                          specs: Optional[Mapping[str, object]] = None) -> Any:
    """The backend called ``name`` (``auto``: the best one usable on ``device`` that supports every spec in
    ``specs``, when given). Raises ``BackendUnavailableError`` listing what is available when the name is
    unknown or cannot run here, or, for ``auto``, why each candidate cannot serve the specs."""
    name = (name or os.environ.get(ENV_VAR) or "auto").strip().lower()
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if name == "auto":
        reasons = {}
        for cand in (AUTO_ORDER_CUDA if dev.type == "cuda" else ("torch",)):
            why = unavailable_reason(cand, dev) if cand in _REGISTRY else "not registered"
            if why is None and specs:
                caps = _load(cand).capabilities
                why = "; ".join(sorted({p for spec in specs.values() for p in caps.problems(spec)})) or None
            if why is None:
                name = cand
                break
            reasons[cand] = why
        else:
            raise BackendUnavailableError("no attention backend can serve this here: "
                                          + "; ".join(f"{n}: {r}" for n, r in reasons.items()))
    if name not in _REGISTRY:
        raise BackendUnavailableError(f"unknown attention backend {name!r}; registered: "
                                      f"{', '.join(_REGISTRY)} (or 'auto')")
    reason = unavailable_reason(name, dev)
    if reason is not None:
        usable = [n for n, r in available_backends(dev).items() if r is None]
        raise BackendUnavailableError(f"attention backend {name!r} cannot run on {dev}: {reason}. "
                                      f"Usable here: {', '.join(usable) or 'none'}")
    if name not in _instances:
        _instances[name] = _load(name)()
    return _instances[name]


def resolve_backend(backend: Any, device: Union[str, torch.device, None] = None) -> Any:
    """``backend`` itself when it is an attention backend, the backend of that name when it is a string
    (as ``get_attention_backend``); anything else is refused naming what was passed."""
    if isinstance(backend, str):
        return get_attention_backend(backend, device)
    if isinstance(backend, type) or not all(hasattr(backend, a) for a in ("forward", "capabilities", "check_spec")):
        raise KVLayoutError(f"backend must be an attention backend (kvlayout.get_attention_backend(name)) or a "
                            f"backend name ({', '.join(_REGISTRY)}), got {type(backend).__name__}")
    return backend


__all__ = ["ENV_VAR", "available_backends", "get_attention_backend", "register_backend",
           "registered_backends", "resolve_backend"]
