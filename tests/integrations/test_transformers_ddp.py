"""The Trainer callback under 2-process CPU DDP (torchrun, gloo); slow, so opt-in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from emaweights.io import load_state

SCRIPT = Path(__file__).with_name("_transformers_ddp.py")


def _torchrun(*args: str) -> None:
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), *sys.path])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT)]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_ranks_agree_and_resume_matches(tmp_path: Path) -> None:
    """Both ranks hold the same EMA, one file per checkpoint, and resuming reproduces it."""
    _torchrun(str(tmp_path))
    _torchrun(str(tmp_path), str(tmp_path / "checkpoint-4"))
    straight = [load_state(tmp_path / f"ema_rank{r}.pt") for r in (0, 1)]
    resumed = [load_state(tmp_path / f"ema_rank{r}_resumed.pt") for r in (0, 1)]
    for state in straight + resumed:
        assert state["step"] == state["num_updates"] == 6
    for name, t in straight[0]["shadow"].items():
        assert torch.equal(straight[1]["shadow"][name], t), name
        for state in resumed:
            torch.testing.assert_close(state["shadow"][name], t, rtol=1e-6, atol=1e-7)
