"""Loading never runs code from a file: malicious pickles are refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from emaweights import io


class _Evil:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def _evil_file(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "ema.pt"
    torch.save({"format": "emaweights.EMA", "payload": _Evil(marker)}, path)
    return path, marker


def test_malicious_pickle_refused(tmp_path: Path) -> None:
    """io.load_state refuses a pickle that would run code, with a clear error, and runs nothing."""
    path, marker = _evil_file(tmp_path)
    with pytest.raises(io.LoadError, match=r"cannot load .*ema\.pt.* safely"):
        io.load_state(path)
    assert not marker.exists()


def test_unsafe_loader_would_run_it(tmp_path: Path) -> None:
    """The same file does run code under a full unpickle (so the test above can fail)."""
    path, marker = _evil_file(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_plain_pickle_refused(tmp_path: Path) -> None:
    """A raw pickle stream (not a torch zip file) is refused as well."""
    marker = tmp_path / "pwned2"
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(io.LoadError):
        io.load_state(path)
    assert not marker.exists()


def test_pickle_renamed_safetensors_refused(tmp_path: Path) -> None:
    """A pickle posing as a safetensors file is refused without unpickling."""
    path, marker = _evil_file(tmp_path)
    fake = tmp_path / "weights.safetensors"
    fake.write_bytes(path.read_bytes())
    with pytest.raises(io.LoadError):
        io.load_safetensors(fake)
    assert not marker.exists()
