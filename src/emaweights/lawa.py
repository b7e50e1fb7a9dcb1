r"""Latest-weight averaging (LAWA; Kaddour 2022, Sanyal et al. 2023).

The mean of the last :math:`k` epoch checkpoints,

.. math:: \bar\theta_E = \frac{1}{k}\sum_{e=E-k+1}^{E}\theta_e .

An exact sliding window needs the :math:`k` checkpoints themselves (a running
sum would have to subtract the oldest one, which must then be kept anyway), so
:class:`LAWA` holds a ring of :math:`k` snapshots. The memory need not be the
accelerator's: ``device="cpu"`` keeps the ring in host memory (one copy per
snapshot, read only when the average is formed). The average is formed on
demand, not per step, so the training loop pays only one copy per epoch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from emaweights import functional as F
from emaweights._naming import BufferPolicy, canonical_name, collect, unwrap
from emaweights.shadow import Shadow

__all__ = ["LAWA"]


class LAWA:
    """Average of the last ``k`` snapshots (taken by :meth:`update`, e.g. at epoch ends).

    Args:
        model: the model.
        k: window length (>= 1).
        device: where the snapshots live (default: each tensor's own device).
        include_frozen: also snapshot frozen parameters.
        exclude: glob patterns of canonical names to leave out.
        buffers: floating buffers ``"average"``, ``"copy"`` or ``"ignore"``.

    Raises:
        ValueError: ``k`` is not a positive int.

    """

    def __init__(
        self,
        model: nn.Module,
        k: int = 5,
        *,
        device: torch.device | str | None = None,
        include_frozen: bool = False,
        exclude: Sequence[str] = (),
        buffers: BufferPolicy = "average",
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        self.model, self.k = model, k
        self._entries = collect(
            model, include_frozen=include_frozen, exclude=tuple(exclude), buffers=buffers
        )
        self._device = torch.device(device) if device is not None else None
        self._ring: list[Shadow] = []
        self._next = 0  # ring index the next snapshot overwrites, once full
        self.step = 0  # optimizer steps seen
        self.num_updates = 0  # snapshots taken

    @property
    def n_snapshots(self) -> int:
        """Snapshots in the window now (at most ``k``)."""
        return len(self._ring)

    def update(self, step: int | None = None) -> None:
        """Add the current weights to the window, dropping the oldest once it holds ``k``.

        Args:
            step: the optimizer step (default: one more than the last call); it
                must not go backwards.

        Raises:
            ValueError: ``step`` is not an int or goes backwards.

        """
        new = self.step + 1 if step is None else step
        if isinstance(new, bool) or not isinstance(new, int) or new < self.step:
            raise ValueError(f"step must be an int >= the last step ({self.step}), got {step!r}")
        self.step = new
        self.num_updates += 1
        self._add()

    def snapshot(self) -> None:
        """Deprecated alias of :meth:`update` (the one verb every averager shares)."""
        warnings.warn(
            "LAWA.snapshot() is deprecated; call LAWA.update()", DeprecationWarning, stacklevel=2
        )
        self.update()

    def _add(self) -> None:
        if len(self._ring) < self.k:
            self._ring.append(Shadow(self._entries, device=self._device))
            return
        self._ring[self._next].copy_from_live_()
        self._next = (self._next + 1) % self.k

    @torch.no_grad()
    def average(self) -> dict[str, Tensor]:
        """The mean of the snapshots in the window, by canonical name (shadow dtype/device).

        Integer buffers hold the latest snapshot's values.

        Raises:
            RuntimeError: no snapshot yet.

        """
        if not self._ring:
            raise RuntimeError("LAWA.average(): no snapshot taken yet")
        latest = self._ring[(self._next - 1) % len(self._ring)]
        out = {n: t.clone() for n, t in latest.tensors.items()}
        names = [g.entries for g in latest.averaged]
        for group_entries in names:
            dst = [out[e.name] for e in group_entries]
            F.copy_(dst, [self._ring[0].tensors[e.name] for e in group_entries])
            for snap in self._ring[1:]:
                torch._foreach_add_(dst, [snap.tensors[e.name] for e in group_entries])
            torch._foreach_div_(dst, float(len(self._ring)))
        return out

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """A model state dict (canonical names, model dtype/device) holding the average."""
        avg = self.average()
        out = {}
        for key, value in unwrap(self.model).state_dict().items():
            name = canonical_name(key)
            src = avg.get(name, value)
            out[name] = src.to(value.device, value.dtype, copy=True)
        return out
