"""The model runner against Hugging Face transformers: the same safetensors weights in
``LlamaForCausalLM`` must give the same prefill logits and the same greedy tokens, with continuous
batching, chunked prefill and preemption, on every backend that can run here."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from kvlayout import AttentionSpec, ScheduledRequest, build_attention_metadata  # noqa: E402
from kvlayout.backends import available_backends, get_attention_backend, registered_backends  # noqa: E402
from kvlayout.errors import KVLayoutError  # noqa: E402
from kvlayout.engine.runner import Engine  # noqa: E402

NEW_TOKENS = 32
# Llama-3 rope scaling with a short original context, so all three frequency bands occur.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny_config(**over):
    kw = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
              initializer_range=0.2, rope_parameters=dict(LLAMA3_ROPE))
    kw.update(over)
    return transformers.LlamaConfig(**kw)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """Random weights saved by transformers' own LlamaForCausalLM.save_pretrained (safetensors)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(1234)
    model = transformers.LlamaForCausalLM(tiny_config())
    model.save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def prompts(gen, lengths=(1, 7, 19, 30)):
    return [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def hf_greedy(model, prompt, n=NEW_TOKENS):
    device = next(model.parameters()).device
    out = model(torch.tensor([prompt], device=device), use_cache=True)
    toks = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = model(torch.tensor([[toks[-1]]], device=device), past_key_values=out.past_key_values, use_cache=True)
        toks.append(int(out.logits[0, -1].argmax()))
    return toks


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def cpu_backends():
    """torch always; triton when registered (under TRITON_INTERPRET on CPU)."""
    out = [pytest.param("torch", id="torch")]
    reason = None if "triton" in registered_backends() else "the 'triton' backend is not registered yet"
    out.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


def smallest_block_size(backend_name, candidates=(4, 8, 16, 32)):
    caps = get_attention_backend(backend_name, "cpu").capabilities
    return next(b for b in candidates if caps.block_size_ok(b))


# ---- what the runner refuses ------------------------------------------------------------------------

@pytest.mark.parametrize("model_type, fields, msg", [
    ("mamba", {"num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 128}, "attention-only"),
    ("deepseek_v3", {"num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 128, "num_attention_heads": 4,
                     "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                     "v_head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2,
                     "moe_intermediate_size": 32, "intermediate_size": 64}, "MLASpec"),
    ("llama4_text", {"num_hidden_layers": 2}, "chunked"),
])
def test_unsupported_models_are_refused_in_one_line(model_type, fields, msg):
    cfg = transformers.AutoConfig.for_model(model_type, **fields).to_dict()
    with pytest.raises(KVLayoutError, match=msg) as e:
        Engine(cfg, num_blocks=8, block_size=4)
    assert "\n" not in str(e.value)


def test_weights_that_do_not_fit_are_refused(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 96
    with pytest.raises(KVLayoutError, match="do not fit the config"):
        Engine(cfg, weights=hf_dir, num_blocks=16)


# ---- prefill logits and greedy tokens against transformers ------------------------------------------

@pytest.mark.parametrize("backend", cpu_backends())
def test_prefill_logits_match_transformers(hf_dir, hf_model, rng, backend):
    """One step prefilling several prompts at once (block ids scrambled): all-token logits equal HF's."""
    bs = smallest_block_size(backend)
    eng = Engine(hf_dir, weights=hf_dir, backend=backend, num_blocks=48, block_size=bs)
    ps = prompts(rng, (1, bs, 2 * bs + 3))
    perm = torch.randperm(eng.num_blocks, generator=rng).tolist()
    reqs, start = [], 0
    for p in ps:
        nb = -(-len(p) // bs)
        reqs.append(ScheduledRequest(0, len(p), perm[start:start + nb]))
        start += nb
    meta = build_attention_metadata(reqs, eng.plan, "cpu")
    ids = torch.tensor(sum(ps, []))
    pos = torch.cat([torch.arange(len(p)) for p in ps])
    with torch.inference_mode():
        ours = eng.model(ids, pos, meta, eng.backend, all_logits=True)
        last = eng.model(ids, pos, meta, eng.backend)
        ref = torch.cat([hf_model(torch.tensor([p])).logits[0] for p in ps])
    assert rel_err(ours, ref) < 1e-4
    ends = torch.tensor([len(p) for p in ps]).cumsum(0) - 1
    assert rel_err(last, ref[ends]) < 1e-4


@pytest.mark.parametrize("backend", cpu_backends())
def test_greedy_tokens_match_transformers(hf_dir, hf_model, rng, backend):
    """Prompts batched continuously (four, or three under the slow Triton interpreter), a token budget that
    splits prefills over steps and mixes them with decodes: the 32 greedy tokens of each (16 under the
    interpreter, still past a block boundary) equal transformers' own greedy decoding."""
    bs = smallest_block_size(backend)
    interpreted = backend != "torch"
    ps = prompts(rng, (1, 7, 19) if interpreted else (1, 7, 19, 30))
    n_new = 16 if interpreted else NEW_TOKENS
    eng = Engine(hf_dir, weights=hf_dir, backend=backend, num_blocks=64, block_size=bs,
                 max_num_batched_tokens=13, max_num_seqs=3)
    steps = []
    rids = [eng.add_request(p, n_new) for p in ps]
    eng.run(steps.append)
    got = [eng.requests[r].output for r in rids]
    assert got == [hf_greedy(hf_model, p, n_new) for p in ps]
    assert any(s.num_decodes and s.num_prefills for s in steps), "no step mixed decodes and prefills"
    assert max(s.num_tokens for s in steps) <= 13
    assert eng.num_free_blocks == eng.num_blocks, "blocks leaked"


def test_preemption_recomputes_and_matches_transformers(hf_dir, hf_model, rng):
    """A cache too small for all requests at once: requests are preempted, recomputed, and still
    produce transformers' tokens (with the per-layer checks off, as a hot loop runs)."""
    ps = prompts(rng, (9, 14, 11))
    eng = Engine(hf_dir, weights=hf_dir, backend="torch", num_blocks=14, block_size=4, max_num_batched_tokens=32,
                 validate=False)
    rids = [eng.add_request(p, NEW_TOKENS) for p in ps]
    eng.run()
    assert sum(eng.requests[r].num_preemptions for r in rids) > 0
    assert [eng.requests[r].output for r in rids] == [hf_greedy(hf_model, p) for p in ps]
    assert eng.num_free_blocks == eng.num_blocks


def test_remote_request_continues_from_loaded_blocks(hf_dir, hf_model, rng):
    """Prefill on one engine (blocks held), copy its blocks into another engine's blocks, decode there:
    the tokens equal one engine's run. (The NIXL demo does the same copy over the network.)"""
    p = prompts(rng, (21,))[0]
    pre = Engine(hf_dir, weights=hf_dir, num_blocks=16, block_size=4)
    dec = Engine(hf_dir, weights=hf_dir, num_blocks=24, block_size=4)
    rid = pre.add_request(p, 1, "r0", keep_blocks=True)
    pre.run()
    src = pre.requests[rid].block_ids
    dst = dec.add_remote_request(p, pre.requests[rid].output[0], NEW_TOKENS, "r0")
    for name, view in pre.caches.items():
        dec.caches[name][dst] = view[src]
    pre.release(rid)
    dec.start_remote("r0")
    dec.run()
    assert dec.requests["r0"].output == hf_greedy(hf_model, p)
    assert pre.num_free_blocks == pre.num_blocks and dec.num_free_blocks == dec.num_blocks


# ---- input checks -----------------------------------------------------------------------------------

def test_bad_requests_are_refused_and_change_nothing(hf_dir):
    eng = Engine(hf_dir, weights=hf_dir, num_blocks=4, block_size=4)
    for args, msg in [(([], 4), "empty"), (([1, 128], 4), "token ids"), (([1], 0), "max_new_tokens"),
                      (([1] * 10, 8), "needs 5 blocks")]:
        with pytest.raises(KVLayoutError, match=msg):
            eng.add_request(*args)
    assert not eng.requests and not eng.waiting and eng.num_free_blocks == 4
    eng.add_request([1], 2, "a")
    with pytest.raises(KVLayoutError, match="already in use"):
        eng.add_request([1], 2, "a")
    with pytest.raises(KVLayoutError, match="holds no blocks"):
        eng.release("a")


# ---- bf16: the CPU reference, and every usable GPU backend ----------------------------------------------

def bf16_cases():
    cases = [pytest.param("cpu", "torch", id="cpu-torch")]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.gpu)
                  for name, reason in available_backends("cuda").items() if reason is None]
    else:
        cases.append(pytest.param("cuda", "any", id="cuda", marks=pytest.mark.gpu))
    return cases


@pytest.mark.parametrize("device, backend", bf16_cases())
def test_bf16_matches_transformers(hf_dir, rng, device, backend):
    """bf16: prefill logits are no further from transformers' float32 logits than transformers' own bf16
    model is; every greedy token is the argmax of transformers' float32 logits on the same sequence, or
    within a few bf16 logit errors of it (a near tie), and nearly all are the exact argmax."""
    load = transformers.LlamaForCausalLM.from_pretrained
    hf32 = load(hf_dir, dtype=torch.float32).to(device).eval()
    hf16 = load(hf_dir, dtype=torch.bfloat16).to(device).eval()
    caps = get_attention_backend(backend, device).capabilities
    bs = next(b for b in (16, 32, 64) if caps.block_size_ok(b))
    problems = caps.problems(AttentionSpec(2, 64, torch.bfloat16, bs))
    if problems:
        pytest.skip(f"backend {backend!r} cannot serve the tiny model: {'; '.join(problems)}")
    ps = prompts(rng)
    eng = Engine(hf_dir, weights=hf_dir, backend=backend, device=device, dtype=torch.bfloat16, num_blocks=64,
                 block_size=bs, max_num_batched_tokens=13, max_num_seqs=3)
    reqs = [ScheduledRequest(0, len(p), list(range(i * 4, i * 4 + 4))) for i, p in enumerate(ps)]
    meta = build_attention_metadata(reqs, eng.plan, device)
    ids = torch.tensor(sum(ps, []), device=device)
    pos = torch.cat([torch.arange(len(p)) for p in ps]).to(device)
    with torch.inference_mode():
        ours = eng.model(ids, pos, meta, eng.backend, all_logits=True).float()
        ref32 = torch.cat([hf32(torch.tensor([p], device=device)).logits[0] for p in ps]).float()
        ref16 = torch.cat([hf16(torch.tensor([p], device=device)).logits[0] for p in ps]).float()
    err, hf_err = rel_err(ours, ref32), rel_err(ref16, ref32)
    assert err < 1.5 * hf_err + 1e-3, f"bf16 logits error {err:.4f}, transformers' own bf16: {hf_err:.4f}"
    # A greedy pick can flip only where the chosen logit and the best one both move: a gap up to twice the
    # largest bf16 logit error is a near tie, not a wrong token.
    tol = 2 * float((ours - ref32).abs().max())
    rids = [eng.add_request(p, NEW_TOKENS) for p in ps]
    eng.run()
    gaps = []
    for p, r in zip(ps, rids):
        out = eng.requests[r].output
        with torch.no_grad():
            logits = hf32(torch.tensor([p + out], device=device)).logits[0, len(p) - 1:-1].float()
        chosen = logits.gather(1, torch.tensor(out, device=device).unsqueeze(1)).squeeze(1)
        gaps.append(logits.max(dim=1).values - chosen)
    gaps = torch.cat(gaps)
    assert float(gaps.max()) <= tol, f"token(s) further than {tol:.3f} from the argmax: {gaps.max():.3f}"
    assert float((gaps > 0).float().mean()) <= 0.1
