"""Benchmark metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from emaweights.bench.metrics import curve_a_at, delta_a, forgetting, mean_std


def test_curve_reads_linear_interpolation() -> None:
    """Between (0.2, 0.9) and (0.6, 0.5), the curve at B=0.5 has A=0.6."""
    curve = [(0.2, 0.9), (0.6, 0.5), (0.9, 0.3)]
    assert curve_a_at(curve, 0.5) == pytest.approx(0.6)
    assert curve_a_at(curve, 0.9) == pytest.approx(0.3)
    assert curve_a_at(curve, 0.2) == pytest.approx(0.9)


def test_curve_takes_best_of_several_crossings() -> None:
    """Where the curve passes a B twice, the higher A counts."""
    curve = [(0.1, 0.9), (0.8, 0.7), (0.6, 0.2)]  # B goes up then back down
    # segment 1 at B=0.7: 0.9 + (0.7-0.9)*(0.6/0.7); segment 2 at B=0.7: 0.45
    first = 0.9 + (0.7 - 0.9) * (0.7 - 0.1) / (0.8 - 0.1)
    assert curve_a_at(curve, 0.7) == pytest.approx(max(first, 0.45))


def test_outside_curve_is_nan() -> None:
    """A B beyond the curve's range gives NaN, not an extrapolation."""
    assert math.isnan(curve_a_at([(0.1, 0.9), (0.5, 0.4)], 0.7))


def test_delta_a_sign() -> None:
    """A point above the curve has a positive ΔA equal to its vertical distance."""
    curve = [(0.0, 1.0), (1.0, 0.0)]
    assert delta_a((0.25, 0.85), curve) == pytest.approx(0.1)
    assert delta_a((0.5, 0.3), curve) == pytest.approx(-0.2)


def test_w0_is_beta_power_t() -> None:
    """The anchored EMA's w0 after T steps is β^T (checked through EMAMethod)."""
    import torch

    from emaweights.bench.methods import EMAMethod

    model = torch.nn.Linear(2, 2)
    m = EMAMethod(0.97)
    m.start(model)
    for step in range(1, 41):
        m.after_step(model, step)
    assert m.w0() == pytest.approx(0.97**40)
    debiased = EMAMethod(0.97, anchor="debiased")
    debiased.start(model)
    assert debiased.w0() == 0.0


def test_forgetting_and_mean_std() -> None:
    """Forgetting is A0 - A; mean/std are the sample statistics, NaN ignored."""
    assert forgetting(0.9, 0.6) == pytest.approx(0.3)
    m, s = mean_std([1.0, 2.0, 3.0, math.nan])
    assert (m, s) == (pytest.approx(2.0), pytest.approx(1.0))
    assert all(math.isnan(v) for v in mean_std([math.nan]))


def test_markdown_tables_format_rows() -> None:
    """markdown_tables gives one table per task, a line per row, accuracies in %, paired Δ."""
    from emaweights.bench.measure import Distance, paired
    from emaweights.bench.report import COLUMNS, Row, markdown_tables

    keys = [k for _, k in COLUMNS]
    stats = {k: (0.5, 0.25) for k in keys}
    counts = {k: (3, 3) for k in keys}
    counts["a"] = (2, 3)
    d = paired([Distance(0.01), Distance(0.02), Distance(0.03)])  # mean 2, SE 0.577 points
    dist = {"interp_a": d, "interp_b": d, "path_a": d}
    rows = [Row("t1", "m1", "ema", stats, counts, dist), Row("t2", "m2", "ema", stats, counts)]
    text = markdown_tables(rows)
    assert text.count("| method |") == 2
    line = next(x for x in text.splitlines() if x.startswith("| m1 |"))
    assert line == (
        "| m1 | 0.500 ± 0.250 | 50.0 ± 25.0 (2/3) |"
        + " 50.0 ± 25.0 |" * 3
        + " +2.0 ± 0.6 (t +3.5, 3/3) |" * 3
        + " above |"
    )
    other = next(x for x in text.splitlines() if x.startswith("| m2 |"))
    assert other.endswith("| — | — | — | within noise |")


def test_matched_grid_w0_equals_one_minus_alpha() -> None:
    """After T steps the matched-grid EMAs keep w0 = 1 - α for every interior α of the grid."""
    import torch

    from emaweights.bench.methods import ALPHAS, EMAMethod, matched_decays

    model = torch.nn.Linear(2, 2)
    decays = matched_decays(30)
    assert len(decays) == len([a for a in ALPHAS if 0 < a < 1])
    for a, d in zip([a for a in ALPHAS if 0 < a < 1], decays, strict=True):
        m = EMAMethod(d, grid=True)
        m.start(model)
        for step in range(1, 31):
            m.after_step(model, step)
        assert m.w0() == pytest.approx(1 - a, rel=1e-4) and m.family == "ema-grid"
    with pytest.raises(ValueError, match="got 0"):
        matched_decays(0)
