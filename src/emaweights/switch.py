r"""Switch-EMA: copy the EMA back into the live weights every ``switch_every`` steps.

Every update is an ordinary EMA step; at each switch point the live weights
are replaced by the average,

.. math:: \theta_t \leftarrow \bar\theta_t \quad\text{if } t \bmod N = 0 ,

so training continues from the flatter averaged point (Li et al. 2024,
"Switch EMA: A Free Lunch for Better Flatness and Sharpness"). It changes the
training run; the optimizer's state (momentum) is kept as is. With an EMA started
at pre-trained weights each switch also pulls the live weights toward them by
the average's weight on :math:`\theta_0`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from emaweights.ema import EMA
from emaweights.schedules import Schedule

__all__ = ["SwitchEMA"]


class SwitchEMA(EMA):
    """An :class:`~emaweights.EMA` writing its average into the model every ``switch_every`` steps.

    Args:
        model: the model.
        decay: the EMA decay or schedule.
        switch_every: optimizer steps between switches (e.g. the steps per epoch).
        **options: other :class:`~emaweights.EMA` options.

    Raises:
        ValueError: ``switch_every`` is not a positive int.

    """

    def __init__(
        self,
        model: nn.Module,
        decay: float | Schedule = 0.999,
        *,
        switch_every: int = 1000,
        **options: Any,
    ) -> None:
        if isinstance(switch_every, bool) or not isinstance(switch_every, int) or switch_every < 1:
            raise ValueError(f"switch_every must be an int >= 1, got {switch_every!r}")
        self.switch_every = switch_every
        self.switches = 0
        super().__init__(model, decay, **options)

    def update(self, step: int | None = None) -> None:
        """EMA update; at multiples of ``switch_every`` copy the average into the model."""
        super().update(step)
        if self.step % self.switch_every == 0:
            self._copy_to()  # part of the method, not an evaluation: no early-average warning
            self.switches += 1
