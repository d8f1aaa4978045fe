"""Layers point one way: the import graph of ``distill`` has no upward import, no cycle and no private
name crossing modules.

The layers, lowest first. A module may import its own layer or a lower one, never a higher one; the
longest matching prefix decides a module's layer (``distill.dist.plan`` is an entry point, the rest
of ``distill.dist`` is layer 3).

=====  ============  ===============================================================================
layer  name          modules
=====  ============  ===============================================================================
0      foundation    ``distill`` (the package ``__init__``), ``distill.errors``, ``distill.startup``,
                     ``distill.progress``, ``distill.fileio``, ``distill.runinfo``
1      data          ``distill.data``
2      config        ``distill.config``, ``distill.reporting``
3      dist          ``distill.dist`` (except ``distill.dist.plan``)
4      models        ``distill.models``, ``distill.eval``
5      losses        ``distill.losses``
6      teacher       ``distill.teacher``
7      train         ``distill.train``
8      stages        ``distill.icldist`` < ``distill.multiteacher`` < ``distill.knowdist`` (in this order)
9      entry points  ``distill.predict``, ``distill.export``, ``distill.dist.plan``, and the CLI tools
                     ``distill.losses.bench_memory``, ``distill.teacher.bench``,
                     ``distill.data.make_sample``
=====  ============  ===============================================================================

Modules that are both a library and a ``python -m`` tool stay in their library's layer
(``distill.eval.sentibench``). Every import counts, at module level
or inside a function (a lazy import is still a dependency), and so does an import named in a
string handed to ``importlib.import_module`` (a registry of lazily loaded backends). The checker
reads the source with :mod:`ast` only: nothing under ``distill`` is imported, so the test takes
well under a second.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "distill"

# (prefix, layer); the longest prefix that matches a module's dotted name wins.
LAYERS: dict[str, int] = {
    "distill": 0,
    "distill.errors": 0,
    "distill.startup": 0,
    "distill.progress": 0,
    "distill.fileio": 0,
    "distill.runinfo": 0,
    "distill.data": 1,
    "distill.config": 2,
    "distill.reporting": 2,
    "distill.dist": 3,
    "distill.models": 4,
    "distill.eval": 4,
    "distill.losses": 5,
    "distill.teacher": 6,
    "distill.train": 7,
    "distill.icldist": 8.0,
    "distill.multiteacher": 8.1,
    "distill.knowdist": 8.2,
    "distill.predict": 9,
    "distill.export": 9,
    "distill.dist.plan": 9,
    "distill.losses.bench_memory": 9,
    "distill.teacher.bench": 9,
    "distill.data.make_sample": 9,
}


@dataclasses.dataclass(frozen=True)
class Import:
    """One import statement's edge: ``src`` (a module) imports ``dst`` at ``file:line``."""

    src: str
    dst: str
    file: str
    line: int
    name: str = ""  # the name taken by ``from dst import name`` ("" for ``import dst``)

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def layer_of(module: str, layers: dict[str, float] = LAYERS) -> float | None:
    """The layer of a dotted module name by its longest matching prefix (None: not in the table)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in layers:
            return layers[prefix]
    return None


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root`` by dotted name (a package is its ``__init__``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imported_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Module names given as string constants to ``import_module(...)`` or in a dict of such names
    that the same file hands to ``import_module`` (a lazy registry)."""
    uses_import_module = any(
        isinstance(n, ast.Call)
        and (getattr(n.func, "attr", None) == "import_module" or getattr(n.func, "id", None) == "import_module")
        for n in ast.walk(tree)
    )
    if not uses_import_module:
        return []
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("distill.")
        and n.value.replace(".", "").replace("_", "").isalnum() and " " not in n.value
    ]


