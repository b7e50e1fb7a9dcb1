"""Methods compared by the forgetting benchmark, behind one small protocol.

A method watches a fine-tuning run from the pre-trained weights and, at the
end, names the weights to evaluate. Methods that only read the model ride
along on one shared run; methods that change training (a penalty, writing into
the weights) get their own run with the same data order.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from emaweights.ema import EMA, Anchor
from emaweights.schedules import Warmup

__all__ = ["ALPHAS", "DECAYS", "EMAMethod", "Method", "default_methods", "matched_decays"]


@runtime_checkable
class Method(Protocol):
    """What the benchmark runner needs from a method.

    Attributes:
        name: unique label in tables and plots.
        family: the kind of method (``"ema"``, ``"ema-debiased"``, ``"swa"``, ...).
        changes_training: ``True`` if the method alters the training run
            (it then gets a run of its own); ``False`` if it only reads it.
    """

    name: str
    family: str
    changes_training: bool

    def start(self, model: nn.Module) -> None:
        """Called once with the model at the pre-trained weights."""

    def penalty(self, model: nn.Module) -> Tensor | None:
        """An extra loss term added before ``backward`` (``None``: none)."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step (``step`` is 1-based)."""

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        """Called after the last step of each epoch (1-based)."""

    def result(self, model: nn.Module) -> dict[str, Tensor]:
        """The state dict to evaluate at the end of fine-tuning."""

    def w0(self) -> float | None:
        """Weight the result puts on the pre-trained weights, if defined."""


class EMAMethod:
    r"""An :class:`~emaweights.EMA` started at the pre-trained weights.

    Args:
        decay: constant decay, or ``None`` with ``warmup`` set.
        anchor: ``"init"`` keeps the weight :math:`\beta^T` on the
            pre-trained weights; ``"debiased"`` removes it.
        warmup: use the :class:`~emaweights.schedules.Warmup` schedule
            ``min(decay, (1+t)/(10+t))``.
        grid: a candidate of the grid matched to the interpolation's α grid
            (family ``"ema-grid"``; the summary shows only the one chosen on val).
    """

    changes_training = False

    def __init__(
        self, decay: float, anchor: Anchor = "init", warmup: bool = False, grid: bool = False
    ) -> None:
        self.decay, self.anchor, self.warmup = decay, anchor, warmup
        if grid:  # a candidate of the w0-matched grid: chosen on val, not a row of its own
            self.name, self.family = f"ema-grid β={decay:.8g}", "ema-grid"
        elif warmup:
            self.name, self.family = f"warmup-ema β={decay}", "warmup-ema"
        elif anchor == "debiased":
            self.name, self.family = f"ema-debiased β={decay}", "ema-debiased"
        else:
            self.name, self.family = f"ema β={decay}", "ema"
        self._ema: EMA | None = None

    def start(self, model: nn.Module) -> None:
        """Start the average at the pre-trained weights."""
        schedule = Warmup(self.decay) if self.warmup else self.decay
        self._ema = EMA(model, schedule, anchor=self.anchor)

    def penalty(self, model: nn.Module) -> Tensor | None:
        """No penalty: the EMA only reads the run."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """Fold the new weights into the average."""
        self._require().update(step=step)

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        """Nothing at epoch ends."""

    def result(self, model: nn.Module) -> dict[str, Tensor]:
        """The averaged weights as a model state dict."""
        return self._require().averaged_state_dict()

    def w0(self) -> float | None:
        r""":math:`\prod_t \beta_t` (anchored, warm-up included); 0 when debiased."""
        ema = self._require()
        return ema.init_weight if self.anchor == "init" else 0.0

    def _require(self) -> EMA:
        if self._ema is None:
            raise RuntimeError(f"{self.name}: start() was not called")
        return self._ema


DECAYS = (0.9, 0.99, 0.995, 0.998, 0.999, 0.9995)


ALPHAS = tuple(i / 20 for i in range(21))
"""The interpolation grid of :class:`~emaweights.bench.runner.Config` (its default)."""


def matched_decays(total_steps: int, alphas: tuple[float, ...] = ALPHAS) -> list[float]:
    r"""Decays whose anchored :math:`w_0 = \beta^T` equal :math:`1-\alpha` for the interior α.

    Raises:
        ValueError: ``total_steps`` is below 1.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return [(1 - a) ** (1 / total_steps) for a in alphas if 0 < a < 1]


def default_methods(
    steps_per_epoch: int, total_steps: int, decays: tuple[float, ...] = DECAYS
) -> list[Method]:
    r"""The methods the demo compares, for a fine-tuning run of ``total_steps`` steps.

    Anchored and debiased EMAs at each decay, plus a warm-up EMA at the largest,
    and anchored EMAs on the grid matched to the interpolation's α grid
    (:func:`matched_decays`; the summary keeps the one chosen on val).
    The default decays put :math:`w_0 = \beta^T` between about 0 and 0.84 at
    :math:`T = 340`. Then the averaging family
    (:func:`~emaweights.bench.methods_family.family_methods`):
    SWA, LAWA, post-hoc EMA, BEMA, Switch-EMA, pull-back and L2-SP.

    Args:
        steps_per_epoch: optimizer steps per fine-tuning epoch.
        total_steps: optimizer steps of the whole fine-tuning run.
        decays: the constant decays.

    Raises:
        ValueError: a step count is below 1.
    """
    if steps_per_epoch < 1 or total_steps < 1:
        raise ValueError(
            f"step counts must be >= 1, got steps_per_epoch={steps_per_epoch}, "
            f"total_steps={total_steps}"
        )
    # Imported here: the family module builds on this one's protocol.
    from emaweights.bench.methods_family import family_methods

    methods: list[Method] = [EMAMethod(d) for d in decays]
    methods += [EMAMethod(d, anchor="debiased") for d in decays]
    methods.append(EMAMethod(max(decays), warmup=True))
    methods += [EMAMethod(d, grid=True) for d in matched_decays(total_steps)]
    methods += family_methods(steps_per_epoch, total_steps)
    return methods


def state_of(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of a model's state dict."""
    with torch.no_grad():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
