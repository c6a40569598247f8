"""Imports only go down (DESIGN.md): config → model → weights / infer → data → train / eval →
pipeline / speedrun → cli. Every `import` and `from ... import` of every module under nanoseek/ is
read with ast, at any depth (function-level imports count; `if TYPE_CHECKING:` blocks do not, they
never run), and checked against the layer table below: no import of a higher layer, no cycle between
modules, nothing imports cli.py, serve/ talks only to infer/ and weights/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "nanoseek"

# Layer of each top-level piece of the package, lowest first. A module may import its own layer or a
# lower one. `nanoseek` is the package facade (`nanoseek.load`, `nanoseek.save`), above weights/.
LAYERS = [
    {"errors", "version", "atomic", "args", "jsonl", "chat_template", "mkl", "inductor"},  # leaves: errors,
                                                      # atomic writes, JSONL, argparse, chat templates, MKL, inductor
    {"config", "tokenizer"},                     # ModelConfig and the counts; tokenizer and the R1 tags
    {"model"},                                   # pure math
    {"weights", "infer", "cost", "nanoseek"},    # load/save, the engine, the cost model
    {"data"},                                    # corpora, task suites, rewards' parsers
    {"train", "eval"},
    {"pipeline", "speedrun", "export", "serve"},
    {"cli", "__main__", "chat"},                 # the top: nothing imports cli
]
SERVE_MAY_IMPORT = {"serve", "infer", "weights", "errors", "version", "atomic", "args", "nanoseek"}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every .py under root (a package `__init__` is its package's name)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node, skipping the bodies of `if TYPE_CHECKING:` (annotations only; never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (resolved to the deepest module that exists)."""
    mods = module_names(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:  # `from . import checkpoint` imports the submodule
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
        graph[name] = {r for t in targets if t.split(".")[0] == root.name
                       for r in [resolve(t)] if r is not None and r != name}
    return graph


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if component(module) in names:
            return i
    raise KeyError(f"{module} is in no layer of tests/test_imports.py's LAYERS; add it where it belongs")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
                  for m, ts in graph.items() for t in ts if layer(t) > layer(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


def test_every_module_has_a_layer(graph):
    for m in graph:
        layer(m)


def test_imports_only_go_down(graph):
    assert upward_imports(graph) == []


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_nothing_imports_the_cli(graph):
    assert sorted(m for m, ts in graph.items() if "nanoseek.cli" in ts) == ["nanoseek.__main__"]


def test_serve_talks_only_to_infer_and_weights(graph):
    bad = sorted(f"{m} imports {t}" for m, ts in graph.items() if component(m) == "serve"
                 for t in ts if component(t) not in SERVE_MAY_IMPORT)
    assert bad == []


def test_the_checker_finds_upward_imports_and_cycles(tmp_path):
    """The checks above can fail: a fake package with an upward import (function-level, relative) and a
    two-module cycle (through `from . import`), and a TYPE_CHECKING import that is rightly ignored."""
    pkg = tmp_path / "nanoseek"
    (pkg / "model").mkdir(parents=True)
    (pkg / "train").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from .train import loop\n")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "model" / "a.py").write_text("from . import b\n")
    (pkg / "model" / "b.py").write_text("import nanoseek.model.a\n"
                                        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..cli import x\n")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("from ..model.a import thing\n")
    g = import_graph(pkg)
    assert g["nanoseek.config"] == {"nanoseek.train.loop"}
    assert g["nanoseek.model.b"] == {"nanoseek.model.a"}
    assert upward_imports(g) == ["nanoseek.config (layer 1) imports nanoseek.train.loop (layer 5)"]
    assert cycles(g) == [["nanoseek.model.a", "nanoseek.model.b"]]
