r"""The averager protocol and the one base every averager is built on.

Every averager in emaweights (:class:`~emaweights.EMA`, :class:`~emaweights.SWA`,
:class:`~emaweights.LAWA`, :class:`~emaweights.BEMA`, :class:`~emaweights.SwitchEMA`,
...) has the same surface, :class:`AveragerProtocol`:

* ``update(step=None)`` after every optimizer step;
* ``applied()``: a context manager that swaps the averaged weights into the model
  and restores the live ones in ``finally`` (and the seed API's
  ``apply_shadow()`` / ``restore()``);
* ``averaged_state_dict()`` and ``copy_to(model=None)``: the average as a plain
  model state dict, every tied alias included;
* ``state_dict()`` / ``load_state_dict(state, strict=True)``: tensors and plain
  values only (``torch.load(weights_only=True)``), versioned, refused intact;
* ``step`` (optimizer steps seen) and ``num_updates`` (averaging updates applied).

:class:`Averager` implements all of it once, by composition over a
:class:`~emaweights.shadow.Shadow` (the storage): the step clock (validated once;
a rule never sees a step before ``start_step``), swap ownership (a per-model
record of who swapped in, so that several averagers can be applied and restored
in any order), the in-place guards, alias-aware export, finiteness checks and
the state format. A method supplies only its rule, :meth:`Averager._rule`, over
the storage's tensor lists.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import reprlib
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from emaweights._module import AveragedModule
from emaweights._naming import Entry, canonical_name, collect, unwrap
from emaweights._sharding import local
from emaweights.shadow import Shadow, SwapRecord, undo_swap

__all__ = [
    "AveragedModule",
    "Averager",
    "AveragerProtocol",
    "EarlyAverageWarning",
    "NonFiniteError",
    "NonFinitePolicy",
    "SwapError",
    "check_bool",
    "positive_int",
]

NonFinitePolicy = Literal["check", "raise", "skip"]
Phase = Literal["copy", "wait", "skip", "update"]

# The full (per-tensor) check of the model's tensors runs on the first update and
# then every this many updates; between, one identity/pointer comparison per tensor.
_CHECK_EVERY = 100
# Frozen parameters read per update for being unfrozen (about 0.13 us each on a 2-core CPU).
_WATCH = 16
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
# Counters above this are refused: no real run gets there, and it keeps loops bounded.
MAX_STEP = 1 << 62


class SwapError(RuntimeError):
    """The averaged weights were misused while swapped in, or swapping was misused."""


class NonFiniteError(FloatingPointError):
    """NaN or infinity in the live weights (``nonfinite="raise"``) or in the average."""


def positive_int(value: object, what: str, minimum: int = 1, maximum: int = MAX_STEP) -> int:
    """``value`` if it is a plain int in [minimum, maximum], else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(
            f"{what} must be an integer in [{minimum}, {maximum}], got {_short(value)}"
        )
    return value


def check_bool(value: object, what: str, *, allow_none: bool = False) -> None:
    """Refuse anything but a bool (or ``None`` where allowed), naming the value.

    A string such as ``"yes"`` or ``"false"`` is truthy and would silently mean ``True``.
    """
    if isinstance(value, bool) or (allow_none and value is None):
        return
    allowed = "a bool or None" if allow_none else "a bool"
    raise TypeError(f"{what} must be {allowed}, got {_short(value)}")


class EarlyAverageWarning(UserWarning):
    r"""An evaluation used an average that still holds more than half of :math:`\theta_0`.

    Right for fine-tuning (``anchor="init"`` keeps the pre-trained weights on
    purpose); when training from scratch it means the "average" is mostly the
    random initialization: pass ``anchor="debiased"`` or a warm-up schedule.
    Raised once per averager; silence with
    ``warnings.filterwarnings("ignore", category=EarlyAverageWarning)``.
    """


def _short(value: object, limit: int = 80) -> str:
    """A bounded description of ``value`` (never a full repr of a hostile container)."""
    if isinstance(value, (int, float, str, bool)) or value is None:
        text = repr(value) if not isinstance(value, str) else repr(value[:limit])
        return text[:limit]
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"[:limit]
    if isinstance(value, (dict, list, tuple)):
        # reprlib visits a bounded number of levels and items: bounded time on a hostile DAG.
        return _BOUNDED_REPR.repr(value)[:limit]
    return f"a {type(value).__name__}"


