"""The runner on transformers' own modeling code, family by family: the same local safetensors weights
through ``Engine`` (continuous batching, chunked prefill, scrambled block ids) and through transformers'
``generate()`` with its default attention give the same greedy tokens and the same prefill logits (fp32,
CPU), on the ``torch`` backend for every family below and on ``triton`` (the interpreter) for a subset."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from kvlayout import ScheduledRequest, build_attention_metadata                 # noqa: E402
from kvlayout.backends import get_attention_backend, registered_backends        # noqa: E402
from kvlayout.engine.runner import Engine                                       # noqa: E402

NEW_TOKENS = 10
VOCAB = 96

# model_type: fields of a small variant (layers, widths, and what makes the family itself: windows, soft
# caps, sinks, multi-query, experts, attention multipliers)
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 6},
    "qwen2": {},
    "qwen3": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "gemma2": {"sliding_window": 6, "attn_logit_softcapping": 20.0, "query_pre_attn_scalar": 24},
    "gemma3_text": {"sliding_window": 6, "query_pre_attn_scalar": 24,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {},
    "olmo2": {},
    "granite": {"attention_multiplier": 0.3, "residual_multiplier": 0.5, "logits_scaling": 2.0},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 6,
                "layer_types": ["sliding_attention", "full_attention"]},
    "falcon": {"multi_query": True, "new_decoder_architecture": False, "alibi": False, "num_key_value_heads": None,
               "head_dim": None},                                  # hidden_size / heads
}
TRITON_FAMILIES = ["llama", "gemma2", "gpt_oss", "falcon"]


def family_config(model_type: str, head_dim: int = 16):
    fields = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                  hidden_size=4 * head_dim, intermediate_size=96, vocab_size=VOCAB, initializer_range=0.2,
                  max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    fields.update(FAMILIES[model_type])
    fields = {k: v for k, v in fields.items() if v is not None}
    transformers.logging.set_verbosity_error()
    return transformers.AutoConfig.for_model(model_type, **fields)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``(model_type, head_dim) -> (folder with config.json + model.safetensors, transformers' model)``,
    made once per module."""
    made = {}

    def get(model_type: str, head_dim: int = 16):
        key = (model_type, head_dim)
        if key not in made:
            path = tmp_path_factory.mktemp(f"{model_type}-{head_dim}")
            torch.manual_seed(1234)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = transformers.AutoModelForCausalLM.from_config(family_config(model_type, head_dim))
                model.save_pretrained(path)
            made[key] = (path, model.float().eval())
        return made[key]
    return get


def hf_greedy(model, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    return out[0, len(prompt):].tolist()


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def smallest_block_size(backend: str) -> int:
    caps = get_attention_backend(backend, "cpu").capabilities
    return next(b for b in (4, 8, 16) if caps.block_size_ok(b))


def cases():
    out = [pytest.param(mt, "torch", 16, id=f"{mt}-torch") for mt in FAMILIES]
    skip = pytest.mark.skipif("triton" not in registered_backends(), reason="the triton backend is not registered")
    out += [pytest.param(mt, "triton", 64, id=f"{mt}-triton", marks=skip) for mt in TRITON_FAMILIES]
    return out


@pytest.mark.parametrize("model_type, backend, head_dim", cases())
def test_greedy_tokens_match_transformers_generate(checkpoints, model_type, backend, head_dim):
    """Prompts batched continuously with a token budget that splits prefills and mixes them with
    decodes, block ids handed out in a scrambled order: every greedy token equals transformers'."""
    path, hf = checkpoints(model_type, head_dim)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (1, 9, 17)]
    eng = Engine(path, weights=path, backend=backend, num_blocks=48, block_size=smallest_block_size(backend),
                 max_num_batched_tokens=11, max_num_seqs=3,
                 block_order=lambda n: torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist())
    steps = []
    rids = [eng.add_request(p, NEW_TOKENS) for p in prompts]
    eng.run(steps.append)
    assert [eng.requests[r].output for r in rids] == [hf_greedy(hf, p) for p in prompts]
    assert any(s.num_decodes and s.num_prefills for s in steps)
    assert eng.num_free_blocks == eng.num_blocks


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_prefill_logits_match_transformers(checkpoints, model_type):
    """One step prefilling three prompts at once, every token's logits: equal to transformers' forward."""
    path, hf = checkpoints(model_type)
    eng = Engine(path, weights=path, backend="torch", num_blocks=32, block_size=4)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (1, 4, 11)]
    reqs, start = [], 0
    for p in prompts:
        nb = -(-len(p) // 4)
        reqs.append(ScheduledRequest(0, len(p), list(range(start + nb - 1, start - 1, -1))))   # reversed ids
        start += nb
    meta = build_attention_metadata(reqs, eng.plan, "cpu")
    ids = torch.tensor(sum(prompts, []))
    pos = torch.cat([torch.arange(len(p)) for p in prompts])
    with torch.inference_mode():
        ours = eng.model(ids, pos, meta, eng.backend, all_logits=True)
        ref = torch.cat([hf(torch.tensor([p])).logits[0] for p in prompts])
    assert rel_err(ours, ref) < 1e-4


def test_demo_runs_a_family_config(checkpoints, capsys):
    """``kvlayout demo --model CONFIG`` on a family other than Llama (seeded random weights)."""
    from kvlayout.cli.commands import main
    if "nixl" not in registered_backends() and not __import__("kvlayout.connectors.nixl_api",
                                                                fromlist=["x"]).nixl_installed():
        pytest.skip("the demo moves blocks through NIXL")
    path, _ = checkpoints("qwen3")
    assert main(["demo", "--model", str(path / "config.json"), "--requests", "3", "--new-tokens", "4",
                 "--no-progress"]) == 0
    assert "tokens match the single-process run for all requests" in capsys.readouterr().out
