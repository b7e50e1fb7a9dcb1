"""The runnable examples run as documented (the cheap, single-process ones)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["forgetting_custom.py"])
def test_example_runs(name: str) -> None:
    """examples/`name` exits 0."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["ddp_ema.py", "fsdp2_ema.py"])
def test_torchrun_example_runs(name: str, tmp_path: Path) -> None:
    """examples/`name` runs under torchrun with 2 CPU ranks as its first line documents."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(EXAMPLES / name),
            "--steps",
            "20",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "reloaded" in out.stdout
