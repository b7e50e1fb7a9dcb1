r"""The benchmark's measure: distance to a reference trade-off curve, paired over seeds.

Points live in the plane (new-task score :math:`B`, old-task score :math:`A`),
both *higher is better* (accuracy; or minus bits per byte for the language
model). A reference curve (the interpolation :math:`\theta_0 \to \theta_T`, or
the fine-tuning path) is a polyline through its points in order.

**The frontier.** What the curve offers at new-task score at least :math:`b` is

.. math::

    A^*(b) = \max \{ a : (b', a) \text{ on the polyline},\ b' \ge b \},

its monotone upper envelope. It handles curves that double back (the best
crossing counts) and flat stretches (where the polyline is nearly vertical,
:math:`A^*` jumps instead of being read off a steep, noisy slope). Likewise
:math:`B^*(a) = \max \{ b : (b, a') \text{ on the polyline},\ a' \ge a \}`.

**The two distances.** :math:`\Delta A = a - A^*(b)` (old-task score above the
curve at equal new-task score) and :math:`\Delta B = b - B^*(a)` (new-task
score beyond the curve at equal old-task score). Positive means the curve
cannot reach the method's point. Where the curve is flat in one direction one
of the two is ill-conditioned and the other is not, so both are reported.

**Out of range.** When the method's :math:`b` is beyond every curve point's,
:math:`A^*(b)` is empty: no point of the curve reaches that new-task score,
so :math:`\Delta A = +\infty`, labelled *dominates*. When :math:`b` is below
every curve point's, :math:`A^*(b)` is the curve's best old-task score; a
method below it too is worse than a curve point in both scores and is
labelled *dominated* (its finite :math:`\Delta A` is kept). Nothing is dropped.

**Over seeds.** A method's distances are paired differences (the curve comes
from the same run), so the summary is their mean, the paired standard error
:math:`s/\sqrt{n}`, :math:`t = \bar d / (s/\sqrt n)` and the sign count
:math:`k` of :math:`n` (seeds with :math:`d > 0`). A method counts as above
(below) the curve only when :math:`t \ge 2` (:math:`t \le -2`) and more than
half of the seeds agree in sign; otherwise it is *within noise*. When some
seeds are :math:`+\infty` (dominates), :math:`t` is :math:`+\infty` if every
seed is positive and undefined otherwise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MIN_T",
    "Distance",
    "Paired",
    "a_star",
    "b_star",
    "combined_verdict",
    "delta_a",
    "delta_b",
    "paired",
    "verdict",
]

Point = tuple[float, float]  # (B, A), both higher-is-better

MIN_T = 2.0
"""The :math:`|t|` a mean distance needs to count as above or below the curve."""


def _check(curve: Sequence[Point]) -> None:
    if not curve:
        raise ValueError("the reference curve has no points")
    bad = [p for p in curve if not all(math.isfinite(v) for v in p)]
    if bad:
        raise ValueError(f"the reference curve has non-finite points: {bad[:3]}")


def _segments(curve: Sequence[Point]) -> list[tuple[Point, Point]]:
    if len(curve) == 1:
        return [(curve[0], curve[0])]
    return list(itertools.pairwise(curve))


def a_star(curve: Sequence[Point], b: float) -> float:
    r""":math:`A^*(b)`: the polyline's best old-task score at new-task score :math:`\ge b`.

    Returns ``-inf`` when no point of the polyline has new-task score ``>= b``.

    Raises:
        ValueError: the curve is empty or has a non-finite point.
    """
    _check(curve)
    best = -math.inf
    for (b0, a0), (b1, a1) in _segments(curve):
        if max(b0, b1) < b:
            continue
        # The segment's part with B >= b: its best A is at an end or where B = b.
        cands = [a for bb, a in ((b0, a0), (b1, a1)) if bb >= b]
        if (b0 - b) * (b1 - b) < 0:
            cands.append(a0 + (a1 - a0) * (b - b0) / (b1 - b0))
        best = max(best, *cands)
    return best


def b_star(curve: Sequence[Point], a: float) -> float:
    r""":math:`B^*(a)`: the polyline's best new-task score at old-task score :math:`\ge a`."""
    return a_star([(pa, pb) for pb, pa in curve], a)


