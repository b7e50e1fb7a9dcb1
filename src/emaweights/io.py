"""Saving and loading, safely.

Every file is written atomically: to a temporary file in the same folder,
flushed and fsync'ed, then renamed over the target (and the folder fsync'ed),
so a process killed at any moment leaves the old file or the new one, never a
torn one. Loading never unpickles arbitrary objects: EMA states go through
``torch.load(..., weights_only=True)`` and weights through safetensors.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

__all__ = [
    "DiskFullError",
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


class DiskFullError(OSError):
    """The disk filled up (ENOSPC, EFBIG, EDQUOT) while writing; the previous file is intact."""


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _require_regular_file(path: PathLike) -> None:
    """Refuse ``path`` unless it is a regular file, before anything opens it.

    Opening a FIFO blocks until a writer appears and a device file such as
    ``/dev/zero`` never ends, so either would hang a loader.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        LoadError: ``path`` is a folder, FIFO, socket or device.
    """
    mode = os.stat(path).st_mode  # follows symlinks: a link to a regular file is fine
    if not stat.S_ISREG(mode):
        raise LoadError(f"{str(path)!r} is not a regular file (mode {stat.filemode(mode)})")


def _open_temporary(target: Path) -> tuple[int, Path]:
    """Create a fresh temporary beside ``target``: its mode is ``target``'s, or 0666 less umask.

    ``os.open`` with mode 0666 lets the kernel apply the umask, so the umask is
    never read (reading it means setting it, which races with other threads).
    """
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{os.urandom(6).hex()}.tmp"
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
            )
        except FileExistsError:
            continue
        with contextlib.suppress(OSError, AttributeError):  # no fchmod on Windows
            os.fchmod(fd, os.stat(target).st_mode & 0o777)  # keep the mode of the file replaced
        return fd, tmp
    raise FileExistsError(f"no free temporary name beside {str(target)!r}")  # pragma: no cover


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
    fd, tmp = _open_temporary(target)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _is_disk_full(err):
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full while writing {str(target)!r}; the previous file is intact",
            ) from err
        raise
    _fsync_dir(target.parent)


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EFBIG as OSError, or as torch's writer reports it (a RuntimeError with the text)."""
    if isinstance(err, OSError):
        return err.errno in _DISK_FULL
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        os.strerror(code) in text or errno.errorcode[code] in text for code in _DISK_FULL
    )


def save_state(state: Mapping[str, Any], path: PathLike) -> None:
    """Save a state dict (e.g. ``EMA.state_dict()``) atomically with ``torch.save``.

    Raises:
        TypeError: the state holds a value :func:`load_state` would refuse
            (e.g. a numpy array or scalar, a ``Path``, an ``argparse.Namespace``);
            the message names its key path.
        DiskFullError: the disk filled up; the previous file is intact.
        ValueError: the state holds ``DTensor`` shards (an FSDP2 EMA), of which
            ``torch.save`` would keep only this rank's shard; use
            :func:`emaweights.distributed.save_dcp` or ``save_consolidated``.
    """
    _require_plain(state, "state")
    sharded = _dtensor_names(state)
    if sharded:
        raise ValueError(
            f"state holds DTensor shards ({sharded[:3]}): torch.save would keep only this "
            "rank's shard; use emaweights.distributed.save_dcp or save_consolidated"
        )
    with atomic_write(path) as f:
        torch.save(dict(state), f)


_PLAIN = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _require_plain(value: object, where: str) -> None:
    """Refuse at save time what ``torch.load(weights_only=True)`` would refuse at load time."""
    if isinstance(value, Tensor) or type(value) in _PLAIN or isinstance(value, torch.Size):
        return
    if isinstance(value, dict) and type(value).__module__ in ("builtins", "collections"):
        for k, v in value.items():
            if type(k) not in _PLAIN:
                raise TypeError(f"{where} has a key of type {type(k).__name__}: not plain data")
            _require_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        for i, v in enumerate(value):
            _require_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which "
        "load_state (torch.load weights_only=True) would refuse; store tensors and plain "
        "values (int, float, str, bool, None, lists, dicts)"
    )


def _check_zip_sizes(path: PathLike) -> None:
    """Refuse a torch zip file whose entries declare more bytes than the file holds.

    torch writes its entries stored (uncompressed), so no honest entry is
    larger than the file; checking before ``torch.load`` bounds its allocation.
    Files that are not zip archives are left to ``torch.load`` to judge.
    """
    size = os.path.getsize(path)
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (
        zipfile.BadZipFile,
        OSError,
        ValueError,
        EOFError,
        KeyError,
        NotImplementedError,
    ) as err:
        # NotImplementedError: a corrupted header can claim a zip version zipfile does not read.
        raise LoadError(f"cannot load {str(path)!r} safely: corrupt zip: {err}") from err
    for info in entries:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
            raise LoadError(
                f"cannot load {str(path)!r} safely: entry {info.filename[:80]!r} declares "
                f"{info.file_size} bytes (compression {info.compress_type}) in a "
                f"{size}-byte file"
            )
    if sum(i.file_size for i in entries) > size:
        raise LoadError(f"cannot load {str(path)!r} safely: entries declare more than {size} bytes")


def _dtensor_names(state: Mapping[str, Any], prefix: str = "") -> list[str]:
    from emaweights._sharding import is_dtensor

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
        LoadError: the file is truncated, corrupt, not a regular file (a FIFO
            or device would block), declares more bytes than it holds (a zip
            bomb), or holds pickled objects other than tensors and plain
            containers (which are never executed).
        FileNotFoundError: ``path`` does not exist.
    """
    _require_regular_file(path)
    _check_zip_sizes(path)
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
        LoadError: the file is not a valid safetensors file, or not a regular
            file (a FIFO or device would block).
        FileNotFoundError: ``path`` does not exist.
    """
    _, load_file = _safetensors()
    _require_regular_file(path)
    try:
        return load_file(str(path), device=device)
    except Exception as err:
        raise LoadError(f"cannot load {str(path)!r} as safetensors: {err}") from err
