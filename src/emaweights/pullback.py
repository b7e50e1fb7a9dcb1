r"""Periodic pull-back toward reference weights (Kleiman et al. 2025, SFA).

"Soup to go: mitigating forgetting during continual learning with model averaging".

Every ``every`` optimizer steps (the paper's :math:`pT`), the live weights are
merged with the reference :math:`\theta_o` (the pre-trained weights):

.. math:: \theta_t \leftarrow (1 - \beta)\,\theta_t + \beta\,\theta_o .

Pulling back repeatedly during training acts like an L2 penalty toward
:math:`\theta_o` without computing one; ``beta`` sets the strength and
``every`` how often (``every = T`` is a single merge at the end, which is
WiSE-FT). It changes the training run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from emaweights import functional as F
from emaweights._naming import collect
from emaweights.shadow import Shadow

__all__ = ["PullBack"]


class PullBack:
    r"""Merge the live weights with their starting values every ``every`` steps.

    Args:
        model: the model, at the reference weights :math:`\theta_o` when created.
        every: optimizer steps between merges.
        beta: weight of the reference in each merge, in [0, 1].
        device: where the reference copy lives (``"cpu"`` spares accelerator memory).
        include_frozen, exclude: which parameters (frozen ones never move anyway).

    Raises:
        ValueError: ``every`` or ``beta`` out of range.

    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int,
        beta: float = 0.5,
        device: torch.device | str | None = None,
        include_frozen: bool = False,
        exclude: Sequence[str] = (),
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {beta!r}")
        self.every, self.beta = every, float(beta)
        entries = collect(
            model, include_frozen=include_frozen, exclude=tuple(exclude), buffers="ignore"
        )
        self._ref = Shadow(entries, device=torch.device(device) if device is not None else None)
        self.step = 0
        self.merges = 0

    @torch.no_grad()
    def pull(self) -> None:
        r"""Merge now: :math:`\theta \leftarrow (1-\beta)\theta + \beta\theta_o`."""
        for g in self._ref.averaged:
            live = g.live()
            ref = g.views if g.staging is None else [v.to(g.live_device) for v in g.views]
            F.lerp_(live, ref, self.beta)
        self.merges += 1

    def update(self, step: int | None = None) -> None:
        """Call after ``optimizer.step()``; merges at multiples of ``every``."""
        self.step = self.step + 1 if step is None else step
        if self.step % self.every == 0:
            self.pull()
