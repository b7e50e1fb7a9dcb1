r"""Metrics of the forgetting benchmark.

A method is judged against two reference curves in the plane
(new-task accuracy :math:`B`, old-task accuracy :math:`A`):

* the **interpolation curve** :math:`\theta(\alpha) = (1-\alpha)\theta_0 + \alpha\theta_T`
  between the pre-trained and the fine-tuned weights (WiSE-FT), and
* the **early-stopping path**: the fine-tuning trajectory at each epoch end.

:math:`\Delta A` at equal :math:`B` is the method's old-task accuracy minus the
curve's old-task accuracy at the method's new-task accuracy, read off the curve
by linear interpolation between its points. Where the curve passes the same
:math:`B` several times, its best :math:`A` there is used (a method must beat
the best the curve offers). Outside the curve's range of :math:`B` it is
undefined (NaN): that method is not comparable to that curve.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

__all__ = ["curve_a_at", "delta_a", "forgetting", "mean_std"]

Point = tuple[float, float]  # (B accuracy, A accuracy)


def curve_a_at(curve: Sequence[Point], b: float) -> float:
    """Old-task accuracy of a piecewise-linear curve at new-task accuracy ``b``.

    Args:
        curve: points ``(B, A)`` in curve order (alpha or epoch order).
        b: the new-task accuracy to read at.

    Returns:
        The largest ``A`` among the curve's segments that contain ``b``; NaN if
        no segment does.
    """
    best = math.nan
    for (b0, a0), (b1, a1) in itertools.pairwise(curve):
        lo, hi = min(b0, b1), max(b0, b1)
        if not (lo <= b <= hi):
            continue
        a = max(a0, a1) if b1 == b0 else a0 + (a1 - a0) * (b - b0) / (b1 - b0)
        best = a if math.isnan(best) else max(best, a)
    if len(curve) == 1 and curve[0][0] == b:
        best = curve[0][1]
    return best


def delta_a(point: Point, curve: Sequence[Point]) -> float:
    """:math:`A_{method} - A_{curve}(B_{method})`; positive means above the curve."""
    return point[1] - curve_a_at(curve, point[0])


def forgetting(a_before: float, a_after: float) -> float:
    """Forgetting :math:`A_0 - A`: old-task accuracy lost by fine-tuning."""
    return a_before - a_after


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds, ignoring NaN (NaN if none left)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
