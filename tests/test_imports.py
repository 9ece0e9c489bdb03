"""The package's imports form a DAG (module-level and function-level imports alike), and ``import kvlayout``
loads no optional dependency, nor the engine or the CLI."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed package name -> folder in the checkout (pyproject's package-dir)
PACKAGES = {"kvlayout": ROOT / "kvlayout", "kvlayout.backends": ROOT / "backends",
            "kvlayout.connectors": ROOT / "connectors"}


def modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[0] in ("backends", "connectors") and pkg == "kvlayout":
                continue
            name = ".".join((pkg,) + tuple(p for p in rel if p != "__init__"))
            found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names]
            # ``from pkg import sub`` imports the submodule (its package loads first, as for any import)
            targets = subs if all(t in known for t in subs) else [mod] + subs
        for t in targets:
            if t in known and t != name:
                out.add(t)
    return out


def test_import_graph_has_no_cycle():
    mods = modules()
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) > 30                   # the walk really saw the package


def test_core_does_not_import_backends_connectors_engine_or_cli():
    mods = modules()
    upper = ("kvlayout.backends", "kvlayout.connectors", "kvlayout.engine", "kvlayout.cli")
    for m, p in mods.items():
        if m.startswith(upper) or m == "kvlayout.__main__":
            continue
        bad = sorted(n for n in imports_of(m, p, set(mods)) if n.startswith(upper))
        assert not bad, f"core module {m} imports {bad}"


def test_import_kvlayout_loads_no_optional_dependency():
    code = ("import kvlayout, sys; print(sorted(m for m in ('rich', 'matplotlib', 'transformers', 'nixl', "
            "'flashinfer', 'kvlayout.engine', 'kvlayout.cli', 'kvlayout.backends', 'kvlayout.connectors') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
