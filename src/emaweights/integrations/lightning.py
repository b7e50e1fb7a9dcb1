r"""Lightning callback: an EMA (or any averager) of the LightningModule's weights.

.. math::
    \bar\theta_t = \beta_t\,\bar\theta_{t-1} + (1 - \beta_t)\,\theta_t
    \quad\text{after every optimizer step } t

Usage::

    from emaweights.integrations.lightning import EMACallback

    trainer = L.Trainer(callbacks=[EMACallback(decay=0.999)], accumulate_grad_batches=4)
    trainer.fit(model)                # validation runs with the averaged weights
    ema = trainer.callbacks[0].averager   # an emaweights.EMA

    # any averager of the protocol, updated when should_update says so
    class EpochSWA(EMACallback):
        def should_update(self, step=None, epoch=None):
            return epoch is not None
    trainer = L.Trainer(callbacks=[EpochSWA(averager=lambda m: SWA(m))])

What it guarantees:

* **One update per optimizer step.** The step is read from
  ``trainer.global_step`` (optimizer steps taken), so under
  ``accumulate_grad_batches=k`` the average moves once per ``k`` batches, and
  the epoch's last, shorter accumulation window counts too.
* **Evaluation with the average.** Validation, test and predict run with the
  averaged weights swapped in (by pointer, no copy) and the live weights put
  back afterwards, also when the loop raises, and also under the
  ``torch.inference_mode`` that Lightning evaluates in (the swap itself runs
  outside it). One callback per Trainer evaluates; others may keep averages
  with ``evaluate=False``.
* **Checkpoints.** The averager state goes into the Lightning checkpoint
  (``callbacks`` section, under :attr:`EMACallback.state_key`) and is
  restored on ``ckpt_path=...``, so a resumed run equals an uninterrupted
  one. The checkpoint's ``state_dict`` is always the
  live weights, even when it is written while the average is swapped in.
* **DDP.** Every rank keeps the same average (the weights are identical
  after each synchronized step); rank 0 writes it into the checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from emaweights.averager import check_bool
from emaweights.integrations._adapter import (
    AveragerFactory,
    Evaluation,
    ema_factory,
    owned,
    stats_to_log,
)
from emaweights.integrations._require import require
from emaweights.schedules import Schedule

__all__ = ["EMACallback"]


def _callback_base() -> Any:
    """Lightning's ``Callback`` class, from ``lightning`` or ``pytorch_lightning``."""
    try:
        return importlib.import_module("lightning.pytorch").Callback
    except ImportError:
        with contextlib.suppress(ImportError):
            return importlib.import_module("pytorch_lightning").Callback
        return require("lightning.pytorch", "lightning").Callback  # raises, naming the extra


_Callback: Any = _callback_base()


