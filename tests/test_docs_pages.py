"""Every Python snippet in docs/ema.md and docs/migration.md runs as shown."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ("ema.md", "migration.md")
# A snippet using torch.compile compiles a kernel first (seconds to tens of seconds).
SLOW = "compiled=True"
EVERYTHING = re.compile(r"runs (them|it) all|whole (test )?suite|all (the )?tests|every test")


def _snippets() -> list[object]:
    out: list[object] = []
    for page in PAGES:
        text = (DOCS / page).read_text("utf-8")
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", text, re.S)):
            marks = [pytest.mark.slow] if SLOW in code else []
            out.append(pytest.param(page, i, code, marks=marks, id=f"{page}-{i}"))
    return out


def test_every_page_has_a_snippet() -> None:
    """Each of these pages shows at least one runnable example."""
    found = {p.values[0] for p in _snippets()}  # type: ignore[attr-defined]
    assert found == set(PAGES)


@pytest.mark.parametrize(("page", "index", "code"), _snippets())
def test_snippet_runs(
    page: str, index: int, code: str, tmp_path: Path, monkeypatch: object
) -> None:
    """The snippet executes without error (in a temporary working directory)."""
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"docs/{page} snippet {index}", "exec"), {})


def test_make_test_is_never_said_to_run_every_test() -> None:
    """Wherever the docs say what `make test` runs, they also say it leaves out `slow`."""
    root = DOCS.parent
    for page in [root / "README.md", *sorted(DOCS.rglob("*.md"))]:
        text = " ".join(page.read_text("utf-8").split())
        for m in re.finditer(r"`make test` runs", text):
            nearby = text[m.start() : m.start() + 200]
            assert "slow" in nearby, f"{page.relative_to(root)}: {nearby!r}"
            assert not EVERYTHING.search(nearby), f"{page.relative_to(root)}: {nearby!r}"
