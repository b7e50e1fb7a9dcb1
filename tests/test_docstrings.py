"""Measured numbers live in docs/performance.md only, never in docstrings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "emaweights"
# A throughput or speed-up figure: "23 GB/s", "85% of the roofline", "1.5x faster".
FIGURE = re.compile(
    r"\d\s*(GB/s|GiB/s|MB/s)|\d\s*%[^.]{0,40}roofline|\d(\.\d+)?\s*x\s+(faster|slower)",
    re.IGNORECASE,
)


def _docstrings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text("utf-8"))
    nodes = [tree, *ast.walk(tree)]
    out = []
    for node in nodes:
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                out.append((getattr(node, "lineno", 1), doc))
    return out


def test_the_pattern_finds_figures() -> None:
    """The check recognises the figures it looks for (it could fail)."""
    for text in ("reaches 23.8 GB/s", "68-85% of the bandwidth roofline", "1.5x slower here"):
        assert FIGURE.search(text), text
    assert not FIGURE.search("one kernel over 12 bytes per element")


def test_no_docstring_quotes_a_measured_figure() -> None:
    """No docstring in src/ quotes a throughput or speed-up figure (they go stale)."""
    found = [
        f"{path.relative_to(SRC)}:{line}: {m.group(0)!r}"
        for path in sorted(SRC.rglob("*.py"))
        for line, doc in _docstrings(path)
        for m in FIGURE.finditer(doc)
    ]
    assert not found, found
