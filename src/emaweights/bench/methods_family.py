"""Benchmark adapters for the averaging family.

They follow the protocol of :mod:`emaweights.bench.methods`.

Read-only methods (ride along on the shared run): uniform averaging of epoch
ends (SWA), latest-k averaging (LAWA), post-hoc EMA reconstructions, BEMA.
Methods that change training (own run): Switch-EMA, pull-back (SFA), L2-SP.
"""

from __future__ import annotations

import tempfile
from typing import TypeVar

import torch
from torch import Tensor, nn

from emaweights.bema import BEMA
from emaweights.bench.methods import Method
from emaweights.lawa import LAWA
from emaweights.post_hoc import PostHocEMA, reconstruct
from emaweights.pullback import PullBack
from emaweights.swa import SWA
from emaweights.switch import SwitchEMA

__all__ = [
    "BEMAMethod",
    "L2SPMethod",
    "LAWAMethod",
    "PostHocMethod",
    "PullBackMethod",
    "SWAMethod",
    "SwitchEMAMethod",
    "family_methods",
]


T = TypeVar("T")


def _live_state(model: nn.Module) -> dict[str, Tensor]:
    with torch.no_grad():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _need(obj: T | None, name: str) -> T:
    """``obj``, or a clear error when ``start()`` was not called."""
    if obj is None:
        raise RuntimeError(f"{name}: start() was not called")
    return obj


class _Base:
    """Defaults: no penalty, nothing at steps or epoch ends, the live weights as result."""

    name: str
    family: str
    changes_training = False

    def penalty(self, model: nn.Module) -> Tensor | None:
        """No penalty."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """Nothing after a step."""

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        """Nothing at an epoch end."""

    def result(self, model: nn.Module) -> dict[str, Tensor]:
        """The live weights."""
        return _live_state(model)

    def w0(self) -> float | None:
        """Undefined unless a subclass says otherwise."""
        return None


class SWAMethod(_Base):
    """Equal-weight average of the weights at the end of every epoch (no weight on theta_0)."""

    family = "swa"

    def __init__(self, steps_per_epoch: int) -> None:
        self.name = "swa (epoch ends)"
        self.steps_per_epoch = steps_per_epoch
        self._swa: SWA | None = None

    def start(self, model: nn.Module) -> None:
        """Create the average."""
        self._swa = SWA(model, update_every=self.steps_per_epoch)

    def after_step(self, model: nn.Module, step: int) -> None:
        """Counts steps; averages at multiples of the epoch length."""
        swa = _need(self._swa, self.name)
        swa.update(step=step)

    def result(self, model: nn.Module) -> dict[str, Tensor]:
        """The uniform average."""
        swa = _need(self._swa, self.name)
        return swa.averaged_state_dict()

    def w0(self) -> float | None:
        """0: the pre-trained weights are not among the averaged points."""
        return 0.0


class LAWAMethod(_Base):
    """Mean of the last ``k`` epoch-end weights."""

    family = "lawa"

    def __init__(self, k: int = 3) -> None:
        self.name, self.k = f"lawa k={k}", k
        self._lawa: LAWA | None = None

    def start(self, model: nn.Module) -> None:
        """Create the (empty) window."""
        self._lawa = LAWA(model, k=self.k)

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        """Snapshot the epoch-end weights."""
        lawa = _need(self._lawa, self.name)
        lawa.update()

    def result(self, model: nn.Module) -> dict[str, Tensor]:
        """The window's mean."""
        lawa = _need(self._lawa, self.name)
        return lawa.averaged_state_dict()

    def w0(self) -> float | None:
        """0: only epoch ends are averaged."""
        return 0.0


class PostHocMethod(_Base):
    """Power EMAs (sigma_rel 0.05, 0.10) with snapshots, reconstructed at ``sigma_rel``."""

    family = "posthoc"

    def __init__(self, sigma_rel: float, snapshot_every: int) -> None:
        self.name, self.sigma_rel = f"posthoc σrel={sigma_rel}", sigma_rel
        self.snapshot_every = snapshot_every
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._tracker: PostHocEMA | None = None

    def start(self, model: nn.Module) -> None:
        """Start tracking into a fresh temporary directory."""
        self._dir = tempfile.TemporaryDirectory(prefix="emaweights-posthoc-")
        self._tracker = PostHocEMA(model, self._dir.name, snapshot_every=self.snapshot_every)

    def after_step(self, model: nn.Module, step: int) -> None:
        """Update the power EMAs (and snapshot at multiples of ``snapshot_every``)."""
        tracker = _need(self._tracker, self.name)
        tracker.update(step=step)

    def result(self, model: nn.Module) -> dict[str, Tensor]:
        """The reconstruction at the last step, as a model state dict; removes the snapshots."""
        tracker = _need(self._tracker, self.name)
        if not tracker.snapshots or tracker.snapshots[-1]["step"] != tracker.step:
            tracker.save_snapshot()  # the end of training is always a snapshot
        directory = _need(self._dir, self.name)
        weights = reconstruct(directory.name, self.sigma_rel)
        state = _live_state(model)
        out = {k: weights[k].to(v.dtype) if k in weights else v for k, v in state.items()}
        directory.cleanup()
        return out

    def w0(self) -> float | None:
        """0: a power-function EMA puts no weight on the starting weights."""
        return 0.0


