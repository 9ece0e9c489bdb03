"""``python -m kvlayout``: the ``kvlayout`` command."""

from kvlayout.cli import main

raise SystemExit(main())
