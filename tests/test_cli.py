import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvlayout.cli.commands import main, parse_size
from kvlayout.hf_config import load_hf_config, specs_from_hf_config
from kvlayout.specs import AttentionSpec, MambaSpec, MLASpec

ROOT = Path(__file__).resolve().parent.parent


def test_parse_size():
    assert parse_size("40GiB") == 40 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1e9") == 10**9
    assert parse_size("2G") == 2 * 10**9


@pytest.mark.parametrize("model", ["llama-3.1-8b", "mistral-7b", "gemma-2-9b", "deepseek-v2-lite", "nemotron-h-8b"])
def test_plan_json_every_shipped_model(model, capsys):
    assert main(["plan", model, "--memory", "8GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["allocated_bytes"] <= 8 << 30
    assert out["allocated_bytes"] > 0.99 * (8 << 30) - sum(g["page_size_bytes"] * len(g["layers"]) for g in out["groups"])
    for g in out["groups"]:
        assert g["num_blocks"] > 0
        assert g["nbytes"] == g["num_blocks"] * g["page_size_bytes"] * len(g["layers"])


def test_llama_numbers_by_hand(capsys):
    # 32 layers x 8 KV heads x (K+V) x 128 x 2 bytes = 128 KiB per token; 40 GiB hold 327,680 tokens.
    assert main(["plan", "llama-3.1-8b", "--json"]) == 0
    g = json.loads(capsys.readouterr().out)["groups"][0]
    assert g["page_size_bytes"] == 16 * 8 * 2 * 128 * 2
    assert g["num_tokens"] == 327_680


def test_specs_per_model():
    gemma = specs_from_hf_config(load_hf_config("gemma-2-9b"))
    windows = [s.sliding_window for s in gemma.values()]
    assert windows[0] == 4096 and windows[1] is None and windows[2] == 4096
    assert all(s.logits_soft_cap == 50.0 and s.head_size == 256 for s in gemma.values())
    mistral = specs_from_hf_config(load_hf_config("mistral-7b"))
    assert all(s.sliding_window == 4096 for s in mistral.values())
    ds = specs_from_hf_config(load_hf_config("deepseek-v2-lite"), tp_size=2)
    assert all(isinstance(s, MLASpec) and s.latent_size == 576 for s in ds.values())   # replicated over TP
    nh = specs_from_hf_config(load_hf_config("nemotron-h-8b"), tp_size=2)
    kinds = [type(s) for s in nh.values()]
    assert kinds.count(MambaSpec) == 24 and kinds.count(AttentionSpec) == 4
    mamba = next(s for s in nh.values() if isinstance(s, MambaSpec))
    assert mamba.states["ssm"][0] == (64, 64, 128)          # 128 heads over 2 ranks
    assert mamba.states["conv"][0] == (64 * 64 + 2 * 4 * 128, 3)
    llama_tp16 = specs_from_hf_config(load_hf_config("llama-3.1-8b"), tp_size=16)
    assert all(s.num_kv_heads == 1 for s in llama_tp16.values())  # 8 KV heads replicated over 16 ranks


def test_hybrid_plan_keeps_block_16_and_reports_capacity(capsys):
    """Nemotron-H-8B in 40 GiB (bf16 KV, fp32 SSM): 1 attention + 6 Mamba groups of 4 layers on one page
    pool, attention block 16, at least 180 concurrent 8K requests (vLLM's hybrid manager: 180 at block 1,040)."""
    assert main(["plan", "nemotron-h-8b", "--memory", "40GiB", "--json", "--context", "8192"]) == 0
    out = json.loads(capsys.readouterr().out)
    kinds = [g["kinds"] for g in out["groups"]]
    assert kinds.count({"attention": 4}) == 1 and kinds.count({"mamba": 4}) == 6
    attn = next(g for g in out["groups"] if g["block_size"])
    assert attn["block_size"] == 16 and attn["page_size_bytes"] == 16 * 4096 == out["pool"]["page_bytes"]
    cap = out["capacity"]
    assert cap["context_tokens"] == 8192 and cap["attention_block_size"] == 16
    assert cap["concurrent_requests"] >= 180 and cap["max_tokens_one_request"] >= 2_600_000
    assert main(["plan", "nemotron-h-8b", "--context", "1000"]) == 0
    text = capsys.readouterr().out
    assert "concurrent requests of 1,000 tokens" in text and "attention block 16 tokens" in text


def test_plan_errors_are_clear(capsys):
    assert main(["plan", "no-such-model"]) == 2
    assert "shipped" in capsys.readouterr().err
    assert main(["plan", "llama-3.1-8b", "--memory", "1KiB"]) == 2
    assert "too small for one block" in capsys.readouterr().err
    assert main(["plan", "llama-3.1-8b", "--tp", "3"]) == 2
    assert "tensor-parallel" in capsys.readouterr().err


def test_plan_from_config_path(tmp_path, capsys):
    cfg = load_hf_config("mistral-7b")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["plan", str(tmp_path), "--kv-dtype", "fp8", "--memory", "1GiB"]) == 0
    assert "32 attention" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "kvlayout", "plan", "llama-3.1-8b"], capture_output=True,
                         text=True, check=True).stdout
    assert re.search(r"327,680", out)


