"""The ``kvlayout`` command (plan, demo, bench). Not imported by ``import kvlayout``."""

from .commands import main

__all__ = ["main"]
