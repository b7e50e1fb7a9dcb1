"""emaweights.distributed in a single process (no process group): the plain-tensor paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emaweights import EMA
from emaweights.distributed import (
    distribute_like,
    full_shadow,
    load_consolidated,
    local,
    save_consolidated,
    wrap_like,
)
from emaweights.io import LoadError, save_safetensors
from tests._models import mlp, train_step


def test_plain_tensors_pass_through_unchanged() -> None:
    """local, wrap_like and distribute_like return a plain tensor itself (no copy)."""
    t = torch.randn(3)
    assert local(t) is t and wrap_like(t, t) is t and distribute_like(t, t) is t


def test_consolidated_round_trip_in_one_process(tmp_path: Path) -> None:
    """save_consolidated then load_consolidated restores shadow and counters exactly."""
    model = mlp(batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, 0.9, anchor="debiased")
    for step in range(4):
        train_step(model, opt, step)
        ema.update()
    save_consolidated(ema, tmp_path / "ema.safetensors")
    fresh = EMA(mlp(batchnorm=True), 0.9, anchor="debiased")
    load_consolidated(fresh, tmp_path / "ema.safetensors")
    assert (fresh.step, fresh.num_updates, fresh.init_weight) == (
        ema.step,
        ema.num_updates,
        ema.init_weight,
    )
    for name, t in full_shadow(ema).items():
        assert torch.equal(fresh.shadow[name], t)


def test_load_consolidated_refuses_a_plain_weights_file(tmp_path: Path) -> None:
    """A safetensors file without the EMA metadata raises LoadError naming the file."""
    path = tmp_path / "weights.safetensors"
    save_safetensors(mlp().state_dict(), path)
    with pytest.raises(LoadError, match=r"weights\.safetensors"):
        load_consolidated(EMA(mlp()), path)


def test_single_process_ema_does_not_import_dtensor() -> None:
    """Making and updating an EMA without DTensors never imports torch.distributed.tensor."""
    code = (
        "import sys, torch\n"
        "from emaweights import EMA\n"
        "ema = EMA(torch.nn.Linear(2, 2)); ema.update()\n"
        "with ema.applied(): pass\n"
        "print('torch.distributed.tensor' in sys.modules)\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": src, "PATH": ""},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
