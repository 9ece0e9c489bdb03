"""CUDA graphs over padded step metadata (GPU only): a replayed step equals the same step run eagerly, for
decode-only and mixed steps on every backend that supports capture, with the cache equal afterwards and
every page the step does not own byte-identical; the engine's captured steps give the eager engine's
greedy tokens, compiled or not."""

from __future__ import annotations

import pytest
import torch

import kvlayout as kvl
from kvlayout.backends import get_attention_backend
from kvlayout.errors import KVLayoutError
from kvlayout.registry import available_backends
from kvlayout.step_buffers import StepBuffers

pytestmark = pytest.mark.gpu

HQ, H, D, BS, NB = 8, 2, 128, 16, 96
CAPTURABLE = ("triton", "rocm")


class Attn(kvl.AttentionLayer, torch.nn.Module):
    pass


def schedule(rng, reqs, ids):
    sched, at = [], 0
    for c, n in reqs:
        k = -(-(c + n) // BS)
        sched.append(kvl.ScheduledRequest(c, n, ids[at:at + k]))
        at += k
    return sched, ids[at:]


# (steps replayed one after another in one graph, padded requests, padded tokens, decode_only)
CASES = [
    ([[(15, 1), (40, 1), (0, 1)], [(16, 1)], [(100, 1), (31, 1), (47, 1), (63, 1)]], 4, 4, True),
    ([[(15, 1), (0, 33), (17, 16)], [(64, 1), (5, 1)], [(0, 64)]], 6, 64, False),
]


@pytest.mark.parametrize("backend", CAPTURABLE)
@pytest.mark.parametrize("steps, num_reqs, num_tokens, decode_only", CASES)
def test_replay_equals_eager_and_leaves_other_pages_alone(rng, backend, steps, num_reqs, num_tokens, decode_only):
    dev = torch.device("cuda")
    be = get_attention_backend(backend, dev)
    spec = kvl.AttentionSpec(H, D, torch.bfloat16, BS, sliding_window=48)
    caches = kvl.allocate_kv_cache(kvl.resolve_kv_cache_layout({"g": spec, "e": spec}, NB), dev)
    caches["g"].copy_(torch.randn(caches["g"].shape, generator=rng).to(dev, torch.bfloat16))
    caches["e"].copy_(caches["g"])
    layers = {n: Attn(layer_name=n, spec=spec, num_heads=HQ) for n in caches}
    for n, layer in layers.items():
        layer.bind_kv_cache(caches[n])
    bufs = StepBuffers(BS, num_blocks=NB, max_num_reqs=8, max_num_tokens=64, max_blocks_per_request=8,
                       device=dev)
    q = torch.zeros(num_tokens, HQ, D, device=dev, dtype=torch.bfloat16)
    k = torch.zeros(num_tokens, H, D, device=dev, dtype=torch.bfloat16)
    v = torch.zeros_like(k)
    capture_meta = bufs.build([], num_reqs=num_reqs, num_tokens=num_tokens, decode_only=decode_only)
    before_capture = caches["g"].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layers["g"].attend(q, k, v, capture_meta, be, validate=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layers["g"].attend(q, k, v, capture_meta, be, validate=False)
    torch.cuda.synchronize()
    assert torch.equal(caches["g"], before_capture)              # an all-padding step writes nothing
    for reqs in steps:
        ids = torch.randperm(NB, generator=rng).tolist()
        sched, free = schedule(rng, reqs, ids)
        total = sum(n for _, n in reqs)
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, generator=rng).to(dev, torch.bfloat16))
        free_pages = caches["g"][free].clone()
        meta = bufs.build(sched, num_reqs=num_reqs, num_tokens=num_tokens, decode_only=decode_only)
        eager = layers["e"].attend(q, k, v, meta, be).clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[:total], eager[:total])
        assert torch.equal(caches["g"], caches["e"])
        assert torch.equal(caches["g"][free], free_pages)
        ref = Attn(layer_name="r", spec=spec, num_heads=HQ)
        ref.bind_kv_cache(caches["e"].clone())
        want = ref.attend(q[:total], None, None, kvl.build_attention_metadata(sched, BS, dev, num_blocks=NB), "torch")
        err = float((out[:total].float() - want.float()).norm() / want.float().norm())
        assert err < 1e-2


def engine_tokens(cfg, prompts, **kw):
    from kvlayout.engine.runner import Engine
    eng = Engine(cfg, num_blocks=128, block_size=16, max_num_batched_tokens=32, max_num_seqs=8,
                 device="cuda", dtype=torch.float32, **kw)
    out = eng.generate(prompts, 8)
    return eng, out


@pytest.mark.parametrize("backend", CAPTURABLE)
@pytest.mark.parametrize("compile", [False, True])
def test_the_engines_captured_steps_give_the_eager_tokens(backend, compile):
    pytest.importorskip("transformers")
    from test_runner_families import family_config

    cfg = family_config("llama", head_dim=64).to_dict()
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 90, (n,), generator=gen).tolist() for n in (5, 40, 17, 1, 23)]
    _, eager = engine_tokens(cfg, prompts, backend=backend)
    eng, replayed = engine_tokens(cfg, prompts, backend=backend, cuda_graphs=True, compile=compile,
                                  graph_decode_sizes=(1, 2, 4, 8), graph_mixed_token_sizes=(16, 32))
    assert replayed == eager
    assert eng.graphs.num_replays > 0
    assert eng.num_free_blocks == eng.num_blocks
    graphs = eng.graphs
    key = graphs.pick(2, 2, True)
    sched = [kvl.ScheduledRequest(3, 1, [0]), kvl.ScheduledRequest(5, 1, [1])]
    other = StepBuffers(eng.plan, max_num_reqs=8, max_num_tokens=32, max_blocks_per_request=4, device="cuda")
    before = {n: c.clone() for n, c in eng.caches.items()}
    with pytest.raises(KVLayoutError, match="not built into these graphs"):
        graphs.replay_metadata(key, other.build(sched, num_reqs=key.num_reqs, num_tokens=key.num_tokens,
                                                decode_only=True), [5, 6], [3, 5])
    stale = graphs.buffers.build(sched, num_reqs=key.num_reqs, num_tokens=key.num_tokens, decode_only=True)
    graphs.buffers.build(sched, num_reqs=8, num_tokens=8, decode_only=True)
    with pytest.raises(KVLayoutError, match="changed after it was built"):
        graphs.replay_metadata(key, stale, [5, 6], [3, 5])
    wrong = graphs.buffers.build(sched, num_reqs=8, num_tokens=8, decode_only=True)
    with pytest.raises(KVLayoutError, match="does not match the captured size"):
        graphs.replay_metadata(key, wrong, [5, 6], [3, 5])
    too_big = [kvl.ScheduledRequest(3, 1, [i]) for i in range(9)]
    with pytest.raises(KVLayoutError, match="more than the"):
        graphs.replay(graphs.pick(8, 8, True), too_big, [5] * 9, [3] * 9)
    assert all(torch.equal(c, before[n]) for n, c in eng.caches.items())


def test_backends_that_cannot_be_captured_are_refused():
    pytest.importorskip("transformers")
    from test_runner_families import family_config
    from kvlayout.engine.runner import Engine

    cfg = family_config("llama", head_dim=64).to_dict()
    names = ["torch"] + [n for n in ("flashinfer", "flash_attn") if available_backends("cuda").get(n) is None]
    for name in names:
        with pytest.raises(KVLayoutError, match="cannot be captured"):
            Engine(cfg, num_blocks=16, device="cuda", backend=name, cuda_graphs=True)
