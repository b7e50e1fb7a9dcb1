"""Checks on tensor lists: finiteness screens and content fingerprints.

Used by the storage (:mod:`emaweights.shadow`) for the non-finite policy and
for the in-place-write check of a swap. Imports only torch and
:mod:`emaweights._sharding`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from emaweights._sharding import local

__all__ = ["fingerprint", "nonfinite_flags"]


def nonfinite_flags(tensors: Sequence[Tensor]) -> Tensor:
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


def fingerprint(tensors: Sequence[Tensor]) -> Tensor:
    """Per tensor: its sum and 2-norm in float64 (changes under almost any in-place write)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        d = local(t).detach()
        pair = [d.sum(dtype=torch.float64), torch.linalg.vector_norm(d, dtype=torch.float64)]
        by_device.setdefault(d.device, []).extend(pair)
    # one host transfer per device, not per tensor
    parts = [torch.stack(v).cpu() for v in by_device.values()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
