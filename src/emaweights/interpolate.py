r"""Weight interpolation between two models (WiSE-FT, Wortsman et al. 2022).

.. math:: \theta(\alpha) = (1 - \alpha)\,\theta_A + \alpha\,\theta_B

With :math:`\theta_A` the pre-trained and :math:`\theta_B` the fine-tuned
weights, :math:`\alpha = 0` is the pre-trained model and :math:`\alpha = 1` the
fine-tuned one. An EMA started at :math:`\theta_A` puts the weight
:math:`\beta^T` on it, so this curve is the reference every averaging method of
the forgetting benchmark is drawn against.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor

__all__ = ["interpolate", "sweep"]


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite real number, got {alpha!r}")
    return float(alpha)


def interpolate(
    state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    r"""Return :math:`(1-\alpha)\,A + \alpha\,B` for every floating tensor.

    Non-floating tensors (integer buffers such as BatchNorm's
    ``num_batches_tracked``) are counters, not weights: they are copied from
    ``state_b`` (the fine-tuned side, whose statistics the interpolated model
    continues), whatever ``alpha``. The result is computed in the tensors' own
    dtype, by ``torch.lerp``. ``alpha`` outside [0, 1] extrapolates.

    Args:
        state_a: state dict at :math:`\alpha = 0` (e.g. pre-trained).
        state_b: state dict at :math:`\alpha = 1` (e.g. fine-tuned).
        alpha: the interpolation coefficient.

    Raises:
        KeyError: the two state dicts have different names (listed).
        ValueError: shapes or dtypes differ, or ``alpha`` is not a finite number
            (NaN or infinity would poison every weight).

    """
    alpha = _check_alpha(alpha)
    if set(state_a) != set(state_b):
        raise KeyError(
            f"state dicts differ: only in A {sorted(set(state_a) - set(state_b))}, "
            f"only in B {sorted(set(state_b) - set(state_a))}"
        )
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, a in state_a.items():
            b = state_b[name]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(
                    f"{name}: A is {a.dtype}{tuple(a.shape)}, B is {b.dtype}{tuple(b.shape)}"
                )
            if a.is_floating_point():
                out[name] = torch.lerp(a, b.to(a.device), alpha)
            else:
                # A counter (num_batches_tracked) has no meaningful midpoint: take B's.
                out[name] = b.to(a.device, copy=True)
    return out


def sweep(
    state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], alphas: Iterable[float]
) -> Iterator[tuple[float, dict[str, Tensor]]]:
    """Yield ``(alpha, interpolate(state_a, state_b, alpha))`` for each alpha, lazily."""
    for alpha in alphas:
        yield float(alpha), interpolate(state_a, state_b, alpha)
