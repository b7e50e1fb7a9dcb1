r"""Switch-EMA: copy the EMA back into the live weights every ``switch_every`` steps.

Every update is an ordinary EMA step (:func:`~emaweights.ema.ema_weight`, the
storage's ``lerp_`` kernels); at each switch point the live weights are
replaced by the average,

.. math:: \theta_t \leftarrow \bar\theta_t \quad\text{if } t \bmod N = 0 ,

so training continues from the flatter averaged point (Li et al. 2024,
"Switch EMA: A Free Lunch for Better Flatness and Sharpness"). It changes the
training run; the optimizer's state (momentum) is kept as is. With an EMA started
at pre-trained weights each switch also pulls the live weights toward them by
the average's weight on :math:`\theta_0`.

:class:`SwitchEMA` is an :class:`~emaweights.averager.Averager` (clock, swap,
export and state are the base's); it supplies the EMA rule and the switch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from emaweights._naming import BufferPolicy
from emaweights._storage import StorageOptions
from emaweights.averager import Averager, NonFinitePolicy, positive_int
from emaweights.ema import Anchor, _parse_ema_fields, ema_weight
from emaweights.schedules import Schedule, as_schedule
from emaweights.shadow import Rounding

__all__ = ["SwitchEMA"]


class SwitchEMA(Averager):
    """An EMA that writes its average into the model every ``switch_every`` steps.

    Args:
        model: the model.
        decay: the EMA decay or schedule.
        switch_every: optimizer steps between switches (e.g. the steps per epoch).
        update_every, start_step, anchor, dtype, device, include_frozen, exclude,
            buffers, foreach, nonfinite, rounding, overlap, compiled: as for
            :class:`~emaweights.EMA`.

    Raises:
        ValueError: ``switch_every`` is not a positive int, or another argument
            is out of range (the message names the value).

    """

    FORMAT: ClassVar[str] = "emaweights.SwitchEMA"
    CLOCK_FIELDS: ClassVar[tuple[str, ...]] = ("init_weight",)

    def __init__(
        self,
        model: nn.Module,
        decay: float | Schedule = 0.999,
        *,
        switch_every: int = 1000,
        update_every: int = 1,
        start_step: int = 0,
        anchor: Anchor = "init",
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
        self.switch_every = positive_int(switch_every, "switch_every")
        self.schedule = as_schedule(decay)
        if anchor not in ("init", "debiased"):
            raise ValueError(f"anchor must be 'init' or 'debiased', got {anchor!r}")
        self.anchor: Anchor = anchor
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
        self.init_weight = 1.0  # P_T: weight of the starting weights in the average
        self.switches = 0

    def update(self, step: int | None = None) -> None:
        """EMA update; at multiples of ``switch_every`` copy the average into the model."""
        super().update(step)
        if self.step % self.switch_every == 0:
            self._copy_to()  # part of the method, not an evaluation: no early-average warning
            self.switches += 1

    # -- the rule ----------------------------------------------------------

    def _rule(self) -> None:
        since = self._last_step - self.start_step  # >= 0: the clock clamps jumps
        weight, self.init_weight = ema_weight(
            self.schedule, self.anchor, since, self.step - self._last_step, self.init_weight
        )
        self._last_step = self.step
        self._shadow.average_(weight)

    def _on_copy(self) -> None:
        super()._on_copy()
        self.init_weight = 1.0

    # -- checkpoints -------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.to_dict(),
            "switch_every": self.switch_every,
            "update_every": self.update_every,
            "start_step": self.start_step,
            "anchor": self.anchor,
            "nonfinite": self.nonfinite,
        }

    def _extra_state(self) -> dict[str, Any]:
        return {"init_weight": self.init_weight, "switches": self.switches}

    def _parse_extra(self, state: Mapping[str, Any], strict: bool) -> dict[str, Any]:
        parsed = _parse_ema_fields(state)
        saved = state["config"]
        parsed["config"]["switch_every"] = positive_int(
            saved.get("switch_every"), "saved switch_every"
        )
        parsed["switches"] = positive_int(state.get("switches"), "saved switches", minimum=0)
        return parsed

    def _commit_extra(self, parsed: Mapping[str, Any]) -> None:
        config = parsed["config"]
        self.schedule, self.init_weight = parsed["schedule"], parsed["init_weight"]
        self.update_every, self.start_step = config["update_every"], config["start_step"]
        self.anchor, self.nonfinite = config["anchor"], config["nonfinite"]
        self.switch_every, self.switches = config["switch_every"], parsed["switches"]

    def prepare_load(self, state: Mapping[str, Any], strict: bool = True) -> Callable[[], None]:
        """Validate ``state`` (also one saved by SwitchEMA before 0.2, in the EMA format)."""
        return super().prepare_load(self._from_ema_state(state), strict)

    def _from_ema_state(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        """A state saved before 0.2 (the EMA format, no switch fields), in this format.

        The average, clock and decay state carry over exactly; the switch
        interval is this averager's and the switch count is ``step // switch_every``
        (what :meth:`update` counts when called at every step).
        """
        if not isinstance(state, Mapping) or state.get("format") != "emaweights.EMA":
            return state
        config = state.get("config")
        step = state.get("step")
        if not isinstance(config, Mapping) or type(step) is not int:
            return state  # refused by the format check, naming the EMA format
        new = dict(state)
        new.update(format=self.FORMAT, version=self.VERSION, switches=step // self.switch_every)
        new["config"] = {**config, "switch_every": self.switch_every}
        return new

    def __repr__(self) -> str:
        return (
            f"SwitchEMA(schedule={self.schedule}, switch_every={self.switch_every}, "
            f"update_every={self.update_every}, start_step={self.start_step}, "
            f"anchor={self.anchor!r}, tensors={len(self._shadow.tensors)}, step={self.step})"
        )
