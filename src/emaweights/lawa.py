r"""Latest-weight averaging (LAWA; Kaddour 2022, Sanyal et al. 2023).

The mean of the last :math:`k` averaged points (e.g. epoch ends),

.. math:: \bar\theta_E = \frac{1}{k}\sum_{e=E-k+1}^{E}\theta_e .

An exact sliding window needs the :math:`k` checkpoints themselves (a running
sum would have to subtract the oldest one, which must then be kept anyway), so
:class:`LAWA` holds a window of up to :math:`k` snapshots, overwritten oldest
first, and the mean, formed at each update (the one storage swapped in and
exported). The memory need not be the accelerator's: ``device="cpu"`` keeps
the window and the mean in host memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from emaweights import functional as F
from emaweights._naming import BufferPolicy, collect
from emaweights.averager import Averager, NonFinitePolicy, _short, parse_clock, positive_int
from emaweights.shadow import Shadow

__all__ = ["LAWA"]


class LAWA(Averager):
    """Mean of the last ``k`` points, one taken at each (due) :meth:`update`.

    Call :meth:`update` after every optimizer step with
    ``update_every=steps_per_epoch`` to average epoch ends, or only at epoch
    ends with the default ``update_every=1``. Until the first point the
    average is the starting weights (the weights at ``start_step``).

    Args:
        model: the model.
        k: window length (>= 1).
        update_every: take a point every this many optimizer steps.
        start_step: points before this optimizer step are not taken.
        device: where the window and the mean live (default: each tensor's own device).
        include_frozen: also average frozen parameters.
        exclude: glob patterns of canonical names to leave out.
        buffers: floating buffers ``"average"``, ``"copy"`` or ``"ignore"``;
            integer buffers hold the latest point's values.
        foreach: kernel choice (``None``: the fastest available).
        nonfinite: ``"check"``, ``"raise"`` or ``"skip"`` (see :class:`~emaweights.EMA`).

    Raises:
        ValueError: an argument out of range (the message names the value).

    """

    FORMAT: ClassVar[str] = "emaweights.LAWA"

    def __init__(
        self,
        model: nn.Module,
        k: int = 5,
        *,
        update_every: int = 1,
        start_step: int = 0,
        device: torch.device | str | None = None,
        include_frozen: bool = False,
        exclude: Sequence[str] = (),
        buffers: BufferPolicy = "average",
        foreach: bool | None = None,
        nonfinite: NonFinitePolicy = "check",
    ) -> None:
        self.k = positive_int(k, "k")
        self._init_clock(update_every=update_every, start_step=start_step, nonfinite=nonfinite)
        self.model = model
        self._options: dict[str, Any] = dict(
            include_frozen=include_frozen, exclude=tuple(exclude), buffers=buffers
        )
        self._entries = collect(model, **self._options)
        self._device = torch.device(device) if device is not None else None
        self._foreach = foreach
        self._shadow = self._new_storage()  # the mean
        self._window: list[Shadow] = []  # slot i holds point i, i + k, i + 2k, ...

    def _new_storage(self) -> Shadow:
        return Shadow(self._entries, device=self._device, foreach=self._foreach)

    def _join(self, names: set[str]) -> None:
        """Joining tensors enter every stored point too, from their current value."""
        super()._join(names)
        self._entries = list(self._shadow.entries.values())
        for slot, old in enumerate(self._window):
            old.flush_()
            new = self._new_storage()  # copies the live weights, joining tensors included
            with torch.no_grad():
                for name, value in old.local_tensors.items():
                    new.local_tensors[name].copy_(value)
            self._window[slot] = new

    @property
    def n_snapshots(self) -> int:
        """Points in the window now (at most ``k``)."""
        return len(self._window)

    def snapshot(self) -> None:
        """Deprecated alias of :meth:`update` (the one verb every averager shares)."""
        warnings.warn(
            "LAWA.snapshot() is deprecated; call LAWA.update()", DeprecationWarning, stacklevel=2
        )
        self.update()

    # -- the rule ----------------------------------------------------------

    def _rule(self) -> None:
        slot = self.num_updates % self.k  # the oldest point, once the window is full
        if slot == len(self._window):
            self._window.append(self._new_storage())  # a new Shadow copies the live weights
        else:
            self._window[slot].copy_from_live_()
        self._last_step = self.step
        self._form_mean()
        self._shadow.copy_copied_()  # integer buffers: the latest point's

    def _form_mean(self) -> None:
        for gi, g in enumerate(self._shadow.averaged):
            F.mean_(g.views, [w.averaged[gi].views for w in self._window], foreach=self._foreach)

    @torch.no_grad()
    def average(self) -> dict[str, Tensor]:
        """The mean of the points in the window, by canonical name (copies; storage dtype/device).

        Raises:
            RuntimeError: no point taken yet.

        """
        if not self._window:
            raise RuntimeError("LAWA.average(): no snapshot taken yet (call update() first)")
        return {n: t.clone() for n, t in self.shadow.items()}

    # -- checkpoints -------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {"k": self.k, **super()._config()}

    def _extra_state(self) -> dict[str, Any]:
        return {"window": [w.state() for w in self._window]}

    def _parse_extra(self, state: Mapping[str, Any], strict: bool) -> dict[str, Any]:
        k = positive_int(state["config"].get("k"), "saved k")
        config = {"k": k, **parse_clock(state["config"])}
        window = state.get("window")
        # The window holds the last min(num_updates, k) points, in slot order.
        expected = min(positive_int(state["num_updates"], "saved num_updates", minimum=0), k)
        if not isinstance(window, list) or len(window) != expected:
            raise ValueError(
                f"saved window must be a list of {expected} snapshots (k={k}, "
                f"num_updates={state['num_updates']}), got {_short(window)}"
            )
        for i, snap in enumerate(window):
            if not isinstance(snap, Mapping):
                raise ValueError(f"saved window[{i}] must be a mapping, not {_short(snap)}")
            try:
                self._shadow.validate(snap, strict=strict)
            except (KeyError, ValueError) as err:
                raise type(err)(f"saved window[{i}]: {err}") from err
        return {"config": config, "window": window, "strict": strict}

    def _commit_extra(self, parsed: Mapping[str, Any]) -> None:
        for name, value in parsed["config"].items():
            setattr(self, name, value)
        window = parsed["window"]
        del self._window[len(window) :]
        while len(self._window) < len(window):
            self._window.append(self._new_storage())
        for storage, snap in zip(self._window, window, strict=True):
            storage.load_(snap, strict=parsed["strict"], validated=True)

    def __repr__(self) -> str:
        return (
            f"LAWA(k={self.k}, update_every={self.update_every}, start_step={self.start_step}, "
            f"n_snapshots={self.n_snapshots}, step={self.step})"
        )
