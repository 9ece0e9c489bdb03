"""Block digests: the Triton kernel equals the PyTorch twin, the definition's worked example holds, and any
changed, moved or swapped word changes a digest."""

from __future__ import annotations

import pytest
import torch

from kvlayout.connectors.digests import unit_digests, unit_digests_torch
from kvlayout.errors import KVLayoutError
from kvlayout.kernels.checksum import unit_digests_triton


def test_worked_example():
    words = torch.tensor([0, 1, 1, 0, -1, 5], dtype=torch.int32)
    got = unit_digests_torch(words, torch.tensor([0, 2, 3]), 2)
    assert got.tolist() == [7, 5, 1 + (1 << 32) * 3]          # words read as unsigned: -1 is 2**32 - 1


@pytest.mark.parametrize("unit_words", [1, 5, 256, 1500])
def test_triton_equals_torch(rng, unit_words):
    """On CPU tensors under the interpreter (the CPU suite), on CUDA tensors compiled (a GPU machine)."""
    n = 6
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (unit_words * n + 7,), generator=rng, dtype=torch.int32)
    offsets = torch.randperm(n, generator=rng) * unit_words + torch.randint(0, 8, (n,), generator=rng)
    offsets = offsets.clamp(max=words.numel() - unit_words).to(torch.int64)
    if torch.cuda.is_available():
        words, offsets = words.cuda(), offsets.cuda()
    assert torch.equal(unit_digests_triton(words, offsets, unit_words), unit_digests_torch(words, offsets, unit_words))


def test_every_changed_or_moved_word_changes_the_digest(rng):
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (64,), generator=rng, dtype=torch.int32)
    base = int(unit_digests_torch(words, torch.tensor([0]), 64))
    for i in range(64):
        w = words.clone()
        w[i] ^= 1 << int(torch.randint(0, 32, (1,), generator=rng))
        assert int(unit_digests_torch(w, torch.tensor([0]), 64)) != base
    for i in range(63):
        if words[i] != words[i + 1]:
            w = words.clone()
            w[i], w[i + 1] = words[i + 1], words[i]
            assert int(unit_digests_torch(w, torch.tensor([0]), 64)) != base


def test_bad_arguments_are_refused():
    words = torch.zeros(16, dtype=torch.int32)
    with pytest.raises(KVLayoutError, match="outside the buffer"):
        unit_digests(words, torch.tensor([10]), 8)
    with pytest.raises(KVLayoutError, match="int32"):
        unit_digests(words.view(torch.int64), torch.tensor([0]), 2)
    with pytest.raises(KVLayoutError, match="at least one word"):
        unit_digests(words, torch.tensor([0]), 0)


@pytest.mark.gpu
def test_triton_equals_torch_on_the_gpu():
    g = torch.Generator(device="cuda").manual_seed(3)
    for unit_words in (3, 2048, 70000):
        words = torch.randint(-2 ** 31, 2 ** 31 - 1, (unit_words * 9,), generator=g, dtype=torch.int32, device="cuda")
        offsets = (torch.randperm(8, device="cuda") * unit_words).to(torch.int64)
        assert torch.equal(unit_digests(words, offsets, unit_words), unit_digests_torch(words, offsets, unit_words))
