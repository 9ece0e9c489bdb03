"""FlashInfer backend. CPU: lazy import, refusals, argument mapping, and the step orchestration run
against a stand-in flashinfer module whose wrappers compute with the reference math from the plan
inputs. GPU (H100, real FlashInfer): the feature matrix against the reference backend, bit-equality
with FlashInfer on contiguous K/V, CUDA-graph decode replay, K/V append, MLA."""

from __future__ import annotations

import math
import subprocess
import sys
import types
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import pytest
import torch

import kvlayout as kvl
from kvlayout.backends import get_attention_backend
from kvlayout.backends.flashinfer_backend import (INSTALL_HINT, TENSOR_CORE_MIN_GROUP, FlashInferBackend,
                                                   canonical_strides,
                                                   packed_kv_views, paged_inputs, window_left)
from kvlayout.backends.torch_ref import TorchBackend, dense_attention
from kvlayout.errors import BackendUnavailableError, KVLayoutError, UnsupportedFeatureError

REF = TorchBackend()
LN2 = math.log(2.0)
FP8 = torch.float8_e4m3fn


# ---- a stand-in flashinfer module (CPU) ----------------------------------------------------------

def _fake_attend(p, q, kv, out, lse, sinks=None):
    """What FlashInfer computes for a plan: per request, its pages from the CSR table; LSE in base 2."""
    k_cache, v_cache = kv
    assert k_cache.stride() == v_cache.stride()
    qo, indptr, last = p["qo"].tolist(), p["indptr"].tolist(), p["last"].tolist()
    indices = p["indices"].tolist()
    n = p["page_size"]
    assert q.shape[0] == qo[-1] and out.shape == q.shape
    wl = p["window_left"]
    for i in range(len(indptr) - 1):
        pages = indices[indptr[i]:indptr[i + 1]]
        assert 1 <= last[i] <= n and pages
        s = (len(pages) - 1) * n + last[i]
        h, d = k_cache.shape[1], k_cache.shape[3]
        kk = k_cache[pages].permute(0, 2, 1, 3).reshape(-1, h, d)[:s].float()
        vv = v_cache[pages].permute(0, 2, 1, 3).reshape(-1, h, d)[:s].float()
        ql = qo[i + 1] - qo[i]
        o, l = dense_attention(q[qo[i]:qo[i + 1]].float(), kk, vv, p["sm_scale"], q_offset=s - ql,
                               causal=p["causal"], sliding_window=None if wl < 0 else wl + 1,
                               soft_cap=p["soft_cap"] or None, sinks=sinks)
        out[qo[i]:qo[i + 1]] = o.to(out.dtype)
        if lse is not None:
            lse[qo[i]:qo[i + 1]] = l / LN2


