"""Weight interpolation (WiSE-FT) against its closed form."""

from __future__ import annotations

import pytest
import torch

from emaweights import interpolate
from emaweights.interpolate import sweep


def test_closed_form_and_endpoints() -> None:
    """Interpolate gives (1-a)A + aB, A at 0 and B at 1, and copies equal int tensors."""
    a = {"w": torch.randn(3, 2, dtype=torch.float64), "n": torch.tensor(4)}
    b = {"w": torch.randn(3, 2, dtype=torch.float64), "n": torch.tensor(4)}
    for alpha in (0.0, 0.3, 1.0):
        out = interpolate(a, b, alpha)
        torch.testing.assert_close(out["w"], (1 - alpha) * a["w"] + alpha * b["w"])
        assert torch.equal(out["n"], a["n"])
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    assert [x for x, _ in sweep(a, b, [0, 0.5])] == [0.0, 0.5]


def test_mismatches_are_named() -> None:
    """Different names, shapes or differing int tensors raise, naming them."""
    a = {"w": torch.zeros(2), "n": torch.tensor(1)}
    with pytest.raises(KeyError, match="only in B"):
        interpolate(a, {"w": torch.zeros(2)}, 0.5)
    with pytest.raises(ValueError, match=r"w: A is torch.float32\(2,\)"):
        interpolate(a, {"w": torch.zeros(3), "n": torch.tensor(1)}, 0.5)
    with pytest.raises(ValueError, match="nan"):
        interpolate(a, a, float("nan"))


@pytest.mark.parametrize("alpha", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_alpha_is_refused_naming_it(alpha: float) -> None:
    """An alpha of inf, -inf or nan is refused with its value in the message."""
    a = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match=f"got {alpha!r}"):
        interpolate(a, a, alpha)


def _bn_cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 2),
    )


def _train_forwards(model: torch.nn.Module, batches: int, seed: int) -> None:
    """Train-mode forwards: move the BN statistics and num_batches_tracked."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(5, 3, 8, 8, generator=gen))


def test_wise_ft_between_two_batchnorm_cnns() -> None:
    """Two BN CNNs (different num_batches_tracked) interpolate: closed form, counters from B."""
    pre, fine = _bn_cnn(0), _bn_cnn(1)
    _train_forwards(pre, 2, seed=0)
    _train_forwards(fine, 5, seed=1)
    a, b = pre.state_dict(), fine.state_dict()
    assert not torch.equal(a["1.num_batches_tracked"], b["1.num_batches_tracked"])
    alpha = 0.25
    out = interpolate(a, b, alpha)
    for name, t in out.items():
        if t.is_floating_point():
            oracle = (1 - alpha) * a[name].double() + alpha * b[name].double()
            torch.testing.assert_close(t.double(), oracle, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(t, b[name]), name
    out["1.num_batches_tracked"] += 1  # a copy, not B's own tensor
    assert b["1.num_batches_tracked"].item() == 5
    wise = _bn_cnn(2)
    wise.load_state_dict(out)
    wise.eval()
    assert torch.isfinite(wise(torch.randn(2, 3, 8, 8))).all()
