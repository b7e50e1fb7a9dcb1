r"""Periodic pull-back toward reference weights (Kleiman et al. 2025, SFA).

"Soup to go: mitigating forgetting during continual learning with model averaging".

Every ``update_every`` optimizer steps (the paper's :math:`pT`), the live
weights are merged with the reference :math:`\theta_o` (the weights at
``start_step``, by default those at creation: the pre-trained weights), with
the reference weight :math:`\lambda` (``reference_weight``):

.. math:: \theta_t \leftarrow (1 - \lambda)\,\theta_t + \lambda\,\theta_o .

Pulling back repeatedly during training acts like an L2 penalty toward
:math:`\theta_o` without computing one; ``reference_weight`` sets the strength
and ``update_every`` how often (``update_every = T`` is a single merge at the
end, which is WiSE-FT). It changes the training run: the live model is the
result. The averager's storage is the reference, so :meth:`PullBack.applied`
evaluates the reference weights and :meth:`PullBack.averaged_state_dict`
exports them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from emaweights import functional as F
from emaweights._naming import collect
from emaweights.averager import Averager, NonFinitePolicy, _short, parse_clock
from emaweights.shadow import Shadow

__all__ = ["PullBack"]


def _weight(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{what} must be a number in [0, 1], got {_short(value)}")
    return float(value)


class PullBack(Averager):
    r"""Merge the live weights with their reference values every ``update_every`` steps.

    Args:
        model: the model, at the reference weights :math:`\theta_o` when created
            (or at ``start_step``).
        update_every: optimizer steps between merges (the merges fall at
            ``start_step + k * update_every``).
        reference_weight: :math:`\lambda`, the weight of the reference in each
            merge, in [0, 1] (default 0.5).
        start_step: until this optimizer step the reference follows the live
            weights (it is the weights at this step).
        device: where the reference copy lives (``"cpu"`` spares accelerator memory).
        include_frozen, exclude: which parameters (frozen ones never move anyway).
        foreach: kernel choice (``None``: the fastest available).
        nonfinite: ``"check"``, ``"raise"`` or ``"skip"`` (skip the merge; see
            :class:`~emaweights.EMA`).
        every: deprecated name of ``update_every``.
        beta: deprecated name of ``reference_weight``.

    Raises:
        ValueError: an argument out of range (the message names the value).
        TypeError: ``update_every`` missing, or given with its old name too.

    """

    FORMAT: ClassVar[str] = "emaweights.PullBack"

    def __init__(
        self,
        model: nn.Module,
        *,
        update_every: int | None = None,
        reference_weight: float | None = None,
        start_step: int = 0,
        device: torch.device | str | None = None,
        include_frozen: bool = False,
        exclude: Sequence[str] = (),
        foreach: bool | None = None,
        nonfinite: NonFinitePolicy = "check",
        every: int | None = None,
        beta: float | None = None,
    ) -> None:
        steps = _renamed(every, "every", update_every, "update_every")
        if steps is None:
            raise TypeError("PullBack() missing the keyword argument 'update_every'")
        weight = _renamed(beta, "beta", reference_weight, "reference_weight")
        self.reference_weight = _weight(0.5 if weight is None else weight, "reference_weight")
        self._init_clock(update_every=steps, start_step=start_step, nonfinite=nonfinite)
        self.model = model
        self._options: dict[str, Any] = dict(
            include_frozen=include_frozen, exclude=tuple(exclude), buffers="ignore"
        )
        self._foreach = foreach
        self._shadow = Shadow(  # the reference theta_o
            collect(model, **self._options),
            device=torch.device(device) if device is not None else None,
            foreach=foreach,
        )

    @property
    def merges(self) -> int:
        """Merges done by :meth:`update` so far (its :attr:`num_updates`)."""
        return self.num_updates

    @torch.no_grad()
    def pull(self) -> None:
        r"""Merge now, outside the schedule (not counted in :attr:`merges`).

        :math:`\theta \leftarrow (1-\lambda)\,\theta + \lambda\,\theta_o`.

        Raises:
            SwapError: the reference is swapped into the model.
        """
        self._refuse_while_applied("pull")
        self._merge()

    def _rule(self) -> None:
        self._merge()
        self._last_step = self.step

    def _merge(self) -> None:
        for g in self._shadow.averaged:
            ref = g.views if g.staging is None else [v.to(g.live_device) for v in g.views]
            F.lerp_(g.live(), ref, self.reference_weight, foreach=self._foreach)

    # -- checkpoints -------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {"reference_weight": self.reference_weight, **super()._config()}

    def _parse_extra(self, state: Mapping[str, Any], strict: bool) -> dict[str, Any]:
        config = state["config"]
        weight = _weight(config.get("reference_weight"), "saved reference_weight")
        return {"config": {"reference_weight": weight, **parse_clock(config)}}

    def _commit_extra(self, parsed: Mapping[str, Any]) -> None:
        for k, v in parsed["config"].items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        return (
            f"PullBack(update_every={self.update_every}, "
            f"reference_weight={self.reference_weight}, start_step={self.start_step}, "
            f"step={self.step}, merges={self.merges})"
        )


def _renamed(old: Any, old_name: str, new: Any, new_name: str) -> Any:
    """The value of a renamed keyword: the new one, else the old one (with a warning), else None."""
    if old is None:
        return new
    if new is not None:
        raise TypeError(f"PullBack(): pass {new_name}= only, not also its old name {old_name}=")
    warnings.warn(
        f"PullBack({old_name}=) is deprecated; use {new_name}=", DeprecationWarning, stacklevel=3
    )
    return old