_BOUNDED_REPR = reprlib.Repr()
_BOUNDED_REPR.maxlevel = 3
_BOUNDED_REPR.maxdict = _BOUNDED_REPR.maxlist = _BOUNDED_REPR.maxtuple = 8
_BOUNDED_REPR.maxstring = _BOUNDED_REPR.maxother = 40


@runtime_checkable
class AveragerProtocol(Protocol):
    """What every averager offers (see the module docstring)."""

    step: int
    num_updates: int

    def update(self, step: int | None = None) -> None: ...  # noqa: D102
    def applied(self) -> contextlib.AbstractContextManager[nn.Module]: ...  # noqa: D102
    def averaged_state_dict(self) -> dict[str, Tensor]: ...  # noqa: D102
    def copy_to(self, model: nn.Module | None = None) -> None: ...  # noqa: D102
    def state_dict(self) -> dict[str, Any]: ...  # noqa: D102
    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None: ...  # noqa: D102


# Who has swapped into which model, oldest first (keyed by the unwrapped module).
_OWNERS: weakref.WeakKeyDictionary[nn.Module, list[SwapRecord]] = weakref.WeakKeyDictionary()


class Averager:
    """The shared machinery of every averager; subclasses supply :meth:`_rule`.

    A subclass sets :attr:`model` and :attr:`_shadow` (the storage swapped in and
    exported), calls :meth:`_init_clock`, and implements :meth:`_rule` (fold the
    live weights into the storage). For its state it overrides :meth:`_config`,
    :meth:`_extra_state` and :meth:`_parse_extra` / :meth:`_commit_extra`.
    """

    FORMAT: ClassVar[str] = "emaweights.Averager"
    VERSION: ClassVar[int] = 1
    # Write buffers changed inside applied() back into the average (SWA + update_bn).
    KEEP_BUFFERS: ClassVar[bool] = False
    # Attributes that a refused update must leave as they were (besides the counters).
    CLOCK_FIELDS: ClassVar[tuple[str, ...]] = ()

    model: nn.Module
    _shadow: Shadow

    def _init_clock(
        self, *, update_every: int = 1, start_step: int = 0, nonfinite: NonFinitePolicy = "check"
    ) -> None:
        self.update_every = positive_int(update_every, "update_every")
        self.start_step = positive_int(start_step, "start_step", minimum=0)
        if nonfinite not in ("check", "raise", "skip"):
            raise ValueError(
                f"nonfinite must be 'check', 'raise' or 'skip', got {_short(nonfinite)}"
            )
        self.nonfinite: NonFinitePolicy = nonfinite
        self._swap: SwapRecord | None = None
        self._hook: Any = None
        self._reset_clock()

    def _reset_clock(self) -> None:
        self.step = 0  # optimizer steps seen
        self.num_updates = 0  # averaging updates applied
        self.skipped_updates = 0  # updates skipped for non-finite weights (nonfinite="skip")
        self._last_step = 0  # optimizer step of the last update (or copy)
        # (the modules' tensor tables and names, the tensors, their data pointers)
        self._signature: tuple[list[tuple[Any, str]], list[Tensor], list[int]] | None = None
        # Frozen parameters left out (include_frozen=False), watched for being unfrozen;
        # None: not listed yet (an averager that does not call _watch_frozen at creation
        # gets them at its first full check).
        self._dormant: list[Tensor] | None = None

    # -- storage -----------------------------------------------------------

    @property
    def storage(self) -> Shadow:
        """The storage of the averaged tensors (for adapters such as ``distributed``)."""
        return self._shadow

    def _storages(self) -> dict[str, Shadow]:
        """Every storage saved in the state, by state field (the first is the average)."""
        return {"shadow": self._shadow}

    # -- the clock -----------------------------------------------------------

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """Fold the current weights into the average; call after ``optimizer.step()``.

        Args:
            step: the optimizer step just taken (1 after the first step). Default:
                one more than the last call. It must not go backwards; the step
                already seen again (``update(step=n)`` twice with ``n >= 1``,
                e.g. once per micro-batch) is a no-op, so no step counts twice.
                ``update(step=0)`` copies the live weights, as every step up to
                ``start_step`` does.

        Raises:
            SwapError: the averaged weights are swapped into the model.
            TypeError: ``step`` is a model (the averager already holds the
                model it was made with: call ``update()``).
            ValueError: ``step`` is not an int, or goes backwards.
            RuntimeError: the model changed (dtype, shape, device, a replaced
                Parameter) since the averager was made; nothing changed.

        A refused update has no effect at all: counters and storage are unchanged.
        """
        saved = self._save_clock()
        try:
            phase = self._tick(step)
            if phase == "copy":
                self._on_copy()
            elif phase == "update":
                self._rule()
                self.num_updates += 1
        except BaseException:
            self._load_clock(saved)
            raise

    def begin_update(self, step: int | None = None) -> bool:
        """Advance the clock as :meth:`update` does, without running the rule.

        For fused drivers (:class:`~emaweights.MultiEMA` runs one kernel for
        several EMAs): returns whether the rule is due now; the driver then
        applies it (e.g. with :meth:`EMA.next_weight`). A refusal leaves the
        clock unchanged; :meth:`clock` / :meth:`set_clock` let a driver undo a
        partly done group.
        """
        saved = self._save_clock()
        try:
            phase = self._tick(step)
            if phase == "copy":
                self._on_copy()
        except BaseException:
            self._load_clock(saved)
            raise
        return phase == "update"

    def clock(self) -> tuple[Any, ...]:
        """The clock's state (opaque), for :meth:`set_clock`."""
        return self._save_clock()

    def set_clock(self, saved: tuple[Any, ...]) -> None:
        """Put back a clock state taken by :meth:`clock`."""
        self._load_clock(saved)

    def _save_clock(self) -> tuple[Any, ...]:
        fields = tuple(getattr(self, f) for f in self.CLOCK_FIELDS)
        return (self.step, self._last_step, self.num_updates, self.skipped_updates, fields)

    def _load_clock(self, saved: tuple[Any, ...]) -> None:
        self.step, self._last_step, self.num_updates, self.skipped_updates, fields = saved
        for f, v in zip(self.CLOCK_FIELDS, fields, strict=True):
            setattr(self, f, v)

    def _tick(self, step: int | None) -> Phase:
        """Advance the clock; say what this step does. Validates everything first."""
        self._refuse_while_applied("update")
        if isinstance(step, nn.Module):
            raise TypeError(
                f"update() takes the optimizer step, not a model (got a {type(step).__name__}): "
                f"this {type(self).__name__} already tracks the model it was made with; "
                "call update() (or update(step=n)) after optimizer.step()"
            )
        new = self.step + 1 if step is None else step
        if isinstance(new, bool) or not isinstance(new, int) or not self.step <= new <= MAX_STEP:
            raise ValueError(
                f"step must be an int >= the last step ({self.step}), got {_short(step)}"
            )
        if step is not None and new == self.step > 0:
            return "wait"  # this step is already folded in: never count it twice
        self._check_signature()
        self.step = new
        if new <= self.start_step:
            self._last_step = new
            return "copy"
        # A jump past start_step: the rule counts from start_step, never before it.
        self._last_step = max(self._last_step, self.start_step)
        if (new - self.start_step) % self.update_every:
            return "wait"
        if self.num_updates % _CHECK_EVERY == 0:
            self._check_model()
        if self.nonfinite != "check" and not self._shadow.live_all_finite():
            if self.nonfinite == "raise":
                raise NonFiniteError(
                    f"non-finite live weights at optimizer step {new}; the average is "
                    "unchanged (nonfinite='skip' skips such updates instead)"
                )
            self.skipped_updates += 1
            self._last_step = new  # the skipped steps do not age the average
            return "skip"
        return "update"

    def _check_signature(self) -> None:
        """Refuse a model whose tensors were replaced or re-typed (cheap when unchanged).

        Compares the tensors the modules hold now (by identity) and their data
        pointers with those cached at the last check; any difference runs the
        full per-tensor check, which names the changed tensor.
        """
        sig = self._signature
        if sig is not None:
            # Hot path: one dict lookup, one identity test and one data_ptr per tensor,
            # no per-entry method call (it was a third of a tiny model's update).
            now = [table.get(attr) for table, attr in sig[0]]
            if (
                all(map(operator.is_, now, sig[1]))
                and [t.data_ptr() for t in now] == sig[2]
                and not self._unfrozen()
            ):
                return
        self._check_model()
        entries = list(self._shadow.entries.values())  # tensors may have joined
        tables = [
            (e.module._parameters if e.kind == "param" else e.module._buffers, e.attr)
            for e in entries
        ]
        tensors = [e.get() for e in entries]
        self._signature = (tables, tensors, [t.data_ptr() for t in tensors])

    def _unfrozen(self) -> bool:
        """Whether a watched frozen parameter is trainable now (bounded work per update).

        Up to :data:`_WATCH` frozen parameters are read per update, a window
        that moves with the step, so an unfrozen one is noticed within
        ``ceil(n / _WATCH)`` updates (at once for ``n <= _WATCH``); every
        evaluation and every full check also looks at all of them.
        """
        dormant = self._dormant or []
        n = len(dormant)
        if n <= _WATCH:
            return any(map(_REQUIRES_GRAD, dormant))
        start = (self.step * _WATCH) % n
        window = dormant[start : start + _WATCH] + dormant[: max(0, start + _WATCH - n)]
        return any(map(_REQUIRES_GRAD, window))

    def _on_copy(self) -> None:
        """Before ``start_step``: the storage follows the live weights."""
        for s in self._storages().values():
            s.copy_from_live_()

    def _rule(self) -> None:  # pragma: no cover - every subclass overrides it
        """Fold the live weights into the storage (the method's update rule)."""
        raise NotImplementedError

    # -- checks ------------------------------------------------------------

    def _check_model(self) -> None:
        """Raise if tensors changed shape, dtype or device, or were added, since creation."""
        from emaweights._sharding import reshard

        reshard(self.model)  # FSDP2: an eval forward can leave full tensors in the modules
        for s in self._storages().values():
            s.check_live()
        options = getattr(self, "_options", None)
        if options is None:
            return
        if self._dormant is None:
            self._watch_frozen()
        entries = collect(self.model, **options)
        tracked = set(self._shadow.names())
        new = [e for e in entries if e.name not in tracked]
        if new:
            dormant = {id(p) for p in self._dormant or []}
            added = sorted(e.name for e in new if id(e.get()) not in dormant)
            if added:
                raise RuntimeError(
                    f"the model gained tensors after the averager was made: {added[:10]}"
                    + (f" and {len(added) - 10} more" if len(added) > 10 else "")
                    + "; make a new averager (or call register()) to average them"
                )
            self._join(tracked | {e.name for e in new})
            self._watch_frozen()
        # Unfrozen but not tracked (excluded): stop watching them, or every update would
        # run this full check.
        self._dormant = [p for p in self._dormant or [] if not p.requires_grad]

    def _watch_frozen(self) -> None:
        """Remember the frozen parameters left out, to notice when one is unfrozen (cheap).

        Called when the tracked set is made or grows; the per-update check then
        reads at most :data:`_WATCH` of them (see :meth:`_unfrozen`).
        """
        options = getattr(self, "_options", None)
        if options is None or options.get("include_frozen", False):
            self._dormant = []
            return
        full = collect(self.model, **{**options, "include_frozen": True})
        tracked = set(self._shadow.names())
        self._dormant = [e.get() for e in full if e.name not in tracked and not _tracked_kind(e)]

    def _join(self, names: set[str]) -> None:
        r"""Let parameters that were frozen and are trainable now join the average.

        Each new tensor starts from its current value,
        :math:`\bar\theta^{new}_t = \theta^{new}_t`, and is averaged from the
        next update on; every tensor already tracked keeps its average, and the
        counters are unchanged. The storages are rebuilt in the order a fresh
        averager would use (so a checkpoint matches one made on the unfrozen
        model, bit for bit).
        """
        options = {**getattr(self, "_options", {}), "include_frozen": True}
        entries = [e for e in collect(self.model, **options) if e.name in names]
        for key, old in self._storages().items():
            old.flush_()
            new = Shadow(entries, **storage_options(old))
            with torch.no_grad():
                for name, value in old.local_tensors.items():
                    new.local_tensors[name].copy_(value)
            self._replace_storage(key, new)
        self._signature = None

    def _replace_storage(self, key: str, storage: Shadow) -> None:
        """Put ``storage`` where :meth:`_storages` found the one under ``key``.

        The default covers ``"shadow"`` (:attr:`_shadow`) and ``"<key>"`` stored
        as ``_<key>``; an averager keeping a storage elsewhere overrides this.
        """
        setattr(self, "_shadow" if key == "shadow" else f"_{key}", storage)

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

    # -- swapping ----------------------------------------------------------

    @property
    def is_applied(self) -> bool:
        """Whether the averaged weights are swapped into the model now."""
        return self._swap is not None

    def apply_shadow(self) -> None:
        """Swap the averaged weights into the model (by pointer); undo with :meth:`restore`.

        While applied, an ``optimizer.step()`` over these parameters raises
        before it changes anything, and :meth:`update` raises. Several
        averagers may be applied to one model and restored in any order.

        Raises:
            SwapError: already applied (a second call would lose the live weights).

        """
        self._refuse_while_applied("apply_shadow")
        self._check_model()
        self._check_finite("apply_shadow")
        self._warn_if_early("applied()")
        record = self._shadow.swap_in()
        _OWNERS.setdefault(unwrap(self.model), []).append(record)
        self._swap = record
        swapped = {id(e.get()) for e, _ in record.held if e.kind == "param"}
        self._hook = register_optimizer_step_pre_hook(
            lambda opt, args, kwargs: _refuse_step(opt, swapped)
        )

    def restore(self) -> None:
        """Put the live weights back after :meth:`apply_shadow`.

        If another averager swapped in after this one and is still applied, the
        model keeps that one's weights, and restoring it later puts back the
        live weights.

        Raises:
            SwapError: nothing is applied; or the averaged parameters were modified
                in place while applied (the live weights are restored first).

        """
        from emaweights._sharding import reshard

        if self._swap is None:
            raise SwapError("restore() called but the averaged weights are not applied")
        record, self._swap = self._swap, None
        self._hook.remove()
        reshard(self.model)  # FSDP2: drop full tensors gathered from the average
        stack = _OWNERS.get(unwrap(self.model), [])
        index = next((i for i, r in enumerate(stack) if r is record), len(stack) - 1)
        if index == len(stack) - 1:
            modified = self._shadow.swap_out(record, keep_buffers=self.KEEP_BUFFERS)
        else:
            # Another averager is applied on top: it now owns putting the live weights back.
            undo_swap(record, stack[index + 1].hand_over(record))
            modified = []
        if stack:
            del stack[index]
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
        block leaves the live weights in place. Nesting the same averager is refused.
        Works under ``torch.no_grad()`` and ``torch.inference_mode()``.
        """
        self.apply_shadow()
        try:
            yield self.model
        finally:
            self.restore()

    # -- results -----------------------------------------------------------

    @property
    def shadow(self) -> Mapping[str, Tensor]:
        """The averaged tensors by canonical name: a read-only mapping of views into the storage.

        Assigning to it (``averager.shadow["w"] = t``) raises ``TypeError``; to
        change the average, use :meth:`load_state_dict`. To save it, save
        :meth:`state_dict` (resume) or ``dict(averager.shadow)`` (a plain dict that
        ``torch.load(weights_only=True)`` reads); it also pickles as a plain ``dict``.
        """
        return ReadOnlyTensors(self._shadow.state())

    @property
    def module(self) -> AveragedModule:
        """A module that computes with the averaged weights, beside the live model.

        ``teacher = averager.module`` then ``teacher(x)`` runs the model's
        forward over the averaged tensors (``torch.func.functional_call``), in
        evaluation mode, without swapping them into the model and without a
        copy of the weights (a shadow of another dtype or device than the model
        is cast per call, freed after it). It reads the storage at every call, so
        it follows every :meth:`update` and load; it has no parameters of its
        own and cannot be trained (see :class:`AveragedModule`). The same
        object is returned every time, so ``torch.compile(averager.module)``
        compiles once.
        """
        cached: AveragedModule | None = getattr(self, "_module", None)
        if cached is None:
            cached = AveragedModule(self)
            self._module = cached
        return cached

    # -- observability -----------------------------------------------------

    @property
    def decay(self) -> float | None:
        r"""The decay :math:`\beta_t` of the latest optimizer step (``None``: no single decay)."""
        return None

    @property
    def horizon(self) -> float | None:
        r"""The effective horizon in optimizer steps, :math:`1 / (1 - \beta_t)`.

        About how many recent steps the average spans (its weights decay by
        :math:`1/e` over that many steps); ``inf`` for a decay of 1, ``None``
        for an averager without a single decay.
        """
        decay = self.decay
        if decay is None:
            return None
        return math.inf if decay >= 1.0 else 1.0 / (1.0 - decay)

    @torch.no_grad()
    def drift(self) -> Tensor:
        r"""The drift norm :math:`\|\theta - \bar\theta\| / \|\bar\theta\|` of live and average.

        Over the averaged parameters (buffers left out), in float32, as a
        0-d tensor on the storage's device: nothing waits for the device until
        you read it (``float(averager.drift())`` syncs). Sharded parameters
        count this rank's shard only.
        """
        self._shadow.flush_()
        params = [
            (e, v)
            for n, e in self._shadow.entries.items()
            if e.kind == "param"
            for v in [self._shadow.local_tensors[n]]
        ]
        if not params:
            return torch.zeros(())
        home = params[0][1].device
        diff, norm = [], []
        for e, v in params:
            live = local(e.get()).detach().to(v.device)
            diff.append(torch.linalg.vector_norm(live.float() - v.float()).square().to(home))
            norm.append(torch.linalg.vector_norm(v.float()).square().to(home))
        return (torch.stack(diff).sum() / torch.stack(norm).sum()).sqrt()

    def stats(self, drift: bool = False) -> dict[str, float | Tensor]:
        """What to log about the averager, by name.

        ``step``, ``num_updates``, and where defined ``decay``, ``horizon`` and
        ``init_weight`` (plain floats, no device sync); with ``drift`` also
        :meth:`drift` (a tensor).
        """
        out: dict[str, float | Tensor] = {
            "step": float(self.step),
            "num_updates": float(self.num_updates),
        }
        decay = self.decay
        if decay is not None:
            out["decay"] = decay
            out["horizon"] = self.horizon  # type: ignore[assignment]
        init = getattr(self, "init_weight", None)
        if isinstance(init, (int, float)) and not isinstance(init, bool):
            out["init_weight"] = float(init)
        if drift:
            out["drift"] = self.drift()
        return out

    def _warn_if_early(self, what: str) -> None:
        r"""Warn once when an evaluation uses an average still mostly :math:`\theta_0`."""
        init = getattr(self, "init_weight", None)
        if (
            getattr(self, "_warned_early", False)
            or not isinstance(init, float)
            or init <= 0.5
            or self.num_updates == 0  # nothing averaged yet: the average is the live start
        ):
            return
        self._warned_early = True
        n = self.num_updates
        warnings.warn(
            f"{type(self).__name__}.{what}: after {n} update{'' if n == 1 else 's'} the average "
            f"still holds {init:.0%} of the starting weights (init_weight={init:.3g}). Right "
            "for fine-tuning (anchor='init' keeps the pre-trained weights); when training "
            "from scratch pass anchor='debiased' or a warm-up schedule",
            EarlyAverageWarning,
            stacklevel=_user_stacklevel(),
        )

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into ``model`` (default: the averager's own) for good.

        Raises:
            SwapError: the average is applied to the averager's model.
            KeyError: ``model`` lacks some averaged tensor (names listed).

        """
        self._refuse_while_applied("copy_to")
        self._check_finite("copy_to")
        self._warn_if_early("copy_to()")
        self._write_average(model)

    def _copy_to(self, model: nn.Module | None = None) -> None:
        """:meth:`copy_to` without the early-average warning (a method's own switch)."""
        self._refuse_while_applied("copy_to")
        self._check_finite("copy_to")
        self._write_average(model)

    def _write_average(self, model: nn.Module | None) -> None:
        from emaweights._sharding import reshard

        if model is None or unwrap(model) is unwrap(self.model):
            reshard(self.model)  # FSDP2: else the next forward reuses gathered live tensors
            self._shadow.copy_to_live_()
            return
        load_into(model, self._averaged_state_dict())

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """A plain model state dict (canonical names) holding the averaged weights.

        Every name of a tied tensor (``head.weight`` tied to ``emb.weight``) holds
        the average. Tensors that are not averaged (frozen parameters, ignored
        buffers) hold the live values; every tensor has the model's dtype and
        device and owns its memory.
        """
        self._check_finite("averaged_state_dict")
        self._warn_if_early("averaged_state_dict()")
        return self._averaged_state_dict()

    def _averaged_state_dict(self) -> dict[str, Tensor]:
        """:meth:`averaged_state_dict` without the checks and the warning."""
        averaged = self._shadow.state()
        by_identity = {id(e.get()): n for n, e in self._shadow.entries.items()}
        out = {}
        with torch.no_grad():
            for key, value in unwrap(self.model).state_dict(keep_vars=True).items():
                name = canonical_name(key)
                avg = averaged.get(name)
                if avg is None and id(value) in by_identity:
                    avg = averaged[by_identity[id(value)]]  # a tied alias of an averaged tensor
                src = avg if avg is not None else value
                out[name] = src.detach().to(value.device, value.dtype, copy=True)
        return out

    # -- checkpoints -------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        """The configuration a strict load must match (plain values)."""
        return {
            "update_every": self.update_every,
            "start_step": self.start_step,
            "nonfinite": self.nonfinite,
        }

    def _extra_state(self) -> dict[str, Any]:
        """The rule's own state fields (plain values and tensors)."""
        return {}

    def _parse_extra(self, state: Mapping[str, Any], strict: bool) -> dict[str, Any]:
        """Validate the rule's own fields of ``state``; raise ``ValueError`` naming one."""
        return {}

    def _commit_extra(self, parsed: Mapping[str, Any]) -> None:
        """Adopt what :meth:`_parse_extra` returned (cannot fail)."""

    def state_dict(self) -> dict[str, Any]:
        """The full state: storage tensors, counters and configuration.

        Only tensors and plain Python values, so it loads with
        ``torch.load(..., weights_only=True)``.

        Raises:
            NonFiniteError: the average holds NaN or infinity (never saved silently).
        """
        self._check_finite("state_dict")
        return self._unchecked_state()

    def _unchecked_state(self) -> dict[str, Any]:
        """:meth:`state_dict` without the finiteness check: the layout a loader fills.

        A loader that needs the current layout (``load_dcp``) must work on a
        NaN-poisoned averager too, so that a good checkpoint always recovers it.
        """
        state: dict[str, Any] = {
            "format": self.FORMAT,
            "version": self.VERSION,
            "step": self.step,
            "last_step": self._last_step,
            "num_updates": self.num_updates,
            "skipped_updates": self.skipped_updates,
            "config": self._config(),
        }
        state.update({k: s.state() for k, s in self._storages().items()})
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned.

        Every field is validated before anything changes, so a bad state
        (another architecture or method, a truncated or hand-edited file) leaves
        the averager exactly as it was. Loading a good state always recovers,
        even an averager whose average holds NaN.

        Args:
            state: the saved state.
            strict: require the same tensor names, dtypes and configuration.
                With ``strict=False`` the saved configuration is adopted and only
                the tensors present in both are loaded (cast to the storage dtype;
                values the storage dtype cannot hold are refused).

        Raises:
            ValueError: not this averager's state, a malformed field, or a
                mismatch (each one listed).
            KeyError: missing or unexpected tensor names (listed).
        """
        self.prepare_load(state, strict)()

    def prepare_load(self, state: Mapping[str, Any], strict: bool = True) -> Callable[[], None]:
        """Validate ``state`` completely; return the function that loads it (cannot fail).

        Lets a composite (e.g. :class:`~emaweights.MultiEMA`) validate every
        member before changing any.
        """
        self._refuse_while_applied("load_state_dict")
        common = parse_common(state, self.FORMAT, self.VERSION, list(self._storages()))
        extra = self._parse_extra(state, strict)
        config = extra.get("config", state["config"])
        if strict and config != self._config():
            mine = self._config()
            diff = {
                k: (_short(config.get(k)), _short(v)) for k, v in mine.items() if config.get(k) != v
            }
            raise ValueError(f"configuration differs from the saved one (saved, current): {diff}")
        for key, storage in self._storages().items():
            storage.validate(state[key], strict=strict)

        def commit() -> None:
            for key, storage in self._storages().items():
                storage.load_(state[key], strict=strict, validated=True)
            self.step, self._last_step = common["step"], common["last_step"]
            self.num_updates, self.skipped_updates = (
                common["num_updates"],
                common["skipped_updates"],
            )
            self._signature = None
            self._commit_extra(extra)

        return commit

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(update_every={self.update_every}, "
            f"start_step={self.start_step}, tensors={len(self._shadow.tensors)}, "
            f"step={self.step}, num_updates={self.num_updates})"
        )


# Frames a warning should not point at: this package, contextlib (``applied()``) and
# torch (``module(x)`` runs through ``nn.Module.__call__``).
_INTERNAL = (
    os.path.dirname(__file__) + os.sep,
    os.path.dirname(torch.__file__) + os.sep,
    contextlib.__file__ or "contextlib.py",
)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points ``warnings.warn`` at the first frame outside the internals."""
    frame, level = sys._getframe(1), 1  # the frame calling warnings.warn
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


