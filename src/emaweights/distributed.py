r"""DDP and FSDP2: sharded shadows, distributed checkpoints, consolidated files.

Under ``DistributedDataParallel`` every rank holds the full model and the same
weights after each step, so an :class:`~emaweights.ema.EMA` on each rank stays
identical with no communication; names are canonical (``module.`` dropped), so
its state loads into an EMA of the bare model and back.

Under FSDP2 (``fully_shard``) the parameters are ``DTensor`` shards. The EMA
keeps a ``DTensor`` shadow with each parameter's mesh and placements: each rank
stores and updates only its local shards,

.. math::
    \bar\theta^{(r)}_t = \beta_t\,\bar\theta^{(r)}_{t-1} + (1-\beta_t)\,\theta^{(r)}_t ,

where :math:`\theta^{(r)}` is rank :math:`r`'s shard. The update is elementwise,
so the shards of the average are the average of the shards: no communication
per step, and shadow memory per rank is the full size over the world size.

Checkpoints: :func:`save_dcp` / :func:`load_dcp` use
``torch.distributed.checkpoint`` (save on N ranks, load on M);
:func:`save_consolidated` / :func:`load_consolidated` write one full
safetensors file on rank 0 and read it on every rank.

This module imports only torch; ``torch.distributed`` pieces are imported when
first needed (never on the single-process path), so a build of torch without
distributed support still imports :mod:`emaweights`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from emaweights._sharding import (  # re-exported: old imports keep working
    any_across_ranks,
    distribute_like,
    is_dtensor,
    is_sharded,
    is_zero3,
    local,
    reshard,
    wrap_like,
)

if TYPE_CHECKING:
    from emaweights.ema import EMA
    from emaweights.io import PathLike

__all__ = [
    "CheckpointError",
    "any_across_ranks",
    "average_buffers_",
    "distribute_like",
    "full_shadow",
    "is_dtensor",
    "is_sharded",
    "is_zero3",
    "load_consolidated",
    "load_dcp",
    "local",
    "reshard",
    "save_consolidated",
    "save_dcp",
    "shadow_nbytes",
    "wrap_like",
]

_STATE_KEY = "emaweights.state"  # safetensors metadata key holding the non-tensor EMA state


def shadow_nbytes(ema: EMA) -> int:
    """Bytes of shadow storage on this rank (a shard of the full size under FSDP2)."""
    return ema.storage.nbytes()


def full_shadow(ema: EMA) -> dict[str, Tensor]:
    """The full (gathered) shadow tensors on every rank; a collective under FSDP2.

    Every rank must call it. Plain tensors are returned as they are (views).
    """
    return {name: distribute_like(t, local(t)) for name, t in ema.shadow.items()}


def average_buffers_(ema: EMA, group: Any = None) -> None:
    """All-reduce the averaged floating buffers of the shadow to their mean over ranks.

    Under DDP each rank's BatchNorm running statistics follow its own data
    between the buffer broadcasts at each forward, so the averaged buffers of
    the EMA drift apart across ranks. Call this (on every rank) before
    evaluating or saving to make them identical: the mean over ranks of each
    rank's average. Parameters are untouched.

    Args:
        ema: the averager.
        group: the process group (default: the world).

    """
    import torch.distributed as dist

    ema.storage.flush_()
    buffers = [
        ema.storage.local_tensors[e.name]
        for e in ema.storage.entries.values()
        if e.kind == "avg_buffer" and not is_dtensor(e.get())
    ]
    world = dist.get_world_size(group)
    with torch.no_grad():
        for b in buffers:
            dist.all_reduce(b, op=dist.ReduceOp.SUM, group=group)
            b.div_(world)


# -- checkpoints ---------------------------------------------------------------


class CheckpointError(RuntimeError):
    """``torch.distributed.checkpoint`` failed on some rank (its exception is a BaseException)."""


# What a DCP ``.metadata`` pickle may name: the metadata classes, paths, sizes and dtypes.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


def _safe_unpickle(data: bytes, where: str) -> Any:
    """Unpickle DCP metadata, resolving only allow-listed classes (nothing else can run)."""
    import io as _bytes_io
    import pickle

    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            obj = getattr(torch, name, None) if module == "torch" else None
            allowed = (
                (module, name) in _DCP_GLOBALS
                or (
                    module in _DCP_MODULES
                    and isinstance(getattr(sys.modules[module], name, None), type)
                )
                or isinstance(obj, (torch.dtype, torch.memory_format, torch.layout))
            )
            if not allowed:
                raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
            return super().find_class(module, name)

    from emaweights.io import LoadError

    try:
        return _Restricted(_bytes_io.BytesIO(data)).load()
    except Exception as err:  # every failure of a hostile file means "refused"
        raise LoadError(f"refused DCP metadata {where!r}: {type(err).__name__}: {err}") from err


def _safe_reader(path: PathLike) -> Any:
    """A ``FileSystemReader`` that reads ``.metadata`` through :func:`_safe_unpickle`."""
    from pathlib import Path

    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    from emaweights.io import LoadError, _require_regular_file

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            file = Path(path) / ".metadata"
            _require_regular_file(file)
            meta = _safe_unpickle(file.read_bytes(), str(file))
            if not isinstance(meta, Metadata) or not isinstance(meta.storage_data, dict):
                raise LoadError(f"{str(file)!r} does not hold DCP metadata")
            for info in meta.storage_data.values():
                name = getattr(info, "relative_path", None)
                # Shards are read by this name: it must stay inside the folder.
                if not isinstance(name, str) or Path(name).name != name or name in ("", "..", "."):
                    raise LoadError(f"{str(file)!r} names a shard outside its folder: {name!r}")
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id  # type: ignore[union-attr]
            return meta

    return _Reader(str(path))


def _wrap_checkpoint_errors(what: str, run: Any) -> None:
    """Run ``run()``; turn torch's CheckpointException (a BaseException) into CheckpointError."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        run()
    except CheckpointException as err:
        raise CheckpointError(f"{what} failed: {err}") from err


