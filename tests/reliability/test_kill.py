"""Files survive a writer killed at any moment: the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from emaweights import io

SIZE = 1 << 19  # 2 MiB of float32 per file: a write takes long enough to be interrupted


TENSORS = {}  # made in the parent: the forked child runs no torch kernels (no thread pools)


def _writer(path: Path, save: Callable[[int, torch.Tensor, Path], None]) -> None:
    """Child: write step 1, 2, 1, 2, ... forever."""
    torch.set_num_threads(1)  # a forked child must not touch the parent's thread pool
    tensors = TENSORS
    ready = path.with_suffix(".ready")
    step = 1
    while True:
        save(step, tensors[step], path)
        if not ready.exists():
            ready.touch()
        step = 3 - step


def _save_state(step: int, t: torch.Tensor, path: Path) -> None:
    io.save_state({"step": step, "t": t}, path)


def _save_safetensors(step: int, t: torch.Tensor, path: Path) -> None:
    io.save_safetensors({"t": t}, path, metadata={"step": str(step)})


def _save_naive(step: int, t: torch.Tensor, path: Path) -> None:
    torch.save({"step": step, "t": t}, path)  # not atomic: truncates, then writes


def _kill_trials(
    tmp: Path, save: Callable[[int, torch.Tensor, Path], None], trials: int
) -> list[str]:
    """Kill a forked writer at random moments; return how each trial's file loaded."""
    rng = random.Random(1234)
    if not TENSORS:
        TENSORS.update({1: torch.full((SIZE,), 1.0), 2: torch.full((SIZE,), 2.0)})
    outcomes = []
    for i in range(trials):
        path = tmp / f"f{i}.bin"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                _writer(path, save)
            finally:
                os._exit(0)
        deadline = time.monotonic() + 20
        while not path.with_suffix(".ready").exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcomes.append(_check(path, safetensors=save is _save_safetensors))
    return outcomes


def _check(path: Path, safetensors: bool) -> str:
    """'ok' if the file loads and its tensor matches its step, else why not."""
    try:
        if safetensors:
            from safetensors import safe_open

            io.load_safetensors(path)  # the library's loader accepts it
            with safe_open(str(path), "pt") as f:
                step, t = float(f.metadata()["step"]), f.get_tensor("t")
        else:
            state = io.load_state(path)
            step, t = float(state["step"]), state["t"]
    except Exception as err:
        return f"torn: {type(err).__name__}"
    return "ok" if t.numel() == SIZE and bool((t == step).all()) else "inconsistent"


pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.mark.parametrize("save", [_save_state, _save_safetensors], ids=["state", "safetensors"])
def test_killed_writer_leaves_a_loadable_file(tmp_path: Path, save: Callable[..., None]) -> None:
    """25 writers killed at random points each leave a complete, consistent file."""
    outcomes = _kill_trials(tmp_path, save, trials=25)
    assert outcomes == ["ok"] * 25


def test_naive_writer_is_torn(tmp_path: Path) -> None:
    """The same kills tear a plain torch.save at least once (the test can fail)."""
    outcomes = _kill_trials(tmp_path, _save_naive, trials=25)
    assert any(o != "ok" for o in outcomes), outcomes


@pytest.mark.slow
@pytest.mark.parametrize("save", [_save_state, _save_safetensors], ids=["state", "safetensors"])
def test_killed_writer_many_trials(tmp_path: Path, save: Callable[..., None]) -> None:
    """300 random kills, each leaving a complete, consistent file."""
    outcomes = _kill_trials(tmp_path, save, trials=300)
    assert outcomes == ["ok"] * 300
