"""EarlyAverageWarning: once, when an evaluation uses an average still mostly theta_0."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from emaweights import EMA
from emaweights.averager import EarlyAverageWarning
from emaweights.export import save_averaged
from tests._models import mlp, train_step


def _run(steps: int, **options: object) -> tuple[torch.nn.Module, EMA]:
    torch.manual_seed(0)
    model = mlp()
    ema = EMA(model, 0.99, **options)  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(steps):
        train_step(model, opt, i)
        ema.update()
    return model, ema


def _early(ema: EMA, use: str, tmp_path: Path) -> None:
    if use == "applied":
        with ema.applied():
            pass
    elif use == "copy_to":
        ema.copy_to(mlp())
    elif use == "module":
        ema.module(torch.zeros(1, 6))
    else:
        save_averaged(ema, tmp_path / "w.safetensors")


@pytest.mark.parametrize("use", ["applied", "copy_to", "module", "export"])
def test_warns_once_when_the_average_is_mostly_the_start(use: str, tmp_path: Path) -> None:
    """anchor='init', 10 steps at 0.99 (init_weight 0.90): every evaluation path warns, once."""
    _, ema = _run(10)
    assert ema.init_weight > 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _early(ema, use, tmp_path)
        _early(ema, use, tmp_path)
        with ema.applied():
            pass
    early = [w for w in caught if issubclass(w.category, EarlyAverageWarning)]
    assert len(early) == 1
    assert "anchor='debiased'" in str(early[0].message)


def test_no_warning_when_debiased() -> None:
    """anchor='debiased' holds none of theta_0: no warning."""
    _, ema = _run(10, anchor="debiased")
    with warnings.catch_warnings():
        warnings.simplefilter("error", EarlyAverageWarning)
        with ema.applied():
            pass
        ema.module(torch.zeros(1, 6))


def test_no_warning_before_any_update_or_once_the_start_is_forgotten() -> None:
    """Before the first update (average = live start) and once init_weight <= 0.5: no warning."""
    _, fresh = _run(0)
    _, late = _run(70)  # 0.99**70 = 0.49
    with warnings.catch_warnings():
        warnings.simplefilter("error", EarlyAverageWarning)
        for ema in (fresh, late):
            with ema.applied():
                pass


@pytest.mark.parametrize("use", ["applied", "module", "copy_to", "averaged_state_dict"])
def test_the_warning_points_at_the_users_line(use: str) -> None:
    """EarlyAverageWarning names the caller's file, not contextlib, torch or this package."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(model, 0.99)
    ema.update()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if use == "applied":
            with ema.applied():
                pass
        elif use == "module":
            ema.module(torch.randn(3, 2))
        else:
            getattr(ema, use)()
    early = [w for w in caught if issubclass(w.category, EarlyAverageWarning)]
    assert len(early) == 1 and early[0].filename == __file__
    assert "after 1 update the" in str(early[0].message)
