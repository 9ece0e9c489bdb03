"""Tensor parallelism: the head math (``kvlayout.tp``), the connector's records of replicated KV heads, the
model sharding's refusals, and engines of TP 2 and 4 over gloo (worker processes in the torchrun
environment) whose greedy tokens equal a TP 1 engine's, on several families, with split and with replicated
KV heads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvlayout import allocate_kv_cache, plan_kv_cache                   # noqa: E402
from kvlayout.engine.runner import Engine                              # noqa: E402
from kvlayout.engine.tensor_parallel import TensorParallel, shard_model  # noqa: E402
from kvlayout.engine.hf_model import _attention_modules                 # noqa: E402
from kvlayout.errors import KVLayoutError                              # noqa: E402
from kvlayout.hf_config import specs_from_hf_config                    # noqa: E402
from kvlayout.tp import kv_head_range, num_readers, query_head_range, source_ranks  # noqa: E402

VOCAB = 96


def small_config(model_type: str, heads: int = 4, kv_heads: int = 2, **extra) -> dict:
    cfg = dict(model_type=model_type, num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
               head_dim=16, hidden_size=64, intermediate_size=96, vocab_size=VOCAB, initializer_range=0.2,
               max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    cfg.update(extra)
    return cfg


# ---------------------------------------------------------------------------------------- head math

def test_head_ranges_split_and_replicate():
    assert [query_head_range(r, 4, 32) for r in range(4)] == [(0, 8), (8, 8), (16, 8), (24, 8)]
    assert [kv_head_range(r, 2, 8) for r in range(2)] == [(0, 4), (4, 4)]
    assert [kv_head_range(r, 4, 2) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]      # replicas
    assert [kv_head_range(r, 16, 8) for r in range(16)] == [(r // 2, 1) for r in range(16)]
    assert kv_head_range(1, 2, 1) == (0, 1)                                                     # MQA
    for bad in [(0, 3, 2), (0, 3, 4)]:
        with pytest.raises(KVLayoutError, match="cannot be split"):
            kv_head_range(*bad)
    with pytest.raises(KVLayoutError, match="cannot be split"):
        query_head_range(0, 3, 32)
    for rank, size in [(2, 2), (-1, 2), (0, 0), (True, 2)]:
        with pytest.raises(KVLayoutError):
            kv_head_range(rank, size, 8)


@pytest.mark.parametrize("size,remote,kv", [(1, 2, 8), (2, 1, 8), (1, 4, 2), (2, 4, 2), (4, 2, 2), (2, 4, 8),
                                            (1, 2, 1), (4, 1, 1), (8, 16, 8), (4, 8, 8)])
def test_source_ranks_cover_each_head_once(size, remote, kv):
    """Every rank's KV heads come from remote ranks that hold them, each head from exactly one of them,
    and ``num_readers`` counts the readers that ``source_ranks`` picks."""
    for rank in range(size):
        start, count = kv_head_range(rank, size, kv)
        got = []
        for r in source_ranks(rank, size, remote, kv):
            rs, rc = kv_head_range(r, remote, kv)
            got += [h for h in range(max(start, rs), min(start + count, rs + rc)) if h not in got]
        assert sorted(got) == list(range(start, start + count))
        # no source is redundant: dropping any one loses a head
        srcs = source_ranks(rank, size, remote, kv)
        assert len(srcs) == len({r for r in srcs}) <= count
    readers = [num_readers(r, remote, size, kv) for r in range(remote)]
    assert sum(readers) == sum(len(source_ranks(r, size, remote, kv)) for r in range(size))
    if remote > kv:                                   # replicas: some remote ranks are never read
        assert readers.count(0) == remote - kv


def test_planner_specs_per_rank_follow_the_head_math():
    for tp in (1, 2, 4, 8):
        spec = next(iter(specs_from_hf_config(small_config("llama", heads=8, kv_heads=2), tp_size=tp).values()))
        assert spec.num_kv_heads == kv_head_range(0, tp, 2)[1]


def test_records_of_replicated_kv_heads():
    """With fewer KV heads than ranks a rank's record says which global head its replica is, so a peer
    reads each head once; without ``num_kv_heads`` the record would claim heads that do not exist."""
    from kvlayout.connectors.record import build_record
    specs = specs_from_hf_config(small_config("llama", kv_heads=2), tp_size=4)
    caches = allocate_kv_cache(plan_kv_cache(specs, 1 << 20), "cpu")
    for rank in range(4):
        rec = build_record(caches, engine_id="e", agent_name="a", tp_rank=rank, tp_size=4, num_kv_heads=2)
        lay = rec.layers[0]
        assert (lay.head_start, lay.num_heads, lay.total_heads) == (rank // 2, 1, 2)
    naive = build_record(caches, engine_id="e", agent_name="a", tp_rank=3, tp_size=4)
    assert (naive.layers[0].head_start, naive.layers[0].total_heads) == (3, 4)
    with pytest.raises(KVLayoutError, match="give 2 per rank"):
        build_record(caches, engine_id="e", agent_name="a", tp_rank=0, tp_size=2, num_kv_heads=4)


# -------------------------------------------------------------------------------------- refusals

def _hf(cfg: dict):
    from kvlayout.engine.hf_model import build_model
    return build_model(cfg).hf


class FakeGroup(TensorParallel):
    """Rank 1 of 2 without a process group, for sharding checks that never reach a collective."""

    def __post_init__(self):
        pass


@pytest.mark.parametrize("model_type,extra,match", [
    ("phi3", {}, "no q_proj linear layer"),
    ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}, "gate_proj"),
    ("olmo2", {}, "spans all heads"),
])
def test_sharding_refuses_fused_or_unsplittable_layers_and_changes_nothing(model_type, extra, match):
    hf = _hf(small_config(model_type, **extra))
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    with pytest.raises(KVLayoutError, match=match):
        shard_model(hf, _attention_modules(hf), FakeGroup(1, 2))
    after = hf.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_engine_tp_refusals():
    with pytest.raises(KVLayoutError, match="init_process_group"):
        TensorParallel(0, 2)
    with pytest.raises(KVLayoutError, match="cuda_graphs=True does not run with tensor parallelism"):
        Engine(small_config("llama"), num_blocks=8, cuda_graphs=True, device="cuda", tp=FakeGroup(1, 2))
    with pytest.raises(KVLayoutError, match="cannot be split"):
        Engine(small_config("llama", heads=6, kv_heads=2, hidden_size=96), num_blocks=8, tp=FakeGroup(1, 4))
    assert TensorParallel.from_env() == TensorParallel()        # no torchrun environment: one rank


# ----------------------------------------------------------------------------- engines over gloo

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from kvlayout.engine.runner import Engine
    from kvlayout.engine.tensor_parallel import TensorParallel
    torch.set_num_threads(1)
    cases, prompts, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    device = sys.argv[4]
    two_gpus = device == "cuda" and torch.cuda.device_count() >= 2
    if device == "cuda":                      # one GPU per rank over NCCL, or both ranks on one GPU over gloo
        device = f"cuda:{int(os.environ['RANK'])}" if two_gpus else "cuda:0"
        torch.cuda.set_device(device)
    tp = TensorParallel.from_env(backend="nccl" if two_gpus else "gloo")
    results = []
    for cfg in cases:
        eng = Engine(cfg, num_blocks=48, block_size=4, max_num_batched_tokens=16, tp=tp, device=device,
                     dtype=torch.float32, compile={"backend": sys.argv[5]} if sys.argv[5] else False)
        results.append({"tokens": eng.generate(prompts, 6), "kv_heads": eng.model.kv_specs[
            "model.layers.0.self_attn"].num_kv_heads, "heads": eng.model.attention_layers()[
            "model.layers.0.self_attn"].attn_params.num_heads})
    json.dump(results, open(out % tp.rank, "w"))
    tp.close()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path, size: int, cases: list, prompts: list, device: str = "cpu", compile_backend: str = ""
              ) -> list[list[dict]]:
    """Every case on ``size`` gloo ranks (one process each, torchrun environment); per rank, its results."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = _free_port()
    procs = []
    for rank in range(size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(cases), json.dumps(prompts),
                                       str(tmp_path / f"out{size}-%d.json"), device, compile_backend], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [json.loads((tmp_path / f"out{size}-{r}.json").read_text()) for r in range(size)]


