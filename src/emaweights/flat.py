"""Opt-in: make a model's parameters views of one contiguous buffer per (device, dtype).

With the parameters laid out back to back, the EMA update of a group is one
``lerp_`` over one flat buffer (the memory-bandwidth limit) instead of one
multi-tensor kernel over hundreds of tensors. See ``docs/performance.md``.

Caveats (why this is opt-in):

* Call it right after building the model and moving it to its device, *before*
  creating the optimizer and the EMA, and before wrapping with DDP/FSDP. The
  ``Parameter`` objects stay the same (``param.data`` is re-pointed), so an
  optimizer made earlier still works, but fused or foreach optimizer state
  already built for the old storage is not moved.
* ``model.half()`` or ``model.to(dtype)`` after the EMA is made changes the
  parameters' dtype: the EMA's next update raises ``RuntimeError`` (the model
  changed; make a new EMA). Re-allocating the parameters without changing
  their dtype (FSDP, ``param.data = ...``) undoes the layout: the EMA keeps
  averaging them on its multi-tensor path (same numbers, lower speed). Call
  this again after such a move.
* Gradients are not flattened; ``param.grad`` stays per tensor.
* Tied (shared) parameters are placed once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["flatten_parameters"]


@torch.no_grad()
def flatten_parameters(model: nn.Module) -> list[Tensor]:
    """Re-point every parameter of ``model`` into one flat buffer per (device, dtype).

    Within a buffer, trainable parameters come first (in ``model.parameters()``
    order) and frozen ones after, so that the tensors an EMA tracks by default
    form one contiguous run.

    Args:
        model: the module whose parameters are re-laid out (values unchanged).

    Returns:
        The flat buffers, one per (device, dtype) group.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    for p in model.parameters():  # de-duplicates tied parameters
        groups.setdefault((p.device, p.dtype), []).append(p)
    flats = []
    for (device, dtype), params in groups.items():
        params = [p for p in params if p.requires_grad] + [p for p in params if not p.requires_grad]
        flat = torch.empty(sum(p.numel() for p in params), device=device, dtype=dtype)
        offset = 0
        for p in params:
            view = flat[offset : offset + p.numel()].view(p.shape)
            view.copy_(p.data)
            p.data = view
            offset += p.numel()
        flats.append(flat)
    return flats
