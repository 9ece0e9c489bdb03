"""The ``kvlayout`` command (plan, demo, bench). Not imported by ``import kvlayout``."""

import importlib.util
import os
import sys


def _import_the_real_package() -> None:
    """Make ``sys.modules["kvlayout"]`` the package this file belongs to.

    With an editable install (setuptools' import hook, which Python consults after ``sys.path``), a folder
    named ``kvlayout`` without ``__init__.py`` in a directory on ``sys.path`` wins: ``import kvlayout`` gives a
    namespace package of that folder. That folder is typically the checkout itself (git's default clone name),
    and the current directory is on ``sys.path`` for ``python -m kvlayout``, ``python -c`` or ``PYTHONPATH=.``.
    The hook still finds ``kvlayout.cli`` (this file), so here the namespace package is swapped for the real
    one before any other part of kvlayout is imported. A regular install is never shadowed this way.
    """
    pkg = sys.modules.get("kvlayout")
    if pkg is None or getattr(pkg, "__file__", None):
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("kvlayout", os.path.join(here, "__init__.py"),
                                                  submodule_search_locations=[here])
    real = importlib.util.module_from_spec(spec)
    sys.modules["kvlayout"] = real
    try:
        spec.loader.exec_module(real)
    except BaseException:
        sys.modules["kvlayout"] = pkg
        raise
    real.cli = sys.modules[__name__]


_import_the_real_package()

from .commands import main  # noqa: E402

__all__ = ["main"]
