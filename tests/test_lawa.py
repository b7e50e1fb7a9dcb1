"""Tests of latest-k averaging (LAWA) against the float64 mean of the last k checkpoints."""

from __future__ import annotations

import pytest
import torch

from emaweights.lawa import LAWA
from tests._history import run
from tests._models import mlp


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


def test_bad_k_and_empty() -> None:
    """K < 1 is refused naming the value; averaging before any snapshot raises."""
    with pytest.raises(ValueError, match="0"):
        LAWA(mlp(), k=0)
    with pytest.raises(RuntimeError, match="no snapshot"):
        LAWA(mlp()).average()


def test_snapshot_is_a_deprecated_alias_of_update() -> None:
    """LAWA.snapshot() warns and does what update() does."""
    import pytest
    from torch import nn

    from emaweights import LAWA

    lawa = LAWA(nn.Linear(2, 2), k=2)
    with pytest.warns(DeprecationWarning, match="update"):
        lawa.snapshot()
    assert lawa.n_snapshots == 1 and lawa.num_updates == 1
