"""The language-model task: deterministic offline corpus, cached pre-training, a tiny run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emaweights.bench import lm
from emaweights.bench.lm_report import closing_summary, load_runs, markdown, summarize

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
    lm._build_corpus.cache_clear()  # build it again from the files, not from the cache
    again = lm.build_corpus(TINY.max_bytes)
    assert again == corpus and again is not corpus
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


def _tiny_demo(monkeypatch: pytest.MonkeyPatch, out: Path, cache: Path, *extra: str) -> int:
    from emaweights.bench import lm_demo
    from emaweights.bench.demo import main

    monkeypatch.setattr(lm_demo, "setup", lambda quick: (TINY, (10,)))
    argv = ["--workers", "1", "--pretrain-seeds", "2", *extra]
    if "--progress" in argv:
        argv.remove("--progress")
    else:
        argv.append("--no-progress")
    return main([*argv, "--out", str(out), "--cache", str(cache)])


def test_tiny_demo_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`emaweights demo` on a tiny config: tables, closing summary, JSON per seed, CSV; cache."""
    import json

    from emaweights.bench import lm_demo

    monkeypatch.setattr(lm_demo, "SCHEDULES", ("cosine",))
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert _tiny_demo(monkeypatch, out, cache, "--seeds", "1", "--no-plot") == 0
    text = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    rows = summarize(load_runs(out / "results.json"))
    assert closing_summary(rows) in text  # the printed conclusion is the saved numbers'
    assert [(r["pretrain_seed"], r["seed"]) for r in data["runs"]] == [(0, 0), (1, 0)]
    cfg = data["config"]
    assert cfg["corpus_sha256"] == lm.build_corpus(TINY.max_bytes).digest
    assert cfg["pretraining_cached"] == [False, False] and cfg["cpu_seconds"] > 0
    header = (out / "summary.csv").read_text().splitlines()[0]
    assert header.startswith("condition,name,family") and "interp_b_t" in header
    # a second run takes the pre-trained models from the cache and gives the same numbers
    assert _tiny_demo(monkeypatch, tmp_path / "again", cache, "--seeds", "1", "--no-plot") == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["config"]["pretraining_cached"] == [True, True]
    assert again["runs"] == data["runs"]


@pytest.mark.slow
def test_tiny_demo_all_conditions_and_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both schedules x 2 x 2 seeds: every (pre-training, fine-tuning) pair and a plot each."""
    import json

    out = tmp_path / "out"
    assert _tiny_demo(monkeypatch, out, tmp_path / "cache", "--seeds", "2") == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    pairs = {(r["condition"], r["pretrain_seed"], r["seed"]) for r in runs}
    assert pairs == {
        (c, p, f) for c in ("constant T=10", "cosine T=10") for p in (0, 1) for f in (0, 1)
    }
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["tradeoff-lm-constant-T10.png", "tradeoff-lm-cosine-T10.png"]


def test_progress_bars_count_pretraining_steps_and_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The pre-training bar counts steps of both models to the end; the second bar counts runs."""
    from emaweights.bench import lm_demo

    monkeypatch.setattr(lm_demo, "SCHEDULES", ("cosine",))
    args = ("--seeds", "1", "--no-plot", "--progress")
    assert _tiny_demo(monkeypatch, tmp_path / "o", tmp_path / "c", *args) == 0
    err = capsys.readouterr().err
    total = 2 * TINY.pretrain_steps
    assert "pre-training (prose)" in err and f"{total}/{total}" in err
    assert "fine-tuning runs (code)" in err and "2/2" in err


@pytest.mark.slow
def test_worker_processes_give_the_in_process_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--workers 2` (spawned processes) writes the per-seed numbers of `--workers 1`."""
    import json

    from emaweights.bench import lm_demo

    monkeypatch.setattr(lm_demo, "SCHEDULES", ("cosine",))
    out = {}
    for w in ("1", "2"):
        args = ("--seeds", "1", "--no-plot", "--workers", w)
        assert _tiny_demo(monkeypatch, tmp_path / w, tmp_path / f"c{w}", *args) == 0
        out[w] = json.loads((tmp_path / w / "results.json").read_text())
    assert out["2"]["config"]["workers"] == 2
    assert out["1"]["runs"] == out["2"]["runs"]
