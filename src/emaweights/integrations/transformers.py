r"""Hugging Face ``Trainer`` callback: an EMA of the model's weights.

.. math::
    \bar\theta_t = \beta_t\,\bar\theta_{t-1} + (1 - \beta_t)\,\theta_t
    \quad\text{after every optimizer step } t

Usage::

    from emaweights.integrations.transformers import EMACallback

    ema_cb = EMACallback(decay=0.999, save_averaged_to="out/averaged")
    trainer = Trainer(model, args, train_dataset=..., eval_dataset=..., callbacks=[ema_cb])
    trainer.train()                              # or train(resume_from_checkpoint=True)
    with ema_cb.ema.applied():                   # evaluate the average by hand
        trainer.evaluate()

What it guarantees:

* **One update per optimizer step**: ``on_step_end`` fires once per
  optimizer step (``on_substep_end`` for the other micro-batches), and the
  step number is ``state.global_step``.
* **Evaluation with the average**: when the Trainer is about to evaluate
  (``control.should_evaluate`` after a step or an epoch, or
  ``eval_on_start``) the averaged weights are swapped in by pointer, and put
  back in ``on_evaluate``, before any checkpoint is written, so checkpoints
  always hold the live weights.
* **Resume**: on every save the EMA state goes into the ``checkpoint-N``
  folder as ``emaweights_ema.pt`` (atomic, loaded with ``weights_only``).
  On ``train(resume_from_checkpoint=...)`` it is loaded back, so the resumed
  average equals an uninterrupted one.
* **Final export**: ``save_averaged_to`` writes the averaged model with
  ``save_pretrained`` when training ends (for a PEFT model: the averaged
  adapters, in the adapter's own format).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from emaweights._naming import unwrap
from emaweights.averager import check_bool
from emaweights.integrations._adapter import (
    AveragerFactory,
    Evaluation,
    ema_factory,
    stats_to_log,
)
from emaweights.integrations._require import require
from emaweights.io import load_state, save_state
from emaweights.schedules import Schedule

__all__ = ["STATE_FILE", "EMACallback", "save_pretrained_averaged"]

_TrainerCallback: Any = require("transformers", "transformers").TrainerCallback

#: File name of the EMA state inside a ``checkpoint-N`` folder.
STATE_FILE = "emaweights_ema.pt"


class EMACallback(_TrainerCallback):  # type: ignore[misc]
    """Keep an averager (an :class:`~emaweights.EMA` by default) of the Trainer's model.

    Args:
        decay: constant decay or :class:`~emaweights.schedules.Schedule` of the
            default EMA (0.999 when omitted).
        averager: instead of an EMA, a callable ``model -> averager`` for any
            averager of the protocol (``decay`` and options then go to it).
        evaluate: run the Trainer's scheduled evaluations with the averaged weights.
        save_averaged_to: folder to write the averaged model to at the end of
            training (``save_pretrained`` format); ``None`` to skip.
        resume_from: checkpoint folder to read the EMA state from on resume,
            when it is not ``<output_dir>/checkpoint-<global_step>``.
        state_file: the state's file name in a checkpoint folder (give two
            callbacks two names).
        log_stats: at every Trainer log, add the averager's
            :meth:`~emaweights.averager.Averager.stats` as ``ema/<key>`` to the
            logs (seen by the callbacks after this one) and to
            ``state.log_history``.
        log_drift: also add the drift norm (one host sync per log).
        **ema_options: passed to :class:`~emaweights.EMA` (``update_every``,
            ``start_step``, ``anchor``, ``dtype``, ``device``,
            ``include_frozen``, ``exclude``, ``buffers``, ``foreach``),
            checked here: a misspelt option or a value out of range raises
            at construction.

    Attributes:
        averager: the averager, created when training begins (``ema``: the
            same object).

    Raises:
        TypeError: an unknown option.
        ValueError: an option value out of range.

    """

    def __init__(
        self,
        decay: float | Schedule | None = None,
        *,
        averager: AveragerFactory | None = None,
        evaluate: bool = True,
        save_averaged_to: str | os.PathLike[str] | None = None,
        resume_from: str | os.PathLike[str] | None = None,
        state_file: str = STATE_FILE,
        log_stats: bool = False,
        log_drift: bool = False,
        **ema_options: Any,
    ) -> None:
        for flag, value in (
            ("evaluate", evaluate),
            ("log_stats", log_stats),
            ("log_drift", log_drift),
        ):
            check_bool(value, flag)
        self._factory = ema_factory("EMACallback", decay, averager, ema_options)
        self.log_stats, self.log_drift = log_stats or log_drift, log_drift
        self.state_file = state_file
        self.decay = decay
        self.evaluate = evaluate
        self.save_averaged_to = save_averaged_to
        self.resume_from = resume_from
        self.ema_options = ema_options
        self.averager: Any = None
        self._offset = 0  # optimizer steps taken before the EMA existed
        self._last_step = 0  # the last global step folded in (never twice)
        self._evaluation = Evaluation()  # only undoes a swap this callback made

    @property
    def ema(self) -> Any:
        """The averager (the name kept from when it could only be an EMA)."""
        return self.averager

    def should_update(self, step: int | None = None, epoch: int | None = None) -> bool:
        """Whether to fold the weights in now; override to choose when.

        Called after every optimizer step with ``step`` (``state.global_step``)
        and at every epoch end with ``epoch`` (zero-based), the other argument
        ``None``. The default updates after every optimizer step.
        """
        return step is not None

    # -- start and resume --------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Create the EMA on the (possibly just restored) model; load its state on resume."""
        model = kwargs["model"]
        self.averager = self._factory(model)
        self._offset = self._last_step = 0
        if state.global_step > 0:
            self._resume(args, state)
        if self.evaluate and args.eval_on_start:
            self._apply()

    def _resume(self, args: Any, state: Any) -> None:
        assert self.averager is not None  # internal invariant
        folders = [self.resume_from, getattr(args, "resume_from_checkpoint", None)]
        folders.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for folder in folders:
            if folder is not None and isinstance(folder, (str, os.PathLike)):
                path = Path(folder) / self.state_file
                if path.is_file():
                    self.averager.load_state_dict(load_state(path))
                    self._last_step = state.global_step
                    return
        self._offset = self._last_step = state.global_step
        warnings.warn(
            f"resuming at step {state.global_step} without an EMA state (looked for "
            f"{self.state_file} "
            f"in {[str(f) for f in folders if f]}); the average restarts from the current "
            "weights. Pass EMACallback(resume_from=<checkpoint folder>) if it is elsewhere.",
            stacklevel=2,
        )

    # -- updates -----------------------------------------------------------

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Update after the optimizer step; swap the average in if evaluation follows."""
        if self.averager is None:
            return
        if state.global_step > self._last_step and self.should_update(step=state.global_step):
            self._update(state)
        if self.evaluate and control.should_evaluate:
            self._apply()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Update if :meth:`should_update` asks; swap the average in if evaluation follows."""
        epoch = max(round(state.epoch or 0) - 1, 0)
        due = self.averager is not None and state.global_step > self._last_step
        if due and self.should_update(epoch=epoch):
            self._update(state)
        if self.evaluate and control.should_evaluate:
            self._apply()

    # -- evaluation --------------------------------------------------------

    def _update(self, state: Any) -> None:
        self.averager.update(step=state.global_step - self._offset)
        self._last_step = state.global_step

    def _apply(self) -> None:
        if self.averager is not None:
            self._evaluation.enter(self.averager)

    def _restore(self) -> None:
        self._evaluation.exit()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Add the averager's stats to the logs (``log_stats``)."""
        if not self.log_stats or self.averager is None or logs is None:
            return
        stats = stats_to_log(self.averager, "ema", drift=self.log_drift, host=True)
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Put the live weights back once the evaluation is done."""
        self._restore()

    # -- checkpoints and the end -------------------------------------------

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the EMA state into the checkpoint folder the Trainer just wrote."""
        self._restore()  # defensive: evaluation already restored before any save
        if self.averager is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_state(self.averager.state_dict(), folder / self.state_file)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Put the live weights back; write the averaged model if asked."""
        self._restore()
        if self.averager is None or self.save_averaged_to is None:
            return
        if state.is_world_process_zero:
            save_pretrained_averaged(self.averager, self.save_averaged_to)


def save_pretrained_averaged(ema: Any, path: str | os.PathLike[str]) -> None:
    """Write the EMA's model with the averaged weights in ``save_pretrained`` format.

    The averaged weights are passed as ``state_dict`` (owned copies, so the
    live model is untouched and no shared-storage views reach the writer).
    A PEFT model writes only its (averaged) adapters, in PEFT's format; a
    plain ``nn.Module`` without ``save_pretrained`` gets
    ``model.safetensors`` (see :func:`emaweights.export.save_averaged`).
    """
    save_pretrained = getattr(unwrap(ema.model), "save_pretrained", None)
    if callable(save_pretrained):
        save_pretrained(str(path), state_dict=ema.averaged_state_dict())
    else:
        from emaweights.export import save_averaged

        save_averaged(ema, Path(path) / "model.safetensors")
