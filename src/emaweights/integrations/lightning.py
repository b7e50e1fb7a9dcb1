r"""Lightning callback: an EMA of the LightningModule's weights.

.. math::
    \bar\theta_t = \beta_t\,\bar\theta_{t-1} + (1 - \beta_t)\,\theta_t
    \quad\text{after every optimizer step } t

Usage::

    from emaweights.integrations.lightning import EMACallback

    trainer = L.Trainer(callbacks=[EMACallback(decay=0.999)], accumulate_grad_batches=4)
    trainer.fit(model)                # validation runs with the averaged weights
    ema = trainer.callbacks[0].ema    # an emaweights.EMA

What it guarantees:

* **One update per optimizer step.** The step is read from
  ``trainer.global_step`` (optimizer steps taken), so under
  ``accumulate_grad_batches=k`` the average moves once per ``k`` batches, and
  the epoch's last, shorter accumulation window counts too.
* **Evaluation with the average.** Validation, test and predict run with the
  averaged weights swapped in (by pointer, no copy) and the live weights put
  back afterwards, also when the loop raises. ``log_live=True`` additionally
  runs each validation batch with the live weights, logging under ``live/``.
* **Checkpoints.** The EMA state goes into the Lightning checkpoint
  (``callbacks`` section) and is restored on ``ckpt_path=...``, so a resumed run
  equals an uninterrupted one. The checkpoint's ``state_dict`` is always the
  live weights, even when it is written while the average is swapped in.
* **DDP.** Every rank keeps the same average (the weights are identical
  after each synchronized step); rank 0 writes it into the checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from emaweights.ema import EMA
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
    """Keep an :class:`~emaweights.EMA` of the LightningModule and evaluate with it.

    Args:
        decay: constant decay or :class:`~emaweights.schedules.Schedule`.
        evaluate: run validation, test and predict with the averaged weights.
        log_live: with ``evaluate``, also run every validation batch with the
            live weights and log its metrics under ``live_prefix`` (costs a
            second forward pass per validation batch).
        live_prefix: prefix of the live weights' metric names.
        **ema_options: passed to :class:`~emaweights.EMA` (``update_every``,
            ``start_step``, ``anchor``, ``dtype``, ``device``,
            ``include_frozen``, ``exclude``, ``buffers``, ``foreach``).

    Attributes:
        ema: the :class:`~emaweights.EMA`, created when fitting starts
            (``None`` before).

    """

    def __init__(
        self,
        decay: float | Schedule = 0.999,
        *,
        evaluate: bool = True,
        log_live: bool = False,
        live_prefix: str = "live/",
        **ema_options: Any,
    ) -> None:
        super().__init__()
        if log_live and not evaluate:
            raise ValueError("log_live=True needs evaluate=True (the live weights are the default)")
        self.decay = decay
        self.evaluate = evaluate
        self.log_live = log_live
        self.live_prefix = live_prefix
        self.ema_options = ema_options
        self.ema: EMA | None = None
        # Optimizer steps taken before the EMA existed (a callback added to a resumed
        # run without EMA state): EMA step = global_step - offset.
        self._offset = 0
        self._fresh = False
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        """Key of this callback's state in the checkpoint, e.g. ``EMACallback[decay=0.999]``.

        It names the decay and the averaging options, so several callbacks
        (say, two decays) keep separate states; ``device`` and ``foreach`` are
        left out, as they may change between a run and its resume.
        """
        options = {k: v for k, v in self.ema_options.items() if k not in ("device", "foreach")}
        described = [f"decay={self.decay!r}"] + [f"{k}={options[k]!r}" for k in sorted(options)]
        return f"EMACallback[{', '.join(described)}]"

    # -- creation ----------------------------------------------------------

    def _ensure(self, pl_module: Any) -> EMA:
        """Create the EMA on the module's current weights, loading any restored state."""
        if self.ema is None:
            self.ema = EMA(pl_module, self.decay, **self.ema_options)
            self._fresh = self._pending is None
            if self._pending is not None:
                self._load(self._pending)
                self._pending = None
        return self.ema

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Create the EMA once the strategy has moved and wrapped the model."""
        self._ensure(pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Align a fresh average with the restored step count (known only now)."""
        if self._fresh:
            self._offset, self._fresh = trainer.global_step, False
            if self._offset > 0:
                warnings.warn(
                    f"resuming at optimizer step {self._offset} without EMA state for "
                    f"{self.state_key} in the checkpoint; the average starts from the "
                    "restored weights",
                    stacklevel=2,
                )

    # -- updates -----------------------------------------------------------

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update after a batch that ended with an optimizer step (not every micro-batch)."""
        ema = self._ensure(pl_module)
        step = trainer.global_step - self._offset
        if step > ema.step:
            ema.update(step=step)

    # -- evaluation --------------------------------------------------------

    def _apply(self, pl_module: Any) -> None:
        if self.ema is None and self._pending is not None:
            self._ensure(pl_module)  # evaluating a checkpoint outside fit
        if self.evaluate and self.ema is not None and not self.ema.is_applied:
            self.ema.apply_shadow()

    def _restore(self) -> None:
        if self.ema is not None and self.ema.is_applied:
            self.ema.restore()

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

    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """With ``log_live``: run the batch again with the live weights, logged under a prefix."""
        if not (self.log_live and self.ema is not None and self.ema.is_applied):
            return
        args: tuple[Any, ...] = (batch, batch_idx)
        if len(trainer.num_val_batches) > 1:
            args += (dataloader_idx,)
        self.ema.restore()
        try:
            with _prefixed_log(pl_module, self.live_prefix):
                pl_module.validation_step(*args)
        finally:
            self.ema.apply_shadow()

    # -- checkpoints -------------------------------------------------------

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """If the average is swapped in right now, store the live weights as the model's."""
        if self.ema is None or not self.ema.is_applied:
            return
        self.ema.restore()
        try:
            # The state dict references the live storage; swapping back in below
            # re-points the parameters, it does not write into that storage.
            checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()
        finally:
            self.ema.apply_shadow()

    def state_dict(self) -> dict[str, Any]:
        """The EMA state, saved in the Lightning checkpoint (tensors and plain data only)."""
        if self.ema is None:
            return dict(self._pending) if self._pending is not None else {}
        # Owned copies: the shadow keeps changing in place, and checkpoint IO may be
        # asynchronous.
        state = self.ema.state_dict()
        state["shadow"] = {k: v.clone() for k, v in state["shadow"].items()}
        return {"ema": state, "offset": self._offset}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the EMA state (applied when the EMA exists, i.e. now or at fit start)."""
        if not state_dict:
            return
        if self.ema is None:
            self._pending = state_dict
        else:
            self._load(state_dict)

    def _load(self, state: dict[str, Any]) -> None:
        assert self.ema is not None  # internal invariant, not user input
        if "ema" not in state:
            raise ValueError(f"not an EMACallback state: keys {sorted(state)}")
        self.ema.load_state_dict(state["ema"])
        self._offset = int(state.get("offset", 0))
        self._fresh = False


@contextlib.contextmanager
def _prefixed_log(pl_module: Any, prefix: str) -> Iterator[None]:
    """Temporarily prefix the names the module logs (``log`` and ``log_dict``)."""
    original: Callable[..., Any] = pl_module.log

    def log(name: str, *args: Any, **kwargs: Any) -> Any:
        return original(prefix + name, *args, **kwargs)

    pl_module.log = log
    try:
        yield
    finally:
        del pl_module.log  # back to the class's method
