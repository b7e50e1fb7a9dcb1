r"""Decay as a function of the optimizer step.

A schedule gives :math:`\beta_t`, the decay applied for the optimizer step
:math:`t` (counted from 0 at the first step the average sees). When the average
is updated only every :math:`k` steps, the decay of one update is the product of
the per-step decays it stands for,

.. math:: \beta_{t_0 \to t_0 + k} = \prod_{t = t_0}^{t_0 + k - 1} \beta_t ,

so the averaging horizon, measured in optimizer steps, does not change with
``update_every`` (for a constant decay this is :math:`\beta^k`).

Every schedule is a small frozen dataclass: cheap to call on the host (no tensor,
no device sync) and round-trippable through :func:`schedule_from_dict` for
checkpoints.

A user schedule resumes the same way once it names itself: a frozen dataclass
subclass of :class:`Schedule` that sets a class attribute ``kind`` is
registered under that kind when the class is defined, and a checkpoint that
names the kind is rebuilt from it (the module defining the class must be
imported before the load)::

    @dataclass(frozen=True)
    class Cosine(Schedule):
        kind: ClassVar[str] = "my_project.cosine"
        peak: float = 0.999
        def __call__(self, step: int) -> float: ...

Two different classes cannot claim one kind; a kind nobody registered is
refused on load with the list of the known ones.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

__all__ = [
    "Constant",
    "HalfLife",
    "PowerFunction",
    "PowerWarmup",
    "Schedule",
    "Warmup",
    "as_schedule",
    "schedule_from_dict",
]


def _check_offset(value: object) -> int:
    """Return ``value`` if it is a non-negative int, or raise naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"offset must be an int >= 0 (optimizer steps), got {value!r}")
    return value


# Up to this many steps per update a schedule's decay is the exact product of its
# per-step decays; past it (a restored state far ahead of its last update, or
# ``update(step=...)`` jumping) closed forms or a quadrature keep the time bounded.
_EXACT_STEPS = 1024


def _brief(value: object, limit: int = 80) -> str:
    """A bounded ``repr`` of a value a saved schedule may hold.

    A hostile value (a shared-node DAG) has a repr that never ends; reprlib
    visits a bounded number of levels and items.
    """
    return _REPR.repr(value)[:limit]


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 8, 8, 8
_REPR.maxstring = _REPR.maxother = 40


