"""The forgetting benchmark end to end: outputs, consistency, reproducibility."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emaweights.bench.demo import main
from emaweights.bench.runner import Config, run_one
from emaweights.bench.tasks import digits_task

TINY = Config(seeds=(0,), pretrain_epochs=3, finetune_epochs=2)


def test_quick_run_writes_table_plot_json_csv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`emaweights demo --task digits --quick` prints the table and writes JSON, CSV and PNG."""
    assert main(["--task", "digits", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ΔA@B interp" in out and "ΔB@A interp" in out and "ema β=0.999" in out
    assert "Against the interpolation curve" in out and "ema (w0 grid, β on val)" in out
    assert "ema-grid β=" not in out  # grid candidates are chosen on val, not rows
    data = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "summary.csv").read_text().startswith("task,name,family")
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    for run in data["runs"]:
        final = run["interpolation"][-1]
        last_epoch = run["trajectory"][-1]
        # Oracle: interpolation at alpha=1 and the last epoch are both the fine-tuned weights.
        assert final["alpha"] == 1.0
        assert final["a_test"] == last_epoch["a_test"] and final["b_test"] == last_epoch["b_test"]
        # Oracle: interpolation at alpha=0 is the pre-trained model.
        assert run["interpolation"][0]["a_test"] == run["pretrained"]["a_test"]
        # Oracle: an anchored EMA's w0 is beta^T.
        assert run["methods"]["ema β=0.99"]["w0"] == pytest.approx(0.99 ** run["steps"])
    # Oracle: the summary is the mean over the per-seed runs written beside it.
    for row in data["summary"]:
        if row["name"] != "fine-tuned (final)":
            continue
        finals = [
            r["interpolation"][-1]["a_test"] for r in data["runs"] if r["task"] == row["task"]
        ]
        assert row["a_mean"] == pytest.approx(sum(finals) / len(finals))
    assert data["config"]["steps"] == {r["task"]: r["steps"] for r in data["runs"]}
    csv_lines = (tmp_path / "summary.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(data["summary"])
    # Oracle: each seed pre-trains on its own split, so the pre-trained scores differ by seed.
    pre = {r["seed"]: r["pretrained"]["a_test"] for r in data["runs"] if r["task"] == "permuted"}
    assert len(pre) == 2 and pre[0] != pre[1]
    # Oracle: the paired verdict in the summary agrees with the per-row t and sign count.
    for row in data["summary"]:
        t, k, n = row["interp_a_t"], row["interp_a_k"], row["interp_a_n"]
        if row["interp_a_verdict"] == "above":
            assert t >= 2 and 2 * k > n


def test_one_seed_prints_no_spread(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--seeds 1` prints `(n=1)` and no `± 0.0` (one seed has no spread)."""
    args = ["--task", "digits", "--quick", "--seeds", "1", "--shifts", "inverted"]
    assert main([*args, "--no-progress", "--no-plot", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(n=1)" in out and "± 0.0" not in out


def test_reproducible() -> None:
    """Two runs with the same seed give identical numbers."""
    torch.manual_seed(123)
    first = run_one(digits_task("inverted"), TINY, seed=0).to_dict()
    torch.manual_seed(456)
    second = run_one(digits_task("inverted"), TINY, seed=0).to_dict()
    assert first == second


def test_ema_with_decay_zero_equals_fine_tuned() -> None:
    """An EMA with β=0 tracks the live weights, so it lands on the fine-tuned point."""
    from emaweights.bench.methods import EMAMethod

    r = run_one(
        digits_task("class_split"), TINY, seed=1, make_methods=lambda spe, total: [EMAMethod(0.0)]
    )
    assert r.methods["ema β=0.0"] == r.interpolation[-1][1]


def test_duplicate_method_names_refused() -> None:
    """Two methods with the same name are refused, naming it."""
    from emaweights.bench.methods import EMAMethod

    with pytest.raises(ValueError, match=r"ema β=0\.9"):
        run_one(
            digits_task("inverted"),
            TINY,
            0,
            make_methods=lambda spe, total: [EMAMethod(0.9), EMAMethod(0.9)],
        )


def test_bad_workers_flag_named(tmp_path: Path) -> None:
    """`--workers 0` is refused with a message naming the value; nothing is written."""
    with pytest.raises(SystemExit, match="--workers must be >= 1, got 0"):
        main(["--quick", "--workers", "0", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
