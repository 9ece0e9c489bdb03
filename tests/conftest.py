import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; it must be on before any @triton.jit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("UCX_NET_DEVICES", "lo")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A fresh generator per test; the seed differs per run unless KVLAYOUT_TEST_SEED is set."""
    seed = int(os.environ.get("KVLAYOUT_TEST_SEED", torch.seed() % (1 << 31)))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
