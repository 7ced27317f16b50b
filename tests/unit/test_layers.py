"""The layers of docs/design.md: imports inside ``policylong/`` run one way, down, at module level.

Each module has a layer (below); a module may import modules of its own layer or of a lower
one, never of a higher one, and the import graph has no cycle. Imports of ``policylong``
modules sit at module level (an import inside a function hides an edge from readers and from
this test). A new module must be given a layer here.
"""

from __future__ import annotations

import ast
import os
import shutil

import pytest

PKG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "policylong")

LAYERS = [
    # 0: typed configs, readers, the stage dataset format, synthetic world, paths, logging
    (
        "policylong",
        "policylong.config",
        "policylong.corpus",
        "policylong.datasets",
        "policylong.passage_store",
        "policylong.errors",
        "policylong.outputs",
        "policylong.paths",
        "policylong.logs",
        "policylong.synthetic",
    ),
    # 1: fused ops + references; embedder + FAISS; LM protocol + HF backend; the base model
    ("policylong.kernels", "policylong.retrieval", "policylong.lm", "policylong.basemodel"),
    # 2: the method's steps; probes; verifiable task generators
    ("policylong.screening", "policylong.evaluation", "policylong.tasks"),
    # 3: Megatron-Core
    ("policylong.megatron_ext",),
    # 4: the alignment loop
    ("policylong.align",),
    # 5: the extension loop and its hook for Megatron scripts
    ("policylong.stages", "policylong.recipe"),
    # 6: statistics, JSON + PNG
    ("policylong.report",),
    # 7, 8: commands (the CLI wires the demo in)
    ("policylong.demo",),
    ("policylong.cli",),
]
_RANK_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def layer_of(module: str) -> int | None:
    """The layer of ``module``: that of its longest listed prefix (``policylong.kernels.x`` is
    in ``policylong.kernels``'s layer)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        rank = _RANK_OF.get(".".join(parts[:i]))
        if rank is not None and (i > 1 or module == "policylong"):
            return rank
    return None


def modules(pkg_dir: str = PKG_DIR) -> dict[str, str]:
    """``{module name: file}`` of every module under ``policylong/``."""
    out = {}
    root = os.path.dirname(os.path.abspath(pkg_dir))
    for dirpath, _, files in os.walk(os.path.abspath(pkg_dir)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: str, known: dict[str, str]) -> list[tuple[str, int, bool]]:
    """(imported policylong module, line, at module level) for each import in ``path``."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            # ``from pkg import mod`` imports the submodule when there is one
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for t in targets:
            if t == "policylong" or t.startswith("policylong."):
                out.append((t, node.lineno, id(node) in top))
    return out


def graph(pkg_dir: str = PKG_DIR) -> tuple[dict[str, set[str]], list[str]]:
    """The import graph and the list of violations (unplaced modules, upward edges, imports
    inside functions)."""
    known = modules(pkg_dir)
    edges: dict[str, set[str]] = {m: set() for m in known}
    bad = []
    for name, path in sorted(known.items()):
        src = layer_of(name)
        if src is None:
            bad.append(f"{name}: no layer (add it to LAYERS in {__file__})")
            continue
        for target, line, at_top in imports(name, path, known):
            rel = os.path.relpath(path, os.path.dirname(os.path.abspath(pkg_dir)))
            if not at_top:
                bad.append(f"{rel}:{line}: import of {target} inside a function or block")
            dst = layer_of(target)
            if dst is not None and dst > src:
                bad.append(f"{rel}:{line}: {name} (layer {src}) imports {target} (layer {dst})")
            if target in known and target != name:
                edges[name].add(target)
    return edges, bad


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (c := visit(t)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_layers_run_one_way_down_at_module_level():
    edges, bad = graph()
    assert not bad, "\n".join(bad)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _copy_package(tmp_path):
    dst = tmp_path / "policylong"
    shutil.copytree(PKG_DIR, dst, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    return dst


@pytest.mark.parametrize(
    "module, line, why",
    [
        ("config.py", "from policylong.stages import run_stages\n", "imports policylong.stages"),
        ("kernels/__init__.py", "from policylong import report\n", "imports policylong.report"),
        ("screening/verify.py", "from policylong.megatron_ext import lm\n", "(layer 3)"),
    ],
)
def test_an_upward_import_fails(tmp_path, module, line, why):
    """The check itself: an upward edge planted in a copy of the package is reported."""
    dst = _copy_package(tmp_path)
    path = dst / module
    path.write_text(path.read_text() + "\n" + line)
    _, bad = graph(str(dst))
    assert any(why in b for b in bad), bad


def test_an_import_inside_a_function_fails(tmp_path):
    dst = _copy_package(tmp_path)
    path = dst / "corpus.py"
    path.write_text(path.read_text() + "\n\ndef f():\n    from policylong import paths\n")
    _, bad = graph(str(dst))
    assert any("inside a function" in b and "corpus.py" in b for b in bad), bad


def test_a_cycle_is_found():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
