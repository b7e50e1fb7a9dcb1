"""A run stopped, saved and resumed in a new process equals an uninterrupted run, bitwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from emaweights import io

WORKER = Path(__file__).with_name("_resume_worker.py")


def _run(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parents[2] / "src"), *sys.path])}
    subprocess.run([sys.executable, str(WORKER), *args], check=True, timeout=120, env=env)


def test_resume_in_new_process_is_bitwise_equal(tmp_path: Path) -> None:
    """Train 0-13, stop, resume 13-29 in another process: EMA, counters and schedule match 0-29."""
    full, part, resumed = tmp_path / "full.pt", tmp_path / "part.pt", tmp_path / "resumed.pt"
    _run("0", "29", "-", str(full))
    _run("0", "13", "-", str(part))  # 13 is mid-period of update_every=3
    _run("13", "29", str(part), str(resumed))
    a, b = io.load_state(full)["ema"], io.load_state(resumed)["ema"]
    assert {k: v for k, v in a.items() if k != "shadow"} == {
        k: v for k, v in b.items() if k != "shadow"
    }
    assert a["step"] == 29 and a["num_updates"] > 0
    assert a["shadow"].keys() == b["shadow"].keys()
    for name in a["shadow"]:
        assert torch.equal(a["shadow"][name], b["shadow"][name]), name
