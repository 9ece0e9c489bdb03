"""Attention backends: adapters over kvlayout's kernels and the peer libraries (installed as
``kvlayout.backends``). The name registry lives in ``kvlayout.registry``; it is re-exported here."""

from kvlayout.registry import (AUTO_ORDER_CUDA, ENV_VAR, available_backends, get_attention_backend, register_backend,
                               registered_backends, unavailable_reason)

from .base import AttentionBackend

__all__ = ["AUTO_ORDER_CUDA", "AttentionBackend", "ENV_VAR", "available_backends", "get_attention_backend",
           "register_backend", "registered_backends", "unavailable_reason"]
