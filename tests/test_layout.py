"""The package layout rules (see ../shared/reference/architecture.md): every module imports from a
plain source checkout, imports run downward only (no cycles, no upward edges), only ``cli`` imports
typer/rich. The graph is built from the source with ``ast`` (an independent reading, not our code)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mlx_openelm"

# layer of each top-level part of the package: an import may only go to the same or a lower layer
LAYERS = {
    "_backend": 0, "utils": 0, "config": 1, "weights": 1, "tokenizer": 1, "model": 2, "scoring": 2, "adapters": 2, "data": 3,
    "kernels": 1, "io": 3, "generate": 3, "train": 4, "eval": 4, "bench": 4, "serve": 4, "cli": 5, "__init__": 6, "__main__": 6,
}


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imports_of(name: str, path: Path):
    """(target module, top-level?) of every ``mlx_openelm`` import in ``path``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t.startswith("mlx_openelm"):
                out.append((t, id(node) in top_level))
    return out


def part(module: str) -> str:
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "__init__"


def test_every_module_imports_from_a_source_checkout():
    names = [n for n, _ in modules() if not n.endswith("__main__")]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_imports_run_downward_and_have_no_cycles():
    graph = {}
    upward = []
    for name, path in modules():
        edges = set()
        for target, _ in imports_of(name, path):
            src, dst = part(name), part(target)
            if target == "mlx_openelm" or dst == "__init__" or dst not in LAYERS:
                continue  # the package's lazy public face (OpenBLAS preload)
            if src != dst and LAYERS[dst] > LAYERS[src] and src not in ("__init__", "__main__"):
                upward.append(f"{name} -> {target}")
            edges.add(target)
        graph[name] = edges
    assert not upward, "imports that go up a layer: " + ", ".join(upward)

    # cycles among modules (top-level and in-function imports alike)
    def resolve(t):
        while t not in graph and "." in t:
            t = t.rpartition(".")[0]
        return t if t in graph else None

    adj = {n: {resolve(t) for t in e} - {None, n, "mlx_openelm"} for n, e in graph.items()}
    # a package's __init__ is not a cycle with its own submodules
    adj = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in adj.items()}
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in adj[n]:
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in adj:
        if n not in state:
            visit(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_only_the_cli_uses_typer_and_rich():
    offenders = []
    for name, path in modules():
        if part(name) == "cli":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("typer", "rich", "click") for n in names):
                offenders.append(name)
    assert not offenders, offenders


def test_no_print_outside_the_cli():
    offenders = []
    for name, path in modules():
        if part(name) == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(name)
    assert not offenders, offenders
