"""Which tensors of a model are averaged, and under which wrapper-free names.

A model may reach the EMA bare, wrapped in ``DistributedDataParallel`` /
``DataParallel`` (names gain ``module.``), compiled with ``torch.compile``
(``_orig_mod.``), or with wrapped sub-modules (activation checkpointing, FSDP1).
We unwrap the root *object* rather than cutting strings, and drop only the path
components that wrappers insert, so a user module that happens to be called
``module`` keeps its name.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["BufferPolicy", "Entry", "canonical_name", "collect", "unwrap", "warn_unmatched"]

BufferPolicy = Literal["average", "copy", "ignore"]
Kind = Literal["param", "avg_buffer", "copy_buffer"]

# Path components that only wrappers insert; never user-chosen names.
_WRAPPER_COMPONENTS = frozenset(
    {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_forward_module"}
)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the user's module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner  # torch.compile's OptimizedModule
        elif _is_fabric_module(model):
            model = getattr(model, "_original_module")  # noqa: B009 - Fabric's _FabricModule
        else:
            return model


def _is_fabric_module(model: nn.Module) -> bool:
    """Lightning Fabric's ``_FabricModule``, recognized without importing Lightning."""
    inner = getattr(model, "_original_module", None)
    return (
        type(model).__name__ == "_FabricModule"
        and isinstance(inner, nn.Module)
        and inner is not model
    )


def canonical_name(name: str) -> str:
    """Drop wrapper-inserted components: ``a._orig_mod.b`` -> ``a.b``."""
    parts = name.split(".")
    if not any(p in _WRAPPER_COMPONENTS for p in parts):
        return name
    return ".".join(p for p in parts if p not in _WRAPPER_COMPONENTS)


@dataclass(frozen=True)
class Entry:
    """One tensor of the model that the EMA tracks.

    Attributes:
        name: canonical name (wrapper-free), the key in every state dict.
        module: the module that owns the tensor.
        attr: the attribute name inside ``module``.
        kind: ``param``; ``avg_buffer`` (a floating buffer that is averaged,
            e.g. BatchNorm running statistics); or ``copy_buffer`` (copied:
            integer buffers such as ``num_batches_tracked``, or floating
            buffers under ``buffers="copy"``).

    """

    name: str
    module: nn.Module
    attr: str
    kind: Kind

    def get(self) -> torch.Tensor:
        """Return the tensor the module holds *now* (buffers may be replaced by ``.to()``)."""
        table = self.module._parameters if self.kind == "param" else self.module._buffers
        tensor = table.get(self.attr)
        if tensor is None:
            raise RuntimeError(
                f"tensor {self.name!r} was removed from the model after the EMA was made"
            )
        return tensor


def _owners(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield (prefix, module) for every sub-module, shared modules once."""
    yield from model.named_modules(remove_duplicate=True)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def collect(
    model: nn.Module,
    *,
    include_frozen: bool = False,
    exclude: Sequence[str] = (),
    buffers: BufferPolicy = "average",
) -> list[Entry]:
    """List the tensors to track, in a deterministic order, keyed by canonical name.

    Args:
        model: the model, bare or wrapped.
        include_frozen: also track parameters with ``requires_grad=False``.
        exclude: glob patterns (``fnmatch``) on canonical names to leave out.
        buffers: floating buffers are averaged (``"average"``), copied
            (``"copy"``) or left alone (``"ignore"``); integer buffers are
            copied unless ``"ignore"``, never averaged.

    Raises:
        ValueError: two tensors map to the same canonical name.

    """
    if buffers not in ("average", "copy", "ignore"):
        raise ValueError(f"buffers must be 'average', 'copy' or 'ignore', got {buffers!r}")
    root = unwrap(model)
    seen: set[int] = set()  # tied weights are tracked once, under their first name
    entries: list[Entry] = []
    for prefix, module in _owners(root):
        for attr, p in module._parameters.items():
            if p is None or id(p) in seen or not (p.requires_grad or include_frozen):
                continue
            seen.add(id(p))
            entries.append(Entry(_join(prefix, attr), module, attr, "param"))
        if buffers == "ignore":
            continue
        for attr, b in module._buffers.items():
            if b is None or id(b) in seen or attr in module._non_persistent_buffers_set:
                continue
            seen.add(id(b))
            average = b.is_floating_point() and buffers == "average"
            kind: Kind = "avg_buffer" if average else "copy_buffer"
            entries.append(Entry(_join(prefix, attr), module, attr, kind))
    entries = [e for e in entries if not _matches(e.name, exclude)]
    _check_unique(e.name for e in entries)
    return entries


def warn_unmatched(model: nn.Module, patterns: Sequence[str], what: str) -> None:
    """Warn naming every pattern that matches no parameter or buffer of ``model`` (a typo?)."""
    if not patterns:
        return
    root = unwrap(model)
    names = [canonical_name(n) for n, _ in root.named_parameters(remove_duplicate=False)]
    names += [canonical_name(n) for n, _ in root.named_buffers(remove_duplicate=False)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        warnings.warn(
            f"{what} patterns {unmatched} match no tensor of the model (canonical names such "
            f"as {names[:3]}); check the spelling",
            UserWarning,
            stacklevel=3,
        )


def _join(prefix: str, attr: str) -> str:
    return canonical_name(f"{prefix}.{attr}" if prefix else attr)


def _check_unique(names: Iterable[str]) -> None:
    seen: set[str] = set()
    dup = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if dup:
        raise ValueError(f"several tensors share the canonical names {dup}")
