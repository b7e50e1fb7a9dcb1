r"""BEMA: bias-corrected EMA (Block & Zhang 2025).

"EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes".

From the reference point :math:`\theta_0` (the weights at ``start_step``), at
update :math:`t` (optimizer steps since ``start_step``):

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

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from emaweights._naming import BufferPolicy, canonical_name, collect, unwrap
from emaweights.shadow import Shadow, live_on_shadow_device

__all__ = ["BEMA"]


def _positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{what} must be a positive number, got {value!r}")
    return float(value)


class BEMA:
    r"""Bias-corrected EMA of a model's weights.

    Args:
        model: the model.
        ema_power: :math:`\kappa` (> 0; paper default 0.5).
        bias_power: :math:`\eta` (> 0; paper default 0.2).
        lag: :math:`\rho` (>= 1 so that :math:`\beta_t \le 1`; paper default 10).
        multiplier: :math:`\gamma` (> 0; paper default 1).
        update_every: update every this many optimizer steps (paper's :math:`\phi`).
        start_step: burn-in :math:`\tau`: :math:`\theta_0` is the weights at this step;
            before it the result is the live weights.
        device: shadow device (default: each tensor's own).
        include_frozen, exclude, buffers: which tensors (see :class:`~emaweights.EMA`).

    """

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
    ) -> None:
        self.kappa = _positive(ema_power, "ema_power")
        self.eta = _positive(bias_power, "bias_power")
        self.rho = _positive(lag, "lag")
        if self.rho < 1:
            raise ValueError(f"lag must be >= 1 (else the EMA weight exceeds 1), got {lag!r}")
        self.gamma = _positive(multiplier, "multiplier")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        self.update_every, self.start_step = update_every, start_step
        self.model = model
        entries = collect(
            model, include_frozen=include_frozen, exclude=tuple(exclude), buffers=buffers
        )
        dev = torch.device(device) if device is not None else None
        self._theta0 = Shadow(entries, device=dev)
        self._mu = Shadow(entries, device=dev)
        self._out = Shadow(entries, device=dev)
        self.step = 0
        self._ema_init_weight = 1.0  # weight of theta_0 in mu: prod (1 - beta_k)
        self.init_weight = 1.0  # weight of theta_0 in the result: prod (1 - beta_k) - alpha_t

    def weights(self, t: int) -> tuple[float, float]:
        r"""(:math:`\beta_t`, :math:`\alpha_t`) at ``t`` optimizer steps after ``start_step``."""
        base = self.rho + self.gamma * t
        return base**-self.kappa, base**-self.eta

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        r"""Update after ``optimizer.step()``; ``step`` defaults to one more than the last.

        Also advances :attr:`init_weight`, the weight of :math:`\theta_0` in the result,
        :math:`\prod_k (1 - \beta_k) - \alpha_t` (negative once the correction dominates).
        """
        self.step = self.step + 1 if step is None else step
        if self.step <= self.start_step:
            for s in (self._theta0, self._mu, self._out):
                s.copy_from_live_()
            self._ema_init_weight = self.init_weight = 1.0
            return
        t = self.step - self.start_step
        if t % self.update_every:
            return
        beta, alpha = self.weights(t)
        self._mu.average_(beta)
        self._ema_init_weight *= 1.0 - beta
        self.init_weight = self._ema_init_weight - alpha
        for go, gm, g0 in zip(
            self._out.averaged, self._mu.averaged, self._theta0.averaged, strict=True
        ):
            live = live_on_shadow_device(gm, self._mu.foreach)
            torch._foreach_copy_(go.views, gm.views)
            torch._foreach_add_(go.views, live, alpha=alpha)
            torch._foreach_add_(go.views, g0.views, alpha=-alpha)
        self._out.copy_copied_()

    @property
    def shadow(self) -> dict[str, Tensor]:
        r"""The corrected average :math:`\hat\theta` by canonical name."""
        return self._out.state()

    @property
    def ema(self) -> dict[str, Tensor]:
        r"""The uncorrected EMA :math:`\mu` by canonical name."""
        return self._mu.state()

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """A model state dict (canonical names, model dtype/device) of the corrected average."""
        out = {}
        for key, value in unwrap(self.model).state_dict().items():
            name = canonical_name(key)
            src = self._out.tensors.get(name, value)
            out[name] = src.to(value.device, value.dtype, copy=True)
        return out

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """Evaluate with the corrected average swapped in; restored on exit."""
        record = self._out.swap_in()
        try:
            yield self.model
        finally:
            self._out.swap_out(record)
