"""Tests of the pure update kernels."""

from __future__ import annotations

import pytest
import torch

from emaweights import functional as F


def _lists(dtype: torch.dtype, n: int = 5) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (7,), (2, 3, 5), (1,), (11, 2)][:n]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes], [
        torch.randn(s, generator=g).to(dtype) for s in shapes
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_foreach_and_loop_agree(dtype: torch.dtype) -> None:
    """The foreach path and the per-tensor path give the same numbers."""
    shadow, live = _lists(dtype)
    a = [t.clone() for t in shadow]
    b = [t.clone() for t in shadow]
    F.ema_update_(a, live, 0.1, foreach=True)
    F.ema_update_(b, live, 0.1, foreach=False)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_update_matches_float64_formula() -> None:
    """One update equals decay*shadow + (1-decay)*live computed in float64."""
    shadow, live = _lists(torch.float32)
    ref = [0.9 * s.double() + 0.1 * x.double() for s, x in zip(shadow, live, strict=True)]
    F.ema_update_(shadow, live, 0.1)
    for s, r in zip(shadow, ref, strict=True):
        torch.testing.assert_close(s.double(), r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach", [True, False])
def test_mixed_dtype_update(foreach: bool) -> None:
    """An fp32 shadow of bf16 weights is updated in fp32 on both paths."""
    shadow, live = _lists(torch.float32)
    live_bf16 = [t.bfloat16() for t in live]
    ref = [0.9 * s.double() + 0.1 * x.double() for s, x in zip(shadow, live_bf16, strict=True)]
    F.ema_update_(shadow, live_bf16, 0.1, foreach=foreach)
    for s, r in zip(shadow, ref, strict=True):
        assert s.dtype == torch.float32
        torch.testing.assert_close(s.double(), r, rtol=1e-6, atol=1e-7)


def test_tensor_weight_matches_float_weight() -> None:
    """A 0-dim tensor weight (kept on device, no host sync) equals the float weight."""
    shadow, live = _lists(torch.float32)
    a = [t.clone() for t in shadow]
    F.ema_update_(a, live, torch.tensor(0.25))
    F.ema_update_(shadow, live, 0.25)
    for x, y in zip(a, shadow, strict=True):
        torch.testing.assert_close(x, y)


def test_length_mismatch_is_an_error() -> None:
    """Lists of different lengths are refused, naming both lengths."""
    shadow, live = _lists(torch.float32)
    with pytest.raises(ValueError, match="5 target tensors but 4 source"):
        F.ema_update_(shadow, live[:4], 0.1)


def test_copy_paths_agree() -> None:
    """copy_ copies exactly on both paths."""
    _, live = _lists(torch.float32)
    for foreach in (True, False):
        dst = [torch.zeros_like(t) for t in live]
        F.copy_(dst, live, foreach=foreach)
        for d, s in zip(dst, live, strict=True):
            assert torch.equal(d, s)
