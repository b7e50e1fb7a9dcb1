"""Tests of bench-speed's argument validation, output hygiene and GPU target table (CPU only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from emaweights.bench import speed


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        speed.parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_unknown_model_is_a_usage_error_listing_valid_names(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--models foo exits with a usage error naming 'foo' and every valid model, no traceback."""
    err = _usage_error(["--models", "resnet50,foo"], capsys)
    assert "'foo'" in err and "Traceback" not in err
    assert all(name in err for name in speed.MODELS)


@pytest.mark.parametrize("flag", ["--threads", "--rounds", "--reps", "--batch"])
def test_non_positive_counts_are_refused(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A count of 0 is refused with a message naming the flag and the value."""
    err = _usage_error([flag, "0"], capsys)
    assert flag in err and "got 0" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_device_cuda_without_cuda_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--device cuda on a machine without CUDA exits with a usage error saying so."""
    err = _usage_error(["--device", "cuda"], capsys)
    assert "--device cuda" in err and "no CUDA device" in err


def test_default_models_depend_on_the_device() -> None:
    """Without --models, the CPU run gets the CPU list (the GPU list adds the 1B flat model)."""
    args = speed.parse_args([])
    assert args.models == speed.DEFAULT_MODELS.split(",")
    assert "flat1b" in speed.DEFAULT_MODELS_CUDA.split(",")


def test_profiler_lines_do_not_leak_into_the_output() -> None:
    """Measuring allocations prints nothing: the profiler's native 'USDT:' lines are silenced."""
    code = (
        "import torch\nfrom emaweights.bench import speed\na = torch.ones(8)\n"
        "print('bytes', speed.allocated_bytes(lambda: a.add_(1)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "USDT" not in out.stdout + out.stderr
    assert out.stdout.strip().startswith("bytes ")  # output after the profile still shows


def test_flat1b_size_scales_without_building() -> None:
    """The flat model's element count follows the scale, and the built model has that count."""
    n = speed._numel("flat1b", 1e-6)
    assert n == 1000
    assert sum(p.numel() for p in speed.build_model("flat1b", 1e-6).parameters()) == n


def _row(model: str, method: str, ms: float, pct: float = float("nan"), best: str | None = None):  # type: ignore[no-untyped-def]
    return {
        "model": model,
        "method": method,
        "median_ms": ms,
        "pct_roofline": pct,
        "best_anchor": best,
    }


def test_targets_pass_and_fail_from_the_rows() -> None:
    """Each target compares its measured value to the threshold; a missing row reads n/a."""
    rows = [
        _row("vit_b16", "ours (flat params)", 1.0, 95.0, "lib"),
        _row("vit_b16", "lib", 3.0, 30.0, "lib"),
        _row("train step", "no EMA", 100.0),
        _row("train step", f"+ {speed.OFFLOAD_OVERLAP}", 106.0),
    ]
    got = {t["target"]: t for t in speed.check_targets(rows)}
    fp32, bf16, step = (t for t in got.values() if "anchor" not in t["target"])
    assert fp32["pass"] is True and fp32["value"] == 95.0
    assert bf16["pass"] is None and bf16["value"] is None  # no bf16 row
    assert step["pass"] is False and step["value"] == pytest.approx(1.06)
    ahead = got["vit_b16: ours ahead of every anchor"]
    assert ahead["pass"] is True and ahead["value"] == pytest.approx(3.0)


def test_targets_table_prints_every_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    """The printed target table has a PASS, FAIL or n/a cell for each target."""
    targets: list[dict[str, Any]] = [
        {"target": "a", "value": 1.0, "unit": "u", "pass": True},
        {"target": "b", "value": 2.0, "unit": "u", "pass": False},
        {"target": "c", "value": None, "unit": "u", "pass": None},
    ]
    speed.print_targets(targets)
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[-1] for line in lines] == ["PASS", "FAIL", "n/a"]


def test_cpu_case_times_every_call() -> None:
    """A CPU case records one mean time per run, from ``reps`` calls."""
    calls: list[int] = []
    case = speed.Case("m", "x", 0, lambda: calls.append(1), reps=4)
    case.run()
    case.run()
    assert len(calls) == 8 and len(case.times) == 2 and case.median >= 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without CUDA")
def test_gpu_check_script_skips_without_cuda(tmp_path: Path) -> None:
    """scripts/gpu_check.sh without CUDA says so, exits 0 and writes no result file."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "out")}
    out = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert out.returncode == 0 and "skipped: no CUDA device" in out.stdout
    assert not any((tmp_path / "out").iterdir())


def test_multi_speed_refuses_bad_counts_and_missing_cuda(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """multi_speed refuses --decays 0, and --device cuda where CUDA is unavailable."""
    from emaweights.bench import multi_speed

    with pytest.raises(SystemExit) as info:
        multi_speed.main(["--decays", "0"])
    assert info.value.code == 2 and "--decays must be at least 1, got 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            multi_speed.main(["--device", "cuda"])
        assert "no CUDA device" in capsys.readouterr().err
