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

.. math:: \Big\| \sum_i x_i\, p_{\gamma_i, n_i} - p_{\gamma^*, n^*} \Big\|_2 ,
    \qquad p_{\gamma, n}(t) = \frac{(\gamma+1)\,t^\gamma}{n^{\gamma+1}} \text{ on } (0, n] ,

with time counted in updates (so the result is right whatever
``snapshot_every`` and ``update_every`` are), through the closed-form inner
products of the profiles: an :math:`S \times S` solve for :math:`S`
snapshots, whatever the number of updates. The discrete weight is exactly
:math:`w_\gamma(m; n) = \int_{m-1}^{m} p_{\gamma,n}(t)\,dt`, so this norm
bounds the error against the EMA it stands for (:func:`solve_weights`); a
target that was tracked is reproduced to rounding. It returns
:math:`\sum_i x_i\,\hat\theta_i`. Only steps at which snapshots were saved
can be reconstructed: the updates after the last snapshot before any other
step are in no file, and such a step is refused.

A power-function EMA holds no weight on the starting weights: unlike an
anchored :class:`~emaweights.EMA` it does not retain pre-trained knowledge by
itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import reprlib
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from emaweights.averager import SwapError, positive_int
from emaweights.averager import _short as _bounded
from emaweights.ema import EMA
from emaweights.io import LoadError, atomic_write, load_safetensors
from emaweights.multi import MultiEMA
from emaweights.schedules import PowerFunction

__all__ = [
    "MAX_SNAPSHOTS",
    "PostHocEMA",
    "gamma_to_sigma_rel",
    "load_manifest",
    "power_profile",
    "profile_error",
    "reconstruct",
    "sigma_rel_to_gamma",
    "solve_weights",
]

