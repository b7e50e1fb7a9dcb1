"""The Lightning callback under the DDP strategy: 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning.pytorch")

SCRIPT = Path(__file__).with_name("_lightning_ddp.py")
DECAY = 0.8
BUFFERS = ("net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked")


def _oracle(run: dict[str, Any], upto: int) -> dict[str, torch.Tensor]:
    avg = {n: t.double() for n, t in run["theta0"].items() if t.is_floating_point()}
    for snap in run["after_step"][:upto]:
        avg = {n: DECAY * avg[n] + (1 - DECAY) * snap[n].double() for n in avg}
    return avg


@pytest.mark.distributed
def test_ddp_two_processes(tmp_path: Path) -> None:
    """Under DDP both ranks hold the float64 EMA of the synced weights, one update per step."""
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), *sys.path])}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for run in runs:
        # 16 samples per rank, batch 4, accumulation 2: 2 optimizer steps per epoch, 2 epochs
        assert run["global_step"] == len(run["after_step"]) == run["ema"]["num_updates"] == 4
        expected = _oracle(run, 4)
        for name, avg in run["ema"]["shadow"].items():
            if name not in BUFFERS:  # parameters: identical on every rank
                torch.testing.assert_close(avg.double(), expected[name], rtol=1e-6, atol=1e-6)
        # validation after epoch 1 saw the average of the first 2 steps
        seen = run["seen_in_validation"][0]
        for name, avg in _oracle(run, 2).items():
            if name not in BUFFERS:
                torch.testing.assert_close(seen[name].double(), avg, rtol=1e-6, atol=1e-6)
    # Rank 0's average (buffers included) is what the checkpoint holds, next to live weights.
    ckpt = torch.load(tmp_path / "end.ckpt", weights_only=True)
    saved = ckpt["callbacks"][f"EMACallback[decay={DECAY!r}]"]["averager"]["shadow"]
    for name, avg in _oracle(runs[0], 4).items():
        torch.testing.assert_close(saved[name].double(), avg, rtol=1e-6, atol=1e-6)
    for name, t in runs[0]["live"].items():
        assert torch.equal(ckpt["state_dict"][name], t), name
