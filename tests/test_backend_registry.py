"""Backend selection by name / auto / environment, and refusal of what a backend cannot do, before any work."""

import dataclasses

import pytest
import torch

import kvlayout as kvl
from kvlayout import registry
from kvlayout.backends.torch_ref import TORCH_CAPABILITIES, TorchBackend
from kvlayout.errors import BackendUnavailableError, KVLayoutError, LayoutConflictError, UnsupportedFeatureError

BS = 4


def test_torch_by_name_auto_and_env(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    torch_backend = kvl.get_attention_backend("torch")
    assert isinstance(torch_backend, TorchBackend) and torch_backend.name == "torch"
    assert kvl.get_attention_backend(" Torch ") is torch_backend            # names are trimmed, any case
    assert isinstance(kvl.get_attention_backend("auto", device="cpu"), TorchBackend)
    assert isinstance(kvl.get_attention_backend(None, device="cpu"), TorchBackend)   # default: auto
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert kvl.get_attention_backend() is torch_backend
    monkeypatch.setenv(registry.ENV_VAR, "auto")
    assert isinstance(kvl.get_attention_backend(device="cpu"), TorchBackend)


def test_unknown_name_lists_registered_backends(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    with pytest.raises(BackendUnavailableError) as e:
        kvl.get_attention_backend("fastest")
    msg = str(e.value)
    assert "'fastest'" in msg and "'auto'" in msg
    for name in registry.registered_backends():
        assert name in msg
    monkeypatch.setenv(registry.ENV_VAR, "nonsense")
    with pytest.raises(BackendUnavailableError, match="unknown attention backend 'nonsense'.*torch"):
        kvl.get_attention_backend()


class NeedsAccelerator(TorchBackend):
    name = "needs_accel"

    @classmethod
    def unavailable_reason(cls, device=None):
        return "needs an accelerator that is not here"


def test_unavailable_backend_says_why_and_what_is_usable(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "needs_accel", NeedsAccelerator)
    with pytest.raises(BackendUnavailableError) as e:
        kvl.get_attention_backend("needs_accel", device="cpu")
    msg = str(e.value)
    assert "'needs_accel'" in msg and "needs an accelerator" in msg and "Usable here:" in msg and "torch" in msg
    avail = registry.available_backends("cpu")
    assert avail["torch"] is None and avail["needs_accel"] == "needs an accelerator that is not here"
    assert isinstance(kvl.get_attention_backend("auto", device="cpu"), TorchBackend)   # auto skips it


def test_every_registered_backend_loads_or_is_refused_cleanly():
    for name in registry.registered_backends():
        try:
            backend = kvl.get_attention_backend(name, device="cpu")
        except BackendUnavailableError as e:
            assert name in str(e) and "Usable here:" in str(e)
        else:
            assert backend.name == name and backend.capabilities.name == name


def test_register_backend_by_string_target(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "ref2", "kvlayout.backends.torch_ref:TorchBackend")
    assert isinstance(kvl.get_attention_backend("ref2"), TorchBackend)
    registry._instances.pop("ref2", None)


# ---------------------------------------------------------------- unsupported features, refused before work

def limited_backend(drop=(), **overrides):
    caps = dataclasses.replace(TORCH_CAPABILITIES, name="limited",
                               features=TORCH_CAPABILITIES.features - set(drop), **overrides)
    return type("Limited", (TorchBackend,), {"name": "limited", "capabilities": caps})()


def setup(dtype=torch.float32, hq=4, hkv=2, d=8):
    spec = kvl.AttentionSpec(hkv, d, dtype, BS)
    caches = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout({"a": spec}, 6))
    g = torch.Generator().manual_seed(0)
    caches.buffers[0].copy_(torch.randint(-100, 100, caches.buffers[0].shape, generator=g, dtype=torch.int8))
    meta = kvl.build_attention_metadata([kvl.ScheduledRequest(3, 2, [4, 1]), kvl.ScheduledRequest(0, 3, [2])],
                                        BS, num_blocks=6)
    q_dtype = torch.float32 if dtype.itemsize == 1 else dtype
    q = torch.randn(5, hq, d, generator=g).to(q_dtype)
    return spec, caches, meta, q


@pytest.mark.parametrize("drop,kw,what", [
    (["non_causal"], dict(params=dict(causal=False)), "non_causal"),
    (["sliding_window"], dict(params=dict(sliding_window=2)), "sliding_window"),
    (["soft_cap"], dict(params=dict(logits_soft_cap=10.0)), "soft_cap"),
    (["sinks"], dict(sinks=True), "sinks"),
    (["lse"], dict(lse=True), "lse"),
    (["fp8_kv"], dict(dtype=torch.float8_e4m3fn), "fp8_kv"),
    ([], dict(caps=dict(q_dtypes=frozenset({torch.bfloat16}))), "float32 queries"),
    ([], dict(caps=dict(kv_dtypes=frozenset({torch.bfloat16}))), "float32 cache"),
    ([], dict(caps=dict(head_sizes=frozenset({64, 128}))), "head size 8"),
    ([], dict(caps=dict(block_sizes=frozenset({16}))), "block size one of 16"),
])
def test_unsupported_feature_refused_before_any_work(drop, kw, what):
    backend = limited_backend(drop, **kw.get("caps", {}))
    spec, caches, meta, q = setup(kw.get("dtype", torch.float32))
    params = kvl.AttentionParams(4, 2, 8, **kw.get("params", {}))
    before = caches.buffers[0].clone()
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan")) if kw.get("lse") else None
    sinks = torch.zeros(4) if kw.get("sinks") else None
    with pytest.raises(UnsupportedFeatureError, match=f"'limited'.*{what}"):
        backend.forward(q, caches["a"], meta, params, sinks=sinks, out=out, lse=lse)
    assert torch.equal(caches.buffers[0], before)
    assert out.isnan().all() and (lse is None or lse.isnan().all())
    assert isinstance(UnsupportedFeatureError("x"), KVLayoutError)


class Attn(kvl.AttentionLayer, torch.nn.Module):
    pass


def test_layer_refuses_a_backend_that_cannot_serve_its_spec_before_writing():
    spec = kvl.AttentionSpec(2, 8, torch.float32, BS, has_sinks=True)
    caches = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout({"a": spec}, 6))
    layer = Attn(layer_name="a", spec=spec, num_heads=4)
    kvl.bind_kv_cache({"a": layer}, caches)
    meta = kvl.build_attention_metadata([kvl.ScheduledRequest(0, 3, [2])], BS, num_blocks=6)
    k = torch.randn(3, 2, 8)
    with pytest.raises(UnsupportedFeatureError, match="'limited' cannot serve layer 'a': learned sinks"):
        layer.attend(torch.randn(3, 4, 8), k, k, meta, limited_backend(["sinks"]))
    assert not caches.buffers[0].any()
    out = layer.attend(torch.randn(3, 4, 8), k, k, meta, kvl.get_attention_backend("torch"))
    assert out.shape == (3, 4, 8) and caches.buffers[0].any()


def test_plan_with_a_backend_object_uses_its_capabilities():
    backend = limited_backend(["soft_cap"])
    with pytest.raises(LayoutConflictError, match="'a'.*'limited'.*soft-cap"):
        kvl.plan_kv_cache({"a": kvl.AttentionSpec(2, 8, logits_soft_cap=30.0)}, 1 << 20, backend=backend)
    assert kvl.plan_kv_cache({"a": kvl.AttentionSpec(2, 8)}, 1 << 20, backend=backend).layout.backend == "limited"


def test_base_backend_refuses_mla():
    class NoMLA(kvl.backends.AttentionBackend):
        name = "nomla"
        capabilities = TORCH_CAPABILITIES

        def forward(self, *a, **k):
            raise AssertionError("not called")

    with pytest.raises(UnsupportedFeatureError, match="'nomla' does not run MLA"):
        NoMLA().forward_mla(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4, 4), None, 2, 1.0)
