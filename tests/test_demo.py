"""``kvlayout demo`` end to end on CPU: two engine processes, NIXL pulls the blocks, tokens equal a
single-process run; without NIXL it says how to install it and runs the single-process part."""

import importlib.util
import json

import pytest

from kvlayout.cli import commands as cli
from kvlayout.connectors.nixl_api import nixl_installed

SMALL = ["demo", "--requests", "3", "--min-prompt", "5", "--max-prompt", "40", "--new-tokens", "4",
         "--block-size", "8", "--token-budget", "24", "--no-progress", "--timeout", "240"]


def test_demo_two_processes_match_single_process(tmp_path, capsys):
    if not nixl_installed():
        pytest.skip("needs NIXL (pip install kvlayout[nixl])")
    out = tmp_path / "demo.json"
    rc = cli.main(SMALL + ["--scramble", "--summary-json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    s = json.loads(out.read_text())
    assert s["nixl"] and s["ok"]
    assert "kvlayout plan" in text and "tokens match" in text
    for i, ref in enumerate(s["reference_tokens"]):
        r = s["requests"][f"r{i}"]
        assert r["tokens"] == ref and len(ref) == 4
        assert r["blocks"] == -(-r["prompt_len"] // 8)
        assert r["bytes"] == r["blocks"] * s["page_bytes"]           # every layer's blocks, nothing else
        assert 1 <= r["descriptors"] <= r["indices"] == r["blocks"] * 4   # 4 layers, one region each
        assert r["released"] is True                                  # the prefill side freed its blocks


def test_demo_without_nixl_runs_single_process(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("nixl") else real(name, *a))
    out = tmp_path / "demo.json"
    rc = cli.main(SMALL + ["--requests", "2", "--summary-json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert 'pip install "kvlayout[nixl]"' in text.replace("\n", " ")
    s = json.loads(out.read_text())
    assert s["nixl"] is False and len(s["reference_tokens"]) == 2


def test_demo_refuses_a_request_larger_than_the_cache(capsys):
    rc = cli.main(SMALL + ["--num-blocks", "4", "--max-prompt", "60", "--min-prompt", "60"])
    assert rc == 2
    assert "needs" in capsys.readouterr().err


@pytest.mark.parametrize("prefill_tp,decode_tp,kv_heads", [(2, 1, 2), (1, 2, 2), (2, 4, 1)])
def test_demo_between_tensor_parallel_sizes(tmp_path, capsys, prefill_tp, decode_tp, kv_heads):
    """Prefill and decode fleets of different TP sizes (gloo groups of worker processes): every decode rank
    pulls exactly its KV heads, each from one prefill rank (with one KV head, the replicas of prefill rank 1
    are never read), and the tokens equal the single-process TP 1 run."""
    if not nixl_installed():
        pytest.skip("needs NIXL (pip install kvlayout[nixl])")
    from kvlayout.hf_config import load_hf_config
    cfg = load_hf_config("tiny-llama")
    cfg.update(num_key_value_heads=kv_heads, num_hidden_layers=2)
    model = tmp_path / "config.json"
    model.write_text(json.dumps(cfg))
    out = tmp_path / "demo.json"
    rc = cli.main(SMALL + ["--model", str(model), "--requests", "2", "--prefill-tp", str(prefill_tp),
                           "--decode-tp", str(decode_tp), "--summary-json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    s = json.loads(out.read_text())
    assert s["ok"] and (s["prefill_tp"], s["decode_tp"]) == (prefill_tp, decode_tp)
    kv_bytes_per_head = s["page_bytes"] // (kv_heads // min(kv_heads, prefill_tp))   # one prefill rank's page
    for i, ref in enumerate(s["reference_tokens"]):
        r = s["requests"][f"r{i}"]
        assert r["tokens"] == ref and r["released"] is True
        per_rank_heads = max(kv_heads // decode_tp, 1)
        assert r["bytes"] == r["blocks"] * kv_bytes_per_head * per_rank_heads * decode_tp
        assert r["holding_ranks"] == ([0] if kv_heads == 1 else list(range(prefill_tp)))
        for rank, pull in r["pulls"].items():
            assert len(pull["sources"]) == (2 if decode_tp == 1 and prefill_tp == 2 else 1)
