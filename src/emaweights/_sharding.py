"""DTensor (FSDP2) and DeepSpeed ZeRO-3 primitives: local shards, wrapping, cross-rank flags.

The layer below the shadow storage: :mod:`emaweights.shadow` reads live tensors
through :func:`local` and wraps its views with :func:`wrap_like`. Imports only
torch; ``torch.distributed`` pieces are imported when first needed.
:mod:`emaweights.distributed` re-exports these names.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

__all__ = [
    "PeerTimeoutError",
    "any_across_ranks",
    "distribute_like",
    "get_timeout",
    "is_dtensor",
    "is_sharded",
    "is_zero3",
    "local",
    "reshard",
    "set_timeout",
    "wrap_like",
]

# Seconds a collective of this library waits for the other ranks before raising
# (torch's process-group default is 30 minutes, without a word until then).
_TIMEOUT_S = 600.0


class PeerTimeoutError(RuntimeError):
    """Another rank did not join a collective within the timeout: it is dead or stuck."""


def set_timeout(seconds: float) -> None:
    """Set how long this library's collectives wait for the other ranks (every rank, same value).

    Bounds the cross-rank non-finite agreement and :func:`~emaweights.distributed.save_dcp` /
    :func:`~emaweights.distributed.load_dcp`. It must exceed the longest time one rank
    can lag the others at those points (for a save: the slowest rank's write).

    Raises:
        ValueError: ``seconds`` is not a positive finite number.
    """
    import math

    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValueError(f"timeout must be a positive number of seconds, got {seconds!r}")
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"timeout must be a positive number of seconds, got {seconds!r}")
    global _TIMEOUT_S
    _TIMEOUT_S = float(seconds)


def get_timeout() -> float:
    """The timeout in seconds of this library's collectives (default 600)."""
    return _TIMEOUT_S


def _dtensor_type() -> type | None:
    # A DTensor exists only once its module is imported; looking it up instead of
    # importing it spares single-process users the import (seconds) on every EMA made.
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None)
    return cls if isinstance(cls, type) else None


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def is_zero3(t: object) -> bool:
    """Whether ``t`` is a DeepSpeed ZeRO-3 parameter (it carries its partition in ``ds_tensor``).

    Recognized by that attribute, so this module never imports DeepSpeed.
    """
    return isinstance(t, Tensor) and getattr(t, "ds_tensor", None) is not None


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a parameter stored as per-rank shards (FSDP2 ``DTensor``, ZeRO-3)."""
    return is_dtensor(t) or is_zero3(t)


def local(t: Tensor) -> Tensor:
    """This rank's shard: a ``DTensor``'s local tensor, a ZeRO-3 parameter's partition.

    Any other tensor is returned unchanged. No copy in any case.
    """
    if is_dtensor(t):
        with torch.no_grad():  # to_local() without grad is the stored local tensor itself
            return t.to_local()  # type: ignore[attr-defined, no-any-return]
    if is_zero3(t):
        return _zero3_partition(t)
    return t


def _zero3_partition(t: Tensor) -> Tensor:
    """The elements of a ZeRO-3 parameter that this rank's partition holds, without padding.

    ZeRO-3 keeps the weights in the flat partition ``ds_tensor`` (``t.data`` is
    empty outside forward, or a gathered copy). Rank ``r`` holds elements
    ``[r n, (r + 1) n)`` of the flattened parameter padded to ``world * n``;
    the padding is never written, may hold anything (NaN in bfloat16), and
    must stay out of the average and its finiteness checks.
    """
    import torch.distributed as dist

    part: Tensor = t.ds_tensor  # type: ignore[attr-defined]
    n = part.numel()
    rank = dist.get_rank(getattr(t, "ds_process_group", None))
    valid = max(0, min(n, int(t.ds_numel) - rank * n))  # type: ignore[attr-defined]
    return part if valid == n else part.narrow(0, 0, valid)


def wrap_like(view: Tensor, like: Tensor) -> Tensor:
    """Wrap a local tensor as a ``DTensor`` with ``like``'s mesh, placements and shape.

    The result shares memory with ``view``. A plain ``like`` returns ``view``.
    """
    if not is_dtensor(like):
        return view
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        view,
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def distribute_like(src: Tensor, like: Tensor) -> Tensor:
    """Give ``src`` the layout of ``like``, communicating only when both are DTensors.

    A full (plain) ``src`` for a DTensor ``like`` is cut locally: every rank
    must hold the same full tensor (as after reading one file on every rank).
    A DTensor ``src`` for a plain ``like`` is gathered (a collective).
    """
    if is_dtensor(like) and not is_dtensor(src):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(
            src.to(local(like).device),
            like.device_mesh,  # type: ignore[attr-defined]
            like.placements,  # type: ignore[attr-defined]
            src_data_rank=None,  # each rank cuts its shard from its own full copy
        )
    if is_dtensor(like) and is_dtensor(src):
        return src.redistribute(like.device_mesh, like.placements)  # type: ignore[attr-defined, no-any-return]
    if is_dtensor(src):
        return src.full_tensor()  # type: ignore[attr-defined, no-any-return]
    return src


def any_across_ranks(flags: Tensor, like: Tensor) -> Tensor:
    """Element-wise OR of the boolean ``flags`` over the ranks of ``like``'s mesh (a collective).

    A sharded EMA sees NaN or infinity only in its own shard; every rank must
    still take the same decision (skip an update, refuse a swap), or the ranks
    diverge, or some enter a collective forward the others never reach.
    """
    import torch.distributed as dist

    if is_dtensor(like):
        mesh = like.device_mesh  # type: ignore[attr-defined]
        group = mesh.get_group() if mesh.ndim == 1 else None
    else:  # ZeRO-3: the group its parameters are partitioned over
        group = getattr(like, "ds_process_group", None)
    from datetime import timedelta

    as_int = flags.to(device=local(like).device, dtype=torch.int32)
    work = dist.all_reduce(as_int, op=dist.ReduceOp.MAX, group=group, async_op=True)
    timeout = _TIMEOUT_S
    try:
        # A bounded wait: a dead or stuck peer raises here instead of after the
        # process group's timeout (30 minutes by default).
        done = work.wait(timeout=timedelta(seconds=timeout))
    except Exception as err:
        raise PeerTimeoutError(
            f"the cross-rank non-finite check did not complete within {timeout:g} s: a peer "
            f"is dead or stuck ({type(err).__name__}: {str(err)[:200]}); see "
            "emaweights.distributed.set_timeout"
        ) from err
    if done is False:  # pragma: no cover - backends that report a timeout by returning False
        raise PeerTimeoutError(
            f"the cross-rank non-finite check did not complete within {timeout:g} s: "
            "a peer is dead or stuck; see emaweights.distributed.set_timeout"
        )
    return as_int.cpu().bool()


def reshard(model: nn.Module) -> None:
    """Reshard every FSDP2 module of ``model`` (a no-op without a process group).

    After an evaluation forward FSDP2 may keep the root's parameters unsharded
    (it skips resharding the root, expecting a backward); until resharded, the
    module holds full tensors and a later forward reuses them without a new
    all-gather. The EMA calls this before swapping in and out.

    DeepSpeed ZeRO-3 likewise keeps some parameters gathered outside forward
    (small "persistent" ones, all of them after an evaluation forward): their
    full copies are released, so that the next forward gathers them again from
    the partitions, where the EMA swaps its average in.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    gathered = [
        p
        for p in model.parameters()
        if is_zero3(p) and getattr(getattr(p, "ds_status", None), "name", "") == "AVAILABLE"
    ]
    if gathered:
        # Local only (no collective): drops the full copy, keeps the partition.
        gathered[0].partition(gathered)  # type: ignore[attr-defined]