def make_fake_flashinfer() -> types.ModuleType:
    fi = types.ModuleType("flashinfer")
    fi.plans, fi.wrappers = [], []

    class _Wrapper:
        def __init__(self, ws, kv_layout, use_cuda_graph=False, **kw):
            assert kv_layout == "HND" and ws.dtype == torch.uint8
            self.use_cuda_graph, self.kw = use_cuda_graph, kw
            fi.wrappers.append(self)

        def _store(self, qo, indptr, indices, last, hq, hkv, d, n, kw):
            assert indptr.device.type == "cpu" and last.device.type == "cpu" and qo.device.type == "cpu"
            assert indices.dtype == indptr.dtype == last.dtype == torch.int32
            assert len(indices) == int(indptr[-1]) and len(last) == len(indptr) - 1 == len(qo) - 1
            if self.use_cuda_graph:
                buf = self.kw.get("paged_kv_indices_buffer", self.kw.get("paged_kv_indices_buf"))
                assert len(indices) <= len(buf)
            self.p = dict(qo=qo, indptr=indptr, indices=indices, last=last, page_size=n, hq=hq, hkv=hkv,
                          sm_scale=kw["sm_scale"], window_left=kw.get("window_left", -1),
                          soft_cap=kw.get("logits_soft_cap") or 0.0, causal=kw.get("causal", True))
            fi.plans.append((self, kw))

    class Decode(_Wrapper):
        def plan(self, indptr, indices, last, hq, hkv, d, n, **kw):
            self._store(torch.arange(len(last) + 1, dtype=torch.int32), indptr, indices, last, hq, hkv, d, n, kw)

        def run(self, q, kv, out=None, lse=None, return_lse=False):
            _fake_attend(self.p, q, kv, out, lse if return_lse else None)

    class Prefill(_Wrapper):
        def plan(self, qo, indptr, indices, last, hq, hkv, d, n, **kw):
            if "jit_args" in self.kw:                    # the attention-sink variant: no soft-cap
                assert "logits_soft_cap" not in kw
                assert self.kw["jit_kwargs"]["use_sliding_window"] == (kw["window_left"] >= 0)
            self._store(qo, indptr, indices, last, hq, hkv, d, n, kw)

        def run(self, q, kv, *args, out=None, lse=None, return_lse=False):
            sinks = None
            if "jit_args" in self.kw:
                (sinks,) = args
            _fake_attend(self.p, q, kv, out, lse if return_lse else None, sinks=sinks)

    fi.BatchDecodeWithPagedKVCacheWrapper = Decode
    fi.BatchPrefillWithPagedKVCacheWrapper = Prefill
    fi.variants = types.ModuleType("flashinfer.jit.attention.variants")
    fi.variants.attention_sink_decl = {"fa2": "struct AttentionSink;", "fa3": "struct AttentionSink;"}
    return fi


@pytest.fixture
def fake_fi(monkeypatch):
    fi = make_fake_flashinfer()
    monkeypatch.setitem(sys.modules, "flashinfer", fi)
    monkeypatch.setitem(sys.modules, "flashinfer.jit.attention.variants", fi.variants)
    return fi


# ---- shared case builder (CPU with the stand-in, GPU with FlashInfer) ------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    num_heads: int = 8
    num_kv_heads: int = 2
    head_size: int = 64
    dtype: torch.dtype = torch.bfloat16
    kv_dtype: Optional[torch.dtype] = None
    block_size: int = 16
    causal: bool = True
    window: Optional[int] = None
    soft_cap: Optional[float] = None
    sinks: bool = False
    per_head_scale: bool = True
    layers: int = 1                    # >1: the layer is one of a cross-layer allocation
    prefill_backend: str = "fa2"
    tensor_cores: Optional[bool] = None  # decode path; None: the backend's rule


