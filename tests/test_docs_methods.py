"""Every Python snippet in docs/methods/ runs as shown."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods"
SNIPPETS = [
    (path.name, i, code)
    for path in sorted(DOCS.glob("*.md"))
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text("utf-8"), re.S))
]


def test_every_method_page_has_a_snippet() -> None:
    """Each method page (not the index) shows at least one runnable example."""
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert pages <= {name for name, _, _ in SNIPPETS}


@pytest.mark.parametrize(("page", "index", "code"), SNIPPETS, ids=lambda v: str(v)[:20])
def test_snippet_runs(page: str, index: int, code: str) -> None:
    """The snippet executes without error."""
    exec(compile(code, f"{page} snippet {index}", "exec"), {})