class ReadOnlyTensors(dict[str, Tensor]):
    """A ``dict`` that refuses changes and pickles as a plain ``dict``."""

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            "averager.shadow is read-only (views of the average); change the average with "
            "load_state_dict(), or copy it with dict(averager.shadow)"
        )

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse  # type: ignore[assignment]
    __ior__ = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[type, tuple[dict[str, Tensor]]]:
        return dict, (dict(self),)


def _tracked_kind(e: Entry) -> bool:
    """Whether ``collect(include_frozen=False)`` keeps ``e``: a buffer or a trainable parameter."""
    return e.kind != "param" or e.get().requires_grad


def storage_options(shadow: Shadow) -> dict[str, Any]:
    """The keyword arguments that rebuild a storage like ``shadow`` (for tensors joining)."""
    kernels = [g.kernel for g in shadow.averaged if g.kernel is not None]
    return {
        "dtype": shadow.dtype,
        "device": shadow.device,
        "foreach": shadow.foreach,
        "rounding": shadow.rounding,
        "overlap": any(k.overlap for k in kernels),
        "compiled": any(k.compiled for k in kernels),
    }


def _refuse_step(optimizer: torch.optim.Optimizer, swapped: set[int]) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in swapped:
                raise SwapError(
                    f"{type(optimizer).__name__}.step() called while the averaged weights are "
                    "applied: it would train the average. Leave `with averager.applied():` "
                    "(or call restore()) first"
                )


