r"""The exponential moving average of a model's weights.

After every optimizer step :math:`t` (or every ``update_every`` steps), with the
decay :math:`\beta_t` of a :mod:`~emaweights.schedules` schedule:

.. math::
    \bar\theta_t = \beta_t\,\bar\theta_{t-1} + (1 - \beta_t)\,\theta_t ,
    \qquad \bar\theta_0 = \theta_0 .

Unrolled for a constant decay, the average still weighs the starting weights by
:math:`\beta^T` (:attr:`EMA.init_weight`):

.. math::
    \bar\theta_T = \beta^T\theta_0 + (1-\beta)\sum_{t=1}^{T}\beta^{T-t}\theta_t .

For fine-tuning that term is the point: it anchors the average to the
pre-trained weights (``anchor="init"``, the default). For training from scratch
it is a lag; ``anchor="debiased"`` removes it exactly,

.. math::
    \hat\theta_T = \frac{\bar\theta_T - P_T\,\theta_0}{1 - P_T}, \qquad
    P_T = \prod_{t \le T} \beta_t ,

computed in place with the weight :math:`w_t = (1-\beta_t)/(1-P_t)` per update, so
it costs no extra memory and the shadow stays swappable by pointer.

The seed API works as written: ``EMA(model, 0.999)``, ``register()``,
``update()``, ``apply_shadow()``, ``restore()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from emaweights._naming import BufferPolicy, collect, warn_unmatched
from emaweights._sharding import reshard
from emaweights.averager import (
    Averager,
    NonFiniteError,
    NonFinitePolicy,
    SwapError,
    _short,
    check_bool,
    is_plain,
    load_into,
    positive_int,
)
from emaweights.schedules import Schedule, as_schedule, schedule_from_dict
from emaweights.shadow import Rounding, Shadow

__all__ = ["EMA", "NonFiniteError", "SwapError", "ema_weight"]

Anchor = Literal["init", "debiased"]
_load_into = load_into  # old private name, used by adapters


def ema_weight(
    schedule: Schedule, anchor: Anchor, since: int, steps: int, init_weight: float
) -> tuple[float, float]:
    r"""The EMA rule: new-value weight of one update and the new :math:`P_T`.

    Args:
        schedule: the decay schedule.
        anchor: ``"init"`` (weight :math:`1-\beta`) or ``"debiased"``
            (:math:`(1-\beta_t)/(1-P_t)`).
        since: optimizer steps from ``start_step`` to the last update (>= 0).
        steps: optimizer steps since the last update (>= 1).
        init_weight: :math:`P_{T-1}`.

    """
    decay = schedule.decay_over(since, steps)
    init = init_weight * decay
    if anchor == "init":
        return 1.0 - decay, init
    # Debiased: w = (1 - beta_t) / (1 - P_t); P_t = 1 only if every decay was 1.
    return ((1.0 - decay) / (1.0 - init) if init < 1.0 else 0.0), init


class EMA(Averager):
    r"""Keep an exponential moving average ("shadow") of a model's weights.

    Args:
        model: the model, bare or wrapped (DDP, ``torch.compile``); names are
            canonical, so an EMA made before wrapping works after, and vice versa.
        decay: a constant :math:`\beta` in [0, 1] or a
            :class:`~emaweights.schedules.Schedule`.
        update_every: average only every ``k`` optimizer steps; the decay of one
            update is the product of the ``k`` per-step decays (``beta**k`` for a
            constant), so the horizon in optimizer steps does not change.
        start_step: until this optimizer step the shadow copies the live weights;
            the average starts from the weights at that step.
        anchor: ``"init"`` keeps the weight :math:`P_T` on the starting weights
            (retains pre-trained knowledge); ``"debiased"`` removes it.
        dtype: shadow dtype of averaged tensors; default at least float32.
        device: shadow device; default each tensor's own device.
        include_frozen: also average parameters with ``requires_grad=False``.
        exclude: glob patterns of canonical names to leave out.
        buffers: floating buffers ``"average"`` (default), ``"copy"`` or
            ``"ignore"``; integer buffers are always copied (unless ignored).
        foreach: kernel choice (``None``: the fastest available).
        nonfinite: what to do about NaN/infinity. ``"check"`` (default) costs
            nothing per step: every read of the average (swap, state dict,
            export, ``copy_to``) checks it and raises :class:`NonFiniteError`
            naming the tensors, so a non-finite average is never used or
            saved silently. ``"raise"`` checks the live weights before each
            update and raises before the average is touched; ``"skip"`` skips
            that update and counts it in :attr:`skipped_updates`. Both cost one
            fused reduction over the weights and one host sync per update.
        rounding: ``"stochastic"`` rounds a bfloat16 shadow (``dtype=torch.bfloat16``)
            stochastically, so that its expectation follows the exact average
            where round-to-nearest would freeze it; ``"nearest"`` (default) otherwise.
            Honoured on every update path (``foreach=False``, non-contiguous
            ``channels_last`` weights, ``overlap``); refused with ``compiled``.
        seed: seed of the stochastic rounding noise (only with
            ``rounding="stochastic"``). The EMA owns its generator: updates never
            draw from torch's global one, and :meth:`state_dict` saves its state,
            so a resumed run is bitwise the uninterrupted one. ``None`` draws a
            seed from torch's default generator once, at construction.
        overlap: with the shadow on another device than the model (CPU offload,
            ``device="cpu"`` for a GPU model), apply each update one step late:
            :meth:`update` only queues the asynchronous copy of the weights into
            pinned buffers, and the next :meth:`update` (or any read of the
            average: evaluation, ``shadow``, ``state_dict``, ``copy_to``) waits
            for it, normally long finished, and averages. The numbers are those
            of ``overlap=False``; only the host no longer waits for the copy.
        compiled: update an fp32 shadow of a low-precision model (bf16/fp16)
            with one kernel compiled by ``torch.compile``, which fuses the cast
            into the update, where the eager path makes two passes (measured in
            ``docs/performance.md``). Needs the parameters flattened
            (:func:`~emaweights.flat.flatten_parameters`) and the shadow on
            the model's device; the first update compiles (seconds; a CPU needs
            a C++ compiler). Results may differ from the eager path's in the
            last bit. No effect on groups whose shadow has the model's dtype
            (their eager update is already at the roofline).

    Raises:
        ValueError: an argument is out of range (the message names the value),
            or the model has no tensor to average.

    """

    FORMAT: ClassVar[str] = "emaweights.EMA"
    CLOCK_FIELDS: ClassVar[tuple[str, ...]] = ("_init_product",)

    def __init__(
        self,
        model: nn.Module,
        decay: float | Schedule = 0.999,
        *,
        update_every: int = 1,
        start_step: int = 0,
        anchor: Anchor = "init",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        include_frozen: bool = False,
        exclude: Sequence[str] = (),
        buffers: BufferPolicy = "average",
        foreach: bool | None = None,
        nonfinite: NonFinitePolicy = "check",
        rounding: Rounding = "nearest",
        overlap: bool = False,
        compiled: bool = False,
        seed: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.schedule = as_schedule(decay)
        self._init_clock(update_every=update_every, start_step=start_step, nonfinite=nonfinite)
        if anchor not in ("init", "debiased"):
            raise ValueError(f"anchor must be 'init' or 'debiased', got {anchor!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if isinstance(exclude, str):
            raise TypeError(f"exclude must be a sequence of patterns, got the string {exclude!r}")
        check_bool(include_frozen, "include_frozen")
        check_bool(foreach, "foreach", allow_none=True)
        self.anchor: Anchor = anchor
        self.model = model
        self._options: dict[str, Any] = dict(
            include_frozen=include_frozen, exclude=tuple(exclude), buffers=buffers
        )
        self._dtype = dtype
        self._device = torch.device(device) if device is not None else None
        self._foreach = foreach
        self._rounding: Rounding = rounding
        check_bool(overlap, "overlap")
        self._overlap = overlap
        check_bool(compiled, "compiled")
        self._compiled = compiled
        if seed is None and rounding == "stochastic":
            # drawn once here, so that register() restarts the same noise stream
            seed = int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
        self._seed = seed
        self.register()
        warn_unmatched(model, tuple(exclude), "exclude")

    # -- set-up ------------------------------------------------------------

    def register(self) -> None:
        """(Re)start the average from the model's current weights.

        The constructor already does this; calling it again (as the seed API
        does right after construction) restarts the average and its counters.
        """
        self._refuse_while_applied("register")
        reshard(self.model)  # FSDP2: after an eval forward the root holds full, unsharded tensors
        entries = collect(self.model, **self._options)
        if not entries:
            raise ValueError(
                "the model has no tensor to average (all parameters frozen or excluded: "
                f"include_frozen={self._options['include_frozen']}, "
                f"exclude={self._options['exclude']})"
            )
        self._shadow = Shadow(
            entries,
            dtype=self._dtype,
            device=self._device,
            foreach=self._foreach,
            rounding=self._rounding,
            seed=self._seed,
            overlap=self._overlap,
            compiled=self._compiled,
        )
        self._reset_clock()
        self._init_product = 1.0  # P_T: the product of the decays of every update
        self._watch_frozen()  # frozen now: may join the average once unfrozen

    # -- the rule --------------------------------------------------------

    def _rule(self) -> None:
        self._shadow.average_(self._weight())

    def _on_copy(self) -> None:
        super()._on_copy()
        self._init_product = 1.0

    @property
    def init_weight(self) -> float:
        r"""The weight still on the starting weights :math:`\theta_0` in the average.

        :math:`P_T = \prod_t \beta_t` with ``anchor="init"``; with
        ``anchor="debiased"`` it is 0 once an update with a decay below 1 ran
        (the debiased average holds none of :math:`\theta_0`), 1 before.
        """
        p = self._init_product
        return 0.0 if self.anchor == "debiased" and p < 1.0 else p

    @init_weight.setter
    def init_weight(self, value: float) -> None:
        self._init_product = value

    @property
    def decay(self) -> float:
        r"""The decay :math:`\beta_t` of the latest optimizer step (of the first, before any).

        Per optimizer step, whatever ``update_every`` is (one update then
        applies :math:`\beta^k`); :attr:`horizon` is :math:`1/(1-\beta_t)`.
        """
        return self.schedule(max(self.step - self.start_step - 1, 0))

    def next_weight(self) -> float:
        """For fused drivers after :meth:`begin_update` returned True: this update's weight.

        Advances :attr:`init_weight` and :attr:`num_updates`; the caller applies
        ``shadow <- shadow + weight * (live - shadow)``.
        """
        self.num_updates += 1
        return self._weight()

    def _weight(self) -> float:
        """Weight of the live weights for this update, advancing :attr:`init_weight`."""
        since = self._last_step - self.start_step  # >= 0: the clock clamps jumps
        weight, self._init_product = ema_weight(
            self.schedule, self.anchor, since, self.step - self._last_step, self._init_product
        )
        self._last_step = self.step
        return weight

    # -- checkpoints -------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.to_dict(),
            "update_every": self.update_every,
            "start_step": self.start_step,
            "anchor": self.anchor,
            "nonfinite": self.nonfinite,
        }

    def _extra_state(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"init_weight": self._init_product}  # P_T, whatever the anchor
        if self._shadow.generators:  # stochastic rounding: its noise stream resumes too
            extra["rounding_rng"] = self._shadow.rng_state()
        return extra

    def _parse_extra(self, state: Mapping[str, Any], strict: bool) -> dict[str, Any]:
        parsed = _parse_ema_fields(state)
        rng = state.get("rounding_rng")
        if self._shadow.generators and rng is None and strict:
            raise ValueError(
                "state lacks rounding_rng (the stochastic rounding generator), so the "
                "resumed noise would differ; load with strict=False to keep this EMA's own"
            )
        if self._shadow.generators and rng is not None:
            self._shadow.validate_rng_state(rng)
            parsed["rounding_rng"] = rng
        return parsed

    def _commit_extra(self, parsed: Mapping[str, Any]) -> None:
        config = parsed["config"]
        self.schedule = parsed["schedule"]
        self.update_every, self.start_step = config["update_every"], config["start_step"]
        self.anchor, self.nonfinite = config["anchor"], config["nonfinite"]
        self._init_product = parsed["init_weight"]
        if "rounding_rng" in parsed:
            self._shadow.load_rng_state(parsed["rounding_rng"])

    def __repr__(self) -> str:
        return (
            f"EMA(schedule={self.schedule}, update_every={self.update_every}, "
            f"start_step={self.start_step}, anchor={self.anchor!r}, "
            f"tensors={len(self._shadow.tensors)}, "
            f"shadow_bytes={self._shadow.nbytes()}, step={self.step})"
        )


def _parse_ema_fields(state: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the EMA's own state fields; raise ``ValueError`` naming the bad one."""
    if "init_weight" not in state:
        raise ValueError("EMA state lacks the fields ['init_weight']")
    w0 = state["init_weight"]
    if isinstance(w0, bool) or not isinstance(w0, (int, float)) or not 0.0 <= w0 <= 1.0:
        raise ValueError(f"saved init_weight must be a number in [0, 1], got {_short(w0)}")
    config = state["config"]
    if not isinstance(config.get("schedule"), Mapping):
        raise ValueError(f"saved config is malformed: {_short(config)}")
    try:
        schedule = schedule_from_dict(dict(config["schedule"]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"saved schedule is invalid: {str(err)[:200]}") from err
    anchor, nonfinite = config.get("anchor"), config.get("nonfinite", "check")
    if not is_plain(anchor, str, "init", "debiased"):
        raise ValueError(f"saved anchor must be 'init' or 'debiased', got {_short(anchor)}")
    if not is_plain(nonfinite, str, "check", "raise", "skip"):
        raise ValueError(
            f"saved nonfinite must be 'check', 'raise' or 'skip', got {_short(nonfinite)}"
        )
    return {
        "init_weight": float(w0),
        "schedule": schedule,
        "config": {
            "schedule": schedule.to_dict(),  # normalized: safe to compare
            "update_every": positive_int(config.get("update_every"), "saved update_every"),
            "start_step": positive_int(config.get("start_step"), "saved start_step", minimum=0),
            "anchor": anchor,
            "nonfinite": nonfinite,
        },
    }
