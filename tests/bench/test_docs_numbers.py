"""The committed LM results back the conclusions printed in README and docs/benchmark.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from emaweights.bench.lm_report import closing_summary, load_runs, markdown, summarize

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results" / "lm-default.json"


@pytest.mark.skipif(not RESULTS.exists(), reason="no committed LM results")
def test_docs_quote_the_committed_run() -> None:
    """README and docs/benchmark.md carry the summary and tables regenerated from the results."""
    rows = summarize(load_runs(RESULTS))
    summary = closing_summary(rows)
    readme = (ROOT / "README.md").read_text()
    doc = (ROOT / "docs" / "benchmark.md").read_text()
    assert summary in readme and summary in doc
    assert markdown(rows) in doc
