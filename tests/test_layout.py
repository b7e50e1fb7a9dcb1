"""The package's layering: import graph (deferred imports included) and documented names."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

import emaweights

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "emaweights"

# Lower layers never import higher ones. ``io`` is a file primitive (atomic writes,
# weights-only loads) that only needs _sharding, and the post-hoc averager writes
# its snapshots with it, so it sits at the bottom. ``export`` writes any averager's
# average (duck-typed), so the package namespace can offer save_averaged beside them.
LAYERS: list[set[str]] = [
    {"functional", "schedules", "_naming", "_sharding", "flat", "io"},
    {"_kernel", "_checks", "_module"},
    {"shadow"},
    {"averager", "_storage"},
    {"ema", "multi", "swa", "lawa", "bema", "post_hoc", "switch", "pullback", "interpolate"},
    {"export"},
    {"__init__"},  # the package namespace re-exports the averagers and export
    {"distributed"},
    {"integrations", "bench", "cli", "post_hoc_cli", "__main__"},
]
CORE = set().union(*LAYERS[:7]) - {"io", "export"}
# Optional extras a core module may import inside a function (file formats only).
DEFERRED_EXTRAS = {"safetensors"}


def _name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if len(parts) > 1 and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"module {module} has no layer in tests/test_layout.py: add it")


def _imports(module: str) -> tuple[set[str], list[tuple[str, bool]]]:
    """(emaweights modules it imports, [(other top-level package, deferred)]), every level."""
    path = MODULES[module]
    tree = ast.parse(path.read_text("utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    internal: set[str] = set()
    external: list[tuple[str, bool]] = []
    top_level = {id(n) for n in tree.body}
    # Imports under ``if TYPE_CHECKING:`` never run: annotations only, not a dependency.
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        deferred = id(node) not in top_level
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "emaweights":
                    internal.add(alias.name.removeprefix("emaweights").lstrip(".") or "__init__")
                else:
                    external.append((alias.name.split(".")[0], deferred))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = ["emaweights", *package.split(".")] if package != "__init__" else []
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "emaweights":
                external.append((base.split(".")[0], deferred))
                continue
            mod = base.removeprefix("emaweights").lstrip(".")
            for alias in node.names:
                sub = f"{mod}.{alias.name}".lstrip(".")
                internal.add(sub if sub in MODULES else (mod or "__init__"))
    internal.discard(module)
    return internal, external


GRAPH = {m: _imports(m)[0] for m in MODULES}


def test_every_module_is_placed_in_a_layer() -> None:
    """Each module of the package belongs to one layer of the table above."""
    for module in MODULES:
        _layer(module)


def test_lower_layers_never_import_higher_ones() -> None:
    """No module imports one of a higher layer, deferred imports included."""
    bad = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in GRAPH.items()
        for d in sorted(deps)
        if _layer(d) > _layer(m)
    ]
    assert not bad, bad


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    """No import cycle among the modules below the benchmarks, deferred imports included."""
    graph = {m: d for m, d in GRAPH.items() if not m.startswith("bench")}
    assert _cycle(graph) is None, _cycle(graph)


def test_cycle_finder_finds_a_cycle() -> None:
    """The cycle check itself reports a planted cycle (so its silence above means something)."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_core_imports_only_torch_and_the_standard_library() -> None:
    """Core modules import torch and the standard library; file formats only when used."""
    bad = [
        f"{m} imports {pkg}" + (" (deferred)" if deferred else "")
        for m in MODULES
        if m.split(".")[0] in CORE
        for pkg, deferred in _imports(m)[1]
        if pkg not in sys.stdlib_module_names
        and pkg != "torch"
        and not (deferred and pkg in DEFERRED_EXTRAS)
    ]
    assert not bad, bad


# -- names the docs use -------------------------------------------------------

DOCS = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]


def _doc_names() -> tuple[set[str], set[tuple[str, str]]]:
    """(names taken from the package, (module, name) taken from submodules) in code blocks."""
    top: set[str] = set()
    sub: set[tuple[str, str]] = set()
    for path in DOCS:
        for code in re.findall(r"```python\n(.*?)```", path.read_text("utf-8"), re.S):
            for node in ast.walk(ast.parse(code)):
                if isinstance(node, ast.ImportFrom) and node.module == "emaweights":
                    top.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "emaweights."
                ):
                    sub.update((str(node.module), a.name) for a in node.names)
                elif (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "emaweights"
                ):
                    top.add(node.attr)
    return top, sub


def test_docs_use_some_names() -> None:
    """The scan finds the documented imports (an empty scan would make the tests below vacuous)."""
    top, sub = _doc_names()
    assert "EMA" in top
    assert ("emaweights.export", "save_averaged") in sub


def test_every_name_in_the_docs_is_importable() -> None:
    """Every emaweights name a docs code block imports exists where the block takes it from."""
    top, sub = _doc_names()
    missing = [n for n in sorted(top) if not hasattr(emaweights, n)]
    missing += [f"{m}.{n}" for m, n in sorted(sub) if not _defines(m, n)]
    assert not missing, missing


def _defines(module: str, name: str) -> bool:
    """Whether ``module`` has ``name``; read from its source where an optional extra is absent."""
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:  # an adapter whose framework is not installed here (e.g. peft)
        path = MODULES[module.removeprefix("emaweights.")]
        tree = ast.parse(path.read_text("utf-8"))
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        defined |= {
            t.id
            for n in tree.body
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        return name in defined


@pytest.mark.parametrize("module", ["ema", "multi", "swa", "lawa", "bema", "post_hoc", "export"])
def test_package_namespace_lists_what_the_docs_take_from_core_modules(module: str) -> None:
    """Public names the docs import from a core module are also in emaweights.__all__."""
    _, sub = _doc_names()
    names = {n for m, n in sub if m == f"emaweights.{module}"}
    assert names <= set(emaweights.__all__), sorted(names - set(emaweights.__all__))


def test_all_lists_only_existing_names() -> None:
    """Every name in emaweights.__all__ is an attribute of the package."""
    assert [n for n in emaweights.__all__ if not hasattr(emaweights, n)] == []
