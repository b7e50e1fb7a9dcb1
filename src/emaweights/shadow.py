"""Shadow storage: where the averages live, in which dtype, and how they swap in.

The averages of all tracked tensors that share (live dtype, live device, shadow
dtype, shadow device) are views into *one* flat contiguous buffer. That gives
the update a prebuilt tensor list per group (no Python work per tensor in the
hot path beyond one list) and lets a future fast path run one kernel per group.

Evaluation swaps parameters in *by pointer*: ``param.data = shadow_view``. No
copy is made when dtype and device agree. When they do not (an fp32 shadow of a
bf16 model, or a shadow kept on another device), the swap materializes one cast
copy per tensor, freed on restore. Buffers are always swapped in as copies
(``module._buffers[name] = copy``): they are small, and some writes to them
bypass version counters (DDP broadcasts rank 0's buffers at every forward), so
the average itself must never be handed to the model.

Sharded parameters (FSDP2 ``DTensor``) keep a sharded shadow: the flat buffer
holds this rank's local shards only, and :attr:`Shadow.tensors` wraps each view
in a ``DTensor`` with the parameter's mesh and placements. Updates touch local
shards only (no communication). Such parameters swap by *copy* into their local
shard, since FSDP2 all-gathers from its own shard storage and ignores ``.data``.
DeepSpeed ZeRO-3 parameters are handled the same way, their partition
``ds_tensor`` playing the local shard (see :func:`emaweights.distributed.local`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from emaweights import functional as F
from emaweights._naming import Entry
from emaweights._sharding import (
    any_across_ranks,
    distribute_like,
    is_sharded,
    local,
    wrap_like,
)

__all__ = ["Rounding", "Shadow", "SwapRecord", "shadow_dtype_for", "undo_swap"]

Rounding = Literal["nearest", "stochastic"]

STAGING_ELEMENTS = 1 << 17
"""Elements of the cache-sized staging buffer of the mixed-dtype update (512 KiB in fp32)."""


def shadow_dtype_for(
    live: torch.dtype, requested: torch.dtype | None, averaged: bool
) -> torch.dtype:
    """Pick the dtype of a shadow tensor.

    Averaged floating tensors default to at least float32: in bf16 an update of
    ``(1 - 0.999) * (live - shadow)`` is below the format's resolution near the
    shadow's value and rounds to nothing, so a bf16 shadow stops moving.
    Copied tensors (integer buffers) keep their own dtype.
    """
    if not averaged:
        return live
    if requested is not None:
        return requested
    return torch.promote_types(live, torch.float32)


@dataclass
class _Group:
    """Tracked tensors sharing one flat shadow buffer."""

    entries: list[Entry]
    flat: Tensor
    views: list[Tensor]
    live_dtype: torch.dtype
    live_device: torch.device
    params: list[Tensor] = field(
        default_factory=list
    )  # cached Parameter objects, stable under .to()
    buffers: list[Entry] = field(default_factory=list)  # buffers are re-read: .to() replaces them
    staging: list[Tensor] | None = None  # live copies on the shadow device (cross-device shadow)
    sharded: bool = False  # some params are DTensors: read their local shard every time
    kernel: _Kernel | None = None  # the update fast path, chosen after the group is built
    flat_is_views: bool = True  # ``flat`` is exactly the views back to back (see rebind_group_)

    def live(self) -> list[Tensor]:
        """The live tensors (local shards for DTensors), in the order of ``views``."""
        # FSDP2 may replace a DTensor's local tensor (padding at lazy init): re-read it.
        params = [local(p) for p in self.params] if self.sharded else self.params
        if not self.buffers:
            return params
        return params + [e.get() for e in self.buffers]


def _group_key(
    e: Entry, dtype: torch.dtype | None, device: torch.device | None
) -> tuple[object, ...]:
    t = local(e.get())
    sdt = shadow_dtype_for(t.dtype, dtype, e.kind != "copy_buffer")
    sdev = t.device if device is None else device
    return (t.dtype, t.device, sdt, sdev)


def _build_group(entries: list[Entry], sdt: torch.dtype, sdev: torch.device) -> _Group:
    # Parameters first, then buffers: the cached parameter list is a prefix.
    entries = [e for e in entries if e.kind == "param"] + [e for e in entries if e.kind != "param"]
    live = [local(e.get()) for e in entries]
    flat = torch.empty(sum(t.numel() for t in live), dtype=sdt, device=sdev)
    views, offset = [], 0
    for t in live:
        run = flat[offset : offset + t.numel()]
        # A channels_last tensor gets a channels_last view: applied() must not change the
        # model's memory format (convolutions would switch layout, compile would recompile).
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
            views.append(run.as_strided(t.shape, t.stride(), run.storage_offset()))
        else:
            views.append(run.view(t.shape))
        offset += t.numel()
    n_params = sum(1 for e in entries if e.kind == "param")
    group = _Group(
        entries=entries,
        flat=flat,
        views=views,
        live_dtype=live[0].dtype,
        live_device=live[0].device,
        params=[e.get() for e in entries[:n_params]],
        buffers=entries[n_params:],
    )
    group.sharded = any(is_sharded(p) for p in group.params)
    if sdev != group.live_device:
        # Allocated once; pinned when it receives copies from an accelerator, so
        # that the device-to-host copies can run asynchronously.
        pin = group.live_device.type == "cuda" and sdev.type == "cpu"
        group.staging = [
            torch.empty(v.shape, dtype=group.live_dtype, device=sdev, pin_memory=pin) for v in views
        ]
    F.copy_(views, live)
    return group


def _flat_run(tensors: Sequence[Tensor]) -> Tensor | None:
    """One 1-D view covering ``tensors`` if they lie back to back in one storage, else ``None``."""
    if not tensors:
        return None
    first = tensors[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (
            not t.is_contiguous()
            or t.storage_offset() != offset
            or t.untyped_storage().data_ptr() != storage
        ):
            return None
        offset += t.numel()
    total = offset - first.storage_offset()
    return first.detach().as_strided((total,), (1,), first.storage_offset())


def _params_run(g: _Group, live: Sequence[Tensor]) -> Tensor | None:
    """The group's live parameters as one flat 1-D view, if they lie back to back."""
    if g.staging is not None or not g.flat_is_views:
        return None
    return _flat_run(live[: len(g.params)])


