r"""BEMA: bias-corrected EMA (Block & Zhang 2025).

"EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes".

From the reference point :math:`\theta_0` (the weights at ``start_step``), at
update :math:`t` (optimizer steps since ``start_step``), in the paper's
notation (here :math:`\beta_t` is the EMA's *new-value weight*, ``ema_weight``
in code, not the decay of :class:`~emaweights.EMA`; :math:`\alpha_t` is the
``correction`` weight):

.. math::
    \beta_t = (\rho + \gamma t)^{-\kappa}, \qquad \alpha_t = (\rho + \gamma t)^{-\eta},

    \mu_t = (1 - \beta_t)\,\mu_{t-1} + \beta_t\,\theta_t, \qquad \mu_0 = \theta_0,

    \hat\theta_t = \mu_t + \alpha_t\,(\theta_t - \theta_0) .

:math:`\mu` is an EMA whose new-value weight :math:`\beta_t` shrinks like
:math:`t^{-\kappa}`; the correction :math:`\alpha_t(\theta_t - \theta_0)` adds
back the drift the EMA lags behind. Defaults are the paper's: :math:`\kappa =
0.5` (``ema_power``), :math:`\eta = 0.2` (``bias_power``), :math:`\rho = 10`
(``lag``), :math:`\gamma = 1` (``multiplier``).

**The opposite trade-off to an anchored EMA.** An EMA started at pre-trained
weights keeps the weight :math:`\beta^T` on them, which retains old knowledge
(and lags). BEMA removes the lag: the correction moves the average toward the
current weights, away from :math:`\theta_0`, so it forgets more. Use it to
train from scratch or when only the new task matters, not to limit forgetting.

Memory: three copies (:math:`\theta_0`, :math:`\mu`, :math:`\hat\theta`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from emaweights import functional as F
from emaweights._naming import BufferPolicy, collect
from emaweights.averager import Averager, NonFinitePolicy, _short, parse_clock
from emaweights.shadow import Shadow, live_on_shadow_device

__all__ = ["BEMA"]

_POWERS = ("ema_power", "bias_power", "lag", "multiplier")


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{what} must be a finite positive number, got {_short(value)}")
    return float(value)


class BEMA(Averager):
    r"""Bias-corrected EMA of a model's weights.

    Args:
        model: the model.
        ema_power: :math:`\kappa` (> 0; paper default 0.5).
        bias_power: :math:`\eta` (> 0; paper default 0.2).
        lag: :math:`\rho` (>= 1 so that :math:`\beta_t \le 1`; paper default 10).
        multiplier: :math:`\gamma` (> 0; paper default 1).
        update_every: update at every this many optimizer steps after
            ``start_step`` (the paper's :math:`\phi`); between updates the
            result keeps its value; :math:`t` counts optimizer steps.
        start_step: burn-in :math:`\tau`: until this optimizer step the result
            (and :math:`\theta_0`, :math:`\mu`) follow the live weights, so
            :math:`\theta_0` is the weights at this step.
        device: shadow device (default: each tensor's own).
        include_frozen, exclude, buffers: which tensors (see :class:`~emaweights.EMA`).
        foreach: kernel choice (``None``: the fastest available).
        nonfinite: ``"check"``, ``"raise"`` or ``"skip"`` (see :class:`~emaweights.EMA`).

    Raises:
        ValueError: an argument out of range (the message names the value).

    """

    FORMAT: ClassVar[str] = "emaweights.BEMA"
    CLOCK_FIELDS: ClassVar[tuple[str, ...]] = ("ema_init_weight", "init_weight")

    def __init__(
        self,
        model: nn.Module,
        *,
        ema_power: float = 0.5,
        bias_power: float = 0.2,
        lag: float = 10.0,
        multiplier: float = 1.0,
        update_every: int = 1,
        start_step: int = 0,
        device: torch.device | str | None = None,
        include_frozen: bool = False,
        exclude: Sequence[str] = (),
        buffers: BufferPolicy = "average",
        foreach: bool | None = None,
        nonfinite: NonFinitePolicy = "check",
    ) -> None:
        self.ema_power = _positive(ema_power, "ema_power")
        self.bias_power = _positive(bias_power, "bias_power")
        self.lag = _positive(lag, "lag")
        if self.lag < 1:
            raise ValueError(f"lag must be >= 1 (else the EMA weight exceeds 1), got {lag!r}")
        self.multiplier = _positive(multiplier, "multiplier")
        self._init_clock(update_every=update_every, start_step=start_step, nonfinite=nonfinite)
        self.model = model
        self._options: dict[str, Any] = dict(
            include_frozen=include_frozen, exclude=tuple(exclude), buffers=buffers
        )
        entries = collect(model, **self._options)
        dev = torch.device(device) if device is not None else None
        self._foreach = foreach
        self._reference = Shadow(entries, device=dev, foreach=foreach)  # theta_0
        self._ema = Shadow(entries, device=dev, foreach=foreach)  # mu
        self._shadow = Shadow(entries, device=dev, foreach=foreach)  # the result
        self.ema_init_weight = 1.0  # weight of theta_0 in mu: prod (1 - beta_k)
        self.init_weight = 1.0  # weight of theta_0 in the result: prod (1 - beta_k) - alpha_t

    def _storages(self) -> dict[str, Shadow]:
        return {"shadow": self._shadow, "ema": self._ema, "reference": self._reference}

    def weights(self, t: int) -> tuple[float, float]:
        r"""(:math:`\beta_t`, :math:`\alpha_t`): EMA and correction weights ``t`` steps in."""
        base = self.lag + self.multiplier * t
        return base**-self.ema_power, base**-self.bias_power

    # -- the rule ----------------------------------------------------------

    def _on_copy(self) -> None:
        super()._on_copy()
        self.ema_init_weight = self.init_weight = 1.0

    def _rule(self) -> None:
        r"""Also advances :attr:`init_weight`, :math:`\prod_k (1 - \beta_k) - \alpha_t`."""
        ema_weight, correction = self.weights(self.step - self.start_step)
        for out, ema, ref in zip(
            self._shadow.averaged, self._ema.averaged, self._reference.averaged, strict=True
        ):
            live = live_on_shadow_device(ema, self._foreach)
            F.bias_corrected_ema_(
                out.views, ema.views, ref.views, live, ema_weight, correction, foreach=self._foreach
            )
        self._shadow.copy_copied_()
        self.ema_init_weight *= 1.0 - ema_weight
        self.init_weight = self.ema_init_weight - correction
        self._last_step = self.step

    @property
    def ema(self) -> dict[str, Tensor]:
        r"""The uncorrected EMA :math:`\mu` by canonical name."""
        return self._ema.state()

    # -- checkpoints -------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in _POWERS}, **super()._config()}

    def _extra_state(self) -> dict[str, Any]:
        return {"ema_init_weight": self.ema_init_weight, "init_weight": self.init_weight}

    def _parse_extra(self, state: Mapping[str, Any], strict: bool) -> dict[str, Any]:
        config = state["config"]
        parsed: dict[str, Any] = {k: _positive(config.get(k), f"saved {k}") for k in _POWERS}
        if parsed["lag"] < 1:
            raise ValueError(f"saved lag must be >= 1, got {parsed['lag']!r}")
        parsed.update(parse_clock(config))
        weights = {}
        for k, low in (("ema_init_weight", 0.0), ("init_weight", -1.0)):
            w = state.get(k)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not low <= w <= 1.0:
                raise ValueError(f"saved {k} must be a number in [{low}, 1], got {_short(w)}")
            weights[k] = float(w)
        return {"config": parsed, **weights}

    def _commit_extra(self, parsed: Mapping[str, Any]) -> None:
        for k, v in parsed["config"].items():
            setattr(self, k, v)
        self.ema_init_weight, self.init_weight = parsed["ema_init_weight"], parsed["init_weight"]

    def __repr__(self) -> str:
        return (
            f"BEMA(ema_power={self.ema_power}, bias_power={self.bias_power}, lag={self.lag}, "
            f"multiplier={self.multiplier}, update_every={self.update_every}, "
            f"start_step={self.start_step}, step={self.step})"
        )
