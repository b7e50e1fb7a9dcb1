r"""The averaged model as a module you can call beside the live one.

Mean teacher, self-distillation (BYOL, DINO, MoCo), consistency training and
sampling during diffusion training run the live model and the averaged model
in one step. :class:`AveragedModule` (``averager.module``) is the second one,

.. math:: y = f(x;\ \bar\theta_t) ,

computed by :func:`torch.func.functional_call` over the averager's storage: the
live model's forward runs with the averaged tensors in place of its own, in
evaluation mode, and the live model is left as it was. No copy of the weights
is made (a shadow of the model's dtype and device is used as is; another one is
cast per call and the casts freed after it), and since the storage is read at
every call, the module follows every update and every load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from emaweights._naming import canonical_name, unwrap

if TYPE_CHECKING:  # the averager imports this module: no import at run time
    from emaweights.averager import Averager

__all__ = ["AveragedModule"]


class AveragedModule(nn.Module):
    """Calls the averager's model with the averaged weights (``averager.module``).

    * It computes in evaluation mode (dropout off, BatchNorm with the averaged
      running statistics, which it never updates), whatever mode the live
      model is in, and puts the live model's mode flags back after each call.
    * It has no parameters, buffers or sub-modules of its own:
      ``parameters()`` is empty, so ``torch.optim.SGD(averager.module.parameters())``
      raises ``ValueError`` (an empty parameter list), and no gradient reaches
      the average (its tensors do not require grad; gradients still flow to
      the inputs). ``.train()`` is accepted, so that a parent module's
      ``.train()`` works, and changes nothing: it stays in evaluation mode.
      It is not part of a parent's ``state_dict``; save the averager.
    * Tensors the averager does not average (frozen or excluded parameters)
      are the live model's, as in ``averager.applied()``.
    * ``torch.compile(averager.module)`` works.

    Args:
        averager: the averager whose storage it computes with.

    """

    _averager: Averager
    _names: tuple[tuple[int, int], list[tuple[str, str]]] | None

    def __init__(self, averager: Averager) -> None:
        super().__init__()
        # Not registered as a sub-module: the live model's parameters must not
        # appear here (an optimizer over them would train the live model).
        object.__setattr__(self, "_averager", averager)
        object.__setattr__(self, "_names", None)
        self.training = False
        self._tensors()  # build the name table now: a compiled forward then sees one path

    def train(self, mode: bool = True) -> AveragedModule:
        """Stay in evaluation mode (the averaged model is never trained); return self."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean, got {mode!r}")
        return self

    def _tensors(self) -> dict[str, Tensor]:
        """The averaged tensors under the names the unwrapped model uses (no copy if possible)."""
        averager = self._averager
        model = unwrap(averager.model)
        storage = averager.storage
        key = (id(storage), id(model))
        names = self._names
        if names is None or names[0] != key:
            averaged = set(storage.names())
            pairs = [
                (real, canonical_name(real))
                for real, _ in [
                    *model.named_parameters(remove_duplicate=False),
                    *model.named_buffers(remove_duplicate=False),
                ]
            ]
            # One name per tensor: functional_call ties the aliases itself.
            seen: set[str] = set()
            kept = []
            for real, canon in pairs:
                if canon in averaged and canon not in seen:
                    seen.add(canon)
                    kept.append((real, canon))
            names = (key, kept)
            object.__setattr__(self, "_names", names)
        values = storage.state()  # completes a deferred update (overlap) first
        entries = storage.entries
        out = {}
        for real, canon in names[1]:
            live = entries[canon].get()
            out[real] = values[canon].to(live.device, live.dtype)  # no copy when they agree
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model's forward with the averaged weights, in evaluation mode."""
        from torch.func import functional_call  # deferred: keeps `import emaweights` light

        averager = self._averager
        if torch.compiler.is_compiling():
            _outside_graph(averager)
        else:
            averager._warn_if_early("module")
        model = unwrap(averager.model)
        tensors = self._tensors()
        modes = [(m, m.training) for m in model.modules()]
        for m, _ in modes:
            m.training = False
        try:
            return functional_call(model, tensors, args, kwargs, tie_weights=True)
        finally:
            for m, mode in modes:
                m.training = mode

    def extra_repr(self) -> str:
        """Name the averager (its repr is bounded)."""
        return repr(self._averager)


def _outside_graph(averager: Averager) -> None:
    """The early-average check, kept out of a compiled graph (it reads floats that change).

    Without this, the graph would be guarded on ``init_weight`` and recompiled
    after updates. ``torch.compiler.disable`` is applied at the first compiled
    call (it is only reached while compiling, when the compiler is loaded anyway).
    """
    global _WARN_OUTSIDE_GRAPH
    if _WARN_OUTSIDE_GRAPH is None:
        _WARN_OUTSIDE_GRAPH = torch.compiler.disable(_check_early)  # type: ignore[no-untyped-call]
    _WARN_OUTSIDE_GRAPH(averager)


def _check_early(averager: Averager) -> None:
    averager._warn_if_early("module")


_WARN_OUTSIDE_GRAPH: Callable[[Averager], None] | None = None
