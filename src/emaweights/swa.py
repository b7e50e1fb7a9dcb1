r"""Uniform weight averaging (SWA; Izmailov et al. 2018).

"Averaging Weights Leads to Wider Optima and Better Generalization".

Every averaged point gets the same weight, whatever the step spacing between
the points or the updates skipped for non-finite weights:

.. math:: \bar\theta_n = \frac{1}{n}\sum_{i=1}^{n}\theta_{t_i}
          = \bar\theta_{n-1} + \frac{1}{n}\,(\theta_{t_n} - \bar\theta_{n-1}) .

:class:`SWA` is an :class:`~emaweights.averager.Averager`: the points are
chosen by the shared clock (``update_every`` / ``start_step``;
``update_every=steps_per_epoch`` averages epoch ends), swapping, export and
state are the base's, and the rule is the in-place step above with the weight
:func:`swa_weight` (the storage's ``lerp_`` kernels of
:mod:`emaweights.functional`). The first averaged point replaces the starting
weights: the result puts no weight on :math:`\theta_0`.

Averaged weights change the statistics BatchNorm should see; recompute them
with :func:`update_bn` inside ``with swa.applied() as m:``: the recomputed
buffers are written into the average (and so reach the export and the state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from emaweights._naming import BufferPolicy
from emaweights._storage import StorageOptions
from emaweights.averager import Averager, NonFinitePolicy, _short, parse_clock
from emaweights.shadow import Rounding

__all__ = ["SWA", "swa_weight", "update_bn"]


def swa_weight(num_averaged: int) -> float:
    r"""New-value weight of the next SWA point: :math:`1/(n+1)` after :math:`n` points."""
    return 1.0 / (num_averaged + 1)


class SWA(Averager):
    """Equal-weight average of the weights at chosen optimizer steps.

    Call :meth:`update` after every optimizer step (with or without ``step``);
    the points averaged are the steps ``start_step + k * update_every``.

    Args:
        model: the model.
        update_every: average every this many optimizer steps (for epoch ends:
            the steps per epoch).
        start_step: first step counted; points before it are not averaged.
        dtype, device, include_frozen, exclude, buffers, foreach, nonfinite,
            rounding, overlap, compiled: as for :class:`~emaweights.EMA`.

    Raises:
        ValueError: an argument is out of range (the message names the value).

    """

    FORMAT: ClassVar[str] = "emaweights.SWA"
    KEEP_BUFFERS = True  # update_bn inside applied() writes the statistics into the average

    def __init__(
        self,
        model: nn.Module,
        *,
        update_every: int = 1,
        start_step: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        include_frozen: bool = False,
        exclude: Sequence[str] = (),
        buffers: BufferPolicy = "average",
        foreach: bool | None = None,
        nonfinite: NonFinitePolicy = "check",
        rounding: Rounding = "nearest",
        overlap: bool = False,
        compiled: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._init_clock(update_every=update_every, start_step=start_step, nonfinite=nonfinite)
        self.model = model
        self._storage_options = StorageOptions(
            dtype, device, include_frozen, exclude, buffers, foreach, rounding, overlap, compiled
        )
        self._options = self._storage_options.selection()
        self.register()

    def register(self) -> None:
        """(Re)start the average from the model's current weights (and zero the counters)."""
        self._refuse_while_applied("register")
        self._shadow = self._storage_options.build(self.model)
        self._reset_clock()

    @property
    def n_averaged(self) -> int:
        """Points averaged so far."""
        return self.num_updates

    def _rule(self) -> None:
        # Counted in points, not steps: spacing and skipped points change nothing.
        self._shadow.average_(swa_weight(self.num_updates))
        self._last_step = self.step

    # -- checkpoints -------------------------------------------------------

    def _parse_extra(self, state: Mapping[str, Any], strict: bool) -> dict[str, Any]:
        return {"config": parse_clock(state["config"])}

    def _commit_extra(self, parsed: Mapping[str, Any]) -> None:
        config = parsed["config"]
        self.update_every, self.start_step = config["update_every"], config["start_step"]
        self.nonfinite = config["nonfinite"]

    def prepare_load(self, state: Mapping[str, Any], strict: bool = True) -> Callable[[], None]:
        """Validate ``state`` (also one saved by SWA before 0.2, in the EMA format)."""
        return super().prepare_load(_from_ema_state(state), strict)

    def __repr__(self) -> str:
        return (
            f"SWA(update_every={self.update_every}, start_step={self.start_step}, "
            f"tensors={len(self._shadow.tensors)}, n_averaged={self.n_averaged}, "
            f"step={self.step})"
        )


def _from_ema_state(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """An SWA state saved in the EMA format (before 0.2), in the SWA format; others unchanged.

    SWA was an EMA with the power-function schedule of gamma 0; its average,
    clock and counters carry over exactly. Any other EMA state is refused.
    """
    if not isinstance(state, Mapping) or state.get("format") != "emaweights.EMA":
        return state
    config = state.get("config")
    if not isinstance(config, Mapping):
        return state  # refused by the format check, naming the EMA format
    schedule = config.get("schedule")
    if not (
        isinstance(schedule, Mapping)
        and schedule.get("kind") == "power_function"
        and schedule.get("gamma") == 0.0
    ):
        raise ValueError(
            "not an emaweights SWA state: an EMA state with the schedule "
            f"{_short(schedule)} (an SWA state saved before 0.2 has "
            "{'kind': 'power_function', 'gamma': 0.0})"
        )
    new = {k: v for k, v in state.items() if k not in ("init_weight", "config")}
    new.update(format=SWA.FORMAT, version=SWA.VERSION)
    new["config"] = {k: v for k, v in config.items() if k not in ("schedule", "anchor")}
    return new


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