class EMACallback(_Callback):  # type: ignore[misc]
    """Keep an averager of the LightningModule and evaluate with it.

    Args:
        decay: constant decay or :class:`~emaweights.schedules.Schedule` of the
            default :class:`~emaweights.EMA` (0.999 when omitted).
        averager: instead of an EMA, a callable ``model -> averager`` for any
            averager of the protocol, e.g. ``lambda m: SWA(m)`` or
            ``lambda m: MultiEMA(m, [0.99, 0.999])``; ``decay`` and the EMA
            options then go to it, not here.
        evaluate: run validation, test and predict with the averaged weights.
            At most one callback per Trainer may evaluate.
        name: names the callback's state in the checkpoint (needed when two
            callbacks would otherwise share :attr:`state_key`).
        log_stats: after every update, ``pl_module.log_dict`` the averager's
            :meth:`~emaweights.averager.Averager.stats` (``decay``, ``horizon``,
            ``init_weight``, ``step``, ``num_updates``) as ``<name or
            "ema">/<key>``.
        log_drift: also log the drift norm ``||theta - avg|| / ||avg||`` (a
            tensor: Lightning reads it when it logs).
        **ema_options: passed to :class:`~emaweights.EMA` (``update_every``,
            ``start_step``, ``anchor``, ``dtype``, ``device``,
            ``include_frozen``, ``exclude``, ``buffers``, ``foreach`` ...),
            checked here: a misspelt option or a value out of range raises
            at construction.

    Attributes:
        averager: the averager, created when fitting starts (``None`` before).

    Raises:
        TypeError: an unknown option, or ``log_live`` (removed).
        ValueError: an option value out of range.

    """

    def __init__(
        self,
        decay: float | Schedule | None = None,
        *,
        averager: AveragerFactory | None = None,
        evaluate: bool = True,
        name: str | None = None,
        log_stats: bool = False,
        log_drift: bool = False,
        **ema_options: Any,
    ) -> None:
        super().__init__()
        if "log_live" in ema_options or "live_prefix" in ema_options:
            raise TypeError(
                "log_live was removed: re-running validation_step with the live weights mixed "
                "both weights in shared torchmetrics objects. Validate the live weights with "
                "a separate trainer.validate(...) while callback.evaluate is False"
            )
        for flag, value in (
            ("evaluate", evaluate),
            ("log_stats", log_stats),
            ("log_drift", log_drift),
        ):
            check_bool(value, flag)
        self._factory = ema_factory("EMACallback", decay, averager, ema_options)
        self.log_stats, self.log_drift = log_stats or log_drift, log_drift
        self.decay = decay
        self.evaluate = evaluate
        self.name = name
        self.ema_options = ema_options
        self._described = averager
        self.averager: Any = None
        # Optimizer steps taken before the averager existed (a callback added to a
        # resumed run without its state): averager step = global_step - offset.
        self._offset = 0
        self._last_step = 0  # the last global step folded in (never twice)
        self._fresh = False
        self._pending: dict[str, Any] | None = None
        self._evaluation = Evaluation()

    @property
    def ema(self) -> Any:
        """The averager (the name kept from when it could only be an EMA)."""
        return self.averager

    @property
    def state_key(self) -> str:
        """Key of this callback's state in the checkpoint, e.g. ``EMACallback[decay=0.999]``.

        It is ``EMACallback[<name>]`` with ``name``; otherwise it names the
        decay and the averaging options (or the averager factory), so several
        callbacks (say, two decays) keep separate states; ``device`` and
        ``foreach`` are left out, as they may change between a run and its resume.
        """
        if self.name is not None:
            return f"EMACallback[{self.name}]"
        if self._described is not None:
            factory = self._described
            return f"EMACallback[averager={getattr(factory, '__qualname__', repr(factory))}]"
        options = {k: v for k, v in self.ema_options.items() if k not in ("device", "foreach")}
        decay = 0.999 if self.decay is None else self.decay
        described = [f"decay={decay!r}"] + [f"{k}={options[k]!r}" for k in sorted(options)]
        return f"EMACallback[{', '.join(described)}]"

    def should_update(self, step: int | None = None, epoch: int | None = None) -> bool:
        """Whether to fold the weights in now; override to choose when.

        Called after every optimizer step with ``step`` (optimizer steps taken,
        ``trainer.global_step``) and at the end of every training epoch with
        ``epoch`` (zero-based), the other argument ``None``. The default
        updates after every optimizer step. A step is never folded in twice.
        """
        return step is not None

    # -- creation ----------------------------------------------------------

    def _ensure(self, pl_module: Any) -> Any:
        """Create the averager on the module's current weights, loading any restored state."""
        if self.averager is None:
            with torch.inference_mode(False):  # never make the shadow of inference tensors
                self.averager = self._factory(pl_module)
                self._fresh = self._pending is None
                if self._pending is not None:
                    self._load(self._pending)
                    self._pending = None
        return self.averager

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse two evaluating callbacks or two callbacks with one state key."""
        ours = [c for c in trainer.callbacks if isinstance(c, EMACallback)]
        evaluating = [c.state_key for c in ours if c.evaluate]
        if len(evaluating) > 1:
            raise ValueError(
                f"{len(evaluating)} EMACallbacks evaluate ({evaluating}): the model can hold "
                "one average at a time; pass evaluate=False to all but one"
            )
        keys = [c.state_key for c in ours]
        if len(set(keys)) < len(keys):
            raise ValueError(f"EMACallbacks share a state key {keys}: give each a name=")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Create the averager once the strategy has moved and wrapped the model."""
        self._ensure(pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Align the average with the Trainer's step count (known only now).

        A fresh average starts at the restored step; an average that a new Trainer
        fits on (its count restarts at 0) goes on counting from its own step.
        """
        if self._fresh:
            self._offset, self._fresh = trainer.global_step, False
            self._last_step = trainer.global_step
            if self._offset > 0:
                warnings.warn(
                    f"resuming at optimizer step {self._offset} without averager state for "
                    f"{self.state_key} in the checkpoint; the average starts from the "
                    "restored weights",
                    stacklevel=2,
                )
        elif self.averager is not None and trainer.global_step < self._last_step:
            # A new Trainer fitting on (no checkpoint) counts from 0 again: without
            # this, every step up to the old count would be taken for one seen already.
            self._offset = trainer.global_step - self.averager.step
            self._last_step = trainer.global_step

    # -- updates -----------------------------------------------------------

    def _update(self, trainer: Any, pl_module: Any) -> None:
        averager = self._ensure(pl_module)
        averager.update(step=trainer.global_step - self._offset)
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update after a batch that ended with an optimizer step (not every micro-batch)."""
        step = trainer.global_step
        if step > self._last_step and self.should_update(step=step):
            self._update(trainer, pl_module)
            if self.log_stats:
                prefix = self.name or "ema"
                stats = stats_to_log(self.averager, prefix, drift=self.log_drift)
                if stats:
                    pl_module.log_dict(stats, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Update at the epoch end if :meth:`should_update` asks and this step is not in yet."""
        if trainer.global_step > self._last_step and self.should_update(
            epoch=trainer.current_epoch
        ):
            self._update(trainer, pl_module)

    # -- evaluation --------------------------------------------------------

    def _apply(self, pl_module: Any) -> None:
        if self.averager is None and self._pending is not None:
            self._ensure(pl_module)  # evaluating a checkpoint outside fit
        if self.evaluate and self.averager is not None:
            self._evaluation.enter(self.averager)

    def _restore(self) -> None:
        self._evaluation.exit()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """Swap the averaged weights in for validation."""
        self._apply(pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Put the live weights back (before checkpoint callbacks, which run last)."""
        self._restore()

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        """Swap the averaged weights in for testing."""
        self._apply(pl_module)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        """Put the live weights back."""
        self._restore()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        """Swap the averaged weights in for prediction."""
        self._apply(pl_module)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        """Put the live weights back."""
        self._restore()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Never leave the averaged weights in the model after a crash."""
        self._restore()

    # -- checkpoints -------------------------------------------------------

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """If the average is swapped in right now, store the live weights as the model's."""
        if not self._evaluation.active:
            return
        self._restore()
        try:
            # Owned copies: swapping back in below re-points the parameters.
            live = trainer.strategy.lightning_module_state_dict()
            checkpoint["state_dict"] = owned(live)
        finally:
            self._evaluation.enter(self.averager)

    def state_dict(self) -> dict[str, Any]:
        """The averager state, saved in the Lightning checkpoint (tensors and plain data only)."""
        if self.averager is None:
            return dict(self._pending) if self._pending is not None else {}
        # Owned copies: the averager keeps changing in place, and checkpoint IO may
        # be asynchronous.
        return {
            "averager": owned(self.averager.state_dict()),
            "offset": self._offset,
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the averager state (applied once the averager exists: now or at fit start)."""
        if not state_dict:
            return
        if self.averager is None:
            self._pending = state_dict
        else:
            self._load(state_dict)

    def _load(self, state: dict[str, Any]) -> None:
        inner = state.get("averager", state.get("ema"))  # "ema": checkpoints of 0.1
        if not isinstance(inner, Mapping):
            raise ValueError(f"not an EMACallback state: keys {sorted(state)}")
        self.averager.load_state_dict(inner)
        self._offset = int(state.get("offset", 0))
        self._last_step = int(state.get("last_step", self._offset + self.averager.step))
        self._fresh = False