class BEMAMethod(_Base):
    r"""BEMA (bias-corrected EMA).

    With the defaults (``update_every=1``, no burn-in) and :math:`\theta_0` the
    pre-trained weights, BEMA's correction term extrapolates along
    :math:`\theta_T - \theta_0` (its ``init_weight`` is negative): it is not a
    lag-free average of the run but a step beyond the fine-tuned weights.
    ``start_step`` (burn-in: averaging starts there) and ``update_every``
    (update frequency) make it average the late run instead.
    """

    family = "bema"

    def __init__(self, update_every: int = 1, start_step: int = 0) -> None:
        self.update_every, self.start_step = update_every, start_step
        self.name = (
            "bema (default: extrapolates)"
            if (update_every, start_step) == (1, 0)
            else f"bema burn-in {start_step}, every {update_every}"
        )
        self._bema: BEMA | None = None

    def start(self, model: nn.Module) -> None:
        """Take theta_0 = the pre-trained weights."""
        self._bema = BEMA(model, update_every=self.update_every, start_step=self.start_step)

    def after_step(self, model: nn.Module, step: int) -> None:
        """Update."""
        bema = _need(self._bema, self.name)
        bema.update(step=step)

    def result(self, model: nn.Module) -> dict[str, Tensor]:
        """The bias-corrected average."""
        bema = _need(self._bema, self.name)
        return bema.averaged_state_dict()

    def w0(self) -> float | None:
        """prod(1 - beta_k) - alpha_T (negative: BEMA extrapolates away from theta_0)."""
        bema = _need(self._bema, self.name)
        return bema.init_weight


class SwitchEMAMethod(_Base):
    """EMA copied into the live weights at every epoch end; the result is the EMA."""

    family = "switch-ema"
    changes_training = True

    def __init__(self, decay: float, switch_every: int) -> None:
        self.name, self.decay, self.switch_every = f"switch-ema β={decay}", decay, switch_every
        self._ema: SwitchEMA | None = None

    def start(self, model: nn.Module) -> None:
        """Start the EMA at the pre-trained weights."""
        self._ema = SwitchEMA(model, self.decay, switch_every=self.switch_every)

    def after_step(self, model: nn.Module, step: int) -> None:
        """Update; switch at multiples of ``switch_every``."""
        ema = _need(self._ema, self.name)
        ema.update(step=step)

    def result(self, model: nn.Module) -> dict[str, Tensor]:
        """The EMA."""
        ema = _need(self._ema, self.name)
        return ema.averaged_state_dict()


class PullBackMethod(_Base):
    """Merge the live weights with the pre-trained ones every ``every`` steps (SFA)."""

    family = "pullback"
    changes_training = True

    def __init__(self, beta: float, every: int) -> None:
        self.name, self.beta, self.every = f"pullback β={beta}/{every}", beta, every
        self._pb: PullBack | None = None

    def start(self, model: nn.Module) -> None:
        """Keep the pre-trained weights."""
        self._pb = PullBack(model, update_every=self.every, reference_weight=self.beta)

    def after_step(self, model: nn.Module, step: int) -> None:
        """Merge at multiples of ``every``."""
        pb = _need(self._pb, self.name)
        pb.update(step=step)


class L2SPMethod(_Base):
    r"""L2-SP (Li et al. 2018): penalty :math:`\frac{\alpha}{2}\lVert\theta-\theta_0\rVert^2`."""

    family = "l2sp"
    changes_training = True

    def __init__(self, alpha: float) -> None:
        self.name, self.alpha = f"l2sp α={alpha}", alpha
        self._ref: list[tuple[nn.Parameter, Tensor]] | None = None

    def start(self, model: nn.Module) -> None:
        """Keep theta_0 of every trainable parameter."""
        self._ref = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def penalty(self, model: nn.Module) -> Tensor | None:
        r""":math:`\frac{\alpha}{2}\sum\lVert\theta - \theta_0\rVert^2`."""
        ref = _need(self._ref, self.name)
        total = sum(((p - p0) ** 2).sum() for p, p0 in ref)
        return 0.5 * self.alpha * torch.as_tensor(total)


def family_methods(steps_per_epoch: int, total_steps: int) -> list[Method]:
    """The averaging family as benchmark methods, sized to the run."""
    snapshot_every = max(1, total_steps // 8)
    return [
        SWAMethod(steps_per_epoch),
        LAWAMethod(k=3),
        PostHocMethod(0.05, snapshot_every),
        PostHocMethod(0.20, snapshot_every),
        BEMAMethod(),
        SwitchEMAMethod(0.99, switch_every=steps_per_epoch),
        PullBackMethod(0.5, every=max(1, total_steps // 4)),
        L2SPMethod(0.1),
        L2SPMethod(1.0),
    ]