def collect_imports(root: Path) -> tuple[list[Import], set[str]]:
    """Every import between modules of the package at ``root`` (module level and function-local,
    relative ones resolved) and the set of its module names."""
    modules = module_names(root)
    pkg = root.name
    edges: list[Import] = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        file = str(path.relative_to(root.parent))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == pkg or alias.name.startswith(pkg + "."):
                        edges.append(Import(mod, alias.name, file, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_package, node.level, node.module)
                if not (base == pkg or base.startswith(pkg + ".")):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:  # `from distill.eval import sentibench`: the submodule
                        edges.append(Import(mod, sub, file, node.lineno))
                    else:
                        edges.append(Import(mod, base, file, node.lineno, alias.name))
        for line, name in _imported_strings(tree):
            if name in modules:
                edges.append(Import(mod, name, file, line))
    return edges, set(modules)


def _cycles(edges: list[Import], modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        if e.dst in modules and e.dst != e.src:
            graph[e.src].add(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def check(edges: list[Import], modules: set[str], layers: dict[str, float] = LAYERS) -> list[str]:
    """Every violation, one line each, naming the importing file:line and the imported module."""
    problems = []
    for e in edges:
        if e.dst == e.src:
            continue
        src_layer, dst_layer = layer_of(e.src, layers), layer_of(e.dst, layers)
        if src_layer is None:
            problems.append(f"{e.where()}: module {e.src} has no layer in the table (add it to LAYERS)")
        elif dst_layer is None:
            problems.append(f"{e.where()}: imports {e.dst}, which has no layer in the table (add it to LAYERS)")
        elif dst_layer > src_layer:
            problems.append(f"{e.where()}: upward import: {e.src} (layer {src_layer}) imports {e.dst} "
                            f"(layer {dst_layer})")
        if e.name.startswith("_") and not (e.name.startswith("__") and e.name.endswith("__")):
            problems.append(f"{e.where()}: private name {e.name} imported from {e.dst}")
    for comp in _cycles(edges, modules):
        inside = set(comp)
        lines = sorted({f"{e.where()} -> {e.dst}" for e in edges if e.src in inside and e.dst in inside
                        and e.src != e.dst})
        problems.append(f"import cycle among {', '.join(comp)}: " + "; ".join(lines))
    return sorted(set(problems))


# -- the real package ----------------------------------------------------------------------------


def test_every_module_has_a_layer():
    modules = module_names(PACKAGE)
    assert modules, f"no modules under {PACKAGE}"
    missing = [m for m in modules if layer_of(m) is None]
    assert not missing, f"modules without a layer (add them to LAYERS in {__file__}): {missing}"


def test_layers_point_one_way():
    edges, modules = collect_imports(PACKAGE)
    assert len(edges) > 100, f"only {len(edges)} imports found: the collector is broken"
    problems = check(edges, modules)
    assert not problems, f"{len(problems)} import problem(s):\n" + "\n".join(problems)


def test_kernels_never_import_distill():
    root = ROOT / "kernels" / "distill_kernels"
    bad = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                    if n == "distill" or n.startswith("distill.")]
    assert not bad, "\n".join(bad)


# -- the checker itself can fail -----------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "distill" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path / "distill"


def test_checker_accepts_a_clean_tree(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "data/__init__.py": "",
        "data/sft.py": "from distill.errors import UserError\nfrom . import __init__\n",
        "losses/__init__.py": "from .divergences import kl\n",
        "losses/divergences.py": "def kl(): from distill.data import sft\n",
    })
    edges, modules = collect_imports(root)
    assert {(e.src, e.dst) for e in edges} >= {("distill.data.sft", "distill.errors"),
                                               ("distill.losses", "distill.losses.divergences"),
                                               ("distill.losses.divergences", "distill.data.sft")}
    assert check(edges, modules) == []


@pytest.mark.parametrize("lazy", [False, True])
def test_checker_fails_on_an_upward_import(tmp_path, lazy):
    line = "from distill.knowdist.corpus import Corpus\n"
    root = _tree(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/sft.py": "import os\n" + (f"def load():\n    {line}" if lazy else line),
        "knowdist/__init__.py": "",
        "knowdist/corpus.py": "class Corpus: pass\n",
    })
    problems = check(*collect_imports(root))
    assert len(problems) == 1, problems
    where = "distill/data/sft.py:3" if lazy else "distill/data/sft.py:2"
    assert problems[0].startswith(f"{where}: upward import: distill.data.sft (layer 1) imports "
                                  "distill.knowdist.corpus (layer 8.2)"), problems


def test_checker_fails_on_a_relative_upward_import_and_a_registry_string(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "icldist/__init__.py": "",
        "icldist/targets.py": "from ..knowdist import harvest\n",
        "knowdist/__init__.py": "",
        "knowdist/harvest.py": "",
        "losses/__init__.py": "",
        "losses/pick.py": "import importlib\nB = {'x': 'distill.teacher.ray'}\n"
                          "def get(k): return importlib.import_module(B[k])\n",
        "teacher/__init__.py": "",
        "teacher/ray.py": "",
    })
    problems = check(*collect_imports(root))
    assert any(p.startswith("distill/icldist/targets.py:1: upward import: distill.icldist.targets (layer 8.0) "
                            "imports distill.knowdist.harvest (layer 8.2)") for p in problems), problems
    assert any(p.startswith("distill/losses/pick.py:2: upward import: distill.losses.pick (layer 5) imports "
                            "distill.teacher.ray (layer 6)") for p in problems), problems


def test_checker_fails_on_a_cycle(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "icldist/__init__.py": "",
        "icldist/prompts.py": "from distill.icldist.tasks import TASKS\n",
        "icldist/tasks.py": "def f():\n    from distill.icldist import prompts\n",
    })
    problems = check(*collect_imports(root))
    assert problems == ["import cycle among distill.icldist.prompts, distill.icldist.tasks: "
                        "distill/icldist/prompts.py:1 -> distill.icldist.tasks; "
                        "distill/icldist/tasks.py:2 -> distill.icldist.prompts"], problems


def test_checker_fails_on_a_private_name(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "losses/__init__.py": "",
        "losses/divergences.py": "def _chunk(): pass\n",
        "losses/lean.py": "from distill.losses.divergences import _chunk, __doc__\n",
    })
    problems = check(*collect_imports(root))
    assert problems == ["distill/losses/lean.py:1: private name _chunk imported from distill.losses.divergences"]


def test_layer_table_longest_prefix():
    assert layer_of("distill.dist.plan") == 9
    assert layer_of("distill.dist.env") == 3
    assert layer_of("distill") == 0
    assert layer_of("distill.knowdist.corpus") > layer_of("distill.multiteacher.stage") > layer_of("distill.icldist")
    assert layer_of("numpy") is None
