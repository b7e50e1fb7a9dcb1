"""Safe loading: a file that would run code when unpickled is refused, and the code never runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from emaweights import EMA, io
from tests._models import mlp


class Payload:
    """Unpickling this object creates the file ``target`` (a harmless stand-in for any code)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.target,))


def _malicious_state(target: Path) -> dict[str, object]:
    """A real EMA state with the payload hidden in one field."""
    state = EMA(mlp(), 0.9).state_dict()
    state["config"] = {**state["config"], "extra": Payload(target)}
    return state


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_refused_and_never_runs(tmp_path: Path, writer: str) -> None:
    """io.load_state refuses a pickle carrying code, names the file, and the code does not run."""
    side = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(_malicious_state(side), path)
    else:
        with open(path, "wb") as f:
            pickle.dump(_malicious_state(side), f)
    with pytest.raises(io.LoadError, match=r"evil\.pt"):
        io.load_state(path)
    assert not side.exists(), "the payload ran while loading"


def test_payload_is_live(tmp_path: Path) -> None:
    """Control: an unsafe load of the same file does run the payload (so the test above bites)."""
    side = tmp_path / "pwned"
    torch.save(_malicious_state(side), tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert side.exists()


def test_pickle_refused_by_safetensors_loader(tmp_path: Path) -> None:
    """io.load_safetensors refuses a pickle file without running it."""
    side = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "x": Payload(side)}, tmp_path / "evil.safetensors")
    with pytest.raises(io.LoadError, match=r"evil\.safetensors"):
        io.load_safetensors(tmp_path / "evil.safetensors")
    assert not side.exists()


def test_non_dict_state_refused(tmp_path: Path) -> None:
    """A weights-only file that is not a state dict is refused with its type named."""
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(io.LoadError, match="list"):
        io.load_state(tmp_path / "list.pt")


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    """A missing file raises FileNotFoundError (not a LoadError) from both loaders."""
    with pytest.raises(FileNotFoundError):
        io.load_state(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        io.load_safetensors(tmp_path / "nope.safetensors")
