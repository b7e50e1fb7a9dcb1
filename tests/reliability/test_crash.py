"""Crash safety: a writer killed with SIGKILL at random moments never leaves a torn file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from emaweights import EMA, io

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or sys.platform == "win32", reason="needs fork and SIGKILL"
)

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (256, 256)  # ~256 KiB per tensor: a write takes long enough to be interrupted


def content(k: int) -> torch.Tensor:
    """The tensor written at counter ``k`` (exact in float32)."""
    return torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.float32).view(SHAPE) + k


def make_model() -> nn.Module:
    """The model whose EMA state is written."""
    return nn.Linear(*SHAPE)


def write_ema(path: Path, k: int, ema: EMA) -> None:
    """Save an EMA state whose step is ``k`` and whose shadow is a function of ``k``."""
    model = ema.model
    with torch.no_grad():
        model.weight.copy_(content(k))  # type: ignore[operator]
        model.bias.fill_(float(k))  # type: ignore[operator]
    ema.update(step=k)  # decay 0: the shadow is the live weights
    io.save_state(ema.state_dict(), path)


def check_ema(path: Path) -> int:
    """Load the state, check it is one complete write, and return its counter."""
    state = io.load_state(path)
    k = state["step"]
    assert torch.equal(state["shadow"]["weight"], content(k)), f"torn shadow at step {k}"
    assert torch.equal(state["shadow"]["bias"], torch.full((SHAPE[1],), float(k)))
    EMA(make_model(), 0.0).load_state_dict(state)  # the library accepts it as a whole
    return int(k)


def write_st(path: Path, k: int, _: object) -> None:
    """Save a safetensors file whose tensors and metadata are functions of ``k``."""
    io.save_safetensors({"w": content(k), "k": torch.tensor([k])}, path, metadata={"step": str(k)})


def check_st(path: Path) -> int:
    """Load the safetensors file, check it is one complete write, return its counter."""
    t = io.load_safetensors(path)
    k = int(t["k"].item())
    assert torch.equal(t["w"], content(k)), f"torn safetensors at step {k}"
    return k


@pytest.fixture(scope="module")
def writer_server() -> Iterator[subprocess.Popen[str]]:
    """A fresh interpreter that forks the writers (see ``_crash_writer``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability._crash_writer"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "ready"
    yield server
    server.kill()
    server.wait()


def kill_trials(
    server: subprocess.Popen[str], tmp_path: Path, kind: str, trials: int, seed: int
) -> dict[str, int]:
    """Start writers that rewrite one file in a loop; SIGKILL each at a random moment.

    The server forks one writer per trial and the kill comes a random time
    after its first complete write (so load cannot starve the test of writes,
    and each trial advances the file). After every kill the file must load
    and hold one complete write, and its counter must never go backwards.
    Returns counts: trials survived, trials in which the file advanced, and
    trials killed inside a write (a temporary was left).
    """
    write, check = (write_ema, check_ema) if kind == "ema_state" else (write_st, check_st)
    rng = random.Random(seed)
    path = tmp_path / "target.bin"
    write(path, 0, EMA(make_model(), 0.0))
    assert server.stdin is not None and server.stdout is not None
    counts = {"survived": 0, "advanced": 0, "killed_mid_write": 0}
    last = check(path)
    for _ in range(trials):
        server.stdin.write(f"go {kind} {path} {last + 1}\n")
        server.stdin.flush()
        lines = {server.stdout.readline().strip(), server.stdout.readline().strip()}
        lines.discard("first")
        pid = int(lines.pop())
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(pid, signal.SIGKILL)
        server.stdin.write("reap\n")
        server.stdin.flush()
        status = int(server.stdout.readline())
        assert os.WIFSIGNALED(status), f"writer ended on its own (status {status})"
        now = check(path)
        assert now >= last, f"file went back from step {last} to {now}"
        counts["advanced"] += now > last
        last = now
        others = [p for p in tmp_path.iterdir() if p != path]
        # A killed writer may leave its temporary, never another target.
        assert all(p.name.startswith(".target.bin.") for p in others), others
        counts["killed_mid_write"] += bool(others)
        for p in others:
            p.unlink()
        counts["survived"] += 1
    return counts


def test_killed_ema_writer_leaves_whole_file(
    writer_server: subprocess.Popen[str], tmp_path: Path
) -> None:
    """25 random SIGKILLs of a real EMA's checkpointing: always one complete write, never older."""
    kind = "ema_state"  # test_kill.py covers plain states and safetensors in the default suite
    counts = kill_trials(writer_server, tmp_path, kind, 25, seed=1)
    print(f"kill trials {kind}: {counts}")
    assert counts["survived"] == 25
    # Not vacuous: every trial wrote, and some kills hit a write.
    assert counts["advanced"] == counts["survived"] and counts["killed_mid_write"] > 0, counts


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ema_state", "safetensors"])
def test_killed_writer_leaves_whole_file_many(
    writer_server: subprocess.Popen[str], tmp_path: Path, kind: str
) -> None:
    """500 random SIGKILLs of a writer: the file is always the old or the new complete write."""
    counts = kill_trials(writer_server, tmp_path, kind, 500, seed=2)
    print(f"kill trials {kind}: {counts}")
    assert counts["survived"] == 500
    assert counts["advanced"] == counts["survived"] and counts["killed_mid_write"] > 0, counts


def test_failed_write_keeps_old_file(tmp_path: Path) -> None:
    """An exception inside atomic_write leaves the old file and no temporary behind."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), io.atomic_write(path) as f:
        f.write(b"new, partial")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_written_file_has_normal_permissions(tmp_path: Path) -> None:
    """A new file gets the mode open() would give (umask), not the temporary's 0600."""
    if sys.platform == "win32":
        pytest.skip("POSIX modes")
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    io.save_state({"a": torch.zeros(1)}, tmp_path / "state.pt")
    assert (tmp_path / "state.pt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    (tmp_path / "state.pt").chmod(0o640)
    io.save_state({"a": torch.ones(1)}, tmp_path / "state.pt")  # a rewrite keeps the mode
    assert (tmp_path / "state.pt").stat().st_mode & 0o777 == 0o640