def requests_for(n: int, prefills: bool = True) -> list:
    """(computed, new) pairs: decodes at page-boundary lengths first, then prefills (fresh, chunked,
    zero-length, a page-boundary chunk, and a one-token request after them)."""
    dec = [(0, 1), (1, 1), (n - 1, 1), (n, 1), (2 * n - 1, 1), (3 * n, 1), (5 * n + 3, 1)]
    pre = [(0, 2 * n + 3), (n + 5, 17), (5, 0), (3 * n, n), (0, 1 + n // 2), (7, 1)] if prefills else []
    return dec + pre


def build_step(case: Case, device, gen, pairs=None, pad=3, num_blocks=None, width=None):
    n, h, d = case.block_size, case.num_kv_heads, case.head_size
    pairs = requests_for(n) if pairs is None else pairs
    need = [-(-(c + t) // n) for c, t in pairs]
    nb = num_blocks or sum(need) + 5
    perm = torch.randperm(nb, generator=gen).tolist()
    reqs, at = [], 0
    for (c, t), k in zip(pairs, need):
        reqs.append(kvl.ScheduledRequest(c, t, perm[at:at + k]))
        at += k
    total = sum(t for _, t in pairs)
    meta = kvl.build_attention_metadata(reqs, n, device, num_blocks=nb, pad_tokens_to=total + pad,
                                        max_blocks_per_request=width)
    kv_dtype = case.kv_dtype or case.dtype
    full = torch.randn(nb, case.layers, h, n, 2 * d, generator=gen) * 0.7
    full = full.to(kv_dtype).to(device)
    kv = full[:, case.layers // 2]                       # a cross-layer view when layers > 1
    q = (torch.randn(total + pad, case.num_heads, d, generator=gen)).to(case.dtype).to(device)
    params = kvl.AttentionParams(case.num_heads, h, d, None, case.causal, case.window, case.soft_cap)
    extra = {}
    if case.sinks:
        extra["sinks"] = (torch.randn(case.num_heads, generator=gen) * 2).to(device)
    if kv_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        cnt = h if case.per_head_scale else 1
        extra["k_scale"] = (torch.rand(cnt, generator=gen) + 0.5).to(device)
        extra["v_scale"] = (torch.rand(cnt, generator=gen) + 0.5).to(device)
    return meta, kv, q, params, extra


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def check_against_reference(backend, case: Case, device, gen, pairs=None):
    meta, kv, q, params, extra = build_step(case, device, gen, pairs)
    total = meta.num_actual_tokens
    ref_out, ref_lse = REF.forward(q, kv, meta, params, return_lse=True, **extra)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=device)
    got, got_lse = backend.forward(q, kv, meta, params, out=out, lse=lse, **extra)
    assert got is out and got_lse is lse
    assert rel_err(out[:total], ref_out[:total]) < 1e-2, case.name
    assert rel_err(lse[:total], ref_lse[:total]) < 5e-3, case.name
    assert torch.all(out[total:] == 0) and torch.all(lse[total:] == float("-inf"))
    return meta, kv, q, params, extra


# ---- CPU: import, availability, refusals, mapping --------------------------------------------------

def test_kvlayout_imports_without_flashinfer():
    code = ("import sys; sys.modules['flashinfer'] = None\n"
            "import kvlayout, kvlayout.backends.flashinfer_backend as m\n"
            "from kvlayout.backends import available_backends\n"
            "r = available_backends('cpu')\n"
            "assert r['torch'] is None and 'kvlayout[flashinfer]' in r['flashinfer'], r\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import kvlayout.backends.flashinfer_backend, sys; assert 'flashinfer' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_selecting_flashinfer_without_it_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    assert INSTALL_HINT in FlashInferBackend.unavailable_reason(torch.device("cuda"))
    with pytest.raises(BackendUnavailableError, match=r'pip install "kvlayout\[flashinfer\]"'):
        get_attention_backend("flashinfer", device="cuda")


def test_flashinfer_needs_cuda(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flashinfer" else real(name, *a))
    assert "CUDA" in FlashInferBackend.unavailable_reason(torch.device("cpu"))


def test_constructor_and_spec_refusals():
    with pytest.raises(KVLayoutError, match="prefill_backend"):
        FlashInferBackend(prefill_backend="fa9")
    with pytest.raises(KVLayoutError, match="append"):
        FlashInferBackend(append="memcpy")
    b = FlashInferBackend()
    b.check_spec("ok", kvl.AttentionSpec(8, 128, torch.bfloat16, 16, sliding_window=128, has_sinks=True))
    with pytest.raises(UnsupportedFeatureError, match="soft-cap"):
        b.check_spec("l0", kvl.AttentionSpec(8, 128, torch.bfloat16, 16, logits_soft_cap=30.0, has_sinks=True))
    with pytest.raises(UnsupportedFeatureError, match="head_size 80"):
        b.check_spec("l1", kvl.AttentionSpec(8, 80, torch.bfloat16, 16))
    with pytest.raises(UnsupportedFeatureError, match="float32"):
        b.check_spec("l2", kvl.AttentionSpec(8, 128, torch.float32, 16))
    b.check_spec("mla", kvl.MLASpec(512, 64, torch.bfloat16, 64))
    with pytest.raises(UnsupportedFeatureError, match="kv_lora_rank"):
        b.check_spec("mla2", kvl.MLASpec(100, 64, torch.bfloat16, 64))


def test_forward_refusals_change_nothing(fake_fi):
    gen = torch.Generator().manual_seed(0)
    b = FlashInferBackend(workspace_bytes=1 << 10)
    case = Case("x", head_size=64)
    meta, kv, q, params, _ = build_step(case, "cpu", gen)
    out = torch.full_like(q, 7.0)
    bad = [
        (dict(params=replace(params, logits_soft_cap=10.0), sinks=torch.zeros(8)), UnsupportedFeatureError),
        (dict(q=q.float(), out=None), UnsupportedFeatureError),
        (dict(q=q[:, :4]), KVLayoutError),
        (dict(out=torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype).transpose(0, 1)), KVLayoutError),
        (dict(params=kvl.AttentionParams(8, 2, 64, sliding_window=None), sinks=torch.zeros(4)), KVLayoutError),
    ]
    for kwargs, err in bad:
        args = dict(q=q, kv_cache=kv, meta=meta, params=params, out=out)
        args.update(kwargs)
        with pytest.raises(err):
            b.forward(args.pop("q"), args.pop("kv_cache"), args.pop("meta"), args.pop("params"), **args)
    assert torch.all(out == 7.0) and not fake_fi.plans and not meta.step_state


def test_window_and_paged_inputs():
    assert window_left(kvl.AttentionParams(8, 2, 64)) == -1
    assert window_left(kvl.AttentionParams(8, 2, 64, sliding_window=1)) == 0
    assert window_left(kvl.AttentionParams(8, 2, 64, sliding_window=4096)) == 4095
    reqs = [kvl.ScheduledRequest(15, 1, [4, 2]), kvl.ScheduledRequest(0, 1, [9]),
            kvl.ScheduledRequest(16, 1, [7, 0, 5]), kvl.ScheduledRequest(40, 8, [1, 3, 6, 8])]
    meta = kvl.build_attention_metadata(reqs, 16, "cpu", num_blocks=10)
    pi = paged_inputs(meta, np.array([0, 2, 3]))
    assert pi.indptr.tolist() == [0, 1, 3, 6] and pi.last_page_len.tolist() == [16, 1, 16]
    assert pi.indices.tolist() == [4, 7, 0, 1, 3, 6] and pi.indices.dtype == torch.int32


def test_paged_inputs_of_a_wide_table_and_any_requests(rng):
    """A padded table much wider than the requests (as CUDA-graph buffers are), requests in any order."""
    gen = np.random.default_rng(int(torch.randint(1 << 30, (1,), generator=rng)))
    nb, bs = 64, 4
    perm = gen.permutation(nb).tolist()
    reqs, at = [], 0
    for n in gen.integers(1, 20, size=6).tolist():
        k = -(-n // bs)
        reqs.append(kvl.ScheduledRequest(n - 1, 1, perm[at:at + k]))
        at += k
    meta = kvl.build_attention_metadata(reqs, bs, "cpu", num_blocks=nb, max_blocks_per_request=40)
    pick = gen.permutation(6)[:4]
    pi = paged_inputs(meta, pick)
    want = [b for i in pick for b in reqs[i].block_ids]
    assert pi.indices.tolist() == want
    pages = [len(reqs[i].block_ids) for i in pick]
    assert pi.indptr.tolist() == np.concatenate([[0], np.cumsum(pages)]).tolist()
    assert pi.last_page_len.tolist() == [(reqs[i].num_computed_tokens + 1 - 1) % bs + 1 for i in pick]


def test_canonical_strides_only_touch_size_one_dims():
    kv = torch.zeros(5 * 9999).as_strided((5, 1, 16, 256), (9999, 3, 256, 1))
    k, v = packed_kv_views(kv)
    assert k.stride() == v.stride() == (9999, 4096, 256, 1) and k.shape == (5, 1, 16, 128)
    assert v.data_ptr() == kv.data_ptr() + 128 * kv.element_size()
    t = torch.zeros(4, 2, 3, 8)[..., :4]
    assert canonical_strides(t) is t


# ---- CPU: orchestration against the stand-in flashinfer ------------------------------------------

CPU_CASES = [
    Case("base"), Case("noncausal", causal=False), Case("window", window=5), Case("softcap", soft_cap=3.0),
    Case("sinks", sinks=True, window=9), Case("fp8", kv_dtype=FP8), Case("fp8-tensor-scale", kv_dtype=FP8,
                                                                        per_head_scale=False),
    Case("mqa", num_kv_heads=1), Case("cross-layer", layers=3, block_size=4), Case("block1", block_size=1),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.name)
def test_step_orchestration_against_reference(fake_fi, case):
    gen = torch.Generator().manual_seed(1)
    b = FlashInferBackend(workspace_bytes=1 << 10)
    meta, kv, q, params, extra = check_against_reference(b, case, "cpu", gen)
    kinds = sorted(type(w).__name__ + ("+sinks" if "jit_args" in w.kw else "") for w, _ in fake_fi.plans)
    assert kinds == (["Prefill+sinks"] if case.sinks else ["Decode", "Prefill"])
    decode = [w for w, _ in fake_fi.plans if type(w).__name__ == "Decode"]
    if decode:
        assert decode[0].kw["use_tensor_cores"] == (case.num_heads // case.num_kv_heads >= TENSOR_CORE_MIN_GROUP)
    # zero-length requests are left out of the prefill plan; one-token requests after a prefill stay in it
    w, kw = fake_fi.plans[-1]
    assert len(w.p["qo"]) - 1 == meta.num_reqs - meta.num_decodes - 1 or case.sinks
    assert kw["window_left"] == window_left(params) and kw["sm_scale"] == params.scale


def test_plan_once_per_step_per_variant(fake_fi):
    gen = torch.Generator().manual_seed(2)
    b = FlashInferBackend(workspace_bytes=1 << 10)
    case = Case("base")
    meta, kv, q, params, _ = build_step(case, "cpu", gen)
    windowed = replace(params, sliding_window=7)
    for layer in range(4):                               # 4 layers: two full, two windowed
        b.forward(q, kv, meta, windowed if layer % 2 else params)
    assert len(fake_fi.plans) == 4                       # (decode + prefill) x 2 variants, not per layer
    meta2, kv2, q2, _, _ = build_step(case, "cpu", gen)
    b.forward(q2, kv2, meta2, params)
    assert len(fake_fi.plans) == 6 and len(fake_fi.wrappers) == 4   # wrappers made once, re-planned
    # a layer of the first step after the second was planned: its wrapper is re-planned for it
    ref = REF.forward(q, kv, meta, params)
    assert rel_err(b.forward(q, kv, meta, params)[:meta.num_actual_tokens], ref[:meta.num_actual_tokens]) < 1e-2
    assert len(fake_fi.plans) == 8


def test_cuda_graph_plan_uses_fixed_buffers(fake_fi):
    gen = torch.Generator().manual_seed(3)
    b = FlashInferBackend(workspace_bytes=1 << 10)
    case = Case("graph", block_size=8)
    pairs = [(c, 1) for c in (3, 8, 20, 0)]
    meta, kv, q, params, _ = build_step(case, "cpu", gen, pairs, pad=0, num_blocks=40)
    b.plan(meta, params, kv.dtype, q.dtype, cuda_graph=True)
    (w, _), = fake_fi.plans
    assert w.use_cuda_graph and len(w.kw["paged_kv_indptr_buffer"]) == 5
    assert len(w.kw["paged_kv_indices_buffer"]) == 4 * meta.block_table.shape[1]
    out = b.forward(q, kv, meta, params)
    assert rel_err(out, REF.forward(q, kv, meta, params)) < 1e-2
    meta2, kv2, q2, _, _ = build_step(case, "cpu", gen, [(c, 1) for c in (1, 2, 3, 4)], pad=0, num_blocks=40)
    with pytest.raises(KVLayoutError, match="graph buffers"):       # wider block table than captured
        wide = kvl.build_attention_metadata([kvl.ScheduledRequest(c, 1, list(range(8 * i, 8 * i + 8)))
                                             for i, c in enumerate((1, 2, 3, 60))], 8, "cpu", num_blocks=40)
        b.plan(wide, params, kv.dtype, q.dtype, cuda_graph=True)
    b.plan(meta2, params, kv2.dtype, q2.dtype, cuda_graph=True)
    assert len(fake_fi.wrappers) == 1
    meta3, *_ = build_step(case, "cpu", gen, [(3, 1), (0, 5)], pad=0, num_blocks=40)
    with pytest.raises(KVLayoutError, match="decode-only"):
        b.plan(meta3, params, kv.dtype, q.dtype, cuda_graph=True)


# ---- GPU (real FlashInfer) -------------------------------------------------------------------------

GPU_CASES = [
    Case("base", 32, 8, 128), Case("base-cc", 32, 8, 128, tensor_cores=False),
    Case("noncausal", 32, 8, 128, causal=False, tensor_cores=True),
    Case("gqa-kv1", 8, 1, 128), Case("cross-layer", 32, 8, 128, layers=3, block_size=64),
    Case("block1", 32, 8, 128, block_size=1, tensor_cores=False),
    Case("window", 32, 8, 128, window=33, tensor_cores=False), Case("softcap", 32, 8, 128, soft_cap=30.0,
                                                                     tensor_cores=False),
    Case("sinks", 32, 8, 128, sinks=True), Case("sinkswin", 16, 2, 128, sinks=True, window=20),
    Case("fp8", 32, 8, 128, kv_dtype=FP8, tensor_cores=False),
    Case("fp8-tc", 16, 2, 128, kv_dtype=FP8, per_head_scale=False, tensor_cores=True),
    Case("e5m2", 32, 8, 128, kv_dtype=torch.float8_e5m2),
    Case("fp16-d64", 16, 4, 64, dtype=torch.float16, block_size=32),
    Case("fa3-base", 32, 8, 128, prefill_backend="auto"), Case("fa3-kv1", 8, 1, 128, prefill_backend="auto"),
    Case("fa3-cross", 32, 8, 128, layers=2, prefill_backend="auto", causal=False),
    Case("fa3-window", 32, 8, 128, window=100, prefill_backend="auto"),
    Case("fa3-softcap", 32, 8, 128, soft_cap=20.0, prefill_backend="auto"),
    Case("fa3-sinks", 32, 8, 128, sinks=True, window=50, prefill_backend="auto"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_gpu_against_reference(case):
    gen = torch.Generator().manual_seed(hash(case.name) % 1000)
    b = FlashInferBackend(prefill_backend=case.prefill_backend, decode_tensor_cores=case.tensor_cores)
    check_against_reference(b, case, "cuda", gen)


BIT_CASES = [Case("base", 32, 8, 128, tensor_cores=False), Case("gqa-kv1", 8, 1, 128), Case("fa3-cross", 32, 8, 128, layers=3,
                                                                          prefill_backend="auto"),
             Case("winbit", 32, 8, 128, prefill_backend="fa2", window=33)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", BIT_CASES, ids=lambda c: c.name)
def test_gpu_packed_views_bit_equal_to_contiguous(case):
    gen = torch.Generator().manual_seed(5)
    b = FlashInferBackend(prefill_backend=case.prefill_backend, decode_tensor_cores=case.tensor_cores)
    meta, kv, q, params, _ = build_step(case, "cuda", gen)
    out = b.forward(q, kv, meta, params)
    k, v = packed_kv_views(kv)
    native = (k.contiguous(), v.contiguous())
    (step,) = meta.step_state.states()
    for part in step.parts:
        ref = torch.empty_like(out[part.t0:part.t1])
        part.slot.wrapper.run(q[part.t0:part.t1], native, out=ref)
        assert torch.equal(ref, out[part.t0:part.t1]), (case.name, part.t0)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [Case("graph-cc", 32, 8, 128, tensor_cores=False),
                                  Case("graph-tc", 32, 8, 128, tensor_cores=True), Case("graph-kv1", 8, 1, 128),
                                  Case("graph-sinks", 32, 8, 128, sinks=True)], ids=lambda c: c.name)
def test_gpu_cuda_graph_decode_replay(case):
    gen = torch.Generator().manual_seed(6)
    b = FlashInferBackend(prefill_backend="fa2", decode_tensor_cores=case.tensor_cores)
    nb, batch, width = 400, 8, 24

    lengths = [[5, 16, 17, 100, 1, 0, 63, 300], [300, 2, 15, 31, 32, 200, 7, 99], [0, 0, 1, 1, 64, 65, 128, 250]]
    meta, kv, q, params, extra = build_step(case, "cuda", gen, [(c, 1) for c in lengths[0]], pad=0,
                                            num_blocks=nb, width=width)
    static_q, static_out = q.clone(), torch.empty_like(q)
    b.plan(meta, params, kv.dtype, q.dtype, sinks=case.sinks, cuda_graph=True)
    b.forward(static_q, kv, meta, params, out=static_out, **extra)      # JIT and warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        b.forward(static_q, kv, meta, params, out=static_out, validate=False, **extra)
    for lens in lengths[1:] + lengths[:1]:
        meta, _, q, _, _ = build_step(case, "cuda", gen, [(c, 1) for c in lens], pad=0, num_blocks=nb,
                                      width=width)
        static_q.copy_(q)
        static_out.fill_(float("nan"))
        b.plan(meta, params, kv.dtype, q.dtype, sinks=case.sinks, cuda_graph=True)
        graph.replay()
        ref = REF.forward(static_q, kv, meta, params, **extra)
        assert rel_err(static_out, ref) < 1e-2, (case.name, lens)
    assert len(b._slots) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("append", ["auto", "torch", "flashinfer"])
def test_gpu_write_kv_matches_reference_write(append):
    gen = torch.Generator().manual_seed(7)
    case = Case("append", 32, 8, 128, layers=2)
    meta, kv, q, params, _ = build_step(case, "cuda", gen)
    total = meta.num_actual_tokens
    k = torch.randn(total, 8, 128, generator=gen).to(torch.bfloat16).cuda()
    v = torch.randn(total, 8, 128, generator=gen).to(torch.bfloat16).cuda()
    expect = kv.clone()
    kvl.write_kv(expect, k, v, meta.slot_mapping)
    FlashInferBackend(append=append).write_kv(kv, k, v, meta.slot_mapping[:total])
    assert torch.equal(kv, expect)


@pytest.mark.gpu
def test_gpu_mla_against_reference():
    gen = torch.Generator().manual_seed(8)
    rank, rope, heads, n = 512, 64, 16, 16
    pairs = requests_for(n)
    need = [-(-(c + t) // n) for c, t in pairs]
    nb = sum(need) + 3
    perm = torch.randperm(nb, generator=gen).tolist()
    reqs, at = [], 0
    for (c, t), k in zip(pairs, need):
        reqs.append(kvl.ScheduledRequest(c, t, perm[at:at + k]))
        at += k
    meta = kvl.build_attention_metadata(reqs, n, "cuda", num_blocks=nb)
    lat = (torch.randn(nb, 1, n, rank + rope, generator=gen) * 0.5).to(torch.bfloat16).cuda()
    q = (torch.randn(meta.num_actual_tokens, heads, rank + rope, generator=gen) * 0.5).to(torch.bfloat16).cuda()
    scale = 1 / math.sqrt(128 + rope)
    ref, ref_lse = REF.forward_mla(q, lat, meta, rank, scale, return_lse=True)
    out, lse = FlashInferBackend(prefill_backend="auto").forward_mla(q, lat, meta, rank, scale, return_lse=True)
    assert rel_err(out, ref) < 1e-2 and rel_err(lse, ref_lse) < 5e-3


def test_empty_batch_is_a_no_op(fake_fi):
    """A step with no requests plans nothing and returns empty outputs (every backend does the same)."""
    b = FlashInferBackend(workspace_bytes=1 << 10)
    meta = kvl.build_attention_metadata([], 8, "cpu", num_blocks=4)
    kv = torch.randn(4, 2, 8, 2 * 64, dtype=torch.bfloat16)
    before = kv.clone()
    params = kvl.AttentionParams(4, 2, 64)
    out, lse = b.forward(torch.zeros(0, 4, 64, dtype=torch.bfloat16), kv, meta, params, return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4) and torch.equal(kv, before)