PROMPTS = [[5, 9, 2, 7, 3, 3, 8, 1, 4, 6, 2, 9, 5], [7, 1], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
CASES = [small_config("llama"), small_config("qwen2"), small_config("qwen3"),
         small_config("gemma2", sliding_window=6, attn_logit_softcapping=20.0, query_pre_attn_scalar=24),
         small_config("llama", kv_heads=1)]


def test_tp_engines_over_gloo_give_the_tokens_of_tp1(tmp_path):
    """TP 2 (KV heads split; one KV head replicated) and TP 4 (two KV heads, each on two ranks) on Llama,
    Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms) and Gemma 2 (soft cap, sliding window): every rank
    samples what a TP 1 engine samples, and holds its share of the heads."""
    ref = [Engine(cfg, num_blocks=48, block_size=4, max_num_batched_tokens=16).generate(PROMPTS, 6) for cfg in CASES]
    for size in (2, 4):
        per_rank = run_ranks(tmp_path, size, CASES, PROMPTS)
        for rank, results in enumerate(per_rank):
            for cfg, want, got in zip(CASES, ref, results):
                assert got["tokens"] == want, (size, rank, cfg["model_type"], cfg["num_key_value_heads"])
                assert got["heads"] == 4 // size
                assert got["kv_heads"] == kv_head_range(rank, size, cfg["num_key_value_heads"])[1]



def test_compiled_tp_engine_gives_the_tokens_of_tp1(tmp_path):
    """``Engine(compile=..., tp=)``: torch.compile(fullgraph=True) traces the all-reduce hooks (dynamo turns
    them into functional collectives); TP 2 compiled gives TP 1's tokens."""
    cases = [CASES[0]]
    ref = [Engine(cfg, num_blocks=48, block_size=4, max_num_batched_tokens=16).generate(PROMPTS, 6) for cfg in cases]
    for results in run_ranks(tmp_path, 2, cases, PROMPTS, compile_backend="aot_eager"):
        assert [r["tokens"] for r in results] == ref


@pytest.mark.gpu
def test_tp2_on_the_gpu_gives_the_tokens_of_tp1(tmp_path):
    """TP 2 with CUDA tensors, fp32: on two GPUs one rank each over NCCL, on one GPU both ranks over gloo
    (NCCL refuses two ranks on one device); the tokens of a TP 1 engine on one GPU."""
    cases = CASES[:2] + CASES[-1:]
    ref = [Engine(cfg, num_blocks=48, block_size=4, max_num_batched_tokens=16, device="cuda",
                  dtype=torch.float32).generate(PROMPTS, 6) for cfg in cases]
    for rank, results in enumerate(run_ranks(tmp_path, 2, cases, PROMPTS, device="cuda")):
        assert [r["tokens"] for r in results] == ref, rank
