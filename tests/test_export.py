"""Averaged weights exported as safetensors load into the plain model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")

from emaweights import EMA
from emaweights.export import load_averaged, save_averaged
from emaweights.io import LoadError
from tests._models import mlp, train_step


def test_round_trip_into_plain_model(tmp_path: Path) -> None:
    """save_averaged then load_state_dict gives the averaged weights, BatchNorm stats included."""
    model = mlp(batchnorm=True)
    ema = EMA(model, 0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(4):
        train_step(model, opt, seed=i)
        ema.update()
    save_averaged(ema, tmp_path / "avg.safetensors", metadata={"run": "t"})
    fresh = mlp(batchnorm=True)
    state = load_averaged(tmp_path / "avg.safetensors", model=fresh)
    expected = ema.averaged_state_dict()
    assert state.keys() == expected.keys()
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, expected[name]), name
    assert not torch.equal(fresh[0].weight, model[0].weight)  # the average, not the live


def test_metadata_records_step(tmp_path: Path) -> None:
    """The file's metadata carries the EMA step and the user's entries."""
    from safetensors import safe_open

    ema = EMA(mlp(), 0.7)
    ema.update()
    save_averaged(ema, tmp_path / "a.safetensors", metadata={"run": "t"})
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["emaweights.step"] == "1" and meta["run"] == "t"


def test_refuses_pickle_file(tmp_path: Path) -> None:
    """A torch pickle renamed to .safetensors is refused, never unpickled."""
    torch.save({"w": torch.zeros(2)}, tmp_path / "bad.safetensors")
    with pytest.raises(LoadError, match=r"bad\.safetensors"):
        load_averaged(tmp_path / "bad.safetensors")
