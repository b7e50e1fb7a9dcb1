"""The storage options every EMA-like averager takes, validated once, and the storage they build.

:class:`~emaweights.SWA` and :class:`~emaweights.SwitchEMA` hold their average in
the same :class:`~emaweights.shadow.Shadow` as :class:`~emaweights.EMA`, with
the same options (precision, device, what to average, kernel choice); this is
where those options are checked and the storage is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from emaweights._naming import BufferPolicy, collect
from emaweights._sharding import reshard
from emaweights.averager import check_bool
from emaweights.shadow import Rounding, Shadow

__all__ = ["StorageOptions"]


@dataclass(frozen=True)
class StorageOptions:
    """What the average holds and how it is updated (see :class:`~emaweights.EMA`'s arguments).

    Raises:
        ValueError: a non-floating ``dtype``.
        TypeError: ``exclude`` given as one string, or ``overlap`` / ``compiled``
            not a bool.
    """

    dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    include_frozen: bool = False
    exclude: Sequence[str] = ()
    buffers: BufferPolicy = "average"
    foreach: bool | None = None
    rounding: Rounding = "nearest"
    overlap: bool = False
    compiled: bool = False

    def __post_init__(self) -> None:
        dtype = self.dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if isinstance(self.exclude, str):
            raise TypeError(
                f"exclude must be a sequence of patterns, got the string {self.exclude!r}"
            )
        for name in ("overlap", "compiled"):
            check_bool(getattr(self, name), name)
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.device is not None:
            object.__setattr__(self, "device", torch.device(self.device))

    def selection(self) -> dict[str, Any]:
        """The options that choose the model's tensors (for ``collect``)."""
        return dict(include_frozen=self.include_frozen, exclude=self.exclude, buffers=self.buffers)

    def build(self, model: nn.Module) -> Shadow:
        """A new storage holding the model's current weights.

        Raises:
            ValueError: the model has no tensor to average, or an option cannot apply.
        """
        reshard(model)  # FSDP2: after an eval forward the root holds full, unsharded tensors
        entries = collect(model, **self.selection())
        if not entries:
            raise ValueError(
                "the model has no tensor to average (all parameters frozen or excluded: "
                f"include_frozen={self.include_frozen}, exclude={self.exclude})"
            )
        device = self.device if isinstance(self.device, torch.device) else None
        return Shadow(
            entries,
            dtype=self.dtype,
            device=device,
            foreach=self.foreach,
            rounding=self.rounding,
            overlap=self.overlap,
            compiled=self.compiled,
        )
