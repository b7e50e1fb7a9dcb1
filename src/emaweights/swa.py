r"""Uniform weight averaging (SWA; Izmailov et al. 2018).

"Averaging Weights Leads to Wider Optima and Better Generalization".

Every averaged point gets the same weight:

.. math:: \bar\theta_n = \frac{1}{n}\sum_{i=1}^{n}\theta_{t_i}
          = \bar\theta_{n-1} + \frac{1}{n}\,(\theta_{t_n} - \bar\theta_{n-1}) .

This is the power-function EMA with :math:`\gamma = 0`
(:class:`~emaweights.schedules.PowerFunction`), so :class:`SWA` is an
:class:`~emaweights.EMA` with that schedule: the points are chosen by
``update_every`` / ``start_step`` (``update_every=steps_per_epoch`` averages
epoch ends), and everything else (swap, state dict, export) is the EMA's.
The first averaged point replaces the starting weights: the result puts no
weight on :math:`\theta_0`.

Averaged weights change the statistics BatchNorm should see; recompute them
with :func:`update_bn` before evaluating.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from emaweights.ema import EMA
from emaweights.schedules import PowerFunction

__all__ = ["SWA", "update_bn"]


class SWA(EMA):
    """Equal-weight average of the weights at chosen optimizer steps.

    Call :meth:`update` after every optimizer step (with or without ``step``);
    the points averaged are the steps ``start_step + k * update_every``.

    Args:
        model: the model.
        update_every: average every this many optimizer steps (for epoch ends:
            the steps per epoch).
        start_step: first step counted; points before it are not averaged.
        **options: other :class:`~emaweights.EMA` options.

    """

    def __init__(
        self, model: nn.Module, *, update_every: int = 1, start_step: int = 0, **options: Any
    ) -> None:
        super().__init__(
            model, PowerFunction(0.0), update_every=update_every, start_step=start_step, **options
        )

    KEEP_BUFFERS = True  # update_bn inside applied() writes the statistics into the average

    def _weight(self) -> float:
        """Every averaged point weighs the same, whatever the step spacing or skips."""
        self._last_step = self.step
        self.init_weight = 0.0
        return 1.0 / (self.num_updates + 1)

    @property
    def n_averaged(self) -> int:
        """Points averaged so far."""
        return self.num_updates


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def update_bn(loader: Iterable[Any], model: nn.Module, device: torch.device | None = None) -> None:
    r"""Recompute the running statistics of every BatchNorm layer with one pass over ``loader``.

    The statistics are reset and accumulated as a plain mean over batches
    (``momentum=None``), in training mode; momenta and the training flag are
    restored afterwards. Batches may be tensors or tuples/lists whose first
    element is the input.

    Args:
        loader: an iterable of batches.
        model: the model, with the averaged weights in place (e.g. inside
            ``with swa.applied():``).
        device: move inputs here first (default: leave them).

    """
    layers = _bn_modules(model)
    if not layers:
        return
    momenta = {m: m.momentum for m in layers}
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    was_training = model.training
    model.train()
    try:
        for batch in loader:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device) if device is not None else x)
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        model.train(was_training)
