r"""Several EMAs of one model, updated in one pass.

Nobody knows the right decay before training. :class:`MultiEMA` keeps one
average per decay :math:`\beta^{(i)}`,

.. math::
    \bar\theta^{(i)}_t = \beta^{(i)}_t\,\bar\theta^{(i)}_{t-1} + (1 - \beta^{(i)}_t)\,\theta_t ,
    \qquad i = 1, \dots, n ,

and updates all of them with one kernel per tracked tensor: the ``n`` averages
of a tensor are the rows of one ``[n, numel]`` block, updated by a single
broadcast ``block.lerp_(live.view(1, -1), w)`` with ``w`` the ``[n, 1]`` column
of new-value weights. Each live tensor is read once per update (not ``n``
times), the launch count does not grow with ``n``, and the Python bookkeeping
(step counting, schedules, checks) is done once. Each row is contiguous, so
every average still swaps into the model by pointer.

Each average is a full :class:`~emaweights.EMA` (``multi[i]``): any of them can
be swapped in for evaluation (``multi.applied(i)``), exported
(``multi.averaged_state_dict(i)``) or saved; the per-decay logic (schedules,
``anchor``, ``update_every``, ``start_step``) is the EMA's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from emaweights.averager import _short, is_plain
from emaweights.ema import EMA
from emaweights.schedules import Schedule
from emaweights.shadow import Shadow, live_on_shadow_device

__all__ = ["MultiEMA"]

_FORMAT = "emaweights.MultiEMA"


class MultiEMA:
    r"""Keep one EMA per decay, updated together.

    Args:
        model: the model (bare or wrapped).
        decays: the decays (numbers or :class:`~emaweights.schedules.Schedule`),
            at least one.
        **options: the keyword options of :class:`~emaweights.EMA`
            (``update_every``, ``start_step``, ``anchor``, ``dtype``, ``device``,
            ``include_frozen``, ``exclude``, ``buffers``, ``foreach``,
            ``nonfinite``), shared by every decay.

    Raises:
        ValueError: ``decays`` is empty, or an option is out of range.

    Do not call ``register()`` on the member EMAs: it would give one of them
    storage of its own, outside the shared blocks; make a new ``MultiEMA``.

    """

    def __init__(
        self, model: nn.Module, decays: Sequence[float | Schedule], **options: Any
    ) -> None:
        if isinstance(decays, (str, bytes)) or not isinstance(decays, Sequence) or not decays:
            raise ValueError(f"decays must be a non-empty sequence, got {decays!r}")
        for name, unsupported in (
            ("rounding", "stochastic"),
            ("compiled", True),
            ("overlap", True),
        ):
            if name in options and options[name] == unsupported:
                # The fused [n, numel] kernel has no such path: refuse rather than ignore.
                raise ValueError(
                    f"MultiEMA does not support {name}={unsupported!r} (its fused update has "
                    "no such path); use one EMA per decay instead"
                )
        self.model = model
        self.emas = [EMA(model, d, **options) for d in decays]
        self._stack()

    def _stack(self) -> None:
        """Put the averages of each tensor into one ``[n, numel]`` block (again, after a join)."""
        self._blocks = [
            _restack([e.storage for e in self.emas], gi)
            for gi in range(len(self.emas[0].storage.averaged))
        ]
        self._stacked = [e.storage for e in self.emas]  # the storages the blocks belong to
        self._casts: dict[int, Tensor] = {}  # mixed-dtype groups: see _cast_buffer
        # The [n, 1] weight column of each group, allocated once and refilled per update.
        self._weights = [
            torch.empty(len(self.emas), 1, dtype=g.flat.dtype, device=g.flat.device)
            for g in self.emas[0].storage.averaged
        ]

    def _index(self, index: int) -> int:
        """``index`` if it names one of the decays, else ``IndexError`` naming it and the count."""
        n = len(self.emas)
        if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
            raise IndexError(
                f"MultiEMA index {index!r} is out of range: it holds {n} decays "
                f"({[str(e.schedule) for e in self.emas]}), index 0 to {n - 1}"
            )
        return index

    def _cast_buffer(self, blocks: list[Tensor]) -> Tensor:
        """The cast buffer of a group (keyed by its first block), allocated on first use."""
        key = blocks[0].data_ptr()
        buffer = self._casts.get(key)
        if buffer is None:
            size = max(b.shape[1] for b in blocks)
            buffer = torch.empty(size, dtype=blocks[0].dtype, device=blocks[0].device)
            self._casts[key] = buffer
        return buffer

    def __len__(self) -> int:
        return len(self.emas)

    def __getitem__(self, index: int) -> EMA:
        """The EMA of the ``index``-th decay."""
        return self.emas[self._index(index)]

    @property
    def step(self) -> int:
        """Optimizer steps seen."""
        return self.emas[0].step

    @property
    def num_updates(self) -> int:
        """Averaging updates applied (the same for every decay)."""
        return self.emas[0].num_updates

    @property
    def is_applied(self) -> bool:
        """Whether one of the averages is swapped into the model now."""
        return any(e.is_applied for e in self.emas)

    def copy_to(self, model: nn.Module | None = None, index: int = 0) -> None:
        """Write the ``index``-th average into ``model`` (see :meth:`EMA.copy_to`)."""
        self.emas[self._index(index)].copy_to(model)

    @property
    def init_weights(self) -> list[float]:
        r"""Weight on the starting weights, :math:`P^{(i)}_T`, per decay."""
        return [e.init_weight for e in self.emas]

    def stats(self, drift: bool = False) -> dict[str, Any]:
        """Every member's :meth:`~emaweights.averager.Averager.stats`, as ``<key>/<index>``."""
        return {f"{k}/{i}": v for i, e in enumerate(self.emas) for k, v in e.stats(drift).items()}

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """Fold the current weights into every average; call after ``optimizer.step()``.

        Args:
            step: the optimizer step just taken (see :meth:`EMA.update`).

        """
        # Every EMA has the same step counters and checks, so they agree on
        # whether this step averages; a refusal by any leaves every clock as it was.
        saved = [e.clock() for e in self.emas]
        try:
            due = [e.begin_update(step) for e in self.emas]
        except BaseException:
            for e, c in zip(self.emas, saved, strict=True):
                e.set_clock(c)
            raise
        if any(e.storage is not s for e, s in zip(self.emas, self._stacked, strict=True)):
            self._stack()  # tensors joined (a parameter was unfrozen): restack the blocks
        if not due[0]:
            return
        weights = [e.next_weight() for e in self.emas]
        first = self.emas[0].storage
        for g, blocks, w in zip(first.averaged, self._blocks, self._weights, strict=True):
            _fill(w, weights)
            live = live_on_shadow_device(g, first.foreach)
            rows = [_row(t, v) for t, v in zip(live, g.views, strict=True)]
            if rows and rows[0].dtype == blocks[0].dtype and first.foreach is False:
                for block, row in zip(blocks, rows, strict=True):  # the per-tensor reference
                    block.lerp_(row, w)
                continue
            if rows and rows[0].dtype == blocks[0].dtype:
                # One call for the group: the per-tensor broadcasts run in C++, not Python.
                torch._foreach_lerp_(blocks, rows, [w] * len(blocks))
                continue
            # Mixed dtypes (fp32 averages of a bf16 model): cast each tensor into a
            # buffer allocated once, the size of the group's largest tensor.
            cast = self._cast_buffer(blocks)
            for block, row in zip(blocks, rows, strict=True):
                staged = cast[: row.numel()].view(1, -1)
                staged.copy_(row)
                block.lerp_(staged, w)
        for e in self.emas:
            e.storage.copy_copied_()

    @contextlib.contextmanager
    def applied(self, index: int = 0) -> Iterator[nn.Module]:
        """Evaluate with the ``index``-th average swapped in (see :meth:`EMA.applied`)."""
        with self.emas[self._index(index)].applied() as model:
            yield model

    def averaged_state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """A model state dict holding the ``index``-th average."""
        return self.emas[self._index(index)].averaged_state_dict()

    def state_dict(self) -> dict[str, Any]:
        """The state of every EMA, in decay order."""
        return {"format": _FORMAT, "emas": [e.state_dict() for e in self.emas]}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: not a MultiEMA state, or a different number of decays.

        """
        if not isinstance(state, Mapping) or not is_plain(state.get("format"), str, _FORMAT):
            raise ValueError(f"not an emaweights MultiEMA state: {_short(state)}")
        emas = state.get("emas")
        if not isinstance(emas, Sequence) or len(emas) != len(self.emas):
            n = len(emas) if isinstance(emas, Sequence) else emas
            raise ValueError(f"saved MultiEMA holds {_short(n)} decays, this one {len(self.emas)}")
        # Validate every member before loading any (no backup through state_dict(),
        # which refuses a NaN-poisoned average: a good checkpoint must always recover).
        commits = [e.prepare_load(s, strict) for e, s in zip(self.emas, emas, strict=True)]
        for commit in commits:
            commit()

    def __repr__(self) -> str:
        return f"MultiEMA(decays={[str(e.schedule) for e in self.emas]}, step={self.step})"


def _fill(column: Tensor, values: list[float]) -> None:
    """Write ``values`` into ``column`` without a host sync.

    On the CPU the elements are set in place (no allocation); elsewhere one
    small pinned host tensor is copied asynchronously.
    """
    if column.device.type == "cpu":
        for i, v in enumerate(values):
            column[i].fill_(v)  # a view and a scalar fill: no temporary tensor
    else:
        host = torch.tensor(values, dtype=column.dtype).view(-1, 1)
        column.copy_(host.pin_memory() if torch.cuda.is_available() else host, non_blocking=True)


def _channels_last(t: Tensor) -> bool:
    """A 4-D tensor stored channels_last (NHWC memory order), not plain contiguous."""
    return (
        t.dim() == 4
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
    )


def _row(t: Tensor, like: Tensor) -> Tensor:
    """``t`` as a ``[1, numel]`` row in the memory order of ``like`` (a block row's order)."""
    if _channels_last(like):
        return t.permute(0, 2, 3, 1).reshape(1, -1)  # a view when t is channels_last too
    return t.reshape(1, -1)


def _shaped(row: Tensor, like: Tensor) -> Tensor:
    """A block row viewed with the shape and memory format of ``like``."""
    if _channels_last(like):
        n, c, h, w = like.shape
        return row.view(n, h, w, c).permute(0, 3, 1, 2)
    return row.view(like.shape)


def _restack(shadows: list[Shadow], gi: int) -> list[Tensor]:
    """Move group ``gi`` of every shadow into ``[n, numel]`` blocks, one per tensor.

    Each shadow keeps its views (now rows of the blocks, in each tensor's memory
    order, so channels_last stays channels_last), so swapping, loading and saving
    work unchanged. Returns the blocks.
    """
    groups = [s.averaged[gi] for s in shadows]
    n, ref = len(groups), groups[0]
    total = ref.flat.numel()
    storage = torch.empty(n * total, dtype=ref.flat.dtype, device=ref.flat.device)
    blocks, offset = [], 0
    for j, v in enumerate(ref.views):
        block = storage[n * offset : n * (offset + v.numel())].view(n, v.numel())
        for i, g in enumerate(groups):
            block[i].copy_(_row(g.views[j], v)[0])
        blocks.append(block)
        offset += v.numel()
    for i, s in enumerate(shadows):
        # ``flat`` is only used for sizes from here on: an equally long slice.
        views = [_shaped(b[i], v) for b, v in zip(blocks, ref.views, strict=True)]
        s.rebind_group_(gi, storage[i * total : (i + 1) * total], views)
    return blocks
