"""The triton backend on a CUDA device: bf16/fp16/fp8 on real head counts and lengths against the
reference, poisoned outputs (every element written), split-KV decode, write_kv bits, CUDA-graph replay."""

import dataclasses

import pytest
import torch

from kvlayout import AttentionParams, ScheduledRequest, build_attention_metadata, get_attention_backend
from kvlayout.backends.torch_ref import TorchBackend
from kvlayout.kernels.decode import SplitWorkspace, decode_config, split_kv_decode
from kvlayout.cache_ops import write_kv as ref_write_kv
from kvlayout.specs import is_fp8

pytestmark = pytest.mark.gpu

REF = TorchBackend()
DEV = "cuda"


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def make_meta(gen, lens, page, nb, width=None):
    """Metadata for ``lens`` [(cached, new)] with pages drawn in random order from ``nb`` blocks."""
    perm = torch.randperm(nb, generator=gen, device=DEV).tolist()
    reqs, used = [], 0
    for c, n in lens:
        k = -(-(c + n) // page)
        reqs.append(ScheduledRequest(c, n, perm[used:used + k]))
        used += k
    return build_attention_metadata(reqs, page, DEV, num_blocks=nb, max_blocks_per_request=width)


def setup(gen, lens, *, h_kv=8, group=4, d=128, page=16, q_dtype=torch.bfloat16, kv_dtype=None, extra=5,
          width=None):
    kv_dtype = kv_dtype or q_dtype
    nb = sum(-(-(c + n) // page) for c, n in lens) + extra
    kv = (torch.randn(nb, h_kv, page, 2 * d, generator=gen, device=DEV) * (0.5 if is_fp8(kv_dtype) else 1)
          ).to(kv_dtype)
    meta = make_meta(gen, lens, page, nb, width)
    q = torch.randn(meta.num_actual_tokens, h_kv * group, d, generator=gen, device=DEV).to(q_dtype)
    return kv, meta, q, AttentionParams(h_kv * group, h_kv, d)


@pytest.fixture
def gen(rng):
    return torch.Generator(DEV).manual_seed(int(torch.randint(1 << 30, (1,), generator=rng)))


@pytest.fixture(scope="module")
def backend():
    return get_attention_backend("triton", DEV)


# decodes at page boundaries and long contexts, a chunked prefill, a fresh prefill
MIXED = [(1023, 1), (16, 1), (2047, 1), (0, 1), (3000, 1), (256, 300), (0, 517)]
CASES = {
    "bf16-causal": dict(),
    "fp16-noncausal": dict(q_dtype=torch.float16, causal=False),
    "bf16-window-sinks-softcap": dict(sliding_window=700, sinks=True, logits_soft_cap=30.0),
    "fp8e4m3-head-scales": dict(kv_dtype=torch.float8_e4m3fn, scales="head"),
    "fp8e5m2-tensor-scale-fp16": dict(q_dtype=torch.float16, kv_dtype=torch.float8_e5m2, scales="tensor"),
    "bf16-d80-mqa": dict(d=80, h_kv=1, group=8),
    "bf16-d96-mha": dict(d=96, h_kv=4, group=1),
    "bf16-d256": dict(d=256, h_kv=2, group=2),
    "bf16-d64-page1": dict(d=64, page=1),
    "bf16-page256": dict(page=256),
    "bf16-page1040": dict(page=1040),          # a page of 65 x 16 tokens (hybrid plans of other engines)
    "bf16-page48": dict(page=48),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, gen, case):
    kw = dict(CASES[case])
    sinks, scales = kw.pop("sinks", False), kw.pop("scales", None)
    param_kw = {k: kw.pop(k) for k in ("causal", "sliding_window", "logits_soft_cap") if k in kw}
    kv, meta, q, p = setup(gen, MIXED, **kw)
    params = AttentionParams(p.num_heads, p.num_kv_heads, p.head_size, **param_kw)
    extra = {}
    if sinks:
        extra["sinks"] = torch.randn(p.num_heads, generator=gen, device=DEV)
    if scales == "head":
        extra["k_scale"] = torch.rand(p.num_kv_heads, generator=gen, device=DEV) + 0.5
        extra["v_scale"] = torch.rand(p.num_kv_heads, generator=gen, device=DEV) + 0.5
    elif scales == "tensor":
        extra["k_scale"], extra["v_scale"] = torch.tensor([0.8], device=DEV), torch.tensor([1.25], device=DEV)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=DEV)
    backend.forward(q, kv, meta, params, out=out, lse=lse, **extra)
    ref, ref_lse = REF.forward(q, kv, meta, params, return_lse=True, **extra)
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten output"
    assert rel_err(out, ref) < 1e-2, rel_err(out, ref)
    assert (lse - ref_lse).abs().max().item() < 2e-2


@pytest.mark.parametrize("splits", [None, 1, 3, 40])
def test_split_kv_decode_long(gen, splits):
    kv, meta, q, params = setup(gen, [(20000, 1), (511, 1), (4096, 1)])
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=DEV)
    split_kv_decode(q, kv, meta.query_start_loc, meta.seq_lens, meta.block_table, params,
                    max_seq_len=meta.max_seq_len, num_splits=splits, out=out, lse=lse)
    ref, ref_lse = REF.forward(q, kv, meta, params, return_lse=True)
    assert rel_err(out, ref) < 1e-2 and (lse - ref_lse).abs().max().item() < 2e-2


@pytest.mark.parametrize("fused", [True, False])
def test_split_kv_merge_in_the_decode_launch_is_race_free(gen, fused):
    """The last split of each (request, KV head) merges the others' partials (release/acquire counter):
    thousands of programs racing, relaunched on one workspace, give the same bits every time, the
    reference's values (with sinks and LSE), and leave the arrival counters at zero."""
    lens = [(int(c), 1) for c in torch.randint(1, 6000, (24,), generator=gen, device=DEV).tolist()]
    kv, meta, q, params = setup(gen, lens)
    sinks = torch.randn(params.num_heads, generator=gen, device=DEV)
    ws = SplitWorkspace.make(meta.num_reqs, params.num_heads, params.num_kv_heads, 16, params.head_size, DEV)
    cfg = dataclasses.replace(decode_config(params.head_size, 2, False), fused_merge=fused)
    ref, ref_lse = REF.forward(q, kv, meta, params, sinks=sinks, return_lse=True)
    first = None
    for _ in range(50):
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:2], float("nan"), device=DEV)
        split_kv_decode(q, kv, meta.query_start_loc, meta.seq_lens, meta.block_table, params,
                        max_seq_len=meta.max_seq_len, num_splits=16, sinks=sinks, out=out, lse=lse, workspace=ws,
                        config=cfg)
        if first is None:
            first = (out, lse)
            assert rel_err(out, ref) < 1e-2 and (lse - ref_lse).abs().max().item() < 2e-2
        assert torch.equal(out, first[0]) and torch.equal(lse, first[1])
    assert not ws.arrivals.any()