@dataclass(frozen=True)
class Distance:
    """A method's distance to a curve on one seed.

    Attributes:
        value: the distance (``+inf`` when the curve cannot reach the point's level).
        label: ``"dominates"`` (beyond the curve's range), ``"dominated"`` (worse than a
            curve point in both scores, outside the curve's range), or ``""``.
    """

    value: float
    label: str = ""


def delta_a(point: Point, curve: Sequence[Point]) -> Distance:
    r""":math:`\Delta A = a - A^*(b)` with its range label (see the module docstring)."""
    b, a = point
    ref = a_star(curve, b)
    if ref == -math.inf:
        return Distance(math.inf, "dominates")
    below_range = b < min(p[0] for p in curve)
    return Distance(a - ref, "dominated" if below_range and a < ref else "")


def delta_b(point: Point, curve: Sequence[Point]) -> Distance:
    r""":math:`\Delta B = b - B^*(a)` with its range label."""
    b, a = point
    return delta_a((a, b), [(pa, pb) for pb, pa in curve])


@dataclass(frozen=True)
class Paired:
    r"""Paired summary of per-seed distances.

    Attributes:
        values: the per-seed distances.
        mean: their mean (``inf`` if some seed dominates).
        se: paired standard error :math:`s/\sqrt{n}` (NaN with one seed or an infinite value).
        t: ``mean / se`` (``+inf`` when every seed is positive and some infinite; NaN undefined).
        k: seeds with a positive distance.
        n: seeds.
        labels: per-seed range labels.
    """

    values: tuple[float, ...]
    mean: float
    se: float
    t: float
    k: int
    n: int
    labels: tuple[str, ...]

    @property
    def verdict(self) -> str:
        """``"above"``, ``"below"`` or ``"within noise"`` (see :func:`verdict`)."""
        return verdict(self)


def paired(values: Sequence[Distance]) -> Paired:
    """Mean, paired SE, t and sign count of per-seed distances.

    Raises:
        ValueError: no values, or a NaN among them.
    """
    if not values:
        raise ValueError("no per-seed values to summarize")
    vals = tuple(d.value for d in values)
    if any(math.isnan(v) for v in vals):
        raise ValueError(f"a per-seed distance is NaN: {vals}")
    n, k = len(vals), sum(v > 0 for v in vals)
    labels = tuple(d.label for d in values)
    if any(math.isinf(v) for v in vals):
        t = math.inf if k == n else math.nan
        return Paired(vals, math.inf if k == n else math.nan, math.nan, t, k, n, labels)
    mean = sum(vals) / n
    if n < 2:
        return Paired(vals, mean, math.nan, math.nan, k, n, labels)
    se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n)
    zero_se = math.nan if mean == 0.0 else math.copysign(math.inf, mean)
    t = zero_se if se == 0.0 else mean / se
    return Paired(vals, mean, se, t, k, n, labels)


def verdict(p: Paired) -> str:
    """Above / below the curve only when ``|t| >= 2`` and more than half the seeds agree."""
    if not math.isnan(p.t):
        if p.t >= MIN_T and 2 * p.k > p.n:
            return "above"
        if p.t <= -MIN_T and 2 * (p.n - p.k) > p.n:
            return "below"
    return "within noise"


def combined_verdict(at_equal_b: Paired, at_equal_a: Paired) -> str:
    """One verdict from ΔA@B and ΔB@A: ``"mixed"`` if they disagree in direction.

    ``"above"`` (``"below"``) when either distance is above (below) and the other
    is not the opposite; ``"within noise"`` when neither is.
    """
    v = {at_equal_b.verdict, at_equal_a.verdict}
    if v == {"above", "below"}:
        return "mixed"
    return "above" if "above" in v else "below" if "below" in v else "within noise"