def save_dcp(ema: EMA, path: PathLike) -> None:
    """Save the EMA's state with ``torch.distributed.checkpoint`` (every rank calls).

    Each rank writes its own shards; the checkpoint loads on any number of
    ranks with :func:`load_dcp`.
    """
    import torch.distributed.checkpoint as dcp

    state = {"ema": ema.state_dict()}
    _wrap_checkpoint_errors(
        f"save_dcp to {str(path)!r}",
        lambda: dcp.save(state, checkpoint_id=str(path)),  # type: ignore[attr-defined]
    )


def load_dcp(ema: EMA, path: PathLike) -> None:
    """Load a checkpoint written by :func:`save_dcp`, resharding to this EMA's layout.

    Every rank calls it; the world size may differ from the one that saved.
    The folder's ``.metadata`` (a pickle) is read by an unpickler that
    resolves only DCP's metadata classes, sizes, dtypes and paths, so a crafted
    folder cannot run code; shard names must stay inside the folder.

    Raises:
        emaweights.io.LoadError: the metadata is not plain DCP metadata.
        CheckpointError: DCP failed on some rank (wraps its BaseException).
    """
    import torch.distributed.checkpoint as dcp

    # DCP loads in place into the tensors of a state dict of the right layout;
    # a copy of the shadow dict receives them, then the EMA validates and loads.
    current = ema.state_dict()
    target = {**current, "shadow": {k: v.clone() for k, v in current["shadow"].items()}}
    holder = {"ema": target}
    reader = _safe_reader(path)
    reader.read_metadata()  # refuse a hostile folder here: DCP would turn LoadError into text
    _wrap_checkpoint_errors(
        f"load_dcp from {str(path)!r}",
        lambda: dcp.load(holder, storage_reader=reader),  # type: ignore[attr-defined]
    )
    ema.load_state_dict(holder["ema"])


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_consolidated(ema: EMA, path: PathLike, rank: int = 0) -> None:
    """Write the whole EMA state to one safetensors file on ``rank`` (every rank calls).

    The shadow is gathered to full tensors (a collective under FSDP2); the
    counters and configuration go into the file's metadata as JSON. The file
    loads into an EMA on any number of ranks, or in a single process.
    """
    from emaweights.io import save_safetensors

    state = ema.state_dict()
    tensors = full_shadow(ema)
    if _rank() != rank:
        return
    rest = {k: v for k, v in state.items() if k != "shadow"}
    save_safetensors(tensors, path, metadata={"format": "pt", _STATE_KEY: json.dumps(rest)})


def load_consolidated(ema: EMA, path: PathLike, strict: bool = True) -> None:
    """Load a file written by :func:`save_consolidated` on this rank.

    Every rank reads the file (it must be visible to all) and keeps only its
    shards, without communication.

    Raises:
        emaweights.io.LoadError: not a regular file, not a safetensors file
            written by :func:`save_consolidated`, or malformed metadata.

    """
    from emaweights.io import LoadError, load_safetensors

    tensors = load_safetensors(path)  # raises with the extra to install if safetensors is absent
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta: Mapping[str, str] = f.metadata() or {}
    if _STATE_KEY not in meta:
        raise LoadError(f"{str(path)!r} has no {_STATE_KEY!r} metadata: not an EMA file")
    try:
        rest = json.loads(meta[_STATE_KEY])
        if not isinstance(rest, dict):
            raise LoadError(f"{_STATE_KEY!r} metadata of {str(path)!r} is not a JSON object")
        ema.load_state_dict({**rest, "shadow": tensors}, strict=strict)
    except (RecursionError, TypeError, OverflowError, json.JSONDecodeError) as err:
        # Hostile metadata (deep nesting, huge numbers, wrong types) must end in one clear error.
        raise LoadError(
            f"{str(path)!r} has malformed {_STATE_KEY!r} metadata: {type(err).__name__}"
        ) from err
