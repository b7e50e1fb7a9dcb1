"""Export the averaged weights as a plain model checkpoint (safetensors).

The file holds an ordinary model state dict (canonical names; by default the
model's dtypes, so a bf16 model with an fp32 shadow exports bf16: pass
``dtype=torch.float32`` to keep the shadow's precision), so it loads into
the bare model with ``model.load_state_dict`` and needs no emaweights to read.
Loading never unpickles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from emaweights._naming import unwrap
from emaweights.io import PathLike, load_safetensors, save_safetensors

__all__ = ["load_averaged", "save_averaged"]


def save_averaged(
    averager: Any,
    path: PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``averager.averaged_state_dict()`` to a safetensors file, atomically.

    Args:
        averager: any averager of the protocol (an :class:`~emaweights.EMA` ...).
        path: target file (conventionally ``*.safetensors``).
        metadata: extra string metadata; the step and update count are added.
        dtype: write the floating tensors in this dtype, cast from the
            averager's ``shadow`` where it has one (so ``torch.float32`` keeps
            an fp32 shadow's precision for a bf16 model); ``None`` (default)
            keeps the dtypes of ``averaged_state_dict()``, i.e. the model's.

    Raises:
        ValueError: ``dtype`` is not a floating ``torch.dtype``.

    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    meta = {"format": "pt", "emaweights.step": str(averager.step)}
    if hasattr(averager, "num_updates"):
        meta["emaweights.num_updates"] = str(averager.num_updates)
    meta.update(metadata or {})
    state = averager.averaged_state_dict()
    if dtype is not None:
        # Cast from the shadow where the averager has one: the model-dtype copy in
        # averaged_state_dict() has already lost the shadow's precision.
        shadow = getattr(averager, "shadow", None)
        source = shadow if isinstance(shadow, Mapping) else {}
        state = {
            k: source.get(k, v).to(dtype) if v.is_floating_point() else v for k, v in state.items()
        }
    save_safetensors(state, path, metadata=meta)


def load_averaged(
    path: PathLike, model: nn.Module | None = None, device: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """Read averaged weights written by :func:`save_averaged`; optionally load them.

    Args:
        path: the safetensors file.
        model: if given, the weights are loaded into it with ``load_state_dict``
            (strict), also through ``torch.compile``, ``DataParallel`` and
            DDP wrappers (the file holds the wrapper-free names).
        device: where the tensors are read to (a name or a ``torch.device``).

    Returns:
        The state dict.

    Raises:
        emaweights.io.LoadError: the file is not valid safetensors.
        RuntimeError: ``model`` does not match the file (from ``load_state_dict``).

    """
    state = load_safetensors(path, device=str(torch.device(device)))
    if model is not None:
        unwrap(model).load_state_dict(state)
    return state
