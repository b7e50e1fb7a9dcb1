"""Saving and loading, safely.

Every file is written atomically: to a temporary file in the same folder,
flushed and fsync'ed, then renamed over the target (and the folder fsync'ed),
so a process killed at any moment leaves the old file or the new one, never a
torn one. Loading never unpickles arbitrary objects: EMA states go through
``torch.load(..., weights_only=True)`` and weights through safetensors.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

__all__ = [
    "LoadError",
    "atomic_write",
    "load_safetensors",
    "load_state",
    "save_safetensors",
    "save_state",
]

PathLike = str | os.PathLike[str]


class LoadError(ValueError):
    """A file could not be loaded safely (corrupt, truncated, or not what it claims)."""


def _file_mode(target: Path) -> int:
    """The mode a plain ``open(target, "w")`` would give (``mkstemp`` makes 0600 files)."""
    try:
        return os.stat(target).st_mode & 0o777  # keep the mode of the file replaced
    except OSError:
        umask = os.umask(0o022)  # the only portable way to read it
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (a no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[IO[bytes]]:
    """Open a binary file that replaces ``path`` only when the block succeeds.

    Yields:
        A file object; write into it. On error the temporary is removed and
        ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with contextlib.suppress(OSError, AttributeError):  # no fchmod on Windows
            os.fchmod(fd, _file_mode(target))
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def save_state(state: Mapping[str, Any], path: PathLike) -> None:
    """Save a state dict (e.g. ``EMA.state_dict()``) atomically with ``torch.save``.

    Raises:
        ValueError: the state holds ``DTensor`` shards (an FSDP2 EMA), of which
            ``torch.save`` would keep only this rank's shard; use
            :func:`emaweights.distributed.save_dcp` or ``save_consolidated``.
    """
    sharded = _dtensor_names(state)
    if sharded:
        raise ValueError(
            f"state holds DTensor shards ({sharded[:3]}): torch.save would keep only this "
            "rank's shard; use emaweights.distributed.save_dcp or save_consolidated"
        )
    with atomic_write(path) as f:
        torch.save(dict(state), f)


def _dtensor_names(state: Mapping[str, Any], prefix: str = "") -> list[str]:
    from emaweights.distributed import is_dtensor

    out = []
    for k, v in state.items():
        if isinstance(v, Mapping):
            out += _dtensor_names(v, f"{prefix}{k}.")
        elif is_dtensor(v):
            out.append(f"{prefix}{k}")
    return out


def load_state(path: PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a state written by :func:`save_state`, refusing anything but tensors and plain data.

    Raises:
        LoadError: the file is truncated, corrupt, or holds pickled objects
            other than tensors and plain containers (which are never executed).
        FileNotFoundError: ``path`` does not exist.
    """
    try:
        obj = torch.load(Path(path), map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises many types for bad bytes; all mean "refused"
        raise LoadError(f"cannot load {str(path)!r} safely: {type(err).__name__}: {err}") from err
    if not isinstance(obj, dict):
        raise LoadError(f"{str(path)!r} holds a {type(obj).__name__}, expected a state dict")
    return obj


def _safetensors() -> tuple[Callable[..., bytes], Callable[..., dict[str, Tensor]]]:
    try:
        from safetensors.torch import load_file, save
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "safetensors is needed for this; "
            "install it with `pip install 'emaweights[safetensors]'`"
        ) from err
    return save, load_file


def save_safetensors(
    tensors: Mapping[str, Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors to a safetensors file, atomically.

    Tensors are made contiguous and independent first (safetensors refuses
    views that share memory, which shadow tensors are).
    """
    save, _ = _safetensors()
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    payload = save(owned, metadata=dict(metadata) if metadata else None)
    with atomic_write(path) as f:
        f.write(payload)


def load_safetensors(path: PathLike, device: str = "cpu") -> dict[str, Tensor]:
    """Read a safetensors file (no pickle involved).

    Raises:
        LoadError: the file is not a valid safetensors file.
        FileNotFoundError: ``path`` does not exist.
    """
    _, load_file = _safetensors()
    if not Path(path).exists():
        raise FileNotFoundError(path)
    try:
        return load_file(str(path), device=device)
    except Exception as err:
        raise LoadError(f"cannot load {str(path)!r} as safetensors: {err}") from err
