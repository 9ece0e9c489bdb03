"""``kvlayout bench``: run the benchmarks in ``tools/`` and write ``bench.json``, ``bench.md`` and ``bench.png``.

The tools ship with the package as ``kvlayout.tools`` (the checkout's ``tools/`` folder) and are found through
it, wherever kvlayout is installed; ``--tools DIR`` runs another folder's ``bench_*.py`` instead. Each tool
that defines ``run(quick: bool) -> list[dict]`` runs in a process of its own (a crashing kernel or a hung
device takes only that tool down) and hands back rows as JSON. Rows are read through one small schema -
``name``, ``backend``, ``shape``, ``seconds``, ``bytes``, ``flops``, ``achieved`` + ``unit`` (TB/s or
TFLOP/s), ``ceiling`` - with the spellings the tools use mapped onto it (``op`` / ``workload`` for the name,
``impl`` for the backend, ``TBps`` / ``TFLOPs`` + ``binds``, ``metric`` + ``value``; a row ``{"op":
"ceilings", "copy_TBps", "matmul_TFLOPs"}`` gives the device ceilings measured in that run).
The plot shows every row's achieved bandwidth or FLOP/s next to its ceiling, per backend and shape.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Optional

from ..errors import KVLayoutError

EXPECTED_TOOLS = ("bench_attention", "bench_transfer", "bench_flashinfer")
UNITS = {"TB/s": ("TB/s", 1.0), "GB/s": ("TB/s", 1e-3), "MB/s": ("TB/s", 1e-6), "B/s": ("TB/s", 1e-12),
         "TFLOP/s": ("TFLOP/s", 1.0), "GFLOP/s": ("TFLOP/s", 1e-3), "FLOP/s": ("TFLOP/s", 1e-12)}
CEILING_KEYS = {"TB/s": "copy_TBps", "TFLOP/s": "matmul_TFLOPs"}
# optional module -> the extra that installs it (pyproject's optional-dependencies)
EXTRAS = {"nixl": "nixl", "nixl_cu13": "nixl", "nixl_cu12": "nixl-cu12", "flashinfer": "flashinfer",
          "matplotlib": "bench", "transformers": "hf", "safetensors": "hf"}
PACKAGE = "kvlayout.tools"
# What the child process runs: import the tool (a module of kvlayout.tools by name, else from its file) with
# its folder on sys.path (the tools import ``bench_common`` as a top-level module), call run(quick), write the
# rows as JSON. It runs in a temporary folder, so that a ``kvlayout`` folder in the caller's current directory
# (say, the checkout) cannot shadow the installed package.
CHILD = """
import importlib, importlib.util, json, sys
where, path, module, out, quick = sys.argv[1:5] + [sys.argv[5] == "1"]
sys.path.insert(0, where)
if module:
    tool = importlib.import_module(module)
else:
    spec = importlib.util.spec_from_file_location("kvlayout_bench_tool", path)
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool      # dataclasses in the tool look their module up there
    spec.loader.exec_module(tool)
rows = tool.run(quick=quick)
open(out, "w").write(json.dumps([dict(r) for r in rows], default=str))
"""


def packaged_tools_dir() -> Optional[Path]:
    """The folder of the ``kvlayout.tools`` package (found by its name, as installed), or None."""
    try:
        root = resources.files(PACKAGE)
    except ModuleNotFoundError:
        return None
    path = Path(str(root))
    return path if path.is_dir() else None


def find_tools_dir(given: Optional[str] = None) -> Optional[Path]:
    """``--tools``, else the installed ``kvlayout.tools`` package's folder."""
    if given:
        if not Path(given).is_dir():
            raise KVLayoutError(f"--tools {given} is not a folder")
        return Path(given)
    return packaged_tools_dir()


