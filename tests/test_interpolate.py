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
    with pytest.raises(ValueError, match="n: non-floating"):
        interpolate(a, {"w": torch.zeros(2), "n": torch.tensor(2)}, 0.5)
    with pytest.raises(ValueError, match="nan"):
        interpolate(a, a, float("nan"))
