"""Plan and dispatch the update of one storage group: lists, flat, staged or compiled.

A :class:`Group` is the set of tracked tensors whose shadows share one flat
buffer (see :mod:`emaweights.shadow`, which builds them). Its :class:`Kernel`
chooses the fastest path the live tensors allow and runs the functional
kernels of :mod:`emaweights.functional` over prebuilt lists. This module sits
below the storage: it imports only torch, :mod:`emaweights.functional`,
:mod:`emaweights._naming` and :mod:`emaweights._sharding`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from emaweights import functional as F
from emaweights._naming import Entry
from emaweights._sharding import local

__all__ = ["STAGING_ELEMENTS", "Group", "Kernel", "live_on_shadow_device", "params_run"]

STAGING_ELEMENTS = 1 << 17
"""Elements of the cache-sized staging buffer of the mixed-dtype update (512 KiB in fp32)."""


@dataclass
class Group:
    """Tracked tensors sharing one flat shadow buffer (built by :mod:`emaweights.shadow`)."""

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
    kernel: Kernel | None = None  # the update fast path, chosen after the group is built
    flat_is_views: bool = True  # ``flat`` is exactly the views back to back (see rebind_group_)

    def live(self) -> list[Tensor]:
        """The live tensors (local shards for DTensors), in the order of ``views``."""
        # FSDP2 may replace a DTensor's local tensor (padding at lazy init): re-read it.
        params = [local(p) for p in self.params] if self.sharded else self.params
        if not self.buffers:
            return params
        return params + [e.get() for e in self.buffers]


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


def params_run(g: Group, live: Sequence[Tensor]) -> Tensor | None:
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


def live_on_shadow_device(g: Group, foreach: bool | None) -> list[Tensor]:
    """The group's live tensors where its shadow is (copied to staging if elsewhere)."""
    live = g.live()
    if g.staging is None:
        return live
    F.copy_(g.staging, live, foreach=foreach)
    if g.live_device.type == "cuda":
        # The CPU update reads the staging tensors next: wait for the copies.
        torch.cuda.current_stream(g.live_device).synchronize()
    return g.staging


class Kernel:
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
      Stochastic rounding takes this path for non-contiguous live tensors too
      (channels_last convolutions: cut along their first dimension), and
      ``foreach=False`` runs its per-tensor reference
      (:func:`emaweights.functional.lerp_stochastic_`): the option is never
      dropped. Its noise comes from ``generator``, never the global RNG.
    * mixed dtypes with ``compiled`` and parameters back to back in one
      storage: one compiled fused pass over the flat buffer
      (:func:`emaweights.functional.lerp_compiled_`); buffers staged as above.

    A cross-device shadow first copies the live tensors into its staging
    tensors (pinned, asynchronous for CUDA to CPU), then runs the plan there.
    With ``overlap``, the plan runs at the *next* update (or at the next read of
    the shadow, see :meth:`emaweights.shadow.Shadow.flush_`): the copy then overlaps a training
    step instead of being waited for.
    """

    def __init__(
        self,
        g: Group,
        *,
        foreach: bool | None,
        stochastic: bool,
        overlap: bool = False,
        compiled: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.g = g
        self.foreach = foreach
        self.stochastic = stochastic
        self.generator = generator  # of the rounding noise, on the shadow's device
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
        if self.kind == "loop" and self.stochastic:
            F.lerp_stochastic_(g.views, live, weight, generator=self.generator)
        elif self.kind == "loop":
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
                generator=self.generator,
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
        run = params_run(g, live)
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
            self._plan_staged_or_warn(in_order)
        elif self.stochastic and all(t.is_contiguous() for t, _ in pairs):
            self._plan_staged_or_warn(pairs)  # non-contiguous sources staged by slices
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

    def _plan_staged_or_warn(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        """Plan the staged path over ``pairs``; warn once if ``compiled`` cannot be used."""
        if self.compiled and not self.warned:
            self.warned = True
            warnings.warn(
                "compiled=True: the parameters no longer lie back to back in one storage; "
                "this group falls back to the eager staged update (same numbers, slower)",
                stacklevel=2,
            )
        self.kind = "staged"
        self._plan_staged(pairs)

    def _plan_staged(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        dev = self.g.flat.device
        size = min(STAGING_ELEMENTS, sum(t.numel() for t, _ in pairs))
        # a non-contiguous source is staged by slices of its first dimension: one must fit
        size = max([size, *(s[0].numel() for _, s in pairs if not s.is_contiguous())])
        if self.stochastic:
            if "work" not in self.buffers or self.buffers["work"].numel() < size:
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