def discover(tools_dir: Optional[Path]) -> dict[str, Optional[Path]]:
    """``{tool name: path or None (missing)}``: every ``bench_*.py`` there that is a tool (has ``run`` or a
    ``__main__`` block; a shared module such as ``bench_common.py`` is neither) plus the expected ones."""
    found = {p.stem: p for p in sorted(tools_dir.glob("bench_*.py")) if has_entry_point(p) or
             'if __name__ == "__main__"' in p.read_text(errors="replace")} if tools_dir else {}
    return {**{name: None for name in EXPECTED_TOOLS}, **found}


def has_entry_point(path: Path) -> bool:
    """Whether the file defines a top-level ``run`` (read as text; the tool is not imported here)."""
    return any(line.startswith("def run(") for line in path.read_text(errors="replace").splitlines())


def run_tool(path: Path, quick: bool, timeout_s: float, module: Optional[str] = None) -> dict:
    """Run one tool's ``run(quick)`` in a child process: ``module`` (e.g. ``kvlayout.tools.bench_ops``)
    imported by name, else the file ``path``. Returns ``{status, rows, seconds, message}``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ)
        env.setdefault("UCX_NET_DEVICES", "lo")
        cmd = [sys.executable, "-c", CHILD, str(Path(path).resolve().parent), str(Path(path).resolve()),
               module or "", str(out), "1" if quick else "0"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"status": "error", "rows": [], "seconds": timeout_s, "message": f"timed out after {timeout_s:g} s"}
        secs = time.perf_counter() - t0
        if proc.returncode != 0 or not out.is_file():
            text = (proc.stderr or proc.stdout).strip()
            tail = text.splitlines()[-3:]
            return {"status": "error", "rows": [], "seconds": secs,
                    "message": f"exit code {proc.returncode}: " + " | ".join(tail) + install_hint(text)}
        return {"status": "ok", "rows": json.loads(out.read_text()), "seconds": secs, "message": ""}


def install_hint(text: str) -> str:
    """``'; pip install "kvlayout[EXTRA]"'`` when a tool died for want of an optional dependency."""
    missing = re.findall(r"No module named '([\w.]+)'", text)
    extra = next((EXTRAS[m.split(".")[0]] for m in reversed(missing) if m.split(".")[0] in EXTRAS), None)
    return f'; pip install "kvlayout[{extra}]"' if extra else ""


def _num(x) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def normalize(tool: str, rows: list[dict]) -> tuple[list[dict], dict]:
    """Map a tool's rows onto the common schema; returns ``(rows, ceilings)``."""
    ceilings: dict = {}
    out = []
    for r in rows:
        if r.get("op") == "ceilings" or r.get("name") == "ceilings" or (
                "copy_TBps" in r and "seconds" not in r):
            ceilings.update({k: v for k, v in r.items() if k in ("copy_TBps", "matmul_TFLOPs")})
            ceilings["device"] = r.get("impl") or r.get("device") or ceilings.get("device")
            continue
        name = str(r.get("name") or r.get("op") or r.get("workload") or r.get("shape") or "?")
        row = {"tool": tool, "name": name, "backend": str(r.get("backend") or r.get("impl") or "-"),
               "shape": r.get("shape") if r.get("shape") not in (None, name) else None,
               "seconds": _num(r.get("seconds")), "bytes": _num(r.get("bytes", r.get("nbytes"))),
               "flops": _num(r.get("flops")), "achieved": None, "unit": None, "ceiling": _num(r.get("ceiling")),
               "note": str(r.get("note") or ""), "error": str(r["error"]) if r.get("error") else None}
        unit = r.get("unit") or r.get("metric")
        value = _num(r.get("achieved", r.get("value")))
        if unit in UNITS and value is not None:
            row["unit"], scale = UNITS[unit]
            row["achieved"] = value * scale
            if row["ceiling"] is not None:            # in the row's unit unless ceiling_unit says otherwise
                row["ceiling"] *= UNITS.get(r.get("ceiling_unit"), UNITS[unit])[1]
        elif "binds" in r and (_num(r.get("TBps")) is not None or _num(r.get("TFLOPs")) is not None):
            compute = r["binds"] == "matmul"
            row["unit"] = "TFLOP/s" if compute else "TB/s"
            row["achieved"] = _num(r.get("TFLOPs" if compute else "TBps"))
        elif row["seconds"]:
            if row["flops"]:
                row["unit"], row["achieved"] = "TFLOP/s", row["flops"] / row["seconds"] / 1e12
            elif row["bytes"]:
                row["unit"], row["achieved"] = "TB/s", row["bytes"] / row["seconds"] / 1e12
        if r.get("ceiling_pct") is not None or r.get("pct_of_bound") is not None:
            row["pct_of_ceiling"] = _num(r.get("ceiling_pct", r.get("pct_of_bound")))
        out.append(row)
    for row in out:
        if row["ceiling"] is None and row["unit"] in CEILING_KEYS:
            row["ceiling"] = _num(ceilings.get(CEILING_KEYS[row["unit"]]))
        if row.get("pct_of_ceiling") is None:
            row["pct_of_ceiling"] = (100 * row["achieved"] / row["ceiling"]
                                     if row["achieved"] is not None and row["ceiling"] else None)
    return out, ceilings


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    lines = [f"# kvlayout bench ({'quick' if result['quick'] else 'full'}) - {result['device']}", "",
             f"torch {result['versions'].get('torch')}, triton {result['versions'].get('triton')}; "
             f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(result['started']))} UTC", "", "## Tools", "",
             "| tool | status | seconds | rows | ceilings (same run) | message |", "|---|---|---:|---:|---|---|"]
    for name, t in result["tools"].items():
        c = t.get("ceilings") or {}
        ceil = (f"copy {_fmt(c.get('copy_TBps'), '.3g')} TB/s, matmul {_fmt(c.get('matmul_TFLOPs'), '.3g')} TFLOP/s"
                if c else "-")
        lines.append(f"| {name} | {t['status']} | {_fmt(t.get('seconds'), '.1f')} | {t.get('num_rows', 0)} | "
                     f"{ceil} | {t.get('message', '').replace('|', '/')} |")
    lines += ["", "## Results", "",
              "| tool | name | backend | time (us) | achieved | unit | ceiling | % of ceiling | note |",
              "|---|---|---|---:|---:|---|---:|---:|---|"]
    for r in result["rows"]:
        note = r["error"] and f"error: {r['error']}" or r["note"]
        lines.append(f"| {r['tool']} | {r['name']} | {r['backend']} | "
                     f"{_fmt(r['seconds'] and r['seconds'] * 1e6, '.1f')} | {_fmt(r['achieved'], '.4g')} | "
                     f"{r['unit'] or '-'} | {_fmt(r['ceiling'], '.4g')} | {_fmt(r['pct_of_ceiling'], '.3g')} | "
                     f"{note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Horizontal bars of achieved TB/s and TFLOP/s per (tool, shape, backend), each with its ceiling."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(u, [r for r in result["rows"] if r["unit"] == u and r["achieved"]]) for u in ("TB/s", "TFLOP/s")]
    heights = [max(len(rows), 1) for _, rows in panels]
    fig, axes = plt.subplots(2, 1, figsize=(11, 1.5 + 0.32 * sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    backends = sorted({r["backend"] for _, rows in panels for r in rows})
    colors = {b: plt.cm.tab10(i % 10) for i, b in enumerate(backends)}
    for ax, (unit, rows) in zip(axes[:, 0], panels):
        if not rows:
            ax.text(0.5, 0.5, f"no {unit} rows", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        y = list(range(len(rows)))
        ax.barh(y, [r["achieved"] for r in rows], color=[colors[r["backend"]] for r in rows])
        ceil_y = [i for i, r in enumerate(rows) if r["ceiling"]]
        ax.scatter([rows[i]["ceiling"] for i in ceil_y], ceil_y, marker="|", s=300, color="black", zorder=3,
                   label="device ceiling (same run)")
        for i, r in enumerate(rows):
            if r["pct_of_ceiling"] is not None:
                ax.annotate(f" {r['pct_of_ceiling']:.0f}%", (r["achieved"], i), va="center", fontsize=7)
        ax.set_yticks(y, [f"{r['tool'].removeprefix('bench_')}: {r['name']} [{r['backend']}]"[:70] for r in rows],
                      fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel(unit)
        ax.legend(loc="lower right", fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[b]) for b in backends]
    if handles:
        fig.legend(handles, backends, loc="upper right", fontsize=7, title="backend", title_fontsize=7)
    fig.suptitle(f"kvlayout bench - {result['device']}" + (" (quick: shapes tiny, timings mean little)"
                                                          if result["quick"] else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    import torch
    import triton
    from rich.console import Console

    console = Console(highlight=False)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tools_dir = find_tools_dir(args.tools)
    tools = discover(tools_dir)
    if args.only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in
                  (part.strip() for part in args.only.split(",")) if n}
        unknown = sorted(wanted - set(tools))
        if unknown or not wanted:
            known = ", ".join(n.removeprefix("bench_") for n in tools)
            raise KVLayoutError(f"--only {args.only!r}: no tool named "
                                f"{', '.join(n.removeprefix('bench_') for n in unknown) or '(empty)'}; "
                                f"known tools: {known}")
        tools = {n: p for n, p in tools.items() if n in wanted}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)"
    result = {"quick": args.quick, "device": device, "started": time.time(), "tools_dir": str(tools_dir),
              "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0]},
              "tools": {}, "rows": []}
    timeout = args.timeout or (120.0 if args.quick else 1800.0)
    packaged = tools_dir is not None and tools_dir == packaged_tools_dir()
    for name, path in tools.items():
        if path is None:
            info = {"status": "missing", "message": f"tools/{name}.py does not exist (yet)"}
        elif not has_entry_point(path):
            info = {"status": "skipped", "message": "no run(quick) -> list[dict] entry point; run it directly"}
        else:
            console.print(f"running {path.name}{' --quick' if args.quick else ''} ...")
            got = run_tool(path, args.quick, timeout, module=f"{PACKAGE}.{name}" if packaged else None)
            rows, ceilings = normalize(name, got.pop("rows"))
            info = {**got, "ceilings": ceilings, "num_rows": len(rows)}
            result["rows"] += rows
        result["tools"][name] = info
        console.print(f"  {name}: {info['status']} {info.get('message', '')}".rstrip(), markup=False)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "bench.md").write_text(markdown(result))
    written = [out_dir / "bench.json", out_dir / "bench.md"]
    if importlib.util.find_spec("matplotlib") is None:
        png_note = 'bench.png skipped: matplotlib is not installed; pip install "kvlayout[bench]" for the plot'
    else:
        plot(result, out_dir / "bench.png")
        written.append(out_dir / "bench.png")
        png_note = None
    print(markdown(result), flush=True)
    console.print("wrote " + ", ".join(str(w) for w in written), markup=False)
    if png_note:
        print(png_note, flush=True)          # one plain line (rich would wrap it at the terminal width)
    failed = [n for n, t in result["tools"].items() if t["status"] == "error"]
    return 1 if (failed and args.strict) else 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmarks in tools/ and write JSON, markdown and a plot",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU/CI; timings then mean little)")
    p.add_argument("--out", default="bench-out", help="folder for bench.json, bench.md, bench.png")
    p.add_argument("--tools", default=None, help="folder holding bench_*.py (default: the installed kvlayout.tools)")
    p.add_argument("--only", default=None, help="comma-separated tool names, e.g. attention,transfer")
    p.add_argument("--timeout", type=float, default=None, help="seconds per tool (default 120 quick, 1800 full)")
    p.add_argument("--strict", action="store_true", help="exit 1 if a tool failed")
    p.set_defaults(func=run)

