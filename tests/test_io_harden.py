"""io hardening: non-regular files, zip bombs, umask under threads, disk full, bad values."""

from __future__ import annotations

import argparse
import errno
import os
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from emaweights import io

POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX files and modes")


def _in_subprocess(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with a 20 s limit (a hang fails the test)."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=False
    )


@POSIX
@pytest.mark.parametrize("loader", ["load_state", "load_safetensors"])
def test_fifo_refused_without_blocking(tmp_path: Path, loader: str) -> None:
    """A FIFO is refused with LoadError before it is opened (opening it would block)."""
    fifo = tmp_path / "f.pt"
    os.mkfifo(fifo)
    out = _in_subprocess(
        "from emaweights import io\n"
        f"try: io.{loader}({str(fifo)!r})\n"
        "except io.LoadError as e: print('refused', e)\n"
    )
    assert out.returncode == 0 and out.stdout.startswith("refused"), out.stderr[-2000:]
    assert "not a regular file" in out.stdout


@POSIX
@pytest.mark.parametrize("loader", ["load_state", "load_safetensors"])
def test_device_file_refused(loader: str) -> None:
    """/dev/zero (never ends) is refused with LoadError naming it."""
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    out = _in_subprocess(
        "from emaweights import io\n"
        f"try: io.{loader}('/dev/zero')\n"
        "except io.LoadError as e: print('refused', e)\n"
    )
    assert out.returncode == 0 and "refused" in out.stdout and "/dev/zero" in out.stdout


def _zip_bomb(path: Path, declared: int) -> None:
    """A valid torch file whose data entry header is rewritten to declare ``declared`` bytes."""
    io.save_state({"t": torch.zeros(4)}, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    # Patch the size fields of the central directory record of that entry.
    name = info.filename.encode()
    pos = data.find(b"PK\x01\x02")
    while pos != -1:
        n = struct.unpack_from("<H", data, pos + 28)[0]
        if bytes(data[pos + 46 : pos + 46 + n]) == name:
            struct.pack_into("<I", data, pos + 24, declared)  # uncompressed size
            break
        pos = data.find(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(data))


def test_zip_bomb_refused_before_loading(tmp_path: Path) -> None:
    """An entry declaring more bytes than the file holds is refused before torch.load runs."""
    path = tmp_path / "bomb.pt"
    _zip_bomb(path, 2_300_000_000)
    called = []
    original = torch.load
    try:
        torch.load = lambda *a, **k: called.append(1)  # type: ignore[assignment]
        with pytest.raises(io.LoadError, match="declares 2300000000 bytes"):
            io.load_state(path)
    finally:
        torch.load = original
    assert not called


def test_honest_file_still_loads(tmp_path: Path) -> None:
    """The size check accepts what save_state writes (the oracle: the saved tensor)."""
    t = torch.randn(1000)
    io.save_state({"t": t}, tmp_path / "ok.pt")
    assert torch.equal(io.load_state(tmp_path / "ok.pt")["t"], t)


@POSIX
def test_atomic_write_never_touches_umask_under_threads(tmp_path: Path) -> None:
    """Files written from 8 threads under umask 077 come out 0600, and the umask stays 077."""
    old = os.umask(0o077)
    try:

        def work(i: int) -> None:
            for j in range(20):
                io.save_state({"a": torch.zeros(1)}, tmp_path / f"{i}_{j}.pt")

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        now = os.umask(0o077)
    finally:
        os.umask(old)
    assert now == 0o077
    modes = {p.stat().st_mode & 0o777 for p in tmp_path.glob("*.pt")}
    assert modes == {0o600}


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EFBIG, "File too large"),
        RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos; "
            "PytorchStreamWriter failed writing file: No space left on device"
        ),
    ],
    ids=["ENOSPC", "EFBIG", "torch-text"],
)
def test_disk_full_is_named_and_old_file_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    """A full disk raises DiskFullError saying so; the previous file loads unchanged."""
    path = tmp_path / "s.pt"
    io.save_state({"t": torch.ones(3)}, path)

    def full(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(io.DiskFullError, match=r"disk full.*previous file is intact"):
        io.save_state({"t": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(io.load_state(path)["t"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (np.float32(1.0), "numpy"),
        (np.zeros(2), "numpy"),
        (Path("x"), "Path"),
        (argparse.Namespace(a=1), "Namespace"),
    ],
    ids=["np-scalar", "np-array", "Path", "Namespace"],
)
def test_save_state_refuses_what_load_would(tmp_path: Path, value: object, kind: str) -> None:
    """save_state refuses values load_state would refuse, naming the key path; nothing written."""
    with pytest.raises(TypeError, match=rf"state\['config'\]\['lr'\].*{kind}"):
        io.save_state({"config": {"lr": value}}, tmp_path / "s.pt")
    assert not (tmp_path / "s.pt").exists()
    # The oracle: torch.load(weights_only=True) does refuse such a file.
    torch.save({"config": {"lr": value}}, tmp_path / "raw.pt")
    with pytest.raises(io.LoadError):
        io.load_state(tmp_path / "raw.pt")
