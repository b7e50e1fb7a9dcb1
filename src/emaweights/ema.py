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

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from emaweights._naming import BufferPolicy, collect, unwrap
from emaweights.distributed import reshard
from emaweights.schedules import Schedule, as_schedule, schedule_from_dict
from emaweights.shadow import Rounding, Shadow, SwapRecord

__all__ = ["EMA", "NonFiniteError", "SwapError"]

Anchor = Literal["init", "debiased"]
NonFinitePolicy = Literal["check", "raise", "skip"]
_FORMAT = "emaweights.EMA"
_VERSION = 1
# The full (per-tensor) check of the model's tensors runs on the first update and
# then every this many updates: cheap amortized, and nothing per tensor per step.
_CHECK_EVERY = 100


class SwapError(RuntimeError):
    """The averaged weights were misused while swapped in, or swapping was misused."""


class NonFiniteError(FloatingPointError):
    """NaN or infinity in the live weights (``nonfinite="raise"``) or in the average."""


def _positive_int(value: object, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


class EMA:
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
        overlap: with the shadow on another device than the model (CPU offload,
            ``device="cpu"`` for a GPU model), apply each update one step late:
            :meth:`update` only queues the asynchronous copy of the weights into
            pinned buffers, and the next :meth:`update` (or any read of the
            average: evaluation, ``shadow``, ``state_dict``, ``copy_to``) waits
            for it, normally long finished, and averages. The numbers are those
            of ``overlap=False``; only the host no longer waits for the copy.
        compiled: update an fp32 shadow of a low-precision model (bf16/fp16)
            with one kernel compiled by ``torch.compile``, which fuses the cast
            into the update (68-85% of the bandwidth roofline on a 2-core CPU,
            where the eager path reaches 45-63%). Needs the parameters flattened
            (:func:`~emaweights.flat.flatten_parameters`) and the shadow on
            the model's device; the first update compiles (seconds; a CPU needs
            a C++ compiler). Results may differ from the eager path's in the
            last bit. No effect on groups whose shadow has the model's dtype
            (their eager update is already at the roofline).

    Raises:
        ValueError: an argument is out of range (the message names the value),
            or the model has no tensor to average.

    """

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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.schedule = as_schedule(decay)
        self.update_every = _positive_int(update_every, "update_every")
        self.start_step = _positive_int(start_step, "start_step", minimum=0)
        if anchor not in ("init", "debiased"):
            raise ValueError(f"anchor must be 'init' or 'debiased', got {anchor!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if isinstance(exclude, str):
            raise TypeError(f"exclude must be a sequence of patterns, got the string {exclude!r}")
        if nonfinite not in ("check", "raise", "skip"):
            raise ValueError(f"nonfinite must be 'check', 'raise' or 'skip', got {nonfinite!r}")
        self.nonfinite: NonFinitePolicy = nonfinite
        self.anchor: Anchor = anchor
        self.model = model
        self._options = dict(include_frozen=include_frozen, exclude=tuple(exclude), buffers=buffers)
        self._dtype = dtype
        self._device = torch.device(device) if device is not None else None
        self._foreach = foreach
        self._rounding: Rounding = rounding
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap must be a bool, got {overlap!r}")
        self._overlap = overlap
        if not isinstance(compiled, bool):
            raise TypeError(f"compiled must be a bool, got {compiled!r}")
        self._compiled = compiled
        self._swap: SwapRecord | None = None
        self._hook: Any = None
        self.register()

    # -- set-up ------------------------------------------------------------

    def register(self) -> None:
        """(Re)start the average from the model's current weights.

        The constructor already does this; calling it again (as the seed API
        does right after construction) restarts the average and its counters.
        """
        self._refuse_while_applied("register")
        reshard(self.model)  # FSDP2: after an eval forward the root holds full, unsharded tensors
        entries = collect(self.model, **self._options)  # type: ignore[arg-type]
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
            overlap=self._overlap,
            compiled=self._compiled,
        )
        self.step = 0  # optimizer steps seen
        self.num_updates = 0  # averaging updates applied
        self.skipped_updates = 0  # updates skipped for non-finite weights (nonfinite="skip")
        self._last_step = 0  # optimizer step of the last update (or copy)
        self.init_weight = 1.0  # P_T: weight of the starting weights in the average

    # -- updates -----------------------------------------------------------

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """Fold the current weights into the average; call after ``optimizer.step()``.

        Args:
            step: the optimizer step just taken (1 after the first step). Default:
                one more than the last call. It must not go backwards.

        Raises:
            SwapError: the averaged weights are swapped into the model.
            ValueError: ``step`` is not an int, or goes backwards.

        """
        if self._due(step):
            self._shadow.average_(self._weight())
            self.num_updates += 1

    def _due(self, step: int | None) -> bool:
        """Advance the step counter; return whether this step averages.

        Copies (before ``start_step``), skipped steps (``update_every``) and
        skipped non-finite updates are handled here and return ``False``.
        Shared with :class:`~emaweights.multi.MultiEMA`, which fuses the averaging.
        """
        self._refuse_while_applied("update")
        saved = (self.step, self._last_step, self.init_weight)
        try:
            return self._advance(step)
        except BaseException:
            # A refused update (bad step, non-finite weights, changed model) has no effect.
            self.step, self._last_step, self.init_weight = saved
            raise

    def _advance(self, step: int | None) -> bool:
        if step is None:
            self.step += 1
        else:
            if isinstance(step, bool) or not isinstance(step, int) or step < self.step:
                raise ValueError(
                    f"step must be an int >= the last step ({self.step}), got {step!r}"
                )
            self.step = step
        if self.step <= self.start_step:
            self._shadow.copy_from_live_()
            self._last_step, self.init_weight = self.step, 1.0
            return False
        if (self.step - self.start_step) % self.update_every:
            return False
        if self.num_updates % _CHECK_EVERY == 0 or self._shadow.live_moved():
            self._check_model()
        if self.nonfinite != "check" and not self._shadow.live_all_finite():
            if self.nonfinite == "raise":
                raise NonFiniteError(
                    f"non-finite live weights at optimizer step {self.step}; the average is "
                    "unchanged (nonfinite='skip' skips such updates instead)"
                )
            self.skipped_updates += 1
            self._last_step = self.step  # the skipped steps do not age the average
            return False
        return True

    def _weight(self) -> float:
        """Weight of the live weights for this update, advancing :attr:`init_weight`."""
        steps = self.step - self._last_step
        decay = self.schedule.decay_over(self._last_step - self.start_step, steps)
        self._last_step = self.step
        self.init_weight *= decay
        if self.anchor == "init":
            return 1.0 - decay
        # Debiased: w = (1 - beta_t) / (1 - P_t); P_t = 1 only if every decay was 1.
        return (1.0 - decay) / (1.0 - self.init_weight) if self.init_weight < 1.0 else 0.0

    # -- evaluation --------------------------------------------------------

    @property
    def is_applied(self) -> bool:
        """Whether the averaged weights are swapped into the model now."""
        return self._swap is not None

    def apply_shadow(self) -> None:
        """Swap the averaged weights into the model (by pointer); undo with :meth:`restore`.

        While applied, an ``optimizer.step()`` over these parameters raises
        before it changes anything, and :meth:`update` raises.

        Raises:
            SwapError: already applied (a second call would lose the live weights).

        """
        self._refuse_while_applied("apply_shadow")
        self._check_model()
        self._check_finite("apply_shadow")
        self._swap = self._shadow.swap_in()
        swapped = {id(e.get()) for e, _ in self._swap.held if e.kind == "param"}
        self._hook = register_optimizer_step_pre_hook(
            lambda opt, args, kwargs: self._refuse_step(opt, swapped)
        )

    def restore(self) -> None:
        """Put the live weights back after :meth:`apply_shadow`.

        Raises:
            SwapError: nothing is applied; or the averaged weights were modified
                in place while applied (the live weights are restored first).

        """
        if self._swap is None:
            raise SwapError("restore() called but the averaged weights are not applied")
        record, self._swap = self._swap, None
        self._hook.remove()
        reshard(self.model)  # FSDP2: drop full tensors gathered from the average
        modified = self._shadow.swap_out(record)
        if modified:
            raise SwapError(
                "the averaged weights were modified in place while applied (an optimizer "
                f"step or in-place op on the evaluation weights): {modified[:10]}"
                + (f" and {len(modified) - 10} more" if len(modified) > 10 else "")
                + "; the live weights are restored, the average is no longer trustworthy"
            )

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """Context manager: evaluate with the averaged weights, restored on exit.

        Yields the model. Restores in ``finally``, so an exception inside the
        block leaves the live weights in place. Nesting is refused.
        """
        self.apply_shadow()
        try:
            yield self.model
        finally:
            self.restore()

    def _check_model(self) -> None:
        """Raise if tensors changed shape, dtype or device, or were added, since creation."""
        reshard(self.model)  # FSDP2: an eval forward can leave full tensors in the modules
        self._shadow.check_live()
        now = {e.name for e in collect(self.model, **self._options)}  # type: ignore[arg-type]
        added = sorted(now - set(self._shadow.names()))
        if added:
            raise RuntimeError(
                f"the model gained tensors after the EMA was made: {added[:10]}"
                + (f" and {len(added) - 10} more" if len(added) > 10 else "")
                + "; make a new EMA (or call register()) to average them"
            )

    def _check_finite(self, what: str) -> None:
        bad = self._shadow.nonfinite_names()
        if bad:
            raise NonFiniteError(
                f"{what}: the average holds NaN or infinity in {bad[:10]}"
                + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
                + " (the live weights were non-finite at some update; use nonfinite='raise' "
                "or 'skip' to catch it when it happens)"
            )

    def _refuse_while_applied(self, what: str) -> None:
        if self._swap is not None:
            raise SwapError(
                f"{what}() called while the averaged weights are applied; call restore() first"
            )

    @staticmethod
    def _refuse_step(optimizer: torch.optim.Optimizer, swapped: set[int]) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in swapped:
                    raise SwapError(
                        f"{type(optimizer).__name__}.step() called while the averaged weights are "
                        "applied: it would train the average. Leave `with ema.applied():` "
                        "(or call ema.restore()) first"
                    )

    # -- results -----------------------------------------------------------

    @property
    def shadow(self) -> dict[str, Tensor]:
        """The averaged tensors by canonical name (views into the shadow storage)."""
        return self._shadow.state()

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into ``model`` (default: the EMA's own model) for good.

        Raises:
            SwapError: the average is applied to the EMA's model.
            KeyError: ``model`` lacks some averaged tensor (names listed).

        """
        self._refuse_while_applied("copy_to")
        self._check_finite("copy_to")
        if model is None or unwrap(model) is unwrap(self.model):
            reshard(self.model)  # FSDP2: else the next forward reuses gathered live tensors
            self._shadow.copy_to_live_()
            return
        _load_into(model, self.averaged_state_dict())

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """A plain model state dict (canonical names) holding the averaged weights.

        Tensors that are not averaged (frozen parameters, ignored buffers) hold
        the live values; every tensor has the model's dtype and device and owns
        its memory, so the result can be saved anywhere or loaded with
        ``model.load_state_dict``.
        """
        self._check_finite("averaged_state_dict")
        out = {}
        with torch.no_grad():
            from emaweights._naming import canonical_name

            for key, value in unwrap(self.model).state_dict().items():
                name = canonical_name(key)
                avg = self._shadow.tensors.get(name)
                out[name] = (avg if avg is not None else value).to(
                    value.device, value.dtype, copy=True
                )
        return out

    # -- checkpoints -------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The EMA's full state: shadow tensors, counters and configuration.

        Only tensors and plain Python values, so it loads with
        ``torch.load(..., weights_only=True)``.

        Raises:
            NonFiniteError: the average holds NaN or infinity (never saved silently).
        """
        self._check_finite("state_dict")
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "step": self.step,
            "last_step": self._last_step,
            "num_updates": self.num_updates,
            "skipped_updates": self.skipped_updates,
            "init_weight": self.init_weight,
            "config": self._config(),
            "shadow": self._shadow.state(),
        }

    def _config(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.to_dict(),
            "update_every": self.update_every,
            "start_step": self.start_step,
            "anchor": self.anchor,
            "nonfinite": self.nonfinite,
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned.

        Every field is validated before anything changes, so a bad state
        (another architecture, a truncated or hand-edited file) leaves the EMA
        exactly as it was.

        Args:
            state: the saved state.
            strict: require the same tensor names, dtypes and configuration.
                With ``strict=False`` the saved configuration (schedule,
                ``update_every``, ``start_step``, ``anchor``, ``nonfinite``) is
                adopted and only the tensors present in both are loaded.

        Raises:
            ValueError: not an EMA state, a malformed field, or a mismatch
                (each one listed).
            KeyError: missing or unexpected tensor names (listed).
        """
        self._refuse_while_applied("load_state_dict")
        parsed = _parse_state(state)
        config = parsed["config"]
        if strict and config != self._config():
            diff = {k: (config.get(k), v) for k, v in self._config().items() if config.get(k) != v}
            raise ValueError(
                f"EMA configuration differs from the saved one (saved, current): {diff}"
            )
        self._shadow.load_(parsed["shadow"], strict=strict)
        self.schedule = parsed["schedule"]
        self.update_every, self.start_step = config["update_every"], config["start_step"]
        self.anchor, self.nonfinite = config["anchor"], config["nonfinite"]
        self.step, self._last_step = parsed["step"], parsed["last_step"]
        self.num_updates, self.skipped_updates = parsed["num_updates"], parsed["skipped_updates"]
        self.init_weight = parsed["init_weight"]

    def __repr__(self) -> str:
        return (
            f"EMA(schedule={self.schedule}, update_every={self.update_every}, "
            f"start_step={self.start_step}, anchor={self.anchor!r}, "
            f"tensors={len(self._shadow.tensors)}, "
            f"shadow_bytes={self._shadow.nbytes()}, step={self.step})"
        )


