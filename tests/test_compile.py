"""Attention as torch custom ops: the ops' schemas and fake implementations (``torch.library.opcheck``),
the ops equal to the layer calls, and the runner's transformers model under ``torch.compile(fullgraph=True)``
with no graph break and the eager engine's greedy tokens."""

from __future__ import annotations

import pytest
import torch

import kvlayout as kvl
from kvlayout import custom_ops  # noqa: F401  (registers torch.ops.kvlayout.*)
from kvlayout.backends import get_attention_backend
from kvlayout.errors import KVLayoutError

H, HQ, D, BS, NB = 2, 4, 64, 4, 12


class Attn(kvl.AttentionLayer, torch.nn.Module):
    pass


class MLA(kvl.MLALayer, torch.nn.Module):
    pass


def step(rng, reqs=((5, 1), (0, 4), (3, 2))):
    ids = torch.randperm(NB, generator=rng).tolist()
    sched, at = [], 0
    for c, n in reqs:
        k = -(-(c + n) // BS)
        sched.append(kvl.ScheduledRequest(c, n, ids[at:at + k]))
        at += k
    return kvl.build_attention_metadata(sched, BS, num_blocks=NB)


def attention_world(rng, **spec_kw):
    spec = kvl.AttentionSpec(H, D, torch.float32, BS, **spec_kw)
    caches = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout({"a": spec, "b": spec}, NB))
    caches["a"].copy_(torch.randn(caches["a"].shape, generator=rng))
    caches["b"].copy_(caches["a"])
    layers = {}
    for name in caches:
        layers[name] = Attn(layer_name=name, spec=spec, num_heads=HQ)
        layers[name].bind_kv_cache(caches[name])
    return layers, caches


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spec_kw", [{}, {"sliding_window": 3, "logits_soft_cap": 20.0}, {"has_sinks": True}])
def test_the_attend_op_equals_the_layer_call(rng, backend, spec_kw):
    layers, caches = attention_world(rng, **spec_kw)
    meta = step(rng)
    t = meta.num_actual_tokens
    q, k, v = torch.randn(t, HQ, D, generator=rng), torch.randn(t, H, D, generator=rng), torch.randn(t, H, D, generator=rng)
    ref = layers["a"].attend(q, k, v, meta, backend, return_lse=True)
    with kvl.step_context(meta, backend):
        got = layers["b"].attend_op(q, k, v, return_lse=True)
    assert torch.equal(caches["a"], caches["b"])
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-5)


def test_the_ops_pass_opcheck(rng):
    layers, caches = attention_world(rng)
    meta = step(rng)
    t = meta.num_actual_tokens
    q, k, v = torch.randn(t, HQ, D, generator=rng), torch.randn(t, H, D, generator=rng), torch.randn(t, H, D, generator=rng)
    lay = layers["a"]
    p = lay.attn_params
    with kvl.step_context(meta, "torch"):
        for lse in (False, True):
            torch.library.opcheck(torch.ops.kvlayout.attend.default,
                                  (q, k, v, caches["a"], None, None, None, HQ, p.scale, True, 0, 0.0, lse))
        torch.library.opcheck(torch.ops.kvlayout.attend.default,
                              (q, None, None, caches["a"], None, None, None, HQ, p.scale, True, 2, 5.0, False))
    torch.library.opcheck(torch.ops.kvlayout.write_kv.default, (caches["b"], k, v, meta.slot_mapping, None, None,
                                                                 "torch"))
    spec = kvl.MLASpec(12, 4, torch.float32, BS)
    latent_cache = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout({"m": spec}, NB))["m"]
    latent_cache.copy_(torch.randn(latent_cache.shape, generator=rng))
    with kvl.step_context(meta, "torch"):
        torch.library.opcheck(torch.ops.kvlayout.mla_attend.default,
                              (torch.randn(t, HQ, 16, generator=rng), torch.randn(t, 16, generator=rng), latent_cache,
                               12, 0.25, True))


