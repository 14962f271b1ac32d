"""The layers of ARCHITECTURE.md hold: every import of a tuneforge module (function-local ones too) goes down the
layer list or stays inside its own unit, no two modules import each other through any chain, and function-local
imports of tuneforge's own modules are only where the command line keeps its start-up fast."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# ARCHITECTURE.md's table, lowest first: a unit may import units of lower layers only.
LAYERS = [
    ("errors",),
    ("files",),
    ("config",),
    ("data",),
    ("models",),
    ("preflight",),
    ("peft",),
    ("distributed",),
    ("checkpoint",),
    ("run",),
    ("eval",),
    ("report",),
    ("train",),
    ("export",),
    ("hub", "serve", "plan", "launch"),
    ("api",),
    ("tuneforge",),
    ("cli",),
    ("__main__",),
]
# Modules that import heavy layers inside functions, so `tuneforge --help` and a refused recipe answer at once.
LAZY_ALLOWED = {"tuneforge.cli", "tuneforge.launch", "tuneforge.api", "tuneforge"}
# Single function-local imports, each for its reason.
LAZY_EDGES = {
    ("tuneforge.serve", "tuneforge.serve.app"): "fastapi and uvicorn, the serve extra",
    ("tuneforge.plan", "tuneforge.train.recipe"): "plan measures what a training process's imports cost",
}


def module_files(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package under root."""
    mods = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _targets(node, module: str, is_package: bool, mods: dict) -> list[str]:
    """The package's modules one import statement loads, absolute or relative: `from a.b import c` names the
    module a.b.c when there is one, else a.b (whose __init__ defines c)."""
    package = next(iter(mods)).split(".")[0]
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = module if is_package else module.rpartition(".")[0]
        if node.level:
            base = ".".join(base.split(".")[: len(base.split(".")) - node.level + 1])
            name = f"{base}.{node.module}" if node.module else base
        else:
            name = node.module or ""
        names = [f"{name}.{a.name}" if f"{name}.{a.name}" in mods else name for a in node.names]
    out = []
    for target in names:
        if target.split(".")[0] != package:
            continue
        while target not in mods and "." in target:
            target = target.rpartition(".")[0]
        if target in mods and target not in out:
            out.append(target)
    return out


def import_edges(root: Path, package: str) -> list[tuple[str, str, bool, int]]:
    """(importer, imported module, function-local?, line) for every import of the package's own modules."""
    mods = module_files(root, package)
    edges = []
    for module, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        top_level = set()
        for stmt in tree.body:  # module level, including under `if TYPE_CHECKING:` / try blocks
            if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                top_level.update(id(n) for n in ast.walk(stmt))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(node, module, path.name == "__init__.py", mods):
                if target != module:
                    edges.append((module, target, id(node) not in top_level, node.lineno))
    return edges


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b, _, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(edges, layers, lazy_allowed, lazy_edges=()) -> list[str]:
    rank = {unit: i for i, units in enumerate(layers) for unit in units}
    problems = []
    for a, b, lazy, line in edges:
        ua, ub = unit_of(a), unit_of(b)
        if ua not in rank or ub not in rank:
            problems.append(f"{a}:{line} imports {b}: unit {ua if ua not in rank else ub} is in no layer")
        elif ua != ub and rank[ub] >= rank[ua]:
            problems.append(f"{a}:{line} imports {b}: layer {rank[ub] + 1} ({ub}) is not below "
                            f"layer {rank[ua] + 1} ({ua})")
        if lazy and a not in lazy_allowed and (a, b) not in lazy_edges:
            problems.append(f"{a}:{line} imports {b} inside a function (only for optional packages and CLI start-up)")
    problems += [f"import cycle: {' -> '.join(cycle_path(edges, c))}" for c in cycles(edges)]
    return problems


def cycle_path(edges, component: list[str]) -> list[str]:
    """One shortest cycle through the component's first module, as the chain of imports that closes it."""
    inside = set(component)
    graph: dict[str, list[str]] = {}
    for a, b, _, _ in edges:
        if a in inside and b in inside:
            graph.setdefault(a, []).append(b)
    start = component[0]
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for nxt in sorted(graph.get(path[-1], [])):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append(path + [nxt])
    return component


def test_tuneforge_keeps_its_layers():
    problems = violations(import_edges(REPO, "tuneforge"), LAYERS, LAZY_ALLOWED, LAZY_EDGES)
    assert not problems, "\n".join(problems)


def test_every_unit_is_in_a_layer_and_in_architecture_md():
    units = {unit_of(m) for m in module_files(REPO, "tuneforge")}
    listed = {u for layer in LAYERS for u in layer}
    assert units <= listed, f"units in no layer: {sorted(units - listed)}"
    doc = (REPO / "ARCHITECTURE.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (.+?) \|", doc, flags=re.M)
    documented = [tuple(re.findall(r"`([\w.]+)`", units)) for _, units in rows]
    assert documented == [tuple(layer) for layer in LAYERS], "ARCHITECTURE.md's layer table and LAYERS differ"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    # a cycle hidden in a function-local import
    ({"__init__.py": "", "low/__init__.py": "", "low/a.py": "from pkg.low import b\n",
      "low/b.py": "def f():\n    from pkg.low.a import x\n"}, ["import cycle: pkg.low.a -> pkg.low.b -> pkg.low.a",
                                                                  "pkg.low.b:2 imports pkg.low.a inside a function"]),
    # an upward edge, written as a relative import
    ({"__init__.py": "", "low/__init__.py": "", "low/a.py": "from ..high import c\n", "high/__init__.py": "",
      "high/c.py": "from pkg.low.a import y\n"}, ["pkg.low.a:1 imports pkg.high.c: layer 2 (high) is not below layer 1"]),
])
def test_the_checker_fails_on_a_planted_cycle_and_an_upward_import(tmp_path, files, expected):
    root = _tree(tmp_path, files)
    problems = violations(import_edges(root, "pkg"), [("low",), ("high",), ("pkg",)], set())
    for want in expected:
        assert any(p.startswith(want) for p in problems), (want, problems)
