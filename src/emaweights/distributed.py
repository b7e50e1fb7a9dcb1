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
    PeerTimeoutError,
    any_across_ranks,
    distribute_like,
    get_timeout,
    is_dtensor,
    is_sharded,
    is_zero3,
    local,
    reshard,
    set_timeout,
    wrap_like,
)

if TYPE_CHECKING:
    from emaweights.ema import EMA
    from emaweights.io import PathLike

__all__ = [
    "CheckpointError",
    "PeerTimeoutError",
    "any_across_ranks",
    "average_buffers_",
    "distribute_like",
    "full_shadow",
    "get_timeout",
    "is_dtensor",
    "is_sharded",
    "is_zero3",
    "load_consolidated",
    "load_dcp",
    "local",
    "reshard",
    "save_consolidated",
    "save_dcp",
    "set_timeout",
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


def _wrap_checkpoint_errors(what: str, run: Any, timeout: float | None = None) -> None:
    """Run ``run()``; turn torch's CheckpointException (a BaseException) into CheckpointError.

    With ``timeout``, a collective that failed or timed out (a dead or stuck
    peer) becomes :class:`PeerTimeoutError` naming it.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        run()
    except CheckpointException as err:
        raise CheckpointError(f"{what} failed: {err}") from err
    except PeerTimeoutError:
        raise
    except RuntimeError as err:  # gloo/nccl report a dead peer or a timeout as RuntimeError
        if timeout is None or not _is_peer_failure(err):
            raise
        raise PeerTimeoutError(
            f"{what}: a peer died or did not answer within {timeout:g} s: "
            f"{type(err).__name__}: {str(err)[:300]}"
        ) from err


def _is_peer_failure(err: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", None)
    text = str(err).lower()
    return (dist_error is not None and isinstance(err, dist_error)) or any(
        word in text for word in ("timed out", "timeout", "connection", "peer", "closed")
    )


# -- crash-safe DCP folders --------------------------------------------------
#
# save_dcp never writes into the checkpoint folder. Every rank writes into a
# fresh sibling, ``.NAME.TOKEN.dcp-tmp``; once DCP returns, rank 0 (whose
# ``.metadata`` is written only after every rank reported its writes) adds the
# commit marker and puts the sibling in place of the folder with one atomic
# exchange (Linux ``renameat2``), or, where that is missing, two renames:
# ``NAME -> .NAME.TOKEN.dcp-old`` then ``sibling -> NAME``. Between the two,
# load_dcp finds the committed sibling by its marker. A killed save leaves the
# old folder as it was and, at worst, a sibling without a marker.

_COMMITTED = ".emaweights-committed"
_TMP_SUFFIX = ".dcp-tmp"
_OLD_SUFFIX = ".dcp-old"


def _timeout(timeout: float | None) -> float:
    """``timeout``, validated, or the library's default (:func:`get_timeout`)."""
    if timeout is None:
        return get_timeout()
    import math

    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _side_group(timeout: float) -> Any:
    """A gloo group over the world with ``timeout`` (cached), or None without a process group.

    DCP's coordination is a handful of object collectives; on a group of their
    own they fail within ``timeout`` when a peer is dead or stuck, instead of
    waiting for the default group's timeout.
    """
    from datetime import timedelta

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    key = round(timeout, 6)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    return _GROUPS[key]


_GROUPS: dict[float, Any] = {}


def _agree_token(group: Any) -> str:
    """A random token drawn on rank 0 and broadcast, so every rank names the same sibling."""
    import os

    token = [os.urandom(6).hex()]
    if group is not None:
        torch.distributed.broadcast_object_list(token, src=0, group=group)
    return str(token[0])


def _barrier(group: Any, timeout: float) -> None:
    from datetime import timedelta

    if group is None:
        return
    work = torch.distributed.barrier(group=group, async_op=True)
    assert work is not None  # async_op=True always returns a Work (not user input)
    work.wait(timeout=timedelta(seconds=timeout))


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import os

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return bool(done == 0)


def _commit(tmp: Any, target: Any) -> None:
    """Rank 0: mark ``tmp`` complete and put it in place of ``target`` (see above)."""
    import os
    import shutil

    from emaweights.io import _fsync_dir, atomic_write

    with atomic_write(tmp / _COMMITTED) as f:
        f.write(b"complete\n")
    _fsync_dir(tmp)
    parent = target.parent
    if not target.exists():
        os.replace(tmp, target)
        _fsync_dir(parent)
    elif _exchange(str(tmp), str(target)):
        _fsync_dir(parent)
        shutil.rmtree(tmp, ignore_errors=True)  # it holds the previous checkpoint now
    else:
        old = parent / (tmp.name.removesuffix(_TMP_SUFFIX) + _OLD_SUFFIX)
        os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    # Siblings of saves killed earlier hold no marker; nothing will ever read them.
    for stale in parent.glob(f".{target.name}.*{_TMP_SUFFIX}"):
        if not (stale / _COMMITTED).exists():
            shutil.rmtree(stale, ignore_errors=True)


def _committed_folder(target: Any) -> Any:
    """The folder holding the checkpoint ``target``: itself, or a committed sibling.

    Only while a two-rename commit is between its renames is ``target`` absent;
    then its committed sibling (marker present) holds the new checkpoint, else
    the renamed old one holds the previous.
    """
    if target.exists():
        return target
    parent = target.parent
    for suffix in (_TMP_SUFFIX, _OLD_SUFFIX):
        found = sorted(
            (p for p in parent.glob(f".{target.name}.*{suffix}") if (p / ".metadata").exists()),
            key=lambda p: p.stat().st_mtime,
        )
        committed = [p for p in found if suffix == _OLD_SUFFIX or (p / _COMMITTED).exists()]
        if committed:
            return committed[-1]
    return target


def save_dcp(ema: EMA, path: PathLike, timeout: float | None = None) -> None:
    """Save the EMA's state with ``torch.distributed.checkpoint`` (every rank calls).

    Each rank writes its own shards; the checkpoint loads on any number of
    ranks with :func:`load_dcp`. Crash-safe: the ranks write into a fresh
    sibling of ``path`` and rank 0 puts it in place of ``path`` in one atomic
    exchange once every rank has finished, so a rank killed mid-save leaves
    the previous checkpoint at ``path`` whole (and a sibling
    ``.NAME.*.dcp-tmp`` without a commit marker, removed by the next save).

    Args:
        ema: the averager.
        path: the checkpoint folder (replaced as a whole).
        timeout: seconds to wait for the other ranks at each step of the save
            (default :func:`get_timeout`, 600 s); it must exceed the slowest
            rank's write time.

    Raises:
        PeerTimeoutError: a peer died or did not answer within ``timeout``;
            ``path`` holds the previous checkpoint.
        CheckpointError: DCP failed on some rank (wraps its BaseException).
        NonFiniteError: the average holds NaN or infinity (nothing written).
    """
    from pathlib import Path

    import torch.distributed.checkpoint as dcp

    from emaweights.io import _fsync_dir

    wait = _timeout(timeout)
    state = {"ema": ema.state_dict()}
    target = Path(path).absolute()
    what = f"save_dcp to {str(path)!r}"
    group = _side_group(wait)

    committed = [False]

    def run() -> None:
        tmp = target.parent / f".{target.name}.{_agree_token(group)}{_TMP_SUFFIX}"
        target.parent.mkdir(parents=True, exist_ok=True)
        dcp.save(state, checkpoint_id=str(tmp), process_group=group)  # type: ignore[attr-defined]
        if _rank() == 0:
            _fsync_dir(tmp)
            _commit(tmp, target)
            committed[0] = True
        _barrier(group, wait)  # no rank returns before the checkpoint is in place

    try:
        _wrap_checkpoint_errors(what, run, wait)
    except (PeerTimeoutError, CheckpointError) as err:
        # Say what the folder holds: only rank 0, which commits, knows which save it is.
        if committed[0]:
            held = "the new checkpoint was committed, whole"
        elif _rank() == 0:
            held = "it holds the previous checkpoint, whole"
        else:
            held = "it holds the previous or the new checkpoint, whole"
        raise type(err)(f"{err}; {str(path)!r}: {held}") from err


def load_dcp(ema: EMA, path: PathLike, timeout: float | None = None) -> None:
    """Load a checkpoint written by :func:`save_dcp`, resharding to this EMA's layout.

    Every rank calls it; the world size may differ from the one that saved.
    The folder's ``.metadata`` (a pickle) is read by an unpickler that
    resolves only DCP's metadata classes, sizes, dtypes and paths, so a crafted
    folder cannot run code; shard names must stay inside the folder. A good
    checkpoint always loads, even into an EMA whose average holds NaN.

    Args:
        ema: the averager.
        path: the checkpoint folder.
        timeout: seconds to wait for the other ranks (default :func:`get_timeout`).

    Raises:
        emaweights.io.LoadError: the metadata is not plain DCP metadata.
        PeerTimeoutError: a peer died or did not answer within ``timeout``.
        CheckpointError: DCP failed on some rank (wraps its BaseException).
    """
    from pathlib import Path

    import torch.distributed.checkpoint as dcp

    wait = _timeout(timeout)
    folder = _committed_folder(Path(path).absolute())
    # DCP loads in place into the tensors of a state dict of the right layout;
    # a copy of the shadow dict receives them, then the EMA validates and loads.
    # The layout is read unchecked: a NaN-poisoned EMA must recover from a good save.
    current = ema._unchecked_state()
    target = {**current, "shadow": {k: v.clone() for k, v in current["shadow"].items()}}
    holder = {"ema": target}
    reader = _safe_reader(folder)
    reader.read_metadata()  # refuse a hostile folder here: DCP would turn LoadError into text
    group = _side_group(wait)
    _wrap_checkpoint_errors(
        f"load_dcp from {str(path)!r}",
        lambda: dcp.load(holder, storage_reader=reader, process_group=group),  # type: ignore[attr-defined]
        wait,
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
