"""Averaged weights exported as safetensors load into the plain model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

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


def _bf16_ema() -> Any:
    """An EMA of a bf16 model with an fp32 shadow, moved off its start."""
    model = nn.Linear(4, 3).to(torch.bfloat16)
    ema = EMA(model, 0.5, dtype=torch.float32)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    return ema


def test_export_keeps_the_model_dtype_by_default(tmp_path: Path) -> None:
    """A bf16 model with an fp32 shadow exports bf16 unless dtype= says otherwise."""
    ema = _bf16_ema()
    save_averaged(ema, tmp_path / "a.safetensors")
    assert load_averaged(tmp_path / "a.safetensors")["weight"].dtype == torch.bfloat16


def test_export_dtype_keeps_the_shadow_precision(tmp_path: Path) -> None:
    """dtype=torch.float32 writes the fp32 shadow itself, bit for bit."""
    ema = _bf16_ema()
    save_averaged(ema, tmp_path / "a.safetensors", dtype=torch.float32)
    state = load_averaged(tmp_path / "a.safetensors")
    assert torch.equal(state["weight"], ema.shadow["weight"])


def test_export_refuses_a_non_floating_dtype(tmp_path: Path) -> None:
    """dtype=torch.int8 is refused, naming the value."""
    with pytest.raises(ValueError, match="int8"):
        save_averaged(_bf16_ema(), tmp_path / "a.safetensors", dtype=torch.int8)


@pytest.mark.parametrize("wrap", ["compile", "dataparallel"])
def test_load_averaged_into_a_wrapped_model(tmp_path: Path, wrap: str) -> None:
    """load_averaged loads into torch.compile'd and DataParallel models (wrapper-free names)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ema = EMA(model, 0.5)
    save_averaged(ema, tmp_path / "a.safetensors")
    target = nn.Linear(4, 3)
    wrapped = torch.compile(target) if wrap == "compile" else nn.DataParallel(target)
    load_averaged(tmp_path / "a.safetensors", model=wrapped)  # type: ignore[arg-type]
    assert torch.equal(target.weight, model.weight)


def test_load_averaged_takes_a_torch_device(tmp_path: Path) -> None:
    """device=torch.device('cpu') reads the file like device='cpu'."""
    ema = EMA(nn.Linear(4, 3), 0.5)
    save_averaged(ema, tmp_path / "a.safetensors")
    state = load_averaged(tmp_path / "a.safetensors", device=torch.device("cpu"))
    assert torch.equal(state["weight"], ema.shadow["weight"])
