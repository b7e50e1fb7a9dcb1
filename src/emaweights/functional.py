r"""Pure in-place update kernels on lists of tensors.

Everything here is stateless: the caller owns the tensors and the step counter.
Each kernel has a *foreach* path (one multi-tensor launch, used by default when
every tensor is on a device torch supports for it) and a per-tensor path (a
Python loop, the reference). A test checks that both give the same numbers.

None of these functions allocates a full-size temporary or reads a value back
to the host: the weight is a Python ``float`` (or a 0-dim tensor that stays on
the device), so a training loop never waits on the EMA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["copy_", "ema_update_", "lerp_"]

Weight = float | Tensor


def _use_foreach(tensors: Sequence[Tensor], foreach: bool | None) -> bool:
    """Decide whether to take the foreach path (``None`` means: when possible)."""
    if foreach is not None:
        return foreach
    if not tensors:
        return False
    # Foreach kernels exist for CPU and CUDA-like devices; they fall back
    # internally (still correctly) when tensors are not fast-path compatible.
    return all(t.device.type in ("cpu", "cuda", "xpu", "mps") for t in tensors)


def _check_pairs(a: Sequence[Tensor], b: Sequence[Tensor], what: str) -> None:
    """Refuse lists of different lengths, which would silently pair the wrong tensors."""
    if len(a) != len(b):
        raise ValueError(f"{what}: got {len(a)} target tensors but {len(b)} source tensors")


def lerp_(
    target: Sequence[Tensor],
    source: Sequence[Tensor],
    weight: Weight,
    *,
    foreach: bool | None = None,
) -> None:
    r"""Move ``target`` toward ``source`` in place: :math:`t \leftarrow t + w\,(s - t)`.

    When ``target`` and ``source`` differ in dtype (an fp32 shadow of a bf16
    model), the update is computed as :math:`t \leftarrow (1 - w)\,t + w\,s`,
    in ``target``'s dtype, with no full-size temporary on CUDA.

    Args:
        target: tensors updated in place.
        source: tensors read, paired with ``target`` by position; same shapes.
        weight: :math:`w`, a float or a 0-dim tensor on the targets' device.
        foreach: force (``True``) or forbid (``False``) the multi-tensor path;
            ``None`` picks it whenever the tensors allow.

    """
    _check_pairs(target, source, "lerp_")
    if not target:
        return
    same_dtype = all(t.dtype == s.dtype for t, s in zip(target, source, strict=True))
    if _use_foreach(target, foreach):
        if same_dtype:
            torch._foreach_lerp_(list(target), list(source), weight)  # type: ignore[arg-type]
        else:
            _foreach_scale_add_(target, source, weight)
        return
    for t, s in zip(target, source, strict=True):
        if t.dtype == s.dtype:
            t.lerp_(s, weight)
        elif isinstance(weight, Tensor):
            t.mul_(1 - weight).add_(s * weight)
        else:
            t.mul_(1.0 - weight).add_(s, alpha=weight)


def _foreach_scale_add_(target: Sequence[Tensor], source: Sequence[Tensor], weight: Weight) -> None:
    r"""Mixed-dtype foreach update :math:`t \leftarrow (1 - w)\,t + w\,s`."""
    targets = list(target)
    if isinstance(weight, Tensor):
        torch._foreach_mul_(targets, 1 - weight)
        torch._foreach_add_(targets, torch._foreach_mul(list(source), weight))
        return
    torch._foreach_mul_(targets, 1.0 - weight)
    torch._foreach_add_(targets, list(source), alpha=weight)


def ema_update_(
    shadow: Sequence[Tensor],
    live: Sequence[Tensor],
    weight: Weight,
    *,
    foreach: bool | None = None,
) -> None:
    r"""One exponential-moving-average step, in place on ``shadow``.

    .. math::
        \bar\theta \leftarrow \beta\,\bar\theta + (1 - \beta)\,\theta
        = \bar\theta + w\,(\theta - \bar\theta), \qquad w = 1 - \beta

    Args:
        shadow: the averages :math:`\bar\theta`, updated in place.
        live: the current weights :math:`\theta`, paired with ``shadow`` by position.
        weight: :math:`w = 1 - \beta`, the weight of the new value.
        foreach: see :func:`lerp_`.

    """
    lerp_(shadow, live, weight, foreach=foreach)


def copy_(
    target: Sequence[Tensor], source: Sequence[Tensor], *, foreach: bool | None = None
) -> None:
    """Copy ``source`` into ``target`` in place (casting dtype and device as needed).

    Args:
        target: tensors overwritten in place.
        source: tensors read, paired with ``target`` by position; same shapes.
        foreach: see :func:`lerp_`.

    """
    _check_pairs(target, source, "copy_")
    if not target:
        return
    if _use_foreach(target, foreach) and hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(list(target), list(source), non_blocking=True)
        return
    for t, s in zip(target, source, strict=True):
        t.copy_(s, non_blocking=True)
