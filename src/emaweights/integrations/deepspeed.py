r"""DeepSpeed ZeRO-3: the same :class:`~emaweights.ema.EMA` on parameter partitions.

Under ZeRO stage 3 each parameter keeps only this rank's flat partition in
``param.ds_tensor`` (padded so that every rank holds the same length);
``param.data`` is empty outside forward. The EMA averages the partitions'
elements without the padding. Make the EMA *after*
``deepspeed.initialize``, on ``engine.module``: it then averages each rank's
partitions in place,

.. math::
    \bar\theta^{(r)}_t = \beta_t\,\bar\theta^{(r)}_{t-1} + (1-\beta_t)\,\theta^{(r)}_t ,

with no communication per step and shadow memory per rank of the full size
over the world size. Evaluation swaps the average into the partitions by copy
(``with ema.applied():``) and releases gathered copies first, so the forward
gathers the average. :meth:`~emaweights.ema.EMA.state_dict` holds this rank's
partitions (load it on the same world size); :func:`gathered_state_dict` and
:func:`load_gathered_state_dict` convert to and from full tensors, for one
file that loads at any world size or into a plain model's EMA.

Nothing here imports DeepSpeed: ZeRO-3 parameters are recognized by their
``ds_tensor``, ``ds_numel``, ``ds_shape`` and ``ds_process_group`` attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from emaweights.distributed import is_zero3

if TYPE_CHECKING:
    from emaweights.ema import EMA

__all__ = ["gathered_shadow", "gathered_state_dict", "load_gathered_state_dict"]


def _gather(partition: Tensor, param: Tensor) -> Tensor:
    """The full tensor of ``param``'s shape from every rank's ``partition`` (a collective).

    ``partition`` holds this rank's elements without padding (see
    :func:`emaweights.distributed.local`); rank ``r``'s start at ``r * n``,
    ``n`` being the padded partition length.
    """
    import torch.distributed as dist

    group = getattr(param, "ds_process_group", None)
    n = param.ds_tensor.numel()  # type: ignore[attr-defined]
    padded = partition.new_zeros(n)
    padded[: partition.numel()] = partition.reshape(-1)
    flat = partition.new_empty(dist.get_world_size(group) * n)
    dist.all_gather_into_tensor(flat, padded, group=group)
    numel: int = param.ds_numel  # type: ignore[attr-defined]
    return flat[:numel].view(param.ds_shape)  # type: ignore[attr-defined]


def _cut(full: Tensor, partition: Tensor, param: Tensor) -> Tensor:
    """This rank's elements of the full tensor ``full``, shaped like ``partition``."""
    import torch.distributed as dist

    start = dist.get_rank(getattr(param, "ds_process_group", None)) * param.ds_tensor.numel()  # type: ignore[attr-defined]
    return full.reshape(-1)[start : start + partition.numel()].clone()


def gathered_shadow(ema: EMA) -> dict[str, Tensor]:
    """The full averaged tensors, on every rank, in the shadow's dtype (a collective).

    Every rank must call it. Tensors that ZeRO-3 does not partition (buffers)
    are returned as copies.
    """
    shadow = ema.shadow  # completes deferred updates
    out = {}
    with torch.no_grad():
        for name, view in shadow.items():
            live = ema.storage.entries[name].get()
            out[name] = _gather(view, live) if is_zero3(live) else view.clone()
    return out


def gathered_state_dict(ema: EMA) -> dict[str, Any]:
    """:meth:`EMA.state_dict <emaweights.ema.EMA.state_dict>` with full tensors (a collective).

    The result loads into an EMA of the same model under ZeRO-3 at any world
    size (:func:`load_gathered_state_dict`) or unsharded
    (:meth:`~emaweights.ema.EMA.load_state_dict`). Save it on one rank.
    """
    state = ema.state_dict()  # checks finiteness on every rank alike
    state["shadow"] = gathered_shadow(ema)
    return state


def load_gathered_state_dict(ema: EMA, state: Mapping[str, Any], strict: bool = True) -> None:
    """Load a state with full tensors into a ZeRO-3 EMA; each rank keeps its partitions.

    Every rank must hold the same ``state`` (e.g. read from one file).

    Raises:
        ValueError: ``state`` has no ``"shadow"`` mapping, or a full tensor's
            shape differs from its parameter's; otherwise as
            :meth:`~emaweights.ema.EMA.load_state_dict`.

    """
    full = state.get("shadow")
    if not isinstance(full, Mapping):
        raise ValueError(f"state['shadow'] must be a mapping of tensors, got {type(full).__name__}")
    local = ema.storage.local_tensors
    shadow: dict[str, Any] = {}
    for name, value in full.items():
        entry = ema.storage.entries.get(name)
        live = entry.get() if entry is not None else None
        if live is None or not is_zero3(live) or not isinstance(value, Tensor):
            shadow[name] = value  # unknown names and bad values: load_state_dict reports them
            continue
        if tuple(value.shape) != tuple(live.ds_shape):  # type: ignore[attr-defined]
            raise ValueError(
                f"{name}: shape {tuple(value.shape)} != {tuple(live.ds_shape)}"  # type: ignore[attr-defined]
            )
        shadow[name] = _cut(value.to(local[name].device), local[name], live)
    ema.load_state_dict({**state, "shadow": shadow}, strict=strict)