MANIFEST = "manifest.json"
_FORMAT = "emaweights.posthoc"
MAX_SNAPSHOTS = 4096
"""Most snapshot entries a manifest may list (the solve's Gram matrix is 128 MiB then)."""
_MAX_COUNT = 2**53  # counters above this are not exact in float64
_MAX_MANIFEST_BYTES = 64 * 2**20


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

    It has the averager protocol (:class:`~emaweights.averager.AveragerProtocol`)
    by composition over a :class:`~emaweights.MultiEMA` of the tracked profiles
    (which owns the storage, the clock and the guards): ``applied``,
    ``averaged_state_dict`` and ``copy_to`` use the first ``sigma_rel``'s
    average unless ``index`` says otherwise, and :meth:`state_dict` adds the
    snapshot list, so that a run resumed with :meth:`load_state_dict` continues
    the numbering and the manifest in the same directory.

    Args:
        model: the model (bare or wrapped).
        directory: where snapshots and ``manifest.json`` go (created on the first save).
        sigma_rels: the tracked profiles; two well-separated ones (the paper's
            0.05 and 0.10) suffice to reconstruct a range of lengths.
        snapshot_every: save every average every this many optimizer steps.
        update_every: average every this many optimizer steps.
        dtype: dtype of the saved snapshots (float32 by default: fp16 snapshots
            lose the small differences the least-squares solve combines).
        overwrite: start a new run in a directory that already holds a manifest
            (its snapshots are replaced). By default the first snapshot refuses
            it: a resumed run must :meth:`load_state_dict` to continue it.
        **options: other :class:`~emaweights.EMA` options (``start_step``,
            ``include_frozen``, ``exclude``, ``buffers``, ``device``, ``foreach``,
            ``nonfinite``).

    Raises:
        ValueError: a ``sigma_rel`` out of range, or ``snapshot_every`` not a positive int.

    """

    FORMAT = "emaweights.PostHocEMA"
    VERSION = 1

    def __init__(
        self,
        model: nn.Module,
        directory: str | Path,
        *,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: int = 1000,
        update_every: int = 1,
        dtype: torch.dtype = torch.float32,
        overwrite: bool = False,
        **options: Any,
    ) -> None:
        if not isinstance(overwrite, bool):
            raise ValueError(f"overwrite must be a bool, got {_bounded(overwrite)}")
        self.overwrite = overwrite
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int):
            raise ValueError(f"snapshot_every must be a positive int, got {snapshot_every!r}")
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be a positive int, got {snapshot_every!r}")
        self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.directory = Path(directory)
        self.snapshot_every = snapshot_every
        self.snapshot_dtype = dtype
        self.multi = MultiEMA(
            model, [PowerFunction(g) for g in self.gammas], update_every=update_every, **options
        )
        self.model = model
        self.snapshots: list[dict[str, Any]] = []

    # -- the protocol, over the tracked EMAs ---------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps seen."""
        return self.multi.step

    @property
    def num_updates(self) -> int:
        """Averaging updates applied (the same for every profile)."""
        return self.multi.num_updates

    @property
    def emas(self) -> list[EMA]:
        """The tracked power EMAs, in ``sigma_rels`` order."""
        return self.multi.emas

    def __len__(self) -> int:
        return len(self.multi)

    def __getitem__(self, index: int) -> EMA:
        """The EMA of the ``index``-th ``sigma_rel``."""
        return self.multi[index]

    @property
    def is_applied(self) -> bool:
        """Whether one of the averages is swapped into the model now."""
        return self.multi.is_applied

    @property
    def shadow(self) -> Mapping[str, Tensor]:
        """The first profile's averaged tensors by canonical name (read-only views)."""
        return self.multi[0].shadow

    def stats(self, drift: bool = False) -> dict[str, Any]:
        """Each profile's observables (see :meth:`MultiEMA.stats`)."""
        return self.multi.stats(drift)

    def apply_shadow(self, index: int = 0) -> None:
        """Swap the ``index``-th average into the model (see :meth:`EMA.apply_shadow`)."""
        self.multi[index].apply_shadow()

    def restore(self) -> None:
        """Put the live weights back after :meth:`apply_shadow` (see :meth:`EMA.restore`)."""
        applied = [e for e in self.multi.emas if e.is_applied]
        if not applied:
            self.multi[0].restore()  # raises the protocol's SwapError
        for e in applied:
            e.restore()

    @contextlib.contextmanager
    def applied(self, index: int = 0) -> Iterator[nn.Module]:
        """Evaluate with the ``index``-th average swapped in (see :meth:`EMA.applied`)."""
        with self.multi.applied(index) as model:
            yield model

    def averaged_state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """A model state dict holding the ``index``-th average (every tied alias included)."""
        return self.multi.averaged_state_dict(index)

    def copy_to(self, model: nn.Module | None = None, index: int = 0) -> None:
        """Write the ``index``-th average into ``model`` (see :meth:`EMA.copy_to`)."""
        self.multi.copy_to(model, index)

    def update(self, step: int | None = None) -> None:
        """Update every average; snapshot when the step is a multiple of ``snapshot_every``."""
        self.multi.update(step)
        if self.step % self.snapshot_every == 0 and self.multi[0].num_updates > 0:
            self.save_snapshot()

    # -- snapshots ----------------------------------------------------------

    def _manifest(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": 1,
            "snapshot_every": self.snapshot_every,
            "update_every": self.multi[0].update_every,
            "start_step": self.multi[0].start_step,
            "snapshots": self.snapshots,
        }

    def save_snapshot(self) -> None:
        """Save every average now, and rewrite the manifest (atomically).

        Raises:
            FileExistsError: the first snapshot of a tracker that loaded no state,
                in a directory that holds a manifest (unless ``overwrite=True``).
        """
        if not self.snapshots and not self.overwrite and (self.directory / MANIFEST).exists():
            # Starting at 000000 would replace an earlier run's snapshots and drop them
            # from the manifest: a resume must load its state first.
            raise FileExistsError(
                f"{str(self.directory / MANIFEST)!r} exists: load the run's state with "
                "load_state_dict() to continue it, or pass overwrite=True to start over"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        entries: list[dict[str, Any]] = []
        for gamma, ema in zip(self.gammas, self.multi.emas, strict=True):
            name = f"{len(self.snapshots) + len(entries):06d}.safetensors"
            tensors = {
                k: (v.to(self.snapshot_dtype) if v.is_floating_point() else v)
                .detach()
                .to("cpu", copy=True)
                .contiguous()
                for k, v in ema.shadow.items()
            }
            _write_snapshot(self.directory / name, tensors, _snapshot_metadata(ema, gamma))
            entries.append(
                {"file": name, "step": ema.step, "gamma": gamma, "num_updates": ema.num_updates}
            )
        self.snapshots.extend(entries)
        # A crash never leaves half a manifest: temporary file, fsync, rename.
        with atomic_write(self.directory / MANIFEST) as f:
            f.write(json.dumps(self._manifest(), indent=1).encode())

    # -- checkpoints --------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "sigma_rels": list(self.sigma_rels),
            "snapshot_every": self.snapshot_every,
            "dtype": str(self.snapshot_dtype),
        }

    def state_dict(self) -> dict[str, Any]:
        """The state: every tracked EMA's state and the snapshot list.

        Only tensors and plain values (``torch.load(weights_only=True)``). The
        directory is not saved: the averager loading it names it.
        """
        return {
            "format": self.FORMAT,
            "version": self.VERSION,
            "config": self._config(),
            "emas": self.multi.state_dict()["emas"],
            "snapshots": [dict(e) for e in self.snapshots],
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned, in the averager's own directory.

        Everything is validated before anything changes: the format and
        version, the configuration (``sigma_rels``, ``snapshot_every``,
        ``dtype`` must be this averager's, whatever ``strict``), each EMA's
        state (see :meth:`EMA.load_state_dict`; ``strict`` applies there), the
        snapshot list (file numbering, profiles, counters no later than the
        state's), and the directory's manifest, which must list exactly the
        state's snapshots (and every file must exist). Later snapshots go on
        with the next number, and the manifest keeps the earlier ones.

        Raises:
            ValueError: any mismatch (``emaweights.io.LoadError`` for the
                directory), named; the averager is unchanged.
            KeyError: missing or unexpected tensor names (from the EMAs).
            FileNotFoundError: a snapshot the state lists is not in the directory.
            SwapError: an average is applied.

        """
        if self.is_applied:
            raise SwapError(
                "load_state_dict() called while an average is applied; call restore() first"
            )
        kind = self.FORMAT.removeprefix("emaweights.")
        if not isinstance(state, Mapping) or state.get("format") != self.FORMAT:
            found = _bounded(state.get("format")) if isinstance(state, Mapping) else _bounded(state)
            raise ValueError(f"not an emaweights {kind} state (format {found})")
        version = state.get("version")
        if type(version) is not int or version != self.VERSION:
            raise ValueError(f"unsupported {kind} state version {_bounded(version)}")
        config, mine = state.get("config"), self._config()
        if not isinstance(config, Mapping) or dict(config) != mine:
            # The snapshot directory holds files of these profiles and this cadence:
            # refused whatever ``strict``, a resume with others would mix them.
            saved = config if isinstance(config, Mapping) else {}
            diff = {k: (_bounded(saved.get(k)), _bounded(v)) for k, v in mine.items()}
            diff = {k: d for k, d in diff.items() if saved.get(k) != mine[k]}
            raise ValueError(
                f"saved {kind} configuration differs from this one (saved, current): "
                f"{diff or _bounded(config)}"
            )
        emas = state.get("emas")
        if not isinstance(emas, list) or not emas or not isinstance(emas[0], Mapping):
            raise ValueError(f"saved emas must be a list of EMA states, got {_bounded(emas)}")
        step = positive_int(emas[0].get("step"), "saved step", minimum=0)
        num_updates = positive_int(emas[0].get("num_updates"), "saved num_updates", minimum=0)
        snapshots = self._parse_snapshots(state.get("snapshots"), step, num_updates)
        self._check_directory(snapshots)
        self.multi.load_state_dict({"format": "emaweights.MultiEMA", "emas": emas}, strict)
        self.snapshots = snapshots

    def _parse_snapshots(
        self, entries: object, step: int, num_updates: int
    ) -> list[dict[str, Any]]:
        width = len(self.gammas)
        if not isinstance(entries, list) or len(entries) % width or len(entries) > MAX_SNAPSHOTS:
            raise ValueError(
                f"saved snapshots must be a list of a multiple of {width} entries (at most "
                f"{MAX_SNAPSHOTS}), got {_bounded(entries)}"
            )
        out = [
            _snapshot_entry(self.directory, e, f"saved snapshot {i}") for i, e in enumerate(entries)
        ]
        last = (0, 0)
        for i, e in enumerate(out):
            where = f"saved snapshot {i}"
            if e["file"] != f"{i:06d}.safetensors" or e["gamma"] != self.gammas[i % width]:
                raise ValueError(
                    f"{where}: expected file {i:06d}.safetensors of gamma "
                    f"{self.gammas[i % width]!r}, got {_bounded(e['file'])} of {e['gamma']!r}"
                )
            here = (e["step"], e["num_updates"])
            first = out[i - i % width]
            if i % width and here != (first["step"], first["num_updates"]):
                raise ValueError(f"{where}: step/num_updates {here} differ from its group's")
            if here < last or here[1] < last[1]:
                raise ValueError(f"{where}: step/num_updates {here} go back from {last}")
            last = here
        if last[0] > step or last[1] > num_updates:
            raise ValueError(
                f"saved snapshots reach step {last[0]} ({last[1]} updates), past the saved "
                f"step {step} ({num_updates} updates)"
            )
        return out

    def _check_directory(self, snapshots: list[dict[str, Any]]) -> None:
        """The directory must hold exactly the state's snapshots (a resume continues it)."""
        folder = self.directory
        if not (folder / MANIFEST).exists():
            if snapshots:
                raise LoadError(
                    f"the state lists {len(snapshots)} snapshots but {str(folder)!r} has no "
                    f"{MANIFEST}: resume in the directory the run wrote"
                )
            return
        manifest = load_manifest(folder)
        listed = manifest["snapshots"]
        if listed != snapshots:
            same = next(
                (i for i, (a, b) in enumerate(zip(listed, snapshots, strict=False)) if a != b),
                min(len(listed), len(snapshots)),
            )
            raise LoadError(
                f"{str(folder / MANIFEST)!r} lists {len(listed)} snapshots, the state "
                f"{len(snapshots)}; they differ from entry {same} on (the manifest's steps: "
                f"{_snapshot_steps(listed)}). Resume from the checkpoint that matches the "
                "directory, or in a copy of the directory cut to the state's snapshots"
            )
        mine = self._manifest()
        for key in ("snapshot_every", "update_every", "start_step"):
            if manifest[key] != mine[key]:
                raise LoadError(f"{MANIFEST}: {key} {manifest[key]} differs from this {mine[key]}")
        for entry in snapshots:
            _regular_file(folder / entry["file"], "snapshot")

    def __repr__(self) -> str:
        return (
            f"PostHocEMA(sigma_rels={self.sigma_rels}, snapshot_every={self.snapshot_every}, "
            f"step={self.step}, snapshots={len(self.snapshots)})"
        )


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "post-hoc EMA snapshots need safetensors: pip install 'emaweights[safetensors]'"
        ) from err
    return safetensors.torch


def _write_snapshot(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write one snapshot file atomically (temporary file, fsync, rename, folder fsync).

    A process killed mid-save leaves the previous file (or none), never a torn one.
    """
    payload = _safetensors().save(tensors, metadata=metadata)
    with atomic_write(path) as f:
        f.write(payload)


def _snapshot_metadata(ema: EMA, gamma: float) -> dict[str, str]:
    """What the manifest says of a snapshot, kept in the file too (to recover a lost manifest)."""
    return {"step": str(ema.step), "gamma": repr(gamma), "num_updates": str(ema.num_updates)}


def _short(value: object) -> str:
    """``repr`` cut to a bounded length: manifests are untrusted input."""
    text = reprlib.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _regular_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (a FIFO or device would block a read)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from None
    if not stat.S_ISREG(mode):
        raise LoadError(f"{what} {str(path)!r} is not a regular file")
    return path


def _count(entry: dict[str, Any], key: str, where: str, low: int) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _MAX_COUNT:
        raise LoadError(f"{where}: {key} must be an int in [{low}, 2**53], got {_short(value)}")
    return value


def _snapshot_file(directory: Path, name: object, where: str) -> str:
    """A snapshot ``file`` entry: a plain name whose file resolves inside ``directory``."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise LoadError(f"{where}: file must be a file name, got {_short(name)}")
    if Path(name).name != name or name in (".", "..") or "\\" in name:
        raise LoadError(f"{where}: file {_short(name)} is not a plain name inside the folder")
    if (directory / name).resolve().parent != directory.resolve():
        raise LoadError(f"{where}: file {_short(name)} links outside {str(directory)!r}")
    return name


def _snapshot_entry(directory: Path, entry: object, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict) or not {"file", "step", "gamma", "num_updates"} <= set(entry):
        raise LoadError(f"{where}: malformed snapshot entry {_short(entry)}")
    gamma = entry["gamma"]
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not -1 < gamma < 1e6:
        raise LoadError(f"{where}: gamma must be a number in (-1, 1e6), got {_short(gamma)}")
    step = _count(entry, "step", where, 0)
    num_updates = _count(entry, "num_updates", where, 0)
    if num_updates > step:
        raise LoadError(f"{where}: num_updates={num_updates} exceeds step={step}")
    file = _snapshot_file(directory, entry["file"], where)
    return {"file": file, "step": step, "gamma": float(gamma), "num_updates": num_updates}


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` of a snapshot directory.

    Every field is checked before anything is read or allocated: counters are
    ints in range (``num_updates <= step``), ``update_every >= 1``, at most
    ``MAX_SNAPSHOTS`` entries, and every ``file`` is a plain name inside
    ``directory`` (no ``..``, no absolute path, no symlink out).

    Returns:
        The manifest, with its snapshot entries normalised.

    Raises:
        FileNotFoundError: no manifest in ``directory``.
        emaweights.io.LoadError: not a post-hoc EMA manifest, or a field out of
            range or of the wrong type (the message names it).

    """
    folder = Path(directory)
    path = folder / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {str(directory)!r}: not a snapshot directory")
    if _regular_file(path, "manifest").stat().st_size > _MAX_MANIFEST_BYTES:
        raise LoadError(f"{path}: larger than {_MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, or nesting too deep
        raise LoadError(f"{path} is not valid JSON: {_short(str(err))}") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise LoadError(f"{path} is not a post-hoc EMA manifest")
    if data.get("version") != 1:
        raise LoadError(f"{path}: unsupported version {_short(data.get('version'))}")
    for key, low in (("snapshot_every", 1), ("update_every", 1), ("start_step", 0)):
        _count(data, key, str(path), low)
    entries = data.get("snapshots")
    if not isinstance(entries, list) or not entries:
        raise LoadError(f"{path}: snapshots must be a non-empty list, got {_short(entries)}")
    if len(entries) > MAX_SNAPSHOTS:
        raise LoadError(f"{path}: {len(entries)} snapshots, more than {MAX_SNAPSHOTS}")
    data["snapshots"] = [
        _snapshot_entry(folder, e, f"{path} snapshot {i}") for i, e in enumerate(entries)
    ]
    return data


def _inner(g_a: Tensor, n_a: Tensor, g_b: Tensor, n_b: Tensor) -> Tensor:
    r"""Closed-form :math:`\langle p_a, p_b\rangle` of continuous power profiles.

    With :math:`p(t) = (\gamma+1)\,t^\gamma / n^{\gamma+1}` on :math:`(0, n]`
    and :math:`n_a \le n_b`,

    .. math::
        \langle p_a, p_b\rangle = \frac{(\gamma_a+1)(\gamma_b+1)}{(\gamma_a+\gamma_b+1)\,n_b}
        \Big(\frac{n_a}{n_b}\Big)^{\gamma_b}

    (written with the ratio :math:`\le 1` so that no power overflows).
    """
    short, long_ = torch.minimum(n_a, n_b), torch.maximum(n_a, n_b)
    g_long = torch.where(n_a >= n_b, g_a, g_b)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * long_) * (short / long_) ** g_long


def _profiles(snapshots: Sequence[tuple[float, int]]) -> tuple[Tensor, Tensor]:
    if not 1 <= len(snapshots) <= MAX_SNAPSHOTS:
        raise ValueError(f"need 1 to {MAX_SNAPSHOTS} snapshots, got {len(snapshots)}")
    gammas = torch.tensor([float(g) for g, _ in snapshots], dtype=torch.float64)
    counts = torch.tensor([float(n) for _, n in snapshots], dtype=torch.float64)
    if not bool(((gammas > -1) & (gammas < 1e6)).all()) or not bool((counts >= 1).all()):
        raise ValueError("every snapshot needs -1 < gamma < 1e6 and num_updates >= 1")
    return gammas, counts


def solve_weights(snapshots: Sequence[tuple[float, int]], gamma: float, num_updates: int) -> Tensor:
    r"""Least-squares coefficients :math:`x` combining snapshot profiles into a target.

    Minimises :math:`\|\sum_i x_i p_i - p^*\|_2` over the continuous profiles
    :math:`p(t) = (\gamma+1)\,t^\gamma / n^{\gamma+1}` on :math:`(0, n]` (time
    in updates), through the :math:`S \times S` Gram matrix of their closed-form
    inner products (:func:`_inner`): memory and time do not depend on the
    number of updates. This is the norm that bounds the result: the discrete
    weight :math:`w_\gamma(m; n)` is exactly :math:`\int_{m-1}^m p(t)\,dt`, so
    an EMA is :math:`\int p(t)\,\theta_{\lceil t\rceil} dt` and a reconstruction
    misses the target EMA by at most
    :math:`\|\sum_i x_i p_i - p^*\|_2 \sqrt{\sum_m \theta_m^2}` per coordinate
    (see :func:`profile_error`).

    Args:
        snapshots: :math:`(\gamma_i, n_i)` of each snapshot, :math:`n_i \ge 1`.
        gamma: the target :math:`\gamma^*`.
        num_updates: the target :math:`n^* \ge 1`.

    Returns:
        float64 coefficients, one per snapshot.

    Raises:
        ValueError: an empty or too long list, or a profile out of range.

    """
    gammas, counts = _profiles(snapshots)
    g_t, n_t = _target(gamma, num_updates)
    gram = _inner(gammas[:, None], counts[:, None], gammas[None], counts[None])
    rhs = _inner(gammas, counts, g_t, n_t)
    # Equilibrate (unit diagonal), then a rank-revealing solve: profiles of
    # nearby lengths are almost parallel, so the Gram matrix is near singular
    # and the minimum-norm solution keeps the coefficients (and the snapshots'
    # rounding they multiply) small.
    scale = gram.diagonal().rsqrt()
    scaled = gram * scale[:, None] * scale[None]
    solution = torch.linalg.lstsq(scaled, (rhs * scale)[:, None], driver="gelsd").solution
    x: Tensor = solution[:, 0] * scale
    return x


def _target(gamma: float, num_updates: int) -> tuple[Tensor, Tensor]:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not -1 < gamma < 1e6:
        raise ValueError(f"gamma must be a number in (-1, 1e6), got {gamma!r}")
    if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 1:
        raise ValueError(f"num_updates must be an int >= 1, got {num_updates!r}")
    return torch.tensor(float(gamma), dtype=torch.float64), torch.tensor(
        float(num_updates), dtype=torch.float64
    )


def profile_error(
    snapshots: Sequence[tuple[float, int]], gamma: float, num_updates: int, weights: Tensor
) -> float:
    r"""Relative error :math:`\|\sum_i x_i p_i - p^*\|_2 / \|p^*\|_2` of a solve.

    0 when the target was tracked (it is one of the snapshots); the
    reconstruction then equals the tracked EMA up to the snapshots' rounding.
    """
    gammas, counts = _profiles(snapshots)
    g_t, n_t = _target(gamma, num_updates)
    x = weights.to(torch.float64)
    gram = _inner(gammas[:, None], counts[:, None], gammas[None], counts[None])
    rhs = _inner(gammas, counts, g_t, n_t)
    target = _inner(g_t, n_t, g_t, n_t)
    squared = target - 2 * (x @ rhs) + x @ gram @ x
    return math.sqrt(max(float(squared), 0.0) / float(target))


def _snapshot_steps(entries: Sequence[dict[str, Any]]) -> str:
    """The snapshot steps, at most six of them: a manifest may list thousands."""
    steps = [str(s) for s in sorted({int(s["step"]) for s in entries})]
    return ", ".join(steps if len(steps) <= 6 else [*steps[:5], "...", steps[-1]])


def _plan(manifest: dict[str, Any], step: int | None) -> tuple[int, list[dict[str, Any]], int]:
    """The step, the snapshots used and the target update count, or a clear refusal."""
    entries: list[dict[str, Any]] = manifest["snapshots"]
    if step is None:
        step = max(s["step"] for s in entries)
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"step must be an int, got {_short(step)}")
    at_step = {s["num_updates"] for s in entries if s["step"] == step}
    if not at_step:
        # The updates after the last snapshot before ``step`` are in no file:
        # no combination can hold them (a fit would be off by tens of percent).
        raise ValueError(
            f"step {step} is not a snapshot step: a power EMA can be reconstructed only at "
            f"a step where snapshots were saved ({_snapshot_steps(entries)})"
        )
    if len(at_step) > 1:
        raise LoadError(
            f"snapshots at step {step} disagree on num_updates: {_short(sorted(at_step))}"
        )
    num_updates = at_step.pop()
    if num_updates < 1:
        raise ValueError(f"no update was averaged by step {step}: nothing to reconstruct")
    # Snapshots with no update hold only the starting weights, on which no
    # power profile puts weight: they take no part.
    used = [s for s in entries if s["step"] <= step and s["num_updates"] >= 1]
    return step, used, num_updates


def _load_snapshot(directory: Path, entry: dict[str, Any]) -> dict[str, Tensor]:
    path = _regular_file((directory / entry["file"]).resolve(), "snapshot")
    return load_safetensors(path)


def reconstruct(
    directory: str | Path, sigma_rel: float, step: int | None = None
) -> dict[str, Tensor]:
    """Reconstruct the power EMA of ``sigma_rel`` at ``step`` from saved snapshots.

    Args:
        directory: a snapshot directory written by :class:`PostHocEMA`.
        sigma_rel: the wanted profile width.
        step: a step at which snapshots were saved (default: the last);
            only snapshots up to it are used. Any other step is refused: the
            updates after the last snapshot before it are in no file.

    Returns:
        The averaged tensors by canonical name (float32, or the snapshots' dtype).

    Raises:
        ValueError: ``sigma_rel`` out of range, or ``step`` not a snapshot step.
        emaweights.io.LoadError: a malformed manifest (see :func:`load_manifest`),
            or a snapshot that is not a safetensors file or does not match the others.
        FileNotFoundError: no manifest, or a snapshot file missing.

    """
    folder = Path(directory)
    manifest = load_manifest(folder)
    gamma = sigma_rel_to_gamma(sigma_rel)
    _, used, num_updates = _plan(manifest, step)
    x = solve_weights([(s["gamma"], s["num_updates"]) for s in used], gamma, num_updates)
    out: dict[str, Tensor] = {}
    layout: dict[str, tuple[torch.dtype, torch.Size]] = {}
    for coef, entry in zip(x.tolist(), used, strict=True):
        tensors = _load_snapshot(folder, entry)
        found = {k: (v.dtype, v.shape) for k, v in tensors.items()}
        if layout and found != layout:
            raise LoadError(f"snapshot {entry['file']!r} holds other tensors than the first one")
        layout = found
        for name, t in tensors.items():
            if not t.is_floating_point():
                out[name] = t  # integer buffers: the latest snapshot's
                continue
            out[name] = out.get(name, torch.zeros(t.shape, dtype=torch.float64)) + coef * t.double()
    return {k: v.to(layout[k][0]) for k, v in out.items()}
