"""The shared conventions (kvlayout.conventions, kvlayout.fp8) and the typed per-step state cache."""

import math
from dataclasses import dataclass

import pytest
import torch

from kvlayout import conventions as cv
from kvlayout import fp8
from kvlayout.errors import KVLayoutError
from kvlayout.metadata import StepStateCache


def test_window_convention_includes_the_query():
    assert cv.window_start(5, 3) == 3 and cv.window_start(1, 3) == 0          # the docstring's example
    q = torch.arange(8).unsqueeze(1)
    k = torch.arange(8).unsqueeze(0)
    vis = cv.visible(q, k, causal=True, window=3)
    assert vis.sum(1).tolist() == [1, 2, 3, 3, 3, 3, 3, 3]                    # W keys, itself included
    assert torch.equal(cv.window_start(q, 3).squeeze(1), torch.tensor([0, 0, 0, 1, 2, 3, 4, 5]))
    assert cv.window_left(3) == 2 and cv.window_left(None) is None


def test_lse_bases_and_constants():
    assert cv.LOG2E == 1.4426950408889634 and cv.LN2 == 0.6931471805599453
    assert cv.lse_factor("e", "2") == cv.LOG2E and cv.lse_factor("2", "e") == cv.LN2
    assert cv.lse_factor("e", "e") == cv.lse_factor("2", "2") == 1.0
    assert math.isclose(1.0 * cv.lse_factor("e", "2") * cv.lse_factor("2", "e"), 1.0)
    with pytest.raises(KVLayoutError, match="LSE base"):
        cv.lse_factor("10", "e")


def test_scale_and_soft_cap():
    assert cv.default_softmax_scale(64) == 0.125 and cv.softmax_scale(None, 64) == 0.125
    assert cv.softmax_scale(2, 64) == 2.0
    assert cv.soft_cap_value(0) is None and cv.soft_cap_value(None) is None and cv.soft_cap_value(30) == 30.0
    for bad in (-1.0, float("nan"), float("inf"), True, "3"):
        with pytest.raises(KVLayoutError, match="logits_soft_cap"):
            cv.soft_cap_value(bad)
    x = torch.tensor([-100.0, 0.0, 1.0, 100.0])
    assert torch.equal(cv.soft_cap(x, None), x)
    assert torch.allclose(cv.soft_cap(x, 10.0), 10.0 * torch.tanh(x / 10.0))


def test_fp8_format_and_round_trip():
    assert fp8.fp8_format(torch.float8_e4m3fn) == (3, -6, 448.0)
    assert fp8.fp8_format(torch.float8_e5m2) == (2, -14, 57344.0)
    x = torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(0)) * 100
    scale = torch.tensor([0.5, 4.0])
    q8 = fp8.quantize(x, scale, torch.float8_e4m3fn)
    assert q8.float().abs().max() <= 448.0                                     # saturated
    back = fp8.dequantize(q8, scale)
    assert torch.equal(back, q8.float() * scale.view(-1, 1))
    fp8.check_scales(scale, None, torch.float8_e4m3fn, 2)
    with pytest.raises(KVLayoutError, match="only for fp8"):
        fp8.check_scales(scale, None, torch.bfloat16, 2)
    with pytest.raises(KVLayoutError, match="k_scale must be"):
        fp8.check_scales(torch.ones(2, 1), None, torch.float8_e4m3fn, 2)


def test_fp8_k_scale_fold_equals_dequantized_keys():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 8, generator=g)                                       # 4 query heads over 2 KV heads
    k8 = torch.randn(6, 2, 8, generator=g)
    k_scale = torch.tensor([0.5, 2.0])
    scores = torch.einsum("thd,shd->ths", q, fp8.dequantize(k8, k_scale).repeat_interleave(2, 1))
    folded = torch.einsum("thd,shd->ths", fp8.fold_k_scale_into_query(q, k_scale, 2), k8.repeat_interleave(2, 1))
    assert torch.allclose(scores, folded, atol=1e-5)
    out = torch.ones(3, 4, 8)
    fp8.apply_v_scale_(out, torch.tensor([0.5, 2.0]), 2)
    assert out[:, :2].eq(0.5).all() and out[:, 2:].eq(2.0).all()
    arg = fp8.scale_arg(torch.ones(1), torch.float8_e4m3fn, out)
    assert arg.stride == 0 and arg.on and not fp8.scale_arg(None, torch.float8_e4m3fn, out).on
    assert fp8.scale_arg(k_scale, torch.float8_e4m3fn, out).stride == 1
    assert not fp8.scale_arg(k_scale, torch.bfloat16, out).on


@dataclass(frozen=True)
class _KeyA:
    n: int


@dataclass(frozen=True)
class _KeyB:
    n: int


def test_step_state_cache_is_keyed_by_type_and_fields():
    cache = StepStateCache()
    assert len(cache) == 0 and not cache
    made = []
    a = cache.get_or_make(_KeyA(1), lambda: made.append(1) or "plan-a")
    assert cache.get_or_make(_KeyA(1), lambda: made.append(2) or "other") == a == "plan-a" and made == [1]
    assert cache.get(_KeyB(1), str) is None                    # same fields, other owner: another entry
    cache.get_or_make(_KeyB(1), lambda: 7)
    assert len(cache) == 2 and cache.states() == ["plan-a", 7] and cache.states(int) == [7]
    with pytest.raises(TypeError, match="not a str"):
        cache.get(_KeyB(1), str)
    cache.put(_KeyA(1), "replanned")
    assert cache.get(_KeyA(1), str) == "replanned" and len(cache) == 2
