r"""Helpers for an EMA in a Hugging Face Accelerate training loop.

.. math::
    \bar\theta_t = \beta_t\,\bar\theta_{t-1} + (1 - \beta_t)\,\theta_t
    \quad\text{after every optimizer step } t \text{ (not every micro-batch)}

Usage::

    from emaweights.integrations.accelerate import prepare_ema, update

    model, opt, loader = accelerator.prepare(model, opt, loader)
    ema = prepare_ema(accelerator, model, decay=0.999)   # unwraps; checkpoints with save_state
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            opt.step()
            opt.zero_grad()
        update(ema, accelerator)       # a no-op on micro-batches that do not step
    with ema.applied():
        evaluate(model)

Checkpointing: by default :func:`prepare_ema` adds save/load hooks to the
accelerator, so ``accelerator.save_state(dir)`` writes ``dir/emaweights_ema.pt``
(atomically) and ``accelerator.load_state(dir)`` reads it back with
``weights_only=True``. A folder without that file (a checkpoint from before
the EMA was added) warns and starts the average afresh from the restored
weights (at the model's next forward, once ``load_state`` has loaded them;
the step count restarts at 0), as the Lightning and Trainer callbacks do.
``checkpointing="register"`` uses
``accelerator.register_for_checkpointing(ema)`` instead (the EMA has
``state_dict``/``load_state_dict``), but Accelerate loads such custom states
with ``weights_only=False``, i.e. it unpickles them; prefer the default.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from emaweights.averager import check_bool
from emaweights.ema import EMA, SwapError
from emaweights.integrations._adapter import stats_to_log
from emaweights.integrations._require import require
from emaweights.io import load_state, save_state
from emaweights.schedules import Schedule

__all__ = ["STATE_FILE", "attach", "prepare_ema", "unwrap", "update"]

require("accelerate", "accelerate")

#: File name of the EMA state inside an ``accelerator.save_state`` folder.
STATE_FILE = "emaweights_ema.pt"

Checkpointing = Literal["hooks", "register", "none"]


def unwrap(accelerator: Any, model: nn.Module) -> nn.Module:
    """The user's model inside whatever ``accelerator.prepare`` wrapped it in."""
    module: nn.Module = accelerator.unwrap_model(model)
    return module


def prepare_ema(
    accelerator: Any,
    model: nn.Module,
    decay: float | Schedule = 0.999,
    *,
    checkpointing: Checkpointing = "hooks",
    **ema_options: Any,
) -> EMA:
    """Make an :class:`~emaweights.EMA` of the prepared model and hook it into checkpoints.

    Call it after ``accelerator.prepare`` so the shadow lives where the
    weights do.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model: the model returned by ``accelerator.prepare`` (or the bare one).
        decay: constant decay or :class:`~emaweights.schedules.Schedule`.
        checkpointing: ``"hooks"`` (default): :func:`attach` the EMA to
            ``save_state``/``load_state`` with safe loading; ``"register"``:
            ``accelerator.register_for_checkpointing``; ``"none"``.
        **ema_options: passed to :class:`~emaweights.EMA`.

    Raises:
        ValueError: ``checkpointing`` is not one of the three choices.

    """
    if checkpointing not in ("hooks", "register", "none"):
        raise ValueError(
            f"checkpointing must be 'hooks', 'register' or 'none', got {checkpointing!r}"
        )
    ema = EMA(unwrap(accelerator, model), decay, **ema_options)
    if checkpointing == "hooks":
        attach(accelerator, ema)
    elif checkpointing == "register":
        accelerator.register_for_checkpointing(ema)
    return ema


def update(ema: EMA, accelerator: Any, *, log_stats: bool = False, log_drift: bool = False) -> bool:
    """Update the average if this micro-batch ended with an optimizer step.

    Under ``accelerator.accumulate`` the optimizer steps only when
    ``accelerator.sync_gradients`` is true; calling this after every
    micro-batch therefore updates once per optimizer step. A step that the
    fp16 grad scaler skipped still counts (the weights did not move, and the
    decay applies), as in the Trainer integrations.

    Args:
        ema: the averager.
        accelerator: the ``accelerate.Accelerator``.
        log_stats: after an update, ``accelerator.log`` the averager's
            :meth:`~emaweights.averager.Averager.stats` as ``ema/<key>`` at
            ``step=ema.step`` (to every tracker of ``log_with``; a no-op without one).
        log_drift: also log the drift norm (one host sync per update).

    Returns:
        Whether the average was updated.

    """
    check_bool(log_stats, "log_stats")
    check_bool(log_drift, "log_drift")
    if not accelerator.sync_gradients:
        return False
    ema.update()
    if log_stats or log_drift:
        accelerator.log(stats_to_log(ema, "ema", drift=log_drift, host=True), step=ema.step)
    return True


def attach(accelerator: Any, ema: EMA) -> tuple[Any, Any]:
    """Save and load the EMA with ``accelerator.save_state`` / ``load_state``.

    The state goes to ``<folder>/emaweights_ema.pt``, written atomically by
    the main process and loaded with ``weights_only=True`` by every process.
    Saving while the averaged weights are applied is refused (the model
    weights in the checkpoint would be the average).

    Returns:
        The two hook handles (call ``.remove()`` to detach).

    """

    def save_hook(models: list[nn.Module], weights: list[Any], output_dir: str) -> None:
        if ema.is_applied:
            raise SwapError(
                "accelerator.save_state() called while the averaged weights are applied: "
                "the checkpoint would store them as the model; save outside `ema.applied()`"
            )
        if accelerator.is_main_process:
            save_state(ema.state_dict(), Path(output_dir) / STATE_FILE)

    restart: list[Any] = []  # the pending one-shot forward hook, if any

    def restart_hook(module: nn.Module, args: Any) -> None:
        if ema.is_applied:
            return  # evaluating with the old average: restart at a later forward
        with torch.inference_mode(False):
            ema.register()
        restart.pop().remove()

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        path = os.path.join(input_dir, STATE_FILE)
        if restart:  # a second load_state before any forward
            restart.pop().remove()
        if not os.path.isfile(path):
            # As the Lightning and Trainer callbacks do: a checkpoint written
            # before the EMA was added still resumes, the average afresh from
            # the restored weights. They are loaded after this hook: restart at
            # the next forward.
            warnings.warn(
                f"accelerator.load_state({input_dir!r}): no {STATE_FILE} there; the average "
                "starts afresh from the restored weights (at the next forward)",
                stacklevel=2,
            )
            restart.append(ema.model.register_forward_pre_hook(restart_hook))
            return
        ema.load_state_dict(load_state(path))

    return (
        accelerator.register_save_state_pre_hook(save_hook),
        accelerator.register_load_state_pre_hook(load_hook),
    )
