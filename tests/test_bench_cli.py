"""``kvlayout bench``: runs the tools' ``run(quick)`` entry points in child processes and writes
bench.json, bench.md and bench.png; every row spelling the tools use lands on one schema."""

import json
import textwrap
from pathlib import Path

import pytest

from kvlayout.cli import commands as cli_main
from kvlayout.cli.bench import EXPECTED_TOOLS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_quick_writes_its_three_files(tmp_path, capsys):
    rc = cli_main.main(["bench", "--quick", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0, text
    result = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC
    md = (tmp_path / "bench.md").read_text()
    for name in EXPECTED_TOOLS:                      # present, missing or skipped: each one is accounted for
        assert result["tools"][name]["status"] in ("ok", "missing", "skipped", "error")
        assert f"| {name} |" in md
    for name, t in result["tools"].items():
        assert t["status"] != "error", f"{name}: {t['message']}"
    for row in result["rows"]:
        assert row["tool"] in result["tools"] and row["name"] and row["backend"]


FAKE_TOOLS = {
    # bench_ops style: a ceilings row, then TBps / TFLOPs with the bound that binds
    "bench_alpha": """
        def run(quick):
            return [{"op": "ceilings", "impl": "fake gpu", "copy_TBps": 2.0, "matmul_TFLOPs": 500.0},
                    {"op": "prefill", "impl": "triton", "seconds": 1e-3, "TBps": 0.1, "TFLOPs": 250.0,
                     "binds": "matmul", "pct_of_bound": 50.0},
                    {"op": "copy", "impl": "triton", "seconds": 1e-3, "TBps": 1.5, "TFLOPs": 0.0, "binds": "copy",
                     "pct_of_bound": 75.0}]
    """,
    # canonical spelling, GB/s; one row computed from bytes and seconds, one failed
    "bench_attention": """
        def run(quick):
            assert quick
            return [{"name": "decode", "backend": "flashinfer", "shape": "64x4096", "seconds": 0.5,
                     "achieved": 1800.0, "unit": "GB/s", "ceiling": 3000.0, "ceiling_unit": "GB/s"},
                    {"name": "write_kv", "backend": "torch", "seconds": 2.0, "bytes": 4e9},
                    {"name": "decode", "backend": "rocm", "error": "needs an AMD GPU"}]
    """,
    "bench_broken": """
        def run(quick):
            raise RuntimeError("kernel exploded")
    """,
    "bench_flashinfer": """
        if __name__ == "__main__":
            print("no entry point")
    """,
    # a module the tools share (neither run() nor a __main__ block): not a tool, not listed
    "bench_common": """
        def timed(fn):
            return fn()
    """,
}


@pytest.fixture
def fake_tools(tmp_path):
    d = tmp_path / "tools"
    d.mkdir()
    for name, src in FAKE_TOOLS.items():
        (d / f"{name}.py").write_text(textwrap.dedent(src))
    return d


def test_bench_maps_every_row_spelling_and_reports_each_tool(fake_tools, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main.main(["bench", "--quick", "--tools", str(fake_tools), "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())
    status = {n: t["status"] for n, t in res["tools"].items()}
    assert status == {"bench_alpha": "ok", "bench_attention": "ok", "bench_broken": "error",
                      "bench_flashinfer": "skipped", "bench_transfer": "missing"}
    assert "kernel exploded" in res["tools"]["bench_broken"]["message"]
    assert res["tools"]["bench_alpha"]["ceilings"]["copy_TBps"] == 2.0
    rows = {(r["tool"], r["name"], r["backend"]): r for r in res["rows"]}
    pre = rows[("bench_alpha", "prefill", "triton")]
    assert (pre["unit"], pre["achieved"], pre["ceiling"], pre["pct_of_ceiling"]) == ("TFLOP/s", 250.0, 500.0, 50.0)
    cp = rows[("bench_alpha", "copy", "triton")]
    assert (cp["unit"], cp["achieved"], cp["ceiling"]) == ("TB/s", 1.5, 2.0)
    dec = rows[("bench_attention", "decode", "flashinfer")]
    assert dec["unit"] == "TB/s" and dec["achieved"] == pytest.approx(1.8) and dec["ceiling"] == pytest.approx(3.0)
    assert dec["pct_of_ceiling"] == pytest.approx(60.0) and dec["shape"] == "64x4096"
    wk = rows[("bench_attention", "write_kv", "torch")]
    assert wk["unit"] == "TB/s" and wk["achieved"] == pytest.approx(0.002) and wk["ceiling"] is None
    assert rows[("bench_attention", "decode", "rocm")]["error"] == "needs an AMD GPU"
    md = (out / "bench.md").read_text()
    assert "| bench_transfer | missing |" in md and "error: needs an AMD GPU" in md
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    assert cli_main.main(["bench", "--quick", "--tools", str(fake_tools), "--out", str(out), "--strict"]) == 1
    assert cli_main.main(["bench", "--quick", "--tools", str(fake_tools), "--out", str(out), "--only", "alpha"]) == 0
    assert set(json.loads((out / "bench.json").read_text())["tools"]) == {"bench_alpha"}


def test_bench_refuses_a_tools_folder_that_does_not_exist(tmp_path, capsys):
    assert cli_main.main(["bench", "--quick", "--tools", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_bench_only_unknown_tool_is_an_error(fake_tools, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main.main(["bench", "--quick", "--tools", str(fake_tools), "--out", str(out), "--only", "nope"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "nope" in err and "alpha" in err and "attention" in err      # the unknown name and the known tools
    assert not (out / "bench.json").exists()


def test_bench_without_matplotlib_skips_the_plot(fake_tools, tmp_path, capsys, monkeypatch):
    from kvlayout.cli import bench
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "out"
    assert cli_main.main(["bench", "--quick", "--tools", str(fake_tools), "--out", str(out), "--only", "alpha"]) == 0
    assert 'pip install "kvlayout[bench]"' in capsys.readouterr().out
    assert (out / "bench.json").is_file() and (out / "bench.md").is_file() and not (out / "bench.png").exists()


def test_bench_finds_the_shipped_tools_through_the_package(tmp_path, monkeypatch):
    """The tools are the ``kvlayout.tools`` package (the checkout's tools/), found from any directory."""
    import kvlayout.tools
    from kvlayout.cli.bench import discover, find_tools_dir
    monkeypatch.chdir(tmp_path)
    found = find_tools_dir(None)
    assert found == Path(kvlayout.tools.__file__).parent
    tools = discover(found)
    assert all(tools[name] is not None for name in EXPECTED_TOOLS), tools
    assert "bench_common" not in tools


def test_a_tool_missing_an_optional_dependency_names_the_extra(tmp_path, monkeypatch):
    from kvlayout.cli import bench
    assert bench.install_hint("ModuleNotFoundError: No module named 'nixl'") == '; pip install "kvlayout[nixl]"'
    assert bench.install_hint("No module named 'flashinfer.jit'").endswith('"kvlayout[flashinfer]"')
    assert bench.install_hint("No module named 'matplotlib'").endswith('"kvlayout[bench]"')
    assert bench.install_hint("No module named 'something_else'") == ""
    d = tmp_path / "tools"
    d.mkdir()
    (d / "bench_needs.py").write_text("def run(quick):\n    import optional_dep_not_here\n    return []\n")
    monkeypatch.setitem(bench.EXTRAS, "optional_dep_not_here", "flashinfer")
    out = tmp_path / "out"
    assert cli_main.main(["bench", "--quick", "--tools", str(d), "--out", str(out)]) == 0
    msg = json.loads((out / "bench.json").read_text())["tools"]["bench_needs"]["message"]
    assert "No module named 'optional_dep_not_here'" in msg and msg.endswith('pip install "kvlayout[flashinfer]"')


def test_two_gpu_tool_runs_its_transfers_on_the_cpu(tmp_path):
    """``tools/bench_two_gpu.py --device cpu``: the script itself (the TP 2 -> 1 demo, a prefill child, pull
    and push of whole requests, the torch copy next to them) without GPUs; the numbers are not GPU numbers."""
    import subprocess
    import sys
    from kvlayout.connectors.nixl_api import nixl_installed
    if not nixl_installed():
        pytest.skip("needs NIXL (pip install kvlayout[nixl])")
    tool = Path(__file__).resolve().parent.parent / "tools" / "bench_two_gpu.py"
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(tool), "--device", "cpu", "--quick", "--parts", "tp,transfer", "--sizes",
                           "2", "--layouts", "cross-layer", "--json", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    demo = rows[0]
    assert demo["part"] == "demo --prefill-tp 2 --decode-tp 1" and demo["rc"] == 0 and demo["ok"] is True
    assert demo["released"] == demo["requests"] == 3
    moved = [r for r in rows if r["part"] == "transfer"]
    assert {r["mode"] for r in moved} == {"pull", "push"} and all(r["requests"] == 2 for r in moved)
    assert all(r["GBps"] > 0 and r["bytes"] == 2 * 4 * 256 * 8 * 16 * 2 * 128 * 2 for r in moved)
    assert next(r for r in moved if r["mode"] == "pull")["descriptors_per_request"] >= 1
    assert rows[-1]["part"] == "torch copy" and rows[-1]["GBps"] > 0
