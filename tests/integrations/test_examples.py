"""The adapter examples run end to end (small settings) and report what they claim."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Any:
    """Run an example in this process (the frameworks are imported once for all tests).

    It runs in an empty working directory, which must stay empty: every file an
    example writes goes under its ``--out``.
    """
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def _run(script: str, *args: str) -> str:
        path = ROOT / "examples" / script
        monkeypatch.setattr(sys, "argv", [str(path), *args])
        runpy.run_path(str(path), run_name="__main__")
        assert not list(cwd.iterdir()), f"{script} wrote outside --out: {list(cwd.iterdir())}"
        return capsys.readouterr().out

    return _run


def test_lightning_example(tmp_path: Path, run: Any) -> None:
    """The Lightning example resumes with the EMA: update count continues past the checkpoint."""
    pytest.importorskip("lightning")
    out = run("lightning_ema.py", "--epochs", "1", "--out", str(tmp_path))
    assert "after 16 optimizer steps (16 EMA updates)" in out, out
    assert "resumed to 48 steps (48 EMA updates)" in out, out


def test_transformers_example(tmp_path: Path, run: Any) -> None:
    """The Trainer example's resumed EMA equals the uninterrupted one."""
    pytest.importorskip("transformers")
    out = run("transformers_ema.py", "--steps", "8", "--out", str(tmp_path))
    assert "8 EMA updates for 8 optimizer steps" in out, out
    assert "identical to the uninterrupted run: True" in out, out
    assert (tmp_path / "averaged" / "config.json").is_file()


def test_accelerate_example(tmp_path: Path, run: Any) -> None:
    """The Accelerate example updates once per 4 micro-batches and restores with load_state."""
    pytest.importorskip("accelerate")
    out = run("accelerate_ema.py", "--epochs", "1", "--out", str(tmp_path))
    assert "56 micro-batches -> 14 EMA updates" in out, out
    assert "load_state restored the EMA (step 14): True" in out, out


def test_peft_example(tmp_path: Path, run: Any) -> None:
    """The LoRA example's reloaded adapter equals the average."""
    pytest.importorskip("peft")
    out = run("peft_lora_ema.py", "--steps", "3", "--out", str(tmp_path))
    assert "reloaded equals the average: True" in out, out
