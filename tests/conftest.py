import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; it must be on before any @triton.jit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("UCX_NET_DEVICES", "lo")

# Under pytest-xdist (`pytest -n auto`) the workers share the cores: one torch thread pool each of the
# whole machine's size would oversubscribe them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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
