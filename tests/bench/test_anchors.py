"""emaweights.bench.anchors: the other libraries load, or say how to install them."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emaweights.bench import anchors, speed


def test_timm_model_ema_loads_without_timm_or_torchvision() -> None:
    """ModelEmaV3 comes from timm's file alone: neither timm nor torchvision gets imported."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    code = (
        "import sys\nfrom emaweights.bench.anchors import timm_model_ema\n"
        "m = timm_model_ema()\nassert hasattr(m, 'ModelEmaV3')\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('timm', 'torchvision')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"


def test_missing_timm_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without timm the loader raises ImportError with 'pip install --no-deps timm'."""
    monkeypatch.setattr(anchors.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delitem(sys.modules, "timm.utils.model_ema", raising=False)
    monkeypatch.delitem(sys.modules, anchors._TIMM_FILE, raising=False)
    with pytest.raises(ImportError, match="pip install --no-deps timm"):
        anchors.timm_model_ema()


def test_a_library_that_fails_at_import_is_an_import_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library raising anything at import (a broken torchvision) becomes ImportError naming it."""
    (tmp_path / "broken_anchor_lib.py").write_text("raise RuntimeError('operator does not exist')")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"broken_anchor_lib.*RuntimeError.*operator does not"):
        anchors.import_anchor("broken_anchor_lib")


def test_speed_lists_a_missing_timm_as_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench-speed skips ModelEmaV3 with the reason and the command when timm is absent."""

    def missing() -> None:
        raise ImportError(f"timm is not installed ({anchors.TIMM_HINT})")

    monkeypatch.setattr(speed, "timm_model_ema", missing)
    made, skipped = speed._anchor_factories()
    assert "timm ModelEmaV3" not in made
    assert anchors.TIMM_HINT in skipped["timm ModelEmaV3"]
    assert "AveragedModel (multi_avg_fn)" in made  # torch's own: always there


def test_bench_anchors_extra_pulls_no_torchvision() -> None:
    """The extra leaves timm out (its torchvision pins a CUDA torch); make installs it --no-deps."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["bench-anchors"]
    names = {re.split(r"[<>=!~\[; ]", req)[0].lower() for req in extra}
    assert names == {"ema-pytorch", "torch-ema", "diffusers"}
    assert "pip install -q --no-deps timm" in (root / "Makefile").read_text()


def test_speed_times_every_installed_anchor_on_a_model() -> None:
    """Each anchor bench-speed found builds on a model and updates it (timm's too, if installed)."""
    made, skipped = speed._anchor_factories()
    if importlib.util.find_spec("timm") is not None:
        assert "timm ModelEmaV3" in made, skipped
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    for name, make in made.items():
        update = make(model)
        update()
        update()
        assert callable(update), name