def _memory_order_pairs(pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]] | None:
    """The pairs as 1-D views in one memory order, if every pair has one, else ``None``.

    Both contiguous, or both channels_last (NHWC order: ``permute`` then ``view``,
    which raises rather than copies), so the staged kernels can treat them as flat.
    """
    cl = torch.channels_last
    out = []
    for t, s in pairs:
        if t.is_contiguous() and s.is_contiguous():
            out.append((t.view(-1), s.view(-1)))
        elif (
            t.dim() == 4 and t.is_contiguous(memory_format=cl) and s.is_contiguous(memory_format=cl)
        ):
            out.append((t.permute(0, 2, 3, 1).view(-1), s.permute(0, 2, 3, 1).view(-1)))
        else:
            return None
    return out


def _plain_alias(t: Tensor) -> Tensor:
    """A 1-D tensor over the same memory as contiguous ``t`` that is not a view of another.

    ``torch.compile`` specializes on how an input views its base: a flat run of
    parameters is a view of the first parameter (another shape), and the kernel
    compiled for such an input indexes it element by element, which is slower.
    """
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def live_on_shadow_device(g: _Group, foreach: bool | None) -> list[Tensor]:
    """The group's live tensors where its shadow is (copied to staging if elsewhere)."""
    live = g.live()
    if g.staging is None:
        return live
    F.copy_(g.staging, live, foreach=foreach)
    if g.live_device.type == "cuda":
        # The CPU update reads the staging tensors next: wait for the copies.
        torch.cuda.current_stream(g.live_device).synchronize()
    return g.staging


def _nonfinite(tensors: Sequence[Tensor]) -> Tensor:
    """One flag per tensor: holds NaN or infinity. A CPU bool tensor.

    A fused 2-norm per (device, dtype) screens every tensor with one launch and
    one sync; it is infinite or NaN whenever the tensor holds a non-finite
    element, but may also overflow for huge finite values, so each suspect is
    confirmed exactly by its min and max (NaN propagates; infinity is the
    extreme). Suspects are rare: they cost one more sync each.
    """
    flags = torch.zeros(len(tensors), dtype=torch.bool)
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel():  # an empty tensor holds nothing non-finite
            by_kind.setdefault((t.device, t.dtype), []).append(i)
    for idx in by_kind.values():
        norms = torch._foreach_norm([tensors[i] for i in idx])
        suspect = (~torch.isfinite(torch.stack(norms))).cpu().tolist()
        for i, s in zip(idx, suspect, strict=True):
            if s:
                lo, hi = torch.aminmax(tensors[i])
                flags[i] = not bool(torch.isfinite(lo) & torch.isfinite(hi))
    return flags


