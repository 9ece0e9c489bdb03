"""The reference backend against a float64 attention written here, from the K/V gathered out of the cache."""

import math

import pytest
import torch

import kvlayout as kvl
from kvlayout.backends.torch_ref import TorchBackend

BACKEND = TorchBackend()
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# (num_computed_tokens, num_new_tokens): decodes first (incl. a one-token prompt), then prefills:
# a prompt of exactly two pages, chunked prefills, length-0 requests, a chunk ending on a page boundary.
BS = 4
MIXED = [(7, 1), (BS - 1, 1), (0, 1), (0, 2 * BS), (5, 6), (0, 0), (13, 0), (BS, BS + 1), (2, 2 * BS - 2)]


def oracle(q, k, v, scale, q_pos, causal=True, window=None, cap=None, sinks=None):
    """float64 attention, one head at a time, with an explicit running max; LSE in natural log.
    q [Q, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv]; query row t sits at position q_pos[t]."""
    q, k, v = q.double(), k.double(), v.double()
    nq, hq, _ = q.shape
    s_len, hkv, dv = v.shape
    out = torch.zeros(nq, hq, dv, dtype=torch.float64)
    lse = torch.full((nq, hq), -math.inf, dtype=torch.float64)
    i = q_pos.view(-1, 1)
    j = torch.arange(s_len).view(1, -1)
    allowed = torch.ones(nq, s_len, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= j > i - window
    for h in range(hq):
        kv_h = h // (hq // hkv)
        logits = (q[:, h] @ k[:, kv_h].T) * scale
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        logits = torch.where(allowed, logits, torch.tensor(-math.inf, dtype=torch.float64))
        row_max = logits.max(dim=1).values
        if sinks is not None:
            row_max = torch.maximum(row_max, torch.tensor(float(sinks[h]), dtype=torch.float64))
        has = torch.isfinite(row_max)
        m = torch.where(has, row_max, torch.zeros_like(row_max))
        w = torch.exp(logits - m.view(-1, 1))                  # exp(-inf) = 0 for hidden keys
        denom = w.sum(dim=1)
        if sinks is not None:
            denom = denom + torch.exp(float(sinks[h]) - m)
        safe = torch.where(has, denom, torch.ones_like(denom))
        out[:, h] = torch.where(has.view(-1, 1), (w @ v[:, kv_h]) / safe.view(-1, 1), 0.0)
        lse[:, h] = torch.where(has, m + torch.log(safe), torch.tensor(-math.inf, dtype=torch.float64))
    return out, lse


def rel_err(x, ref):
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


class Scenario:
    """A cache holding the full history of every request (random block order), the step's metadata,
    and fresh queries (plus ``pad`` extra rows that no request owns)."""

    def __init__(self, rng, dtype=torch.float32, hq=4, hkv=2, d=16, reqs=MIXED, q_dtype=None, per_head=False,
                 cross=False, pad=0, q_mag=1.0):
        self.spec = kvl.AttentionSpec(hkv, d, dtype, BS)
        need = [-(-(c + n) // BS) for c, n in reqs]
        nb = sum(need) + 3
        specs = {"l0": self.spec, "l1": self.spec} if cross else {"l1": self.spec}
        self.caches = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout(specs, nb, cross_layer=cross))
        self.cache = self.caches["l1"]
        pool = torch.randperm(nb, generator=rng).tolist()
        fp8 = dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        if fp8:
            self.k_scale = (torch.rand(hkv if per_head else 1, generator=rng) + 0.5) / 16
            self.v_scale = (torch.rand(hkv if per_head else 1, generator=rng) + 0.5) / 16
        else:
            self.k_scale = self.v_scale = None
        src_dtype = torch.float32 if fp8 else dtype
        self.requests = []
        for c, n in reqs:
            ids = [pool.pop() for _ in range(-(-(c + n) // BS))]
            self.requests.append(kvl.ScheduledRequest(c, n, ids))
            if c + n:
                k = torch.randn(c + n, hkv, d, generator=rng).to(src_dtype)
                v = torch.randn(c + n, hkv, d, generator=rng).to(src_dtype)
                slots = torch.tensor([ids[p // BS] * BS + p % BS for p in range(c + n)])
                kvl.write_kv(self.cache, k, v, slots, self.k_scale, self.v_scale)
        self.meta = kvl.build_attention_metadata(self.requests, BS, num_blocks=nb)
        self.q_dtype = q_dtype or (torch.float32 if fp8 else dtype)
        t = self.meta.num_actual_tokens
        self.q = (q_mag * torch.randn(t + pad, hq, d, generator=rng)).to(self.q_dtype)
        self.hq, self.hkv, self.d = hq, hkv, d

    def reference(self, params, sinks=None):
        out = torch.zeros(self.q.shape, dtype=torch.float64)
        lse = torch.full(self.q.shape[:2], -math.inf, dtype=torch.float64)
        start = 0
        for r in self.requests:
            c, n = r.num_computed_tokens, r.num_new_tokens
            if n:
                k, v = kvl.gather_kv(self.cache, r.block_ids, c + n, self.k_scale, self.v_scale, dtype=torch.float64)
                o, l = oracle(self.q[start:start + n], k, v, params.scale, torch.arange(c, c + n), params.causal,
                              params.sliding_window, params.logits_soft_cap, sinks)
                out[start:start + n], lse[start:start + n] = o, l
            start += n
        return out, lse

    def params(self, **kw):
        return kvl.AttentionParams(self.hq, self.hkv, self.d, **kw)


def check(sc, params, sinks=None, tol=None, **fwd):
    before = [b.clone() for b in sc.caches.buffers]
    out, lse = BACKEND.forward(sc.q, sc.cache, sc.meta, params, sinks=sinks, k_scale=sc.k_scale,
                               v_scale=sc.v_scale, return_lse=True, **fwd)
    ref_out, ref_lse = sc.reference(params, sinks)
    t = sc.meta.num_actual_tokens
    assert out.dtype == sc.q_dtype and tuple(out.shape) == tuple(sc.q.shape)
    assert lse.dtype == torch.float32
    assert rel_err(out[:t], ref_out[:t]) < (tol or TOL[sc.q_dtype])
    assert torch.equal(torch.isfinite(lse[:t]), torch.isfinite(ref_lse[:t]))
    fin = torch.isfinite(ref_lse[:t])
    assert rel_err(lse[:t][fin], ref_lse[:t][fin]) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(before, sc.caches.buffers))     # forward only reads
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 1)])
def test_mixed_batch_gqa_mqa(dtype, hq, hkv, rng):
    sc = Scenario(rng, dtype, hq, hkv)
    assert sc.meta.num_decodes == 3 and sc.meta.num_prefills == len(MIXED) - 3
    check(sc, sc.params())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 5])
def test_causal_noncausal_sliding_window(causal, window, rng):
    sc = Scenario(rng, torch.float32, 4, 2)
    check(sc, sc.params(causal=causal, sliding_window=window))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_cap(dtype, rng):
    sc = Scenario(rng, dtype, 4, 1, q_mag=4.0)           # large logits so the cap bends them
    params = sc.params(logits_soft_cap=2.0)
    check(sc, params)
    plain, _ = BACKEND.forward(sc.q, sc.cache, sc.meta, sc.params(), return_lse=True)
    capped = BACKEND.forward(sc.q, sc.cache, sc.meta, params)
    assert rel_err(capped.float(), plain.double()) > 1e-2         # the cap really changes the result


@pytest.mark.parametrize("causal,window,cap", [(True, None, None), (True, 3, 5.0), (False, None, None)])
def test_sinks(causal, window, cap, rng):
    sc = Scenario(rng, torch.float32, 8, 2)
    sinks = torch.randn(8, generator=rng) * 2
    out, lse = check(sc, sc.params(causal=causal, sliding_window=window, logits_soft_cap=cap), sinks=sinks)
    # a sink only takes probability mass: with sinks, every row's weights sum to less than 1
    no_sink_lse = BACKEND.forward(sc.q, sc.cache, sc.meta, sc.params(causal=causal, sliding_window=window,
                                                                      logits_soft_cap=cap), return_lse=True)[1]
    t = sc.meta.num_actual_tokens
    assert (lse[:t] > no_sink_lse[:t]).all()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_fp8_with_scales(dtype, per_head, q_dtype, rng):
    sc = Scenario(rng, dtype, 4, 2, q_dtype=q_dtype, per_head=per_head)
    check(sc, sc.params(sliding_window=6))


def test_lse_is_natural_log(rng):
    sc = Scenario(rng, torch.float32, 2, 1, reqs=[(0, 3)])
    params = sc.params(causal=False)
    _, lse = BACKEND.forward(sc.q, sc.cache, sc.meta, params, return_lse=True)
    k, _ = kvl.gather_kv(sc.cache, sc.requests[0].block_ids, 3)
    direct = torch.log(torch.exp(torch.einsum("qhd,kd->qhk", sc.q.double(), k[:, 0].double()) * params.scale).sum(-1))
    assert torch.allclose(lse.double(), direct, rtol=1e-6, atol=1e-6)
    assert BACKEND.capabilities.lse_base == "e"


@pytest.mark.parametrize("reqs", [
    [(0, 1)],                                  # one token, nothing cached
    [(0, 0), (0, 0)],                          # nothing scheduled at all
    [(9, 1)] * 5,                              # pure decode
    [(0, BS)], [(0, BS + 1)], [(BS - 1, 2)],   # page boundaries
    [(2 * BS, 3 * BS)],                        # chunked prefill, several new tokens over a cached prefix
])
def test_awkward_batches(reqs, rng):
    sc = Scenario(rng, torch.float32, 4, 1, reqs=reqs)
    check(sc, sc.params())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_poisoned_out_and_lse_are_fully_overwritten(dtype, rng):
    sc = Scenario(rng, dtype, 4, 2, pad=3)
    out = torch.full_like(sc.q, float("nan"))
    lse = torch.full(sc.q.shape[:2], float("nan"))
    got_out, got_lse = check(sc, sc.params(), out=out, lse=lse)
    assert got_out is out and got_lse is lse
    assert not out.isnan().any() and not lse.isnan().any()
    assert not out[sc.meta.num_actual_tokens:].any()             # rows past the scheduled tokens: zero


def test_cross_layer_view_honours_strides(rng):
    sc = Scenario(rng, torch.bfloat16, 4, 2, cross=True)
    assert not sc.cache.is_contiguous() and sc.cache.storage_offset() > 0
    check(sc, sc.params(sliding_window=7))


def test_validate_false_gives_the_same_answer(rng):
    sc = Scenario(rng, torch.float32, 4, 2)
    a = BACKEND.forward(sc.q, sc.cache, sc.meta, sc.params())
    b = BACKEND.forward(sc.q, sc.cache, sc.meta, sc.params(), validate=False)
    assert torch.equal(a, b)


class Attn(kvl.AttentionLayer, torch.nn.Module):
    pass


def test_layer_attend_writes_then_attends(rng):
    """AttentionLayer.attend appends the step's K/V and attends over cache + new tokens."""
    reqs = [(6, 1), (0, 5), (3, 4)]
    spec = kvl.AttentionSpec(2, 16, torch.float32, BS)
    caches = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout({"a": spec}, 12))
    layer = Attn(layer_name="a", spec=spec, num_heads=4)
    kvl.bind_kv_cache({"a": layer}, caches)
    pool = torch.randperm(12, generator=rng).tolist()
    requests, full_k, full_v = [], [], []
    for c, n in reqs:
        ids = [pool.pop() for _ in range(-(-(c + n) // BS))]
        requests.append(kvl.ScheduledRequest(c, n, ids))
        full_k.append(torch.randn(c + n, 2, 16, generator=rng))
        full_v.append(torch.randn(c + n, 2, 16, generator=rng))
        if c:
            kvl.write_kv(caches["a"], full_k[-1][:c], full_v[-1][:c], torch.tensor([ids[p // BS] * BS + p % BS
                                                                                     for p in range(c)]))
    meta = kvl.build_attention_metadata(requests, BS, num_blocks=12)
    k_new = torch.cat([fk[c:] for fk, (c, _) in zip(full_k, reqs)])
    v_new = torch.cat([fv[c:] for fv, (c, _) in zip(full_v, reqs)])
    q = torch.randn(k_new.shape[0], 4, 16, generator=rng)
    out = layer.attend(q, k_new, v_new, meta, BACKEND)
    start = 0
    for (c, n), k, v in zip(reqs, full_k, full_v):
        ref, _ = oracle(q[start:start + n], k, v, 16 ** -0.5, torch.arange(c, c + n))
        assert rel_err(out[start:start + n], ref) < 1e-4
        start += n


# ---------------------------------------------------------------- MLA

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_over_the_latent_cache(dtype, rng):
    rank, rope, heads = 16, 8, 4
    spec = kvl.MLASpec(rank, rope, dtype, BS)
    reqs = [(5, 1), (0, 1), (0, 2 * BS), (3, 6), (0, 0)]
    nb = sum(-(-(c + n) // BS) for c, n in reqs) + 2
    caches = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout({"mla": spec}, nb))

    class MLA(kvl.MLALayer, torch.nn.Module):
        pass

    scale = 0.2
    layer = MLA(layer_name="mla", spec=spec, num_heads=heads, scale=scale)
    kvl.bind_kv_cache({"mla": layer}, caches)
    pool = torch.randperm(nb, generator=rng).tolist()
    requests, lats = [], []
    for c, n in reqs:
        ids = [pool.pop() for _ in range(-(-(c + n) // BS))]
        requests.append(kvl.ScheduledRequest(c, n, ids))
        lats.append(torch.randn(c + n, rank + rope, generator=rng).to(dtype))
        layer.write_latent(lats[-1], torch.tensor([ids[p // BS] * BS + p % BS for p in range(c + n)],
                                                   dtype=torch.int64))
    meta = kvl.build_attention_metadata(requests, BS, num_blocks=nb)
    q = torch.randn(meta.num_actual_tokens, heads, rank + rope, generator=rng).to(dtype)
    out, lse = layer.attend(q, None, meta, BACKEND, return_lse=True)
    assert tuple(out.shape) == (meta.num_actual_tokens, heads, rank) and out.dtype == dtype
    ref_out = torch.zeros(out.shape, dtype=torch.float64)
    ref_lse = torch.zeros(lse.shape, dtype=torch.float64)
    start = 0
    for (c, n), lat in zip(reqs, lats):
        if n:
            # keys: the whole latent (one shared "head"); values: its first kv_lora_rank entries
            o, l = oracle(q[start:start + n], lat.unsqueeze(1), lat[:, :rank].unsqueeze(1), scale,
                          torch.arange(c, c + n))
            ref_out[start:start + n], ref_lse[start:start + n] = o, l
        start += n
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(lse, ref_lse) < 1e-5