def test_readme_tour_runs():
    code = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].shape == (5, 32, 128)


def test_version_flag(capsys):
    import kvlayout
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvlayout {kvlayout.__version__}"


def test_python_m_kvlayout_version():
    import kvlayout
    proc = subprocess.run([sys.executable, "-m", "kvlayout", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"kvlayout {kvlayout.__version__}"


def _shadowed_cwd(tmp_path: Path) -> Path:
    """A folder holding a folder named ``kvlayout`` without ``__init__.py``: what the parent of a checkout
    cloned under git's default name looks like."""
    (tmp_path / "kvlayout" / "tools").mkdir(parents=True)
    (tmp_path / "kvlayout" / "README.md").write_text("a checkout, not the package\n")
    return tmp_path


def _run_in(cwd: Path, cmd: list, pythonpath: bool = False) -> subprocess.CompletedProcess:
    import os
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = "."                     # the current directory on sys.path for a console script too
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def shadowed(tmp_path):
    # The test is about the installed kvlayout (an editable install in CI): skip where it is not importable
    # from outside the checkout.
    probe = _run_in(tmp_path, [sys.executable, "-c", "import kvlayout.cli"])
    if probe.returncode != 0:
        pytest.skip(f"kvlayout is not installed for {sys.executable}: {probe.stderr.strip().splitlines()[-1:]}")
    return _shadowed_cwd(tmp_path / "parent")


def test_cli_works_beside_a_folder_named_kvlayout(shadowed):
    import kvlayout
    proc = _run_in(shadowed, [sys.executable, "-m", "kvlayout", "--version"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"kvlayout {kvlayout.__version__}"
    proc = _run_in(shadowed, [sys.executable, "-m", "kvlayout", "plan", "llama-3.1-8b"])
    assert proc.returncode == 0, proc.stderr
    assert "327,680" in proc.stdout
    script = Path(sys.executable).with_name("kvlayout")          # the console script of this environment
    if script.is_file():
        proc = _run_in(shadowed, [str(script), "plan", "mistral-7b", "--json"], pythonpath=True)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["groups"][0]["num_blocks"] > 0


def test_shipped_configs_are_found_beside_a_folder_named_kvlayout(shadowed):
    code = ("import kvlayout.hf_config as h, kvlayout.cli, kvlayout; "
            "print(len(h.shipped_models()), h.load_hf_config('llama-3.1-8b')['num_hidden_layers'], kvlayout.__file__)")
    proc = _run_in(shadowed, [sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    count, layers, init = proc.stdout.split()
    assert int(count) >= 5 and layers == "32"
    assert Path(init).name == "__init__.py" and not Path(init).is_relative_to(shadowed)   # the real package
