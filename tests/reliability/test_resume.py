"""Exact resume: save, stop the process, resume in a new one; the EMA is bitwise identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from emaweights import io
from tests.reliability._resume_worker import CONFIGS, NAN_STEPS, build, first, train

ROOT = Path(__file__).resolve().parents[2]
N, M = 11, 23  # N is not a multiple of update_every=3, and both sides hold a NaN step


def _run(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    subprocess.run(
        [sys.executable, "-m", "tests.reliability._resume_worker", *args],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=120,
    )


def _assert_identical(got: Any, want: Any, where: str) -> None:
    """Recursive bitwise equality: tensors by value, dtype and shape; the rest by ==."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, where
        assert torch.equal(got, want), f"{where}: tensors differ"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys differ"
        for k in want:
            _assert_identical(got[k], want[k], f"{where}.{k}")
    else:
        assert got == want and type(got) is type(want), f"{where}: {got!r} != {want!r}"


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """EMA states after N steps here, saved, and M - N more in a fresh interpreter."""
    folder = tmp_path_factory.mktemp("resume")
    first(N, str(folder / "ckpt.pt"))  # the new process sees only the file
    _run("resume", str(M), str(folder / "ckpt.pt"), str(folder / "final.pt"))
    return io.load_state(folder / "final.pt")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_in_new_process_is_bitwise_exact(resumed: dict[str, Any], name: str) -> None:
    """Train N, save, new process, train to M: the EMA state equals an uninterrupted run's."""
    model, opt, ema = build(name)
    train(model, opt, ema, 0, M)
    want = ema.state_dict()
    assert want["step"] == M
    if name == "halflife_skip_nonfinite":
        assert want["skipped_updates"] == len(NAN_STEPS)  # the counter crossed the save
    _assert_identical(resumed[name], want, name)
