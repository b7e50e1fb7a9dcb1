"""The language-model task: deterministic offline corpus, cached pre-training, a tiny run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emaweights.bench import lm
from emaweights.bench.lm_report import closing_summary, markdown, summarize

TINY = lm.LMConfig(
    context=16,
    d_model=16,
    n_layer=1,
    n_head=2,
    batch_size=4,
    pretrain_steps=3,
    eval_windows=2,
    path_points=20,
    alphas=(0.0, 0.5, 1.0),
    l2sp=(0.1,),
    lora_rank=0,
    max_bytes=3000,
)


@pytest.fixture(scope="module")
def corpus() -> lm.Corpus:
    """A small corpus (shared: building it parses files)."""
    return lm.build_corpus(TINY.max_bytes)


def test_corpus_is_deterministic_and_split(corpus: lm.Corpus) -> None:
    """Two builds give the same bytes and digest; every split of both tasks is non-empty."""
    again = lm.build_corpus(TINY.max_bytes)
    assert again == corpus
    for part in (corpus.prose, corpus.code):
        assert all(len(part[s]) > TINY.context + 1 for s in lm.SPLITS)
    assert corpus.python and len(corpus.digest) == 64


def test_code_has_no_docstrings_or_comments() -> None:
    """The code task keeps statements and drops docstrings and comments."""
    import ast

    tree = ast.parse('"""doc."""\n# note\ndef f():\n    """inner."""\n    return 1\n')
    docs = lm._strip_docstrings(tree)
    assert docs == ["doc.", "inner."]
    assert ast.unparse(tree) == "def f():\n    return 1"


def test_pretraining_is_cached(corpus: lm.Corpus, tmp_path: Path) -> None:
    """A second call loads the cached weights (equal) instead of training."""
    first, hit1 = lm.pretrained(corpus, TINY, 0, tmp_path)
    second, hit2 = lm.pretrained(corpus, TINY, 0, tmp_path)
    assert (hit1, hit2) == (False, True)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_tiny_end_to_end_run(corpus: lm.Corpus, tmp_path: Path) -> None:
    """A tiny run: α=0 is θ0, α=1 is the fine-tuned point, ≥20 path points, summary covers all."""
    theta0, _ = lm.pretrained(corpus, TINY, 0, tmp_path)
    data = lm.Data.of(corpus, TINY)
    runs = [lm.run_condition(data, theta0, TINY, "cosine", 20, s, 0) for s in (0, 1)]
    for r in runs:
        assert r.interpolation[0][1] == r.pretrained
        assert r.interpolation[-1][1] == r.trajectory[-1][1] == r.methods["fine-tuned"]
        assert len(r.trajectory) >= 21
        assert r.notes["lora"] == "skipped: lora_rank=0"
    rows = summarize(runs)
    interp = next(r for r in rows if r.name == "interpolation (α on val)")
    assert interp.interp_a.n == 2 and interp.interp_a.mean <= 0.0  # a curve point
    assert {r.name for r in rows} == set(runs[0].methods)
    text = closing_summary(rows)
    for row in rows:
        if row.verdict == "above" and row.family != "reference":
            assert row.name in text
    assert "lm cosine T=20" in markdown(rows)


def test_unknown_schedule_named() -> None:
    """An unknown learning-rate schedule is refused, naming it."""
    with pytest.raises(ValueError, match="'linear'"):
        lm.lr_at("linear", 1.0, 1, 10)
