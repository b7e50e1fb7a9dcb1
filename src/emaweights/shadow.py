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

Layers: the update of each group is planned and dispatched by
:mod:`emaweights._kernel`, finiteness screens and swap fingerprints are in
:mod:`emaweights._checks`, and DTensor / ZeRO-3 primitives in
:mod:`emaweights._sharding`, all below this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from emaweights import functional as F
from emaweights._checks import fingerprint, nonfinite_flags
from emaweights._kernel import Group, Kernel, live_on_shadow_device, params_run
from emaweights._naming import Entry
from emaweights._sharding import (
    any_across_ranks,
    distribute_like,
    is_sharded,
    local,
    wrap_like,
)

__all__ = [
    "Rounding",
    "Shadow",
    "SwapRecord",
    "live_on_shadow_device",
    "shadow_dtype_for",
    "undo_swap",
]


Rounding = Literal["nearest", "stochastic"]


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


def _group_key(
    e: Entry, dtype: torch.dtype | None, device: torch.device | None
) -> tuple[object, ...]:
    t = local(e.get())
    sdt = shadow_dtype_for(t.dtype, dtype, e.kind != "copy_buffer")
    sdev = t.device if device is None else device
    return (t.dtype, t.device, sdt, sdev)


def _build_group(entries: list[Entry], sdt: torch.dtype, sdev: torch.device) -> Group:
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
    group = Group(
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


class Shadow:
    """The averaged (and copied) tensors of a model, grouped into flat buffers.

    Args:
        entries: the tracked tensors (see :func:`emaweights._naming.collect`).
        dtype: shadow dtype for averaged tensors; ``None`` means at least float32.
        device: shadow device; ``None`` means each tensor's own device.
        foreach: kernel choice, see :func:`emaweights.functional.lerp_`.
        rounding: ``"stochastic"`` for a stochastically rounded bfloat16 shadow.
        seed: with stochastic rounding, the seed of the rounding noise: one
            ``torch.Generator`` per shadow device, owned here (saved and loaded
            with :meth:`rng_state` / :meth:`load_rng_state`), so the updates
            never draw from or advance torch's global generator. ``None``
            draws a seed from torch's default generator (once, here).
        overlap: defer each update of a cross-device group by one step (see
            :class:`~emaweights._kernel.Kernel`); every read of the shadow completes it first.
        compiled: update mixed-dtype groups with the compiled fused kernel
            (:func:`emaweights.functional.lerp_compiled_`); their parameters
            must lie back to back in one storage
            (:func:`emaweights.flat.flatten_parameters`) on the shadow's device.

    Raises:
        ValueError: a bad ``rounding`` or ``seed`` (a seed without stochastic
            rounding), or ``compiled`` where it cannot apply (the message names
            the group and what to change).

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
        seed: int | None = None,
        overlap: bool = False,
        compiled: bool = False,
    ) -> None:
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        if rounding == "stochastic" and dtype != torch.bfloat16:
            raise ValueError(
                f"rounding='stochastic' needs a bfloat16 shadow (dtype=torch.bfloat16), got {dtype}"
            )
        if seed is not None and rounding != "stochastic":
            raise ValueError(f"seed={seed!r} seeds stochastic rounding; rounding is {rounding!r}")
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63
        ):
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
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
        # The rounding noise: one generator per shadow device, seeded alike.
        self.generators: dict[str, torch.Generator] = {}
        if rounding == "stochastic":
            if seed is None:
                seed = int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
            for g in self.averaged:
                key = str(g.flat.device)
                if key not in self.generators:
                    self.generators[key] = torch.Generator(g.flat.device).manual_seed(seed)
        for g in self.averaged:
            g.kernel = Kernel(
                g,
                foreach=foreach,
                stochastic=rounding == "stochastic",
                overlap=overlap,
                compiled=compiled,
                generator=self.generators.get(str(g.flat.device)),
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
            if params_run(g, g.live()) is None:
                names = [e.name for e in g.entries[: len(g.params)]][:5]
                raise ValueError(
                    f"compiled=True needs the {g.live_dtype} parameters on {g.live_device} "
                    f"back to back in one storage on the shadow's device (shadow "
                    f"{g.flat.dtype} on {g.flat.device}), e.g. {names}: call "
                    "emaweights.flat.flatten_parameters(model) before creating the EMA "
                    "(and the optimizer), keep the shadow on the model's device, or pass "
                    "compiled=False"
                )

    def _build(self, entries: Sequence[Entry]) -> list[Group]:
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
        return not any(self._across_ranks(nonfinite_flags(tensors)).tolist())

    def nonfinite_names(self) -> list[str]:
        """Names of shadow tensors holding NaN or infinity (in any rank's shard, if sharded)."""
        self.flush_()
        names = [n for n, t in self.local_tensors.items() if t.is_floating_point()]
        bad = torch.zeros(len(names), dtype=torch.bool)
        # Screen each group's flat buffer with one reduction; name tensors only in bad groups.
        groups = [g for g in self.averaged + self.copied if g.flat.is_floating_point()]
        screens = nonfinite_flags([g.flat for g in groups]).tolist()
        for g, group_bad in zip(groups, screens, strict=True):
            if group_bad or not g.flat_is_views:
                suspects = [names.index(e.name) for e in g.entries]
                bad[suspects] = nonfinite_flags([self.local_tensors[names[i]] for i in suspects])
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
            record.fingerprint = fingerprint(params)
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
            if not moved and not torch.equal(fingerprint(params), record.fingerprint):
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

    def rng_state(self) -> dict[str, Tensor]:
        """The state of each rounding generator, by device (empty without stochastic rounding)."""
        self.flush_()  # a deferred update still has noise to draw
        return {d: g.get_state() for d, g in self.generators.items()}

    def validate_rng_state(self, state: object) -> None:
        """Check that ``state`` is a :meth:`rng_state` of this shadow's generators.

        Raises:
            ValueError: another set of devices, or a state a generator refuses.

        """
        if not isinstance(state, Mapping) or sorted(state, key=str) != sorted(self.generators):
            keys = sorted(state, key=str)[:8] if isinstance(state, Mapping) else type(state)
            raise ValueError(
                f"saved rounding generator state is for devices {keys}, "
                f"this shadow's are {sorted(self.generators)}"
            )
        for device, t in state.items():
            if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
                raise ValueError(
                    f"saved rounding generator state for {device} is not a uint8 vector"
                )
            try:  # on a scratch generator: nothing changes if it is refused
                torch.Generator(self.generators[device].device).set_state(t)
            except (RuntimeError, ValueError) as err:
                raise ValueError(
                    f"saved rounding generator state for {device} is invalid: {str(err)[:120]}"
                ) from err

    def load_rng_state(self, state: Mapping[str, Tensor]) -> None:
        """Adopt a state that passed :meth:`validate_rng_state`."""
        self._drop()  # a pending update would draw from the replaced stream
        for device, t in state.items():
            self.generators[device].set_state(t)

    def numel(self) -> int:
        """Number of shadow elements."""
        return sum(g.flat.numel() for g in self.averaged + self.copied)

    def nbytes(self) -> int:
        """Bytes of shadow storage."""
        return sum(g.flat.numel() * g.flat.element_size() for g in self.averaged + self.copied)

    def names(self) -> Iterable[str]:
        """Canonical names of the shadow tensors."""
        return self.tensors.keys()
