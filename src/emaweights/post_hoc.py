r"""Post-hoc EMA: choose the EMA length *after* training.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models" (EDM2).

During training, :class:`PostHocEMA` keeps a few power-function EMAs
(:class:`~emaweights.schedules.PowerFunction`): after :math:`n` updates the
:math:`m`-th averaged weights have the weight

.. math::
    w_\gamma(m; n) = \frac{m^{\gamma+1} - (m-1)^{\gamma+1}}{n^{\gamma+1}}
    \approx \frac{(\gamma+1)\,m^\gamma}{n^{\gamma+1}} ,

a profile :math:`\propto t^\gamma`. Its width relative to its length is

.. math:: \sigma_{rel} = \sqrt{\frac{\gamma + 1}{(\gamma + 2)^2 (\gamma + 3)}} ,

so :math:`\sigma_{rel} = 0.10` is :math:`\gamma \approx 6.94` and
:math:`\sigma_{rel} = 0.05` is :math:`\gamma \approx 16.97`. Every
``snapshot_every`` optimizer steps the tracker saves each average (fp32 by
default) as a safetensors file; the step, :math:`\gamma` and update count of
each file are in ``manifest.json``, not in file names.

After training, :func:`reconstruct` finds the weights :math:`x` minimizing

.. math:: \sum_m \Big(\sum_i x_i\, w_{\gamma_i}(m; n_i) - w_{\gamma^*}(m; n^*)\Big)^2

over the *exact* discrete profiles of the saved snapshots (so the result is
right whatever ``snapshot_every`` and ``update_every`` are), and returns
:math:`\sum_i x_i\,\hat\theta_i`. The paper solves the same least-squares
problem over continuous profiles; the discrete one is exact when the target
profile lies in the span of the snapshots' (a target that was tracked directly
is reproduced to rounding).

A power-function EMA holds no weight on the starting weights: unlike an
anchored :class:`~emaweights.EMA` it does not retain pre-trained knowledge by
itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from emaweights.multi import MultiEMA
from emaweights.schedules import PowerFunction

__all__ = [
    "PostHocEMA",
    "gamma_to_sigma_rel",
    "load_manifest",
    "power_profile",
    "reconstruct",
    "sigma_rel_to_gamma",
]

MANIFEST = "manifest.json"
_FORMAT = "emaweights.posthoc"


def gamma_to_sigma_rel(gamma: float) -> float:
    r""":math:`\sigma_{rel} = \sqrt{(\gamma+1) / ((\gamma+2)^2(\gamma+3))}` (EDM2, eq. 3)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > -1:
        raise ValueError(f"gamma must be a number > -1, got {gamma!r}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    r"""Invert :func:`gamma_to_sigma_rel`.

    Finds the root :math:`\gamma \ge 0` of

    .. math:: (\gamma+2)^2(\gamma+3) - \sigma_{rel}^{-2}(\gamma+1) = 0 ,

    by bisection over :math:`\gamma \ge 0`, where :math:`\sigma_{rel}`
    decreases monotonically from :math:`1/\sqrt{12}` (the uniform profile).

    Raises:
        ValueError: ``sigma_rel`` outside :math:`(0, 1/\sqrt{12}]`.

    """
    top = gamma_to_sigma_rel(0.0)
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
        raise ValueError(f"sigma_rel must be a number, got {sigma_rel!r}")
    if not 1e-6 <= sigma_rel <= top:
        raise ValueError(f"sigma_rel must be in [1e-6, {top:.4f}], got {sigma_rel!r}")
    lo, hi = 0.0, 1e13
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gamma_to_sigma_rel(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid
    gamma = 0.5 * (lo + hi)
    return gamma


def power_profile(gamma: float, num_updates: int, length: int | None = None) -> Tensor:
    r"""The exact weights :math:`w_\gamma(m; n)`, :math:`m = 1..n`, in float64.

    Args:
        gamma: the profile's :math:`\gamma`.
        num_updates: :math:`n`, the updates the average has taken.
        length: pad with zeros to this length (default ``n``).

    """
    m = torch.arange(num_updates + 1, dtype=torch.float64) / max(num_updates, 1)
    cdf = m ** (gamma + 1)
    out = torch.zeros(max(length or 0, num_updates), dtype=torch.float64)
    out[:num_updates] = cdf[1:] - cdf[:-1]
    return out


class PostHocEMA:
    """Track power-function EMAs and save snapshots for post-hoc reconstruction.

    Args:
        model: the model (bare or wrapped).
        directory: where snapshots and ``manifest.json`` go (created on the first save).
        sigma_rels: the tracked profiles; two well-separated ones (the paper's
            0.05 and 0.10) suffice to reconstruct a range of lengths.
        snapshot_every: save every average every this many optimizer steps.
        update_every: average every this many optimizer steps.
        dtype: dtype of the saved snapshots (float32 by default: fp16 snapshots
            lose the small differences the least-squares solve combines).
        **options: other :class:`~emaweights.EMA` options (``start_step``,
            ``include_frozen``, ``exclude``, ``buffers``, ``device``, ``foreach``).

    Raises:
        ValueError: a ``sigma_rel`` out of range, or ``snapshot_every`` not a positive int.

    """

    def __init__(
        self,
        model: nn.Module,
        directory: str | Path,
        *,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: int = 1000,
        update_every: int = 1,
        dtype: torch.dtype = torch.float32,
        **options: Any,
    ) -> None:
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int):
            raise ValueError(f"snapshot_every must be a positive int, got {snapshot_every!r}")
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be a positive int, got {snapshot_every!r}")
        self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
        self.directory = Path(directory)
        self.snapshot_every = snapshot_every
        self.snapshot_dtype = dtype
        self.multi = MultiEMA(
            model, [PowerFunction(g) for g in self.gammas], update_every=update_every, **options
        )
        self.snapshots: list[dict[str, Any]] = []

    @property
    def step(self) -> int:
        """Optimizer steps seen."""
        return self.multi.step

    def update(self, step: int | None = None) -> None:
        """Update every average; snapshot when the step is a multiple of ``snapshot_every``."""
        self.multi.update(step)
        if self.step % self.snapshot_every == 0 and self.multi[0].num_updates > 0:
            self.save_snapshot()

    def save_snapshot(self) -> None:
        """Save every average now, and rewrite the manifest."""
        save_file = _safetensors().save_file
        self.directory.mkdir(parents=True, exist_ok=True)
        for gamma, ema in zip(self.gammas, self.multi.emas, strict=True):
            name = f"{len(self.snapshots):06d}.safetensors"
            tensors = {
                k: (v.to(self.snapshot_dtype) if v.is_floating_point() else v)
                .detach()
                .to("cpu", copy=True)
                .contiguous()
                for k, v in ema.shadow.items()
            }
            save_file(tensors, str(self.directory / name))
            self.snapshots.append(
                {"file": name, "step": ema.step, "gamma": gamma, "num_updates": ema.num_updates}
            )
        manifest = {
            "format": _FORMAT,
            "version": 1,
            "snapshot_every": self.snapshot_every,
            "update_every": self.multi[0].update_every,
            "start_step": self.multi[0].start_step,
            "snapshots": self.snapshots,
        }
        tmp = self.directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(self.directory / MANIFEST)  # atomic: a crash never leaves half a manifest


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "post-hoc EMA snapshots need safetensors: pip install 'emaweights[safetensors]'"
        ) from err
    return safetensors.torch


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` of a snapshot directory.

    Raises:
        FileNotFoundError: no manifest in ``directory``.
        ValueError: not a post-hoc EMA manifest, or a malformed entry.

    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {str(directory)!r}: not a snapshot directory")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a post-hoc EMA manifest")
    for s in data.get("snapshots", []):
        if not {"file", "step", "gamma", "num_updates"} <= set(s):
            raise ValueError(f"{path}: malformed snapshot entry {s!r}")
    if not data.get("snapshots"):
        raise ValueError(f"{path} lists no snapshot")
    return data


def solve_weights(snapshots: Sequence[tuple[float, int]], gamma: float, num_updates: int) -> Tensor:
    r"""Least-squares coefficients :math:`x` combining snapshot profiles into a target.

    Args:
        snapshots: :math:`(\gamma_i, n_i)` of each snapshot.
        gamma: the target :math:`\gamma^*`.
        num_updates: the target :math:`n^*`.

    Returns:
        float64 coefficients, one per snapshot.

    """
    length = max([num_updates, *(n for _, n in snapshots)])
    basis = torch.stack([power_profile(g, n, length) for g, n in snapshots], dim=1)
    target = power_profile(gamma, num_updates, length)
    # lstsq on the profiles themselves, not the normal equations: the Gram
    # matrix of nearby profiles is ill-conditioned.
    solution: Tensor = torch.linalg.lstsq(basis, target.unsqueeze(1), driver="gelsd").solution
    return solution.squeeze(1)


def reconstruct(
    directory: str | Path, sigma_rel: float, step: int | None = None
) -> dict[str, Tensor]:
    """Reconstruct the power EMA of ``sigma_rel`` at ``step`` from saved snapshots.

    Args:
        directory: a snapshot directory written by :class:`PostHocEMA`.
        sigma_rel: the wanted profile width.
        step: the optimizer step (default: the last snapshot's); only
            snapshots up to it are used.

    Returns:
        The averaged tensors by canonical name (float32, or the snapshots' dtype).

    Raises:
        ValueError: ``sigma_rel`` out of range, or no snapshot at or before ``step``.

    """
    manifest = load_manifest(directory)
    gamma = sigma_rel_to_gamma(sigma_rel)
    entries = manifest["snapshots"]
    last = max(int(s["step"]) for s in entries)
    step = last if step is None else step
    used = [s for s in entries if int(s["step"]) <= step]
    if not used:
        raise ValueError(f"no snapshot at or before step {step!r} (first: {entries[0]['step']})")
    start, every = int(manifest["start_step"]), int(manifest["update_every"])
    num_updates = max(0, (step - start) // every)
    x = solve_weights(
        [(float(s["gamma"]), int(s["num_updates"])) for s in used], gamma, num_updates
    )
    load_file = _safetensors().load_file
    out: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for coef, s in zip(x.tolist(), used, strict=True):
        for name, t in load_file(str(Path(directory) / s["file"])).items():
            if not t.is_floating_point():
                out[name] = t  # integer buffers: the latest snapshot's
                continue
            dtypes[name] = t.dtype
            out[name] = out.get(name, torch.zeros(t.shape, dtype=torch.float64)) + coef * t.double()
    return {k: v.to(dtypes[k]) if k in dtypes else v for k, v in out.items()}