def _load_into(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a canonical-name state dict into a (possibly wrapped) model, strictly."""
    target = unwrap(model)
    result = target.load_state_dict(dict(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(
            f"model does not match the EMA: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )


def _is(value: object, kind: type, *allowed: object) -> bool:
    """Whether ``value`` is a plain ``kind`` (not a bool or tensor) equal to one of ``allowed``."""
    return type(value) is kind and value in allowed


def _parse_state(state: object) -> dict[str, Any]:
    """Validate a saved EMA state field by field; raise ``ValueError`` naming the bad one."""
    # Type checks come before comparisons: a tensor compared to a str or int has no truth value.
    if not isinstance(state, Mapping) or not _is(state.get("format"), str, _FORMAT):
        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"not an emaweights EMA state (format {found!r}, expected {_FORMAT!r})")
    if not _is(state.get("version"), int, _VERSION):
        raise ValueError(
            f"unsupported EMA state version {state.get('version')!r}, expected {_VERSION}"
        )
    missing = [
        k
        for k in ("step", "last_step", "num_updates", "init_weight", "shadow", "config")
        if k not in state
    ]
    if missing:
        raise ValueError(f"EMA state lacks the fields {missing}")
    out: dict[str, Any] = {
        k: _positive_int(state.get(k, 0), f"saved {k}", minimum=0)
        for k in ("step", "last_step", "num_updates", "skipped_updates")
    }
    if out["last_step"] > out["step"]:
        raise ValueError(
            f"saved last_step {out['last_step']!r} is after the saved step {out['step']!r}"
        )
    w0 = state["init_weight"]
    if isinstance(w0, bool) or not isinstance(w0, (int, float)) or not 0.0 <= w0 <= 1.0:
        raise ValueError(f"saved init_weight must be a number in [0, 1], got {w0!r}")
    out["init_weight"] = float(w0)
    if not isinstance(state["shadow"], Mapping):
        raise ValueError(
            f"saved shadow must be a mapping of tensors, got {type(state['shadow']).__name__}"
        )
    out["shadow"] = state["shadow"]
    config = state["config"]
    if not isinstance(config, Mapping) or not isinstance(config.get("schedule"), Mapping):
        raise ValueError(f"saved config is malformed: {config!r:.200}")
    try:
        out["schedule"] = schedule_from_dict(dict(config["schedule"]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"saved schedule is invalid: {err}") from err
    anchor, nonfinite = config.get("anchor"), config.get("nonfinite", "check")
    if not _is(anchor, str, "init", "debiased"):
        raise ValueError(f"saved anchor must be 'init' or 'debiased', got {anchor!r}")
    if not _is(nonfinite, str, "check", "raise", "skip"):
        raise ValueError(f"saved nonfinite must be 'check', 'raise' or 'skip', got {nonfinite!r}")
    out["config"] = {
        "schedule": out["schedule"].to_dict(),  # normalized: safe to compare
        "update_every": _positive_int(config.get("update_every"), "saved update_every"),
        "start_step": _positive_int(config.get("start_step"), "saved start_step", minimum=0),
        "anchor": anchor,
        "nonfinite": nonfinite,
    }
    return out