def test_the_mla_op_equals_the_layer_call(rng):
    spec = kvl.MLASpec(12, 4, torch.float32, BS)
    caches = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout({"a": spec, "b": spec}, NB))
    layers = {}
    for name, c in caches.items():
        c.copy_(torch.randn(c.shape, generator=rng))
    caches["b"].copy_(caches["a"])
    for name, c in caches.items():
        layers[name] = MLA(layer_name=name, spec=spec, num_heads=HQ, scale=0.25)
        layers[name].bind_kv_cache(c)
    meta = step(rng)
    t = meta.num_actual_tokens
    q, lat = torch.randn(t, HQ, 16, generator=rng), torch.randn(t, 16, generator=rng)
    ref = layers["a"].attend(q, lat, meta, "torch")
    with kvl.step_context(meta, "torch"):
        got = layers["b"].attend_op(q, lat)
    assert torch.equal(caches["a"], caches["b"]) and torch.allclose(got, ref)


def test_the_ops_need_a_step_context_and_validated_metadata(rng):
    layers, caches = attention_world(rng)
    meta = step(rng)
    t = meta.num_actual_tokens
    q, k, v = torch.randn(t, HQ, D, generator=rng), torch.randn(t, H, D, generator=rng), torch.randn(t, H, D, generator=rng)
    before = caches["a"].clone()
    with pytest.raises(KVLayoutError, match="step_context"):
        layers["a"].attend_op(q, k, v)
    meta.seq_lens.add_(1)
    with pytest.raises(KVLayoutError, match="changed after it was built"):
        with kvl.step_context(meta, "torch"):
            pass
    with pytest.raises(KVLayoutError, match="validate must be True or False"):
        with kvl.step_context(step(rng), "torch", validate="no"):
            pass
    with kvl.step_context(step(rng), "torch"):
        with pytest.raises(KVLayoutError, match="rows"):      # k of the wrong length: refused before the write
            layers["a"].attend_op(q, k[:1], v[:1])
    assert torch.equal(caches["a"], before)


# ---- the runner under torch.compile ----------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def compiled_vs_eager(model_type: str, backend: str, compile_opts):
    from test_runner_families import family_config
    from kvlayout.engine.runner import Engine

    cfg = family_config(model_type, head_dim=64 if backend == "triton" else 16).to_dict()
    prompts = [[3, 5, 7, 9, 11], [2, 4, 6, 8, 10, 12, 14, 16, 18], [1, 2]]
    kw = dict(num_blocks=64, block_size=4, max_num_batched_tokens=8, backend=backend)
    eager = Engine(cfg, **kw).generate(prompts, 5)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eng = Engine(cfg, compile=compile_opts, **kw)
    got = eng.generate(prompts, 5)
    return eager, got, dict(torch._dynamo.utils.counters["graph_break"])


@pytest.mark.parametrize("model_type, backend, opts", [
    ("llama", "torch", True),                              # inductor
    ("gemma2", "torch", {"backend": "aot_eager"}),         # soft cap, sliding window
    ("gpt_oss", "torch", {"backend": "aot_eager"}),        # learned sinks, MoE
    ("llama", "triton", {"backend": "aot_eager"}),
])
def test_the_compiled_runner_matches_eager_tokens_without_graph_breaks(model_type, backend, opts):
    eager, compiled, breaks = compiled_vs_eager(model_type, backend, opts)
    assert compiled == eager
    assert breaks == {}


def test_compile_checks_the_backend_against_every_layer():
    from test_runner_families import family_config
    from kvlayout.engine.hf_model import build_model

    model = build_model(family_config("gemma2").to_dict(), block_size=4)
    kvl.bind_kv_cache(model.attention_layers(), kvl.allocate_kv_cache(
        kvl.resolve_kv_cache_layout(model.kv_specs, 8)))
    from kvlayout.backends.torch_ref import TorchBackend
    from kvlayout.capabilities import BackendCapabilities

    class NoSoftCap(TorchBackend):
        name = "no-soft-cap"
        capabilities = BackendCapabilities(name="no-soft-cap", kv_dtypes=frozenset({torch.float32}),
                                           q_dtypes=frozenset({torch.float32}), features=frozenset({"sliding_window"}))

    with pytest.raises(kvl.UnsupportedFeatureError, match="soft"):
        model.compile_model(NoSoftCap())
    assert get_attention_backend("torch", "cpu") is not None
