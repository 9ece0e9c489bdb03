"""kvlayout's Triton kernels, grouped by kind; the backends and ``kvlayout.ops`` launch them.

- ``softmax``: the online-softmax and score helpers every attention kernel shares;
- ``unified``: the unified paged kernel for mixed prefill + decode batches, and its tile helpers;
- ``decode``: split-KV paged decode (partials merged by LSE);
- ``prefill``: paged prefill that appends its chunk, and masked (right-padded) prefill;
- ``rocm``: the kernels in the shape AMD GPUs favour (2-D paged decode, prefix prefill);
- ``merge``: merging attention states by their LSE;
- ``write``: K/V append through ``slot_mapping`` (fp8 quantization on write);
- ``pages``: whole-page copy and zero over byte views.
"""