def load_into(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a canonical-name state dict into a (possibly wrapped) model, strictly."""
    target = unwrap(model)
    result = target.load_state_dict(dict(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(
            f"model does not match the averager: missing {result.missing_keys[:10]}, "
            f"unexpected {result.unexpected_keys[:10]}"
        )


def is_plain(value: object, kind: type, *allowed: object) -> bool:
    """Whether ``value`` is a plain ``kind`` (not a bool or tensor) equal to one of ``allowed``."""
    return type(value) is kind and value in allowed


def parse_clock(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the clock's saved options (``update_every``, ``start_step``, ``nonfinite``)."""
    nonfinite = config.get("nonfinite")
    if not is_plain(nonfinite, str, "check", "raise", "skip"):
        raise ValueError(
            f"saved nonfinite must be 'check', 'raise' or 'skip', got {_short(nonfinite)}"
        )
    return {
        "update_every": positive_int(config.get("update_every"), "saved update_every"),
        "start_step": positive_int(config.get("start_step"), "saved start_step", minimum=0),
        "nonfinite": nonfinite,
    }


def parse_common(state: object, fmt: str, version: int, storages: list[str]) -> dict[str, int]:
    """Validate the fields every averager state has; return the counters.

    Checks type before value (a tensor compared with a str has no truth value),
    bounds every counter and cross-checks them (``num_updates <= step``,
    ``last_step <= step``); messages print bounded descriptions only.
    """
    if not isinstance(state, Mapping) or not is_plain(state.get("format"), str, fmt):
        found = _short(state.get("format")) if isinstance(state, Mapping) else _short(state)
        kind = fmt.removeprefix("emaweights.")
        raise ValueError(f"not an emaweights {kind} state (format {found}, expected {fmt!r})")
    if not is_plain(state.get("version"), int, version):
        raise ValueError(
            f"unsupported {fmt.removeprefix('emaweights.')} state version "
            f"{_short(state.get('version'))}, expected {version}"
        )
    missing = [
        k for k in ("step", "last_step", "num_updates", "config", *storages) if k not in state
    ]
    if missing:
        raise ValueError(f"{fmt} state lacks the fields {missing}")
    out = {
        k: positive_int(state.get(k, 0), f"saved {k}", minimum=0)
        for k in ("step", "last_step", "num_updates", "skipped_updates")
    }
    for k in ("last_step", "num_updates", "skipped_updates"):
        if out[k] > out["step"]:
            raise ValueError(f"saved {k} {out[k]} is more than the saved step {out['step']}")
    if not isinstance(state["config"], Mapping):
        raise ValueError(f"saved config must be a mapping, got {_short(state['config'])}")
    for k in storages:
        if not isinstance(state[k], Mapping):
            raise ValueError(f"saved {k} must be a mapping of tensors, got {_short(state[k])}")
    return out
