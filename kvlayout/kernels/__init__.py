"""kvlayout's Triton kernels, grouped by kind; the backends and ``kvlayout.ops`` launch them.

- ``softmax``: the online-softmax, score, window and fp8-scale helpers every attention kernel shares;
- ``tiles``: the shared tile helpers (query rows, paged K/V tiles, key ranges, output rows);
- ``unified``: the unified paged kernel for mixed prefill + decode batches;
- ``decode``: split-KV paged decode (partials merged by LSE);
- ``prefill``: paged prefill that appends its chunk, and masked (right-padded) prefill;
- ``rocm``: the kernels in the shape AMD GPUs favour (2-D paged decode, prefix prefill);
- ``merge``: merging attention states by their LSE;
- ``write``: K/V append through ``slot_mapping`` (fp8 quantization on write);
- ``pages``: whole-page copy and zero over byte views.

This package's ``__init__`` imports nothing heavy: ``interpreting()`` can be asked without importing Triton.
"""

from __future__ import annotations

import os
import sys

INTERPRET_ENV = "TRITON_INTERPRET"


def interpreter_requested() -> bool:
    """Whether the environment asks for Triton's CPU interpreter now (``TRITON_INTERPRET=1``)."""
    return os.environ.get(INTERPRET_ENV) == "1"


def interpreting() -> bool:
    """Whether kvlayout's Triton kernels run on Triton's CPU interpreter (CPU tensors) rather than compiled
    (CUDA tensors). The one place this is decided.

    Triton reads ``TRITON_INTERPRET`` when a kernel is *defined* (``@triton.jit`` at import), so once the
    kernel modules are imported the answer is how they were built, and setting the variable later changes
    nothing; before that it is what the variable says now, which is how they will be built. Compare with
    ``interpreter_requested()`` to notice the variable changing after the import."""
    softmax = sys.modules.get(__name__ + ".softmax")
    if softmax is None:
        return interpreter_requested()
    return type(softmax.softmax_init).__name__ == "InterpretedFunction"
