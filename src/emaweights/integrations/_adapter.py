"""What the framework adapters need from an averager, and the pieces they share.

The adapters drive any averager through the shared protocol (``update``,
``applied``, ``state_dict``/``load_state_dict``, ``step``) and never reach
into one averager's internals, so EMA, MultiEMA, SWA, BEMA ... plug in alike.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from emaweights.ema import EMA
from emaweights.schedules import Schedule

__all__ = ["Averager", "AveragerFactory", "Evaluation", "ema_factory", "owned", "stats_to_log"]


class Averager(Protocol):
    """The part of the averager protocol that the adapters call."""

    @property
    def step(self) -> int:
        """Optimizer steps seen."""

    def update(self, step: int | None = None) -> None:
        """Fold the model's current weights into the average."""

    def applied(self) -> AbstractContextManager[nn.Module]:
        """Swap the averaged weights in for the block, live weights back after."""

    def state_dict(self) -> dict[str, Any]:
        """The averager's state (tensors and plain data)."""

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore a state from :meth:`state_dict`."""


#: Builds the averager on the (prepared, wrapped) model, e.g. ``lambda m: SWA(m)``.
AveragerFactory = Callable[[nn.Module], Any]

_EMA_OPTIONS = frozenset(inspect.signature(EMA).parameters) - {"model", "decay"}


def ema_factory(
    owner: str,
    decay: float | Schedule | None,
    averager: AveragerFactory | None,
    options: Mapping[str, Any],
) -> AveragerFactory:
    """The factory an adapter uses, with the EMA options validated now, not when training starts.

    Raises:
        TypeError: an unknown option (the message names it and the closest
            valid one), or ``averager`` given together with ``decay``/options.
        ValueError: an option value out of range (from :class:`~emaweights.EMA`).

    """
    if averager is not None:
        if decay is not None or options:
            given = (["decay"] if decay is not None else []) + sorted(options)
            raise TypeError(f"{owner}: pass {given} to your averager factory, not beside averager=")
        if not callable(averager):
            raise TypeError(
                f"{owner}: averager must be a callable model -> averager, not {averager!r}"
            )
        return averager
    unknown = sorted(set(options) - _EMA_OPTIONS)
    if unknown:
        hint = difflib.get_close_matches(unknown[0], _EMA_OPTIONS, n=1)
        raise TypeError(
            f"{owner}: unknown option {unknown[0]!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; EMA takes {sorted(_EMA_OPTIONS)}"
        )
    resolved: float | Schedule = 0.999 if decay is None else decay
    _probe(resolved, options)
    return lambda model: EMA(model, resolved, **options)


def _probe(decay: float | Schedule, options: Mapping[str, Any]) -> None:
    """Build an EMA of a one-weight model so that bad values raise at construction."""
    values = dict(options)
    if values.get("device") is not None:
        torch.device(values.pop("device"))  # validated by name only: it may not exist here
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")  # e.g. an exclude pattern matching the probe's nothing
        EMA(nn.Linear(1, 1), decay, **values)


class Evaluation:
    """The averager's ``applied()`` entered in one hook and left in another."""

    def __init__(self) -> None:
        self._stack: contextlib.ExitStack | None = None

    @property
    def active(self) -> bool:
        """Whether this adapter has the averaged weights swapped in now."""
        return self._stack is not None

    def enter(self, averager: Averager) -> None:
        """Swap the average in (a no-op when already in).

        Frameworks evaluate under ``torch.inference_mode``; the swap runs
        outside it so that no inference tensor enters the model or the
        averager (they could not be trained or version-checked afterwards).
        """
        if self._stack is not None:
            return
        stack = contextlib.ExitStack()
        with torch.inference_mode(False):
            stack.enter_context(averager.applied())
        self._stack = stack

    def exit(self) -> None:
        """Put the live weights back (a no-op when this adapter swapped nothing in)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            with torch.inference_mode(False):
                stack.close()


def stats_to_log(
    averager: Any, prefix: str, *, drift: bool = False, host: bool = False
) -> dict[str, Any]:
    """``averager.stats()`` under ``<prefix>/<key>`` names, for a framework's logger.

    ``drift`` adds the drift norm (a tensor: it syncs only when the logger
    reads it, or here with ``host``, which makes every value a float). An
    averager without ``stats`` logs nothing.
    """
    stats = getattr(averager, "stats", None)
    if not callable(stats):
        return {}
    values = stats(drift=drift)
    if host:
        values = {k: float(v) for k, v in values.items()}
    return {f"{prefix}/{k}": v for k, v in values.items()}


def owned(state: Any) -> Any:
    """A copy of a state whose tensors are clones (the averager keeps changing in place)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, Mapping):
        return {k: owned(v) for k, v in state.items()}
    if isinstance(state, list):
        return [owned(v) for v in state]
    if isinstance(state, tuple):
        return tuple(owned(v) for v in state)
    return state
