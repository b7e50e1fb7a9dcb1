"""The paired two-sided measure against closed-form cases."""

from __future__ import annotations

import math

import pytest

from emaweights.bench.measure import a_star, b_star, delta_a, delta_b, paired, verdict

# A straight trade-off from (B=0, A=1) to (B=1, A=0).
LINE = [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]


def test_point_on_the_curve_gives_zero() -> None:
    """A method exactly on the curve has ΔA = 0 and ΔB = 0."""
    for b in (0.0, 0.2, 0.5, 0.9, 1.0):
        assert delta_a((b, 1 - b), LINE).value == pytest.approx(0.0, abs=1e-12)
        assert delta_b((b, 1 - b), LINE).value == pytest.approx(0.0, abs=1e-12)


def test_closed_form_distances_above_and_below() -> None:
    """Above the line x + y = 1 both distances equal the offset; below, minus it."""
    for off in (0.1, -0.1):
        assert delta_a((0.3, 0.7 + off), LINE).value == pytest.approx(off)
        assert delta_b((0.3 + off, 0.7), LINE).value == pytest.approx(off)


def test_beyond_the_curve_is_labelled_dominates() -> None:
    """A new-task score no curve point reaches gives ΔA = +inf, labelled dominates."""
    d = delta_a((1.2, 0.5), LINE)
    assert d.value == math.inf and d.label == "dominates"
    assert delta_b((0.5, 1.3), LINE).label == "dominates"


def test_below_range_and_worse_is_labelled_dominated() -> None:
    """Worse than the curve's worst B and below its best A: finite ΔA, labelled dominated."""
    d = delta_a((-0.5, 0.6), LINE)
    assert d.value == pytest.approx(0.6 - 1.0) and d.label == "dominated"


def test_flat_stretch_reads_the_envelope() -> None:
    """A vertical stretch (equal B) and a curve that doubles back use the best A at B >= b."""
    flat = [(0.0, 1.0), (0.5, 0.9), (0.5, 0.2), (1.0, 0.0)]
    assert a_star(flat, 0.5) == pytest.approx(0.9)
    assert a_star(flat, 0.5 + 1e-9) == pytest.approx(0.2, abs=1e-6)
    back = [(0.0, 1.0), (0.8, 0.4), (0.4, 0.6), (1.0, 0.0)]
    assert a_star(back, 0.6) == pytest.approx(0.55)  # on the first segment at B = 0.6
    assert b_star(LINE, 0.25) == pytest.approx(0.75)


def test_paired_statistics_and_verdict() -> None:
    """Mean, paired SE, t, sign count; a verdict needs |t| >= 2 and a sign majority."""
    from emaweights.bench.measure import Distance

    vals = [0.1, 0.2, 0.3]
    p = paired([Distance(v) for v in vals])
    se = math.sqrt(sum((v - 0.2) ** 2 for v in vals) / 2 / 3)
    assert (p.mean, p.se, p.t, p.k, p.n) == (
        pytest.approx(0.2),
        pytest.approx(se),
        pytest.approx(0.2 / se),
        3,
        3,
    )
    assert verdict(p) == "above"
    noisy = paired([Distance(v) for v in (0.3, -0.1, 0.2)])
    assert verdict(noisy) == "within noise"
    dom = paired([Distance(math.inf, "dominates"), Distance(0.1)])
    assert dom.t == math.inf and verdict(dom) == "above"
    mixed = paired([Distance(math.inf, "dominates"), Distance(-0.1)])
    assert math.isnan(mixed.t) and verdict(mixed) == "within noise"


def test_bad_input_refused() -> None:
    """An empty curve, a non-finite curve point or a NaN distance is refused, naming it."""
    from emaweights.bench.measure import Distance

    with pytest.raises(ValueError, match="no points"):
        a_star([], 0.0)
    with pytest.raises(ValueError, match="nan"):
        a_star([(0.0, math.nan)], 0.0)
    with pytest.raises(ValueError, match="NaN"):
        paired([Distance(math.nan)])


def test_combined_verdict() -> None:
    """Either distance decides; opposite directions are 'mixed'; neither is within noise."""
    from emaweights.bench.measure import Distance, combined_verdict

    up = paired([Distance(v) for v in (0.1, 0.2, 0.3)])
    down = paired([Distance(-v) for v in (0.1, 0.2, 0.3)])
    flat = paired([Distance(v) for v in (0.3, -0.1, 0.2)])
    assert combined_verdict(up, flat) == combined_verdict(flat, up) == "above"
    assert combined_verdict(down, flat) == "below"
    assert combined_verdict(up, down) == "mixed"
    assert combined_verdict(flat, flat) == "within noise"


def test_one_seed_shows_no_spread() -> None:
    """With one seed the formatted distance says n=1 and never '± 0.0'; labels are kept."""
    from emaweights.bench.measure import Distance
    from emaweights.bench.report import fmt_paired

    one = paired([Distance(0.012)])
    assert fmt_paired(one) == "+1.2 (n=1)"
    assert "±" not in fmt_paired(one, 1000.0)
    assert fmt_paired(paired([Distance(math.inf, "dominates")])) == "dominates (1/1)"
    low = paired([Distance(-0.4, "dominated")])
    assert fmt_paired(low) == "-40.0 (n=1) dominated"