class _Kernel:
    r"""One group's update :math:`\bar\theta \leftarrow \bar\theta + w\,(\theta - \bar\theta)`.

    The fastest path the live tensors allow is chosen when they are first seen
    and re-chosen whenever any of them moves (its data pointer changes, e.g.
    after ``model.to()``), so a plan never holds stale views:

    * ``foreach=False``: the per-tensor reference loop.
    * same dtype, parameters back to back in one storage (see
      :func:`emaweights.flat.flatten_parameters`): one ``lerp_`` over the flat
      buffer, plus one multi-tensor ``lerp_`` for buffers.
    * same dtype otherwise: one multi-tensor ``lerp_`` over prebuilt lists.
    * mixed dtypes (fp32 shadow of a bf16 model) or stochastic rounding:
      chunks cast through a cache-sized staging buffer allocated once
      (:func:`emaweights.functional.lerp_staged_`), no full-size temporary.
    * mixed dtypes with ``compiled`` and parameters back to back in one
      storage: one compiled fused pass over the flat buffer
      (:func:`emaweights.functional.lerp_compiled_`); buffers staged as above.

    A cross-device shadow first copies the live tensors into its staging
    tensors (pinned, asynchronous for CUDA to CPU), then runs the plan there.
    With ``overlap``, the plan runs at the *next* update (or at the next read of
    the shadow, see :meth:`Shadow.flush_`): the copy then overlaps a training
    step instead of being waited for.
    """

    def __init__(
        self,
        g: _Group,
        *,
        foreach: bool | None,
        stochastic: bool,
        overlap: bool = False,
        compiled: bool = False,
    ) -> None:
        self.g = g
        self.foreach = foreach
        self.stochastic = stochastic
        self.overlap = overlap
        # same dtype: the eager flat path is already at the roofline
        self.compiled = compiled and g.flat.dtype != g.live_dtype
        self.pending: float | None = None  # weight of an update staged but not yet applied
        self.event: torch.cuda.Event | None = None  # marks the end of its copy
        self.key: list[int] = []
        self.kind = ""
        self.targets: list[Tensor] = []
        self.sources: list[Tensor] = []
        self.flat: tuple[Tensor, Tensor] | None = None
        self.batches: list[F.Batch] = []
        self.buffers: dict[str, Tensor] = {}
        self.direct = False  # the list path may call the foreach kernel directly
        self.warned = False  # the compiled plan could not be used (warned once)

    def __call__(self, weight: float) -> None:
        if self.overlap and self.g.staging is not None:
            self.finish()
            self._stage(weight)
            return
        self._run(live_on_shadow_device(self.g, self.foreach), weight)

    def _stage(self, weight: float) -> None:
        """Start copying the live tensors into staging; the update itself waits for :meth:`finish`.

        The copy is queued on the model's current stream, behind the optimizer
        step that produced the weights and ahead of the next one, so it reads
        exactly these weights; the host does not wait for it.
        """
        g = self.g
        assert g.staging is not None  # only called for cross-device groups
        F.copy_(g.staging, g.live(), foreach=self.foreach)
        if g.live_device.type == "cuda":
            self.event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self.event.record(torch.cuda.current_stream(g.live_device))
        self.pending = weight

    def finish(self) -> None:
        """Apply the update whose copy :meth:`_stage` started (a no-op if none is pending)."""
        if self.pending is None:
            return
        if self.event is not None:
            self.event.synchronize()  # normally long done: a training step ran meanwhile
            self.event = None
        weight, self.pending = self.pending, None
        assert self.g.staging is not None  # pending only for cross-device groups
        self._run(self.g.staging, weight)

    def drop(self) -> None:
        """Forget a pending update (the shadow is about to be overwritten)."""
        if self.event is not None:
            self.event.synchronize()  # the copy must not land in reused staging later
        self.pending, self.event = None, None

    def _run(self, live: list[Tensor], weight: float) -> None:
        g = self.g
        key = [t.data_ptr() for t in live]
        if key != self.key:
            self._plan(live)
            self.key = key
        if self.kind == "loop":
            F.ema_update_(g.views, live, weight, foreach=False)
        elif self.kind == "compiled":
            assert self.flat is not None  # set with this kind by _plan
            w = self.buffers["weight"]
            w.fill_(weight)
            F.lerp_compiled_(self.flat[0], self.flat[1], w)
            if self.batches:
                F.lerp_staged_(self.batches, weight)
        elif self.kind == "staged":
            F.lerp_staged_(
                self.batches,
                weight,
                work=self.buffers.get("work"),
                noise=self.buffers.get("noise"),
            )
        else:
            if self.flat is not None:
                self.flat[0].lerp_(self.flat[1], weight)
            if self.direct:  # same dtype, foreach-capable: skip the per-tensor checks of F.lerp_
                torch._foreach_lerp_(self.targets, self.sources, weight)
            elif self.targets:
                F.ema_update_(self.targets, self.sources, weight, foreach=self.foreach)

    def _plan(self, live: list[Tensor]) -> None:
        g = self.g
        self.flat, self.batches, self.direct = None, [], False
        n_params = len(g.params)
        run = _params_run(g, live)
        if run is not None:
            n = run.numel()
            pairs = [(g.flat[:n], run), *zip(g.views[n_params:], live[n_params:], strict=True)]
        else:
            pairs = list(zip(g.views, live, strict=True))
        mixed = g.flat.dtype != g.live_dtype
        contiguous = all(t.is_contiguous() and s.is_contiguous() for t, s in pairs)
        in_order = _memory_order_pairs(pairs)  # also channels_last on both sides
        if self.foreach is False:
            self.kind = "loop"
        elif self.compiled and run is not None and contiguous:
            self.kind = "compiled"
            self.flat = (_plain_alias(pairs[0][0]), _plain_alias(pairs[0][1]))
            if "weight" not in self.buffers:
                self.buffers["weight"] = torch.zeros((), dtype=torch.float32, device=g.flat.device)
            if len(pairs) > 1:
                self._plan_staged(pairs[1:])
        elif (mixed or self.stochastic) and in_order is not None:
            if self.compiled and not self.warned:
                self.warned = True
                warnings.warn(
                    "compiled=True: the parameters no longer lie back to back in one storage; "
                    "this group falls back to the eager staged update (same numbers, slower)",
                    stacklevel=2,
                )
            self.kind = "staged"
            self._plan_staged(in_order)
        elif self.stochastic:
            raise ValueError(
                "rounding='stochastic' needs each shadow tensor and its live tensor in one "
                "memory layout (both contiguous or both channels_last); the model's layout "
                "changed after the EMA was created"
            )
        else:
            self.kind = "lists"
            if run is not None and not mixed:
                self.kind = "flat"
                self.flat, pairs = pairs[0], pairs[1:]
            self.targets = [t for t, _ in pairs]
            self.sources = [s for _, s in pairs]
            self.direct = bool(self.targets) and not mixed and F._use_foreach(self.targets, None)

    def _plan_staged(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        dev = self.g.flat.device
        size = min(STAGING_ELEMENTS, sum(t.numel() for t, _ in pairs))
        if self.stochastic:
            if "work" not in self.buffers:
                self.buffers = {
                    "staging": torch.empty(size, dtype=torch.float32, device=dev),
                    "work": torch.empty(size, dtype=torch.float32, device=dev),
                    "noise": torch.empty(size, dtype=torch.int32, device=dev),
                }
        elif "staging" not in self.buffers or self.buffers["staging"].numel() < size:
            self.buffers["staging"] = torch.empty(size, dtype=self.g.flat.dtype, device=dev)
        self.batches = F.stage_batches(
            [t for t, _ in pairs], [s for _, s in pairs], self.buffers["staging"]
        )


@dataclass
class SwapRecord:
    """What :meth:`Shadow.swap_in` changed, so that :meth:`Shadow.swap_out` can undo it."""

    held: list[tuple[Entry, Tensor]]  # (entry, the live tensor or its data, to put back)
    swapped: list[Tensor]  # the Parameter, shard or buffer copy the model holds while swapped
    versions: dict[int, int]  # version counters of the swapped parameters, by id
    fingerprint: Tensor = field(default_factory=lambda: torch.zeros(0))

    def hand_over(self, below: SwapRecord) -> list[tuple[Entry, Tensor]]:
        """Take over what ``below`` (swapped in before this one) would put back.

        Used when ``below`` is restored while this record is still swapped in:
        this record now puts back the true live tensors of the entries both
        share; the entries only ``below`` swapped are returned, to restore now.
        """
        mine = {e.name: i for i, (e, _) in enumerate(self.held)}
        rest = []
        for e, old in below.held:
            i = mine.get(e.name)
            if i is None:
                rest.append((e, old))
            elif e.kind == "param" and is_sharded(e.get()):
                self.held[i] = (e, old)  # a copy of the live shard: keep the oldest
            else:
                self.held[i] = (self.held[i][0], old)
        return rest


def undo_swap(record: SwapRecord, held: Sequence[tuple[Entry, Tensor]] | None = None) -> None:
    """Put back what ``record`` (or just its entries ``held``) swapped out."""
    with torch.inference_mode(False), torch.no_grad():
        for e, old in record.held if held is None else held:
            live = e.get()
            if e.kind == "param" and is_sharded(live):
                local(live).copy_(old)
            elif e.kind == "param":
                live.data = old
            else:
                e.module._buffers[e.attr] = old


def _fingerprint(tensors: Sequence[Tensor]) -> Tensor:
    """Per tensor: its sum and 2-norm in float64 (changes under almost any in-place write)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        d = local(t).detach()
        pair = [d.sum(dtype=torch.float64), torch.linalg.vector_norm(d, dtype=torch.float64)]
        by_device.setdefault(d.device, []).extend(pair)
    # one host transfer per device, not per tensor
    parts = [torch.stack(v).cpu() for v in by_device.values()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


class Shadow:
    """The averaged (and copied) tensors of a model, grouped into flat buffers.

    Args:
        entries: the tracked tensors (see :func:`emaweights._naming.collect`).
        dtype: shadow dtype for averaged tensors; ``None`` means at least float32.
        device: shadow device; ``None`` means each tensor's own device.
        foreach: kernel choice, see :func:`emaweights.functional.lerp_`.
        rounding: ``"stochastic"`` for a stochastically rounded bfloat16 shadow.
        overlap: defer each update of a cross-device group by one step (see
            :class:`_Kernel`); every read of the shadow completes it first.
        compiled: update mixed-dtype groups with the compiled fused kernel
            (:func:`emaweights.functional.lerp_compiled_`); their parameters
            must lie back to back in one storage
            (:func:`emaweights.flat.flatten_parameters`) on the shadow's device.

    Raises:
        ValueError: a bad ``rounding``, or ``compiled`` where it cannot apply
            (the message names the group and what to change).

    """

    @torch.no_grad()
    def __init__(
        self,
        entries: Sequence[Entry],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        foreach: bool | None = None,
        rounding: Rounding = "nearest",
        overlap: bool = False,
        compiled: bool = False,
    ) -> None:
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        if rounding == "stochastic" and dtype != torch.bfloat16:
            raise ValueError(
                f"rounding='stochastic' needs a bfloat16 shadow (dtype=torch.bfloat16), got {dtype}"
            )
        self.foreach = foreach
        self.dtype = dtype
        self.device = device
        self.rounding: Rounding = rounding
        averaged = [e for e in entries if e.kind != "copy_buffer"]
        copied = [e for e in entries if e.kind == "copy_buffer"]
        self.averaged = self._build(averaged)
        self.copied = self._build(copied)
        if compiled:
            self._check_compilable(rounding)
        for g in self.averaged:
            g.kernel = _Kernel(
                g,
                foreach=foreach,
                stochastic=rounding == "stochastic",
                overlap=overlap,
                compiled=compiled,
            )
        self.local_tensors: dict[str, Tensor] = {
            e.name: v
            for g in self.averaged + self.copied
            for e, v in zip(g.entries, g.views, strict=True)
        }
        self.entries: dict[str, Entry] = {e.name: e for e in entries}
        # Views of sharded parameters are wrapped as DTensors with their placements.
        self.tensors: dict[str, Tensor] = {
            n: wrap_like(v, self.entries[n].get()) for n, v in self.local_tensors.items()
        }

    def _check_compilable(self, rounding: Rounding) -> None:
        """Refuse ``compiled=True`` where the compiled kernel would not run."""
        if rounding != "nearest":
            raise ValueError(f"compiled=True needs rounding='nearest', got {rounding!r}")
        if self.foreach is False:
            raise ValueError("compiled=True and foreach=False contradict each other")
        for g in self.averaged:
            if g.flat.dtype == g.live_dtype:
                continue  # same dtype: the eager flat/list paths serve it
            if _params_run(g, g.live()) is None:
                names = [e.name for e in g.entries[: len(g.params)]][:5]
                raise ValueError(
                    f"compiled=True needs the {g.live_dtype} parameters on {g.live_device} "
                    f"back to back in one storage on the shadow's device (shadow "
                    f"{g.flat.dtype} on {g.flat.device}), e.g. {names}: call "
                    "emaweights.flat.flatten_parameters(model) before creating the EMA "
                    "(and the optimizer), keep the shadow on the model's device, or pass "
                    "compiled=False"
                )

    def _build(self, entries: Sequence[Entry]) -> list[_Group]:
        buckets: dict[tuple[object, ...], list[Entry]] = {}
        for e in entries:
            buckets.setdefault(_group_key(e, self.dtype, self.device), []).append(e)
        return [_build_group(es, key[2], key[3]) for key, es in buckets.items()]  # type: ignore[arg-type]

    def rebind_group_(self, gi: int, flat: Tensor, views: list[Tensor]) -> None:
        """Make averaged group ``gi`` live in new storage (same shapes, already filled).

        Used by :class:`~emaweights.multi.MultiEMA`, which stacks the shadows of
        several EMAs into shared blocks.
        """
        g = self.averaged[gi]
        if [v.shape for v in views] != [v.shape for v in g.views]:
            raise ValueError("rebind_group_: the new views do not match the group's shapes")
        g.flat, g.views = flat, views
        g.flat_is_views = all(
            v.data_ptr() == flat.data_ptr() + o * flat.element_size()
            for v, o in zip(views, F._offsets(views), strict=True)
        ) and all(v.is_contiguous() for v in views)
        if g.kernel is not None:
            g.kernel.key = []  # its plan holds the old views: plan again at the next update
        for e, v in zip(g.entries, views, strict=True):
            self.local_tensors[e.name] = v
            self.tensors[e.name] = wrap_like(v, e.get())

    # -- updates -----------------------------------------------------------

    def average_(self, weight: float) -> None:
        """Average with new-value weight ``weight``; copy the copied tensors."""
        if torch.is_grad_enabled():  # cheaper than a no_grad decorator when already off
            with torch.no_grad():
                self.average_(weight)
            return
        for g in self.averaged:
            assert g.kernel is not None  # set in __init__ for every averaged group
            g.kernel(weight)
        for g in self.copied:
            F.copy_(g.views, g.live(), foreach=self.foreach)

    def flush_(self) -> None:
        """Complete every deferred update (``overlap``); called by every read of the shadow."""
        with torch.no_grad():
            for g in self.averaged:
                if g.kernel is not None:
                    g.kernel.finish()

    def _drop(self) -> None:
        for g in self.averaged:
            if g.kernel is not None:
                g.kernel.drop()

    @torch.no_grad()
    def copy_from_live_(self) -> None:
        """Set every shadow tensor to the live value (the start of an average)."""
        self._drop()
        for g in self.averaged:
            F.copy_(g.views, g.live(), foreach=self.foreach)
        self.copy_copied_()

    @torch.no_grad()
    def copy_copied_(self) -> None:
        """Copy the tensors that are copied, not averaged (integer buffers)."""
        for g in self.copied:
            F.copy_(g.views, g.live(), foreach=self.foreach)

    def copy_to_live_(self) -> None:
        """Write the shadow into the live tensors (make the average permanent)."""
        self.flush_()
        with torch.no_grad():
            for g in self.averaged + self.copied:
                F.copy_(g.live(), g.views, foreach=self.foreach)

    # -- checks ------------------------------------------------------------

    def check_live(self) -> None:
        """Raise if the model's tensors changed shape, dtype or device since creation.

        Raises:
            RuntimeError: listing every changed tensor.

        """
        problems = []
        for g in self.averaged + self.copied:
            for i, (e, v) in enumerate(zip(g.entries, g.views, strict=True)):
                p = e.get()
                t = local(p)
                if t.shape != v.shape:
                    problems.append(f"{e.name}: shape {tuple(v.shape)} -> {tuple(t.shape)}")
                elif t.dtype != g.live_dtype:
                    problems.append(f"{e.name}: dtype {g.live_dtype} -> {t.dtype}")
                elif t.device != g.live_device:
                    problems.append(f"{e.name}: device {g.live_device} -> {t.device}")
                elif i < len(g.params) and p is not g.params[i]:
                    # e.g. load_state_dict(assign=True): the average would follow the old tensor
                    problems.append(f"{e.name}: the Parameter object was replaced")
        if problems:
            raise RuntimeError(
                "the model changed after the EMA was made; make a new EMA (or load its state "
                "into one built for the new model): " + "; ".join(problems)
            )

    def live_moved(self) -> bool:
        """Whether the model was moved to another dtype or device (O(groups), no sync).

        Checks one tensor per group: ``model.to(...)`` moves all of them, so
        this catches it at the next update; :meth:`check_live` lists the details.
        """
        for g in self.averaged + self.copied:
            p = g.entries[0].get()  # re-read: some moves replace the Parameter object
            t = local(p)
            if t.dtype != g.live_dtype or t.device != g.live_device:
                return True
            if g.params and p is not g.params[0]:
                return True
        return False

    def live_all_finite(self) -> bool:
        """Whether every averaged live tensor is finite (one fused reduction, one sync)."""
        tensors = [t for g in self.averaged if g.live_dtype.is_floating_point for t in g.live()]
        return not any(self._across_ranks(_nonfinite(tensors)).tolist())

    def nonfinite_names(self) -> list[str]:
        """Names of shadow tensors holding NaN or infinity (in any rank's shard, if sharded)."""
        self.flush_()
        names = [n for n, t in self.local_tensors.items() if t.is_floating_point()]
        bad = torch.zeros(len(names), dtype=torch.bool)
        # Screen each group's flat buffer with one reduction; name tensors only in bad groups.
        groups = [g for g in self.averaged + self.copied if g.flat.is_floating_point()]
        screens = _nonfinite([g.flat for g in groups]).tolist()
        for g, group_bad in zip(groups, screens, strict=True):
            if group_bad or not g.flat_is_views:
                suspects = [names.index(e.name) for e in g.entries]
                bad[suspects] = _nonfinite([self.local_tensors[names[i]] for i in suspects])
        bad = self._across_ranks(bad)
        return [n for n, b in zip(names, bad.tolist(), strict=True) if b]

    def _across_ranks(self, flags: Tensor) -> Tensor:
        """``flags`` or-ed over the ranks of a sharded model (a collective), else as is."""
        like = self._a_sharded_param()
        if like is None:
            return flags
        # Every rank must decide the same: one that alone raised would leave others hanging.
        return any_across_ranks(flags, like)

    def _a_sharded_param(self) -> Tensor | None:
        """A live sharded parameter (it names the group of the cross-rank checks), if any."""
        for g in self.averaged + self.copied:
            for p in g.params:
                if is_sharded(p):
                    return p
        return None

    # -- swapping ----------------------------------------------------------

    def swap_in(self) -> SwapRecord:
        """Put the shadow into the model: parameters by pointer, buffers by copy.

        Works under ``torch.inference_mode()``: the copies are made as normal
        tensors, so their version counters can be read. If anything fails half
        way, the tensors already swapped are put back before the error propagates.
        """
        self.flush_()
        record = SwapRecord([], [], {})
        with torch.inference_mode(False), torch.no_grad():
            try:
                for g in self.averaged + self.copied:
                    for e, v in zip(g.entries, g.views, strict=True):
                        self._swap_one(record, e, v)
            except BaseException:
                undo_swap(record)
                raise
            params = [
                t
                for (e, _), t in zip(record.held, record.swapped, strict=True)
                if e.kind == "param"
            ]
            record.versions = {id(t): t._version for t in params}
            record.fingerprint = _fingerprint(params)
        return record

    @staticmethod
    def _swap_one(record: SwapRecord, e: Entry, v: Tensor) -> None:
        live = e.get()
        if e.kind == "param" and is_sharded(live):
            # FSDP2 and ZeRO-3 all-gather from their shard storage: copy into it, keep
            # the live shard.
            shard = local(live)
            record.held.append((e, shard.clone()))
            record.swapped.append(shard)
            shard.copy_(v)
            return
        # Parameters by pointer where dtype and device agree. Buffers always by
        # copy: they are small, and writes that bypass version counters (DDP
        # broadcasts rank 0's buffers at each forward) must not reach the average.
        same = v.dtype == live.dtype and v.device == live.device
        new = v if (same and e.kind == "param") else v.to(live.device, live.dtype, copy=True)
        if e.kind == "param":
            record.held.append((e, live.data))
            record.swapped.append(live)
            live.data = new
        else:
            record.held.append((e, live))
            record.swapped.append(new)
            e.module._buffers[e.attr] = new

    def swap_out(self, record: SwapRecord, *, keep_buffers: bool = False) -> list[str]:
        """Undo :meth:`swap_in`; return the names of parameters modified meanwhile.

        Only the averaged parameters are checked (version counter and a content
        fingerprint, which also catches writes through ``p.data``); buffers
        written by a train-mode forward are not an error. With ``keep_buffers``
        the buffers' values at this point are written into the shadow (so that
        statistics recomputed inside the swap, e.g. by
        :func:`~emaweights.swa.update_bn`, become part of the average).
        """
        with torch.inference_mode(False), torch.no_grad():
            params = [
                t
                for (e, _), t in zip(record.held, record.swapped, strict=True)
                if e.kind == "param"
            ]
            moved = [
                n
                for (e, _), t in zip(record.held, record.swapped, strict=True)
                if e.kind == "param" and t._version != record.versions.get(id(t))
                for n in [e.name]
            ]
            if not moved and not torch.equal(_fingerprint(params), record.fingerprint):
                # written around the version counter (through ``p.data``)
                moved = ["the parameters' contents (written through .data)"]
            if keep_buffers:
                for (e, _), t in zip(record.held, record.swapped, strict=True):
                    if e.kind != "param" and e.name in self.local_tensors:
                        self.local_tensors[e.name].copy_(t)
            undo_swap(record)
        return moved

    # -- state -------------------------------------------------------------

    def state(self) -> dict[str, Tensor]:
        """Shadow tensors by canonical name (views: no copy)."""
        self.flush_()
        return dict(self.tensors)

    def validate(self, state: Mapping[str, Tensor], *, strict: bool = True) -> None:
        """Check every name, shape, dtype and value of ``state`` against the shadow.

        Raises:
            KeyError: names missing or unexpected (``strict``), listed.
            ValueError: shape or dtype mismatches, non-finite values, or values
                the shadow dtype cannot hold (``strict=False`` casts), listed.

        """
        missing = sorted(set(self.tensors) - set(state))
        unexpected = sorted(set(state) - set(self.tensors), key=str)[:20]  # keys may not be str
        if strict and (missing or unexpected):
            raise KeyError(
                f"state does not match the model: missing {missing[:20]}, unexpected {unexpected}"
            )
        bad = []
        for name in sorted(set(self.tensors).intersection(state)):
            src, dst = state[name], self.tensors[name]
            if not isinstance(src, Tensor):
                bad.append(f"{name}: not a tensor ({type(src).__name__})")
            elif src.layout != torch.strided or src.is_meta:
                bad.append(f"{name}: holds no data ({src.layout}, device {src.device})")
            elif src.shape != dst.shape:
                bad.append(f"{name}: shape {tuple(src.shape)} != {tuple(dst.shape)}")
            elif strict and src.dtype != dst.dtype:
                bad.append(f"{name}: dtype {src.dtype} != {dst.dtype}")
            elif src.is_floating_point() != dst.is_floating_point() or src.is_complex():
                bad.append(f"{name}: dtype {src.dtype} cannot be cast to {dst.dtype}")
            elif src.is_floating_point() and not bool(torch.isfinite(src).all()):
                bad.append(f"{name}: holds NaN or infinity")
            elif src.is_floating_point() and src.dtype != dst.dtype and src.numel():
                limit = torch.finfo(dst.dtype).max
                if float(src.detach().abs().max()) > limit:
                    bad.append(f"{name}: values beyond {dst.dtype}'s range would become infinite")
        if bad:
            raise ValueError("state does not match the model: " + "; ".join(bad[:20]))

    def load_(
        self, state: Mapping[str, Tensor], *, strict: bool = True, validated: bool = False
    ) -> None:
        """Copy ``state`` into the shadow after :meth:`validate` (skipped if ``validated``).

        Nothing is written unless every check passes.
        """
        if not validated:
            self.validate(state, strict=strict)
        names = [n for n in self.tensors if n in state]
        self.flush_()  # a partial load keeps the other tensors: complete them first
        with torch.no_grad():
            F.copy_(
                [self.local_tensors[n] for n in names],
                [local(distribute_like(state[n], self.tensors[n])) for n in names],
            )

    def numel(self) -> int:
        """Number of shadow elements."""
        return sum(g.flat.numel() for g in self.averaged + self.copied)

    def nbytes(self) -> int:
        """Bytes of shadow storage."""
        return sum(g.flat.numel() * g.flat.element_size() for g in self.averaged + self.copied)

    def names(self) -> Iterable[str]:
        """Canonical names of the shadow tensors."""
        return self.tensors.keys()
