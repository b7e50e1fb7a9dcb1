"""Every Python snippet in the README runs as shown."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_snippets() -> None:
    """The README shows at least the seed-style and the context-manager usage."""
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index: int) -> None:
    """README snippet number `index` executes without error."""
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {})
