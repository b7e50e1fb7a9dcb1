"""Tests of latest-k averaging (LAWA) against the float64 mean of the last k checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from emaweights.averager import SwapError
from emaweights.lawa import LAWA
from tests._history import run
from tests._models import mlp, train_step


@pytest.mark.parametrize("k", [1, 3, 5])
def test_mean_of_last_k_snapshots(k: int) -> None:
    """After each snapshot, the average is the mean of the last min(k, n) snapshotted states."""
    torch.manual_seed(0)
    model = mlp(batchnorm=True)
    lawa = LAWA(model, k=k, device="cpu")
    taken: list[int] = []
    checks: list[tuple[int, dict]] = []

    def hook(s: int) -> None:
        if s % 2 == 0:  # an "epoch" of two steps
            lawa.update()
            taken.append(s)
            checks.append((s, lawa.averaged_state_dict()))

    history = run(model, 16, hook)
    for s, avg in checks:
        window = [t for t in taken if t <= s][-k:]
        for name in ("0.weight", "1.running_mean", "3.bias"):
            ref = sum(history[t][name] for t in window) / len(window)
            torch.testing.assert_close(avg[name].double(), ref, rtol=1e-5, atol=1e-6)
        assert avg["1.num_batches_tracked"] == history[s]["1.num_batches_tracked"]


def test_before_the_first_point_the_average_is_the_starting_weights() -> None:
    """With start_step, the average follows the live weights until the first point is taken."""
    torch.manual_seed(0)
    model = mlp()
    lawa = LAWA(model, k=2, start_step=2)
    history = run(model, 2, lambda s: lawa.update())
    for name, t in lawa.averaged_state_dict().items():
        assert torch.equal(t.double(), history[2][name]), name
    assert lawa.n_snapshots == 0


def test_bad_k_and_empty() -> None:
    """K < 1 is refused naming the value; averaging before any snapshot raises."""
    with pytest.raises(ValueError, match="0"):
        LAWA(mlp(), k=0)
    with pytest.raises(RuntimeError, match="no snapshot"):
        LAWA(mlp()).average()


def test_snapshot_is_a_deprecated_alias_of_update() -> None:
    """LAWA.snapshot() warns and does what update() does."""
    lawa = LAWA(nn.Linear(2, 2), k=2)
    with pytest.warns(DeprecationWarning, match="update"):
        lawa.snapshot()
    assert lawa.n_snapshots == 1 and lawa.num_updates == 1


@pytest.mark.parametrize(("every", "start"), [(1, 0), (3, 2)])
def test_update_every_and_start_step_choose_the_points(every: int, start: int) -> None:
    """update() after every step averages the last k points start + j*every (float64 mean)."""
    torch.manual_seed(0)
    model = mlp()
    lawa = LAWA(model, k=3, update_every=every, start_step=start)
    history = run(model, 14, lambda s: lawa.update())
    points = [s for s in range(start + 1, 15) if (s - start) % every == 0][-3:]
    assert lawa.num_updates == len([s for s in range(start + 1, 15) if (s - start) % every == 0])
    for name, t in lawa.averaged_state_dict().items():
        ref = sum(history[s][name] for s in points) / len(points)
        torch.testing.assert_close(t.double(), ref, rtol=1e-5, atol=1e-6)


def _two_steps(model: nn.Module, opt: torch.optim.Optimizer, lawa: LAWA, first: int) -> None:
    for s in (first, first + 1):
        train_step(model, opt, seed=s)
        lawa.update()


def test_state_resumes_the_window_bitwise(tmp_path: Path) -> None:
    """A LAWA loaded from torch.load(weights_only=True) continues exactly like the original."""
    torch.manual_seed(0)
    model = mlp(batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lawa = LAWA(model, k=2)
    _two_steps(model, opt, lawa, 1)
    _two_steps(model, opt, lawa, 3)  # the window has wrapped once
    path = tmp_path / "lawa.pt"
    torch.save(lawa.state_dict(), path)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin_opt.load_state_dict(opt.state_dict())
    resumed = LAWA(twin, k=2)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert resumed.n_snapshots == 2 and resumed.num_updates == 4
    _two_steps(model, opt, lawa, 5)
    _two_steps(twin, twin_opt, resumed, 5)
    for name, t in lawa.averaged_state_dict().items():
        assert torch.equal(resumed.averaged_state_dict()[name], t), name


def test_window_of_another_length_is_refused_unchanged() -> None:
    """A state whose window does not match its counters is refused; the LAWA is unchanged."""
    model = mlp()
    lawa = LAWA(model, k=3)
    lawa.update()
    state = lawa.state_dict()
    before = {k: v.clone() for k, v in lawa.shadow.items()}
    bad = {**state, "window": state["window"] * 2}
    with pytest.raises(ValueError, match="window"):
        lawa.load_state_dict(bad)
    with pytest.raises(ValueError, match="k"):
        lawa.load_state_dict({**state, "config": {**state["config"], "k": 4}})
    assert lawa.n_snapshots == 1
    for k, v in lawa.shadow.items():
        assert torch.equal(v, before[k])


def test_applied_has_the_swap_guards() -> None:
    """Inside applied(): update() and optimizer.step() raise; the live weights come back."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lawa = LAWA(model, k=2)
    train_step(model, opt, seed=1)
    lawa.update()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with lawa.applied():
        with pytest.raises(SwapError):
            lawa.update()
        with pytest.raises(SwapError):
            opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k


def test_foreach_option_gives_the_same_numbers() -> None:
    """LAWA(foreach=False) (per-tensor kernels) equals foreach=True bit for bit."""
    results = []
    for foreach in (True, False):
        torch.manual_seed(0)
        model = mlp(batchnorm=True)
        lawa = LAWA(model, k=2, foreach=foreach)
        run(model, 5, lambda s, lawa=lawa: lawa.update())
        results.append(lawa.averaged_state_dict())
    for k, v in results[0].items():
        assert torch.equal(results[1][k], v), k
