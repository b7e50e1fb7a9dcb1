"""The Accelerate helpers under 2-process CPU DDP (torchrun, gloo); slow, so opt-in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

from emaweights.io import load_state

SCRIPT = Path(__file__).with_name("_accelerate_ddp.py")


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_ranks_agree_and_load_state_resumes(tmp_path: Path) -> None:
    """Both ranks update once per optimizer step and agree; load_state reproduces the EMA."""
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), *sys.path])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT)]
    proc = subprocess.run(
        [*cmd, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [load_state(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # 64 samples / 2 ranks / batch 4 = 8 micro-batches per epoch, accumulation 2
    for run in runs:
        assert run["straight"]["num_updates"] == run["resumed"]["num_updates"] == 8
    for name, t in runs[0]["straight"]["shadow"].items():
        for run in runs:
            assert torch.equal(run["straight"]["shadow"][name], t), name
            assert torch.equal(run["resumed"]["shadow"][name], t), name
