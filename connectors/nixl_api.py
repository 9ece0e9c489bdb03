"""Where NIXL's Python API comes from: its meta-package ``nixl`` or one CUDA build (``nixl_cu13`` through
``kvlayout[nixl]``, ``nixl_cu12`` through ``kvlayout[nixl-cu12]``). Nothing is imported until asked."""

from __future__ import annotations

import importlib
import importlib.util

NIXL_MODULES = ("nixl", "nixl_cu13", "nixl_cu12")


def nixl_installed() -> bool:
    """True when one of NIXL's distributions is importable (checks without importing it)."""
    return any(importlib.util.find_spec(m) is not None for m in NIXL_MODULES)


def load_nixl_agent() -> tuple[type, type]:
    """``(nixl_agent, nixl_agent_config)`` from the first NIXL distribution that imports; ImportError naming
    every one tried when none does."""
    errors = []
    for name in NIXL_MODULES:
        try:
            api = importlib.import_module(f"{name}._api")
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        return api.nixl_agent, api.nixl_agent_config
    raise ImportError("; ".join(errors))