def _real_scalar(value: object) -> float | None:
    """``value`` as a float if it is one real number, else ``None``.

    Accepts Python and NumPy real scalars (``numbers.Real``) and one-element
    real torch tensors (read once, a host sync); refuses bools, complex numbers
    and multi-element tensors.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.detach().reshape(()).item())
    if isinstance(value, numbers.Real) and type(value).__name__ != "bool_":  # np.bool_ too
        return float(value)
    return None


def _check_decay(value: float, what: str = "decay") -> float:
    """Return ``value`` as a float in [0, 1], or raise naming it."""
    real = _real_scalar(value)
    if real is None:
        shown = (
            f"a tensor of shape {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else _brief(value)
        )
        raise TypeError(f"{what} must be a real number in [0, 1], got {shown}")
    v = real
    if not (0.0 <= v <= 1.0):  # also rejects NaN
        raise ValueError(f"{what} must be in [0, 1], got {_brief(value)}")
    return v


_KINDS: dict[str, type[Schedule]] = {}
"""Every schedule class by its ``kind``, filled by :meth:`Schedule.__init_subclass__`."""


@dataclass(frozen=True)
class Schedule:
    """Base class: maps an optimizer step to a decay in [0, 1]."""

    kind: ClassVar[str] = "schedule"
    #: Fields added after the first release: a saved schedule without them loads
    #: with their defaults (checkpoints written before they existed).
    added_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register a subclass that names its own ``kind`` (see the module docstring)."""
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is None:
            return  # no kind of its own: not resumable (to_dict says so)
        if not isinstance(kind, str) or not kind or kind == Schedule.kind:
            raise TypeError(f"{cls.__qualname__}.kind must be a new non-empty str, got {kind!r}")
        known = _KINDS.get(kind)
        same = known is not None and (known.__module__, known.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )
        if known is not None and not same:
            raise TypeError(
                f"schedule kind {kind!r} is already taken by "
                f"{known.__module__}.{known.__qualname__}; choose another kind for "
                f"{cls.__module__}.{cls.__qualname__}"
            )
        _KINDS[kind] = cls  # the same class defined again (a reload) replaces the old one

    def __call__(self, step: int) -> float:
        r"""Return :math:`\beta_t` for optimizer step ``step`` (0-based)."""
        raise NotImplementedError

    def decay_over(self, start: int, steps: int) -> float:
        r"""Return :math:`\prod_{t=start}^{start+steps-1} \beta_t`, the decay of one update.

        Args:
            start: first optimizer step covered by the update (0-based).
            steps: number of optimizer steps the update stands for (>= 1).

        """
        out = 1.0
        for t in range(start, start + steps):
            out *= self(t)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Serialize to plain types (for ``state_dict``).

        Raises:
            TypeError: the class has no registered ``kind`` of its own, or is not
                a dataclass itself (its fields would be lost).

        """
        cls = type(self)
        if _KINDS.get(cls.__dict__.get("kind", "")) is not cls:
            raise TypeError(
                f"{cls.__qualname__} cannot be saved: give it a class attribute "
                f'kind: ClassVar[str] = "..." of its own (see emaweights.schedules)'
            )
        if "__dataclass_fields__" not in cls.__dict__:
            raise TypeError(
                f"{cls.__qualname__} cannot be saved: decorate it with @dataclass(frozen=True)"
            )
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class Constant(Schedule):
    r"""A constant decay: :math:`\beta_t = \beta`.

    Args:
        decay: :math:`\beta` in [0, 1]; 0 copies the live weights, 1 freezes the average.

    """

    decay: float = 0.999
    kind: ClassVar[str] = "constant"

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _check_decay(self.decay))

    def __call__(self, step: int) -> float:
        """Return the constant decay."""
        return self.decay

    def decay_over(self, start: int, steps: int) -> float:
        r"""Return :math:`\beta^{k}` in closed form."""
        return self.decay**steps


@dataclass(frozen=True)
class HalfLife(Schedule):
    r"""The decay whose weights halve every ``half_life`` optimizer steps.

    .. math:: \beta = 2^{-1 / h}

    Args:
        half_life: :math:`h`, in optimizer steps (> 0).

    """

    half_life: float = 693.0
    kind: ClassVar[str] = "half_life"

    def __post_init__(self) -> None:
        h = self.half_life
        if (
            isinstance(h, bool)
            or not isinstance(h, (int, float))
            or not (h > 0 and math.isfinite(h))
        ):
            raise ValueError(
                f"half_life must be a positive finite number of steps, got {_brief(h)}"
            )

    @property
    def decay(self) -> float:
        """The equivalent constant decay."""
        return float(0.5 ** (1.0 / self.half_life))

    def __call__(self, step: int) -> float:
        """Return :math:`2^{-1/h}`."""
        return self.decay

    def decay_over(self, start: int, steps: int) -> float:
        r"""Return :math:`2^{-k/h}` in closed form."""
        return float(0.5 ** (steps / self.half_life))


@dataclass(frozen=True)
class Warmup(Schedule):
    r"""The classic warm-up (TensorFlow's ``num_updates``): short memory early on.

    .. math:: \beta_t = \min\!\left(\beta, \frac{1 + t + o}{10 + t + o}\right)

    With the default ``offset`` :math:`o = 0` the first update (:math:`t = 0`)
    has :math:`\beta_0 = 0.1`. Libraries that count updates from 1 (torch_ema's
    ``num_updates``, diffusers' ``EMAModel`` after its copy step) use
    :math:`o = 1`; see ``docs/migration.md``.

    Args:
        decay: the final decay :math:`\beta`.
        offset: :math:`o`, optimizer steps added to :math:`t` (an int >= 0).

    """

    decay: float = 0.999
    offset: int = 0
    kind: ClassVar[str] = "warmup"
    added_fields: ClassVar[tuple[str, ...]] = ("offset",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _check_decay(self.decay))
        _check_offset(self.offset)

    def __call__(self, step: int) -> float:
        r"""Return :math:`\min(\beta, (1+t+o)/(10+t+o))`."""
        t = step + self.offset
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def decay_over(self, start: int, steps: int) -> float:
        r"""The exact product for short spans; a closed form past ``_EXACT_STEPS``.

        :math:`\beta_t = (1+t)/(10+t)` until it reaches :math:`\beta` at
        :math:`t^* = \lceil (10\beta - 1)/(1 - \beta) \rceil`, then :math:`\beta`; over
        :math:`[s, a)` the ramp telescopes to :math:`\prod_{j=1}^{9} (s+j)/(a+j)`, so

        .. math:: \prod_{t=s}^{s+k-1} \beta_t = \prod_{j=1}^{9} \frac{s+j}{a+j}
                  \; \beta^{\,s+k-a}, \qquad a = \min(\max(t^*, s), s+k).
        """
        if steps <= _EXACT_STEPS:
            return super().decay_over(start, steps)
        start += self.offset  # the closed form is in the shifted step t + o
        end = start + steps
        b = self.decay
        knee = end if b >= 1.0 else max(0, math.ceil((10.0 * b - 1.0) / (1.0 - b)))
        a = min(max(knee, start), end)
        ramp = math.prod((start + j) / (a + j) for j in range(1, 10))
        return float(ramp * b ** (end - a))


@dataclass(frozen=True)
class PowerWarmup(Schedule):
    r"""The inverse-power warm-up (used by diffusion training codes).

    .. math:: \beta_t = \operatorname{clip}\!\left(1 - (1 + (t + o)/\gamma_{inv})^{-p},
              \beta_{min}, \beta_{max}\right)

    ``power=2/3`` reaches 0.999 near 31.6k steps; ``power=3/4`` near 10k steps.
    timm's ``ModelEmaV3``, ema-pytorch and diffusers' ``EMAModel`` compute the same
    formula with their step counted from 1 after a copy step: ``offset=1`` with
    ``start_step = update_after_step + 1`` reproduces them (``docs/migration.md``).

    Args:
        inv_gamma: :math:`\gamma_{inv}` (> 0), the step scale.
        power: :math:`p` (> 0).
        min_decay: lower clip :math:`\beta_{min}`.
        max_decay: upper clip :math:`\beta_{max}`.
        offset: :math:`o`, optimizer steps added to :math:`t` (an int >= 0).

    """

    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_decay: float = 0.0
    max_decay: float = 0.9999
    offset: int = 0
    kind: ClassVar[str] = "power_warmup"
    added_fields: ClassVar[tuple[str, ...]] = ("offset",)

    def __post_init__(self) -> None:
        if not (self.inv_gamma > 0 and math.isfinite(self.inv_gamma)):
            raise ValueError(f"inv_gamma must be positive and finite, got {_brief(self.inv_gamma)}")
        if not (self.power > 0 and math.isfinite(self.power)):
            raise ValueError(f"power must be positive and finite, got {_brief(self.power)}")
        lo = _check_decay(self.min_decay, "min_decay")
        hi = _check_decay(self.max_decay, "max_decay")
        if lo > hi:
            raise ValueError(f"min_decay ({lo!r}) must not exceed max_decay ({hi!r})")
        _check_offset(self.offset)

    def __call__(self, step: int) -> float:
        """Return the clipped inverse-power decay."""
        t = step + self.offset
        value = 1.0 - float((1.0 + t / self.inv_gamma) ** -self.power)
        return min(self.max_decay, max(self.min_decay, value))

    def decay_over(self, start: int, steps: int) -> float:
        r"""The exact product over the first ``_EXACT_STEPS`` steps, then a bounded form.

        Past them the clipped ends are powers (:math:`\beta_{min}^n`,
        :math:`\beta_{max}^n`) and the unclipped middle, where
        :math:`\log\beta_t` is smooth and slowly varying, is
        :math:`\exp \int_{a-1/2}^{b-1/2} \log\beta_t \, dt` (midpoint rule,
        by Simpson's rule in :math:`\log t`): constant time for any span.
        """
        if steps <= _EXACT_STEPS:
            return super().decay_over(start, steps)
        out = super().decay_over(start, _EXACT_STEPS)
        s, end = start + self.offset + _EXACT_STEPS, start + self.offset + steps
        g, p, lo, hi = self.inv_gamma, self.power, self.min_decay, self.max_decay

        def reach(v: float) -> float:  # first t with 1 - (1 + t/g)^-p >= v
            if v >= 1.0:
                return math.inf
            try:
                return float(g * ((1.0 - v) ** (-1.0 / p) - 1.0))
            except OverflowError:
                return math.inf

        t_lo = min(max(math.ceil(min(reach(lo), 2.0**62)), s), end)
        t_hi = min(max(math.ceil(min(reach(hi), 2.0**62)), t_lo), end)
        out *= lo ** (t_lo - s) * hi ** (end - t_hi)
        if t_hi > t_lo and out > 0.0:
            out *= math.exp(self._log_integral(t_lo - 0.5, t_hi - 0.5))
        return float(out)

    def _log_integral(self, a: float, b: float, n: int = 2048) -> float:
        r""":math:`\int_a^b \log(1 - (1+t/\gamma_{inv})^{-p})\,dt` , Simpson in ``log t``."""
        ua, ub = math.log(a), math.log(b)
        h = (ub - ua) / n

        def f(u: float) -> float:
            t = math.exp(u)
            x = (1.0 + t / self.inv_gamma) ** -self.power
            return math.log1p(-x) * t if x < 1.0 else -math.inf

        total = f(ua) + f(ub)
        total += sum((4.0 if i % 2 else 2.0) * f(ua + i * h) for i in range(1, n))
        return total * h / 3.0


@dataclass(frozen=True)
class PowerFunction(Schedule):
    r"""The power-function EMA of Karras et al. 2024 (EDM2), used by post-hoc EMA.

    .. math:: \beta_t = \left(\frac{t}{t + 1}\right)^{\gamma + 1}

    (``t`` 0-based, so the first update copies the live weights). After ``n``
    updates the average weighs the ``m``-th averaged weights by
    :math:`(m^{\gamma+1} - (m-1)^{\gamma+1}) / n^{\gamma+1}`, a profile
    :math:`\propto t^\gamma`; it holds no weight on the starting weights.
    With ``update_every=k`` the per-update decay telescopes to
    :math:`((n-1)/n)^{\gamma+1}`, the same profile over the updates taken.

    Args:
        gamma: :math:`\gamma > -1`; see :func:`emaweights.post_hoc.sigma_rel_to_gamma`.

    """

    gamma: float = 6.94
    kind: ClassVar[str] = "power_function"

    def __post_init__(self) -> None:
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (g > -1 and g < 1e6):
            raise ValueError(f"gamma must be a number > -1, got {_brief(g)}")

    def __call__(self, step: int) -> float:
        r"""Return :math:`(t/(t+1))^{\gamma+1}`."""
        return float((step / (step + 1)) ** (self.gamma + 1))

    def decay_over(self, start: int, steps: int) -> float:
        r"""Closed form: the product telescopes to :math:`(s/(s+k))^{\gamma+1}`."""
        return float((start / (start + steps)) ** (self.gamma + 1))


def schedule_from_dict(data: dict[str, Any]) -> Schedule:
    """Rebuild a schedule written by :meth:`Schedule.to_dict`.

    Raises:
        ValueError: the kind is unknown or a field is missing or extra.

    """
    kind = data.get("kind")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None  # never str() a hostile value
    if cls is None:
        raise ValueError(
            f"unknown schedule kind {_brief(kind)}; known: {sorted(_KINDS)} (a user "
            "schedule must be imported before the load to register its kind)"
        )
    names = {f.name for f in fields(cls)}
    args = {k: v for k, v in data.items() if k != "kind"}
    # A field added after the first release may be absent (an older checkpoint): default.
    missing_ok = set(cls.added_fields)
    if not (set(args) <= names and names - set(args) <= missing_ok):
        raise ValueError(
            f"schedule {kind!r} expects fields {sorted(names)}, got {_brief(list(args))}"
        )
    return cls(**args)


def as_schedule(decay: float | Schedule) -> Schedule:
    """Accept a number (a constant decay) or a schedule.

    Raises:
        TypeError: ``decay`` is neither.
        ValueError: the number is outside [0, 1] or NaN.

    """
    if isinstance(decay, Schedule):
        return decay
    return Constant(_check_decay(decay))