@pytest.mark.parametrize("kv_dtype,scales", [(torch.bfloat16, None), (torch.float8_e4m3fn, "head"),
                                             (torch.float8_e5m2, "tensor")])
def test_write_kv_bits(backend, gen, kv_dtype, scales):
    nb, h, page, d, t = 300, 8, 16, 128, 3000
    base = torch.randn(nb, h, page, 2 * d, generator=gen, device=DEV).to(kv_dtype)
    k = torch.randn(t, h, d, generator=gen, device=DEV).to(torch.bfloat16) * 3
    v = torch.randn(t, h, d, generator=gen, device=DEV).to(torch.bfloat16) * 3
    slots = torch.randperm(nb * page, generator=gen, device=DEV)[:t]
    slots[::7] = -1
    ks = vs = None
    if scales == "head":
        ks, vs = torch.rand(h, generator=gen, device=DEV) + 0.5, torch.rand(h, generator=gen, device=DEV) + 0.5
    elif scales == "tensor":
        ks, vs = torch.tensor([0.01], device=DEV), torch.tensor([2.0], device=DEV)
    got, want = base.clone(), base.clone()
    backend.write_kv(got, k, v, slots, ks, vs)
    ref_write_kv(want, k, v, slots, ks, vs)
    bits = (lambda x: x.view(torch.uint8)) if is_fp8(kv_dtype) else (lambda x: x)
    assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("lens", [[(900, 1)] * 24, [(700, 1)] * 6 + [(300, 200), (0, 64)]],
                         ids=["decode", "mixed"])
def test_cuda_graph_replay(backend, gen, lens):
    """Capture forward once, then write new lengths and block tables into the captured metadata tensors
    (decodes grow or shrink, pages move) and replay."""
    width = 128
    kv, meta, q, params = setup(gen, lens, extra=width * len(lens), width=width)
    nb = kv.shape[0]
    out = torch.full_like(q, float("nan"))
    backend.forward(q, kv, meta, params, out=out)              # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.forward(q, kv, meta, params, out=out, validate=False)
    for _ in range(2):
        new_lens = [(int(torch.randint(1, 1500, (1,))) if n == 1 else c, n) for c, n in lens]
        step = make_meta(gen, new_lens, 16, nb, width)
        for name in ("seq_lens", "query_start_loc", "block_table"):
            getattr(meta, name).copy_(getattr(step, name))
        q.copy_(torch.randn(q.shape, generator=gen, device=DEV))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = REF.forward(q, kv, step, params)
        assert not out.isnan().any() and rel_err(out, ref) < 1e-2
