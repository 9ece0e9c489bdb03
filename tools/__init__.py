"""The benchmark tools, installed as ``kvlayout.tools`` (pyproject's package-dir maps it to this folder).

``kvlayout bench`` finds them here through the package, so they ship with a plain ``pip install``. Each
``bench_*.py`` also runs as a script (``python tools/bench_attention.py``) and imports its helpers as
``from bench_common import ...`` with this folder on ``sys.path``: importing this package imports nothing.
"""
