"""Tests of the pure update kernels."""

from __future__ import annotations

import shutil

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


def _mixed_pairs(n_big: int = 3000) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """fp32 shadows and bf16 live tensors: one larger than the staging buffer, several small."""
    g = torch.Generator().manual_seed(2)
    shapes = [(n_big,), (3, 4), (7,), (50, 9), (1,)]
    shadow = [torch.randn(s, generator=g) for s in shapes]
    live = [torch.randn(s, generator=g).bfloat16() for s in shapes]
    return shadow, live


@pytest.mark.parametrize("size", [1, 16, 700, 5000])
def test_staged_matches_float64(size: int) -> None:
    """The staged mixed-dtype update equals the float64 formula for any staging size."""
    shadow, live = _mixed_pairs()
    ref = [0.9 * s.double() + 0.1 * x.double() for s, x in zip(shadow, live, strict=True)]
    batches = F.stage_batches(shadow, live, torch.empty(size))
    assert all(sum(t.numel() for t in b[0]) <= size for b in batches)
    F.lerp_staged_(batches, 0.1)
    for s, r in zip(shadow, ref, strict=True):
        torch.testing.assert_close(s.double(), r, rtol=1e-6, atol=1e-7)


def test_staged_covers_every_element_once() -> None:
    """Every element of every tensor appears in exactly one staged piece."""
    shadow, live = _mixed_pairs()
    for t in shadow:
        t.zero_()
    for tgt, _, _ in F.stage_batches(shadow, live, torch.empty(333)):
        torch._foreach_add_(tgt, 1.0)
    assert all(bool((t == 1).all()) for t in shadow)


def test_stage_batches_rejects_bad_input() -> None:
    """Bad staging buffers and non-contiguous tensors raise a clear error."""
    shadow, live = _mixed_pairs()
    with pytest.raises(ValueError, match="staging"):
        F.stage_batches(shadow, live, torch.empty(2, 2))
    with pytest.raises(ValueError, match="contiguous"):
        F.stage_batches([torch.zeros(3, 4).t()], [torch.zeros(4, 3)], torch.empty(8))
    with pytest.raises(ValueError, match="target tensors"):
        F.stage_batches(shadow, live[:2], torch.empty(8))


def test_stochastic_round_is_unbiased_and_representable() -> None:
    """Stochastic rounding gives bf16 values whose mean is the fp32 input (within 5 s.e.)."""
    x = torch.full((200_000,), 1.0 + 1.0 / 3 * 2**-7)  # a third of the way to the next bf16
    out = x.clone()
    F.stochastic_round_(
        out, torch.empty(x.numel(), dtype=torch.int32), torch.Generator().manual_seed(0)
    )
    assert torch.equal(out, out.bfloat16().float())  # every result is a bf16 value
    assert set(out.unique().tolist()) == {1.0, 1.0 + 2**-7}
    se = out.double().std().item() / x.numel() ** 0.5
    assert abs(out.double().mean().item() - x[0].item()) < 5 * se


def test_stochastic_rounding_tracks_exact_average() -> None:
    """Many SR updates of a bf16 shadow follow the fp64 EMA, where round-to-nearest freezes."""
    n, steps, w = 20_000, 50, 1e-3
    g = torch.Generator().manual_seed(3)
    start = torch.ones(n).bfloat16()
    live = torch.full((n,), 1.5).bfloat16()
    sr, rn = start.clone(), start.clone()
    staging = torch.empty(4096)
    kw = {"work": torch.empty(4096), "noise": torch.empty(4096, dtype=torch.int32), "generator": g}
    batches = F.stage_batches([sr], [live], staging)
    for _ in range(steps):
        F.lerp_staged_(batches, w, **kw)  # type: ignore[arg-type]
        F.lerp_([rn], [live], w)
    exact = 1.5 - 0.5 * (1 - w) ** steps  # float64 closed form
    # Each step adds at most one bf16 ulp (2**-7) of independent rounding noise.
    se = (steps**0.5 * 2**-7) / n**0.5
    assert abs(sr.double().mean().item() - exact) < 5 * se
    assert torch.equal(rn, start)  # round-to-nearest never moves: the failure SR fixes


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile on the CPU needs a C++ compiler",
)
@pytest.mark.parametrize("size", [2, 1000, 70_001])
def test_compiled_matches_float64(size: int) -> None:
    """The compiled fused mixed-dtype update equals the float64 formula at any size and weight."""
    g = torch.Generator().manual_seed(3)
    target = torch.randn(size, generator=g)
    source = torch.randn(size, generator=g).bfloat16()
    weight = torch.tensor(0.0)
    for w in (0.1, 0.7):  # both branches of lerp's formula; a new weight must not be stale
        ref = target.double() + w * (source.double() - target.double())
        F.lerp_compiled_(target, source, weight.fill_(w))
        torch.testing.assert_close(target.double(), ref, rtol=1e-6, atol=1e-7)


def test_compiled_rejects_bad_input() -> None:
    """lerp_compiled_ refuses 2-D, unequal, non-contiguous tensors and a float weight, by value."""
    t, w = torch.zeros(6), torch.tensor(0.5)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        F.lerp_compiled_(t.view(2, 3), t.view(2, 3), w)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        F.lerp_compiled_(t, torch.zeros(5), w)
    with pytest.raises(ValueError, match="contiguous"):
        F.lerp_compiled_(torch.zeros(12)[::2], t, w)
    with pytest.raises(ValueError, match=r"0\.5"):
        F.lerp_compiled_(t, t, 0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mean_every_foreach_path_agrees_with_float64(dtype: torch.dtype) -> None:
    """mean_ gives the same numbers on every foreach path, close to the float64 mean."""
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (7,), (1,)]
    sources = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(4)]
    results = {}
    for foreach in (True, False, None):
        out = [torch.empty(s, dtype=dtype) for s in shapes]
        F.mean_(out, sources, foreach=foreach)
        results[foreach] = out
    for out in results.values():
        for x, y in zip(out, results[False], strict=True):
            assert torch.equal(x, y)
    for i, x in enumerate(results[None]):
        ref = sum(src[i].double() for src in sources) / len(sources)
        torch.testing.assert_close(x.double(), ref, rtol=1e-6, atol=1e-7)


def test_mean_refuses_no_source_and_mismatched_lists() -> None:
    """mean_ without sources, or with a list of another length, raises naming the counts."""
    with pytest.raises(ValueError, match="none"):
        F.mean_([torch.zeros(2)], [])
    with pytest.raises(ValueError, match="1 target tensors but 2"):
        F.mean_([torch.zeros(2)], [[torch.zeros(2), torch.zeros(2)]])


@pytest.mark.parametrize("live_dtype", [torch.float32, torch.bfloat16])
def test_bias_corrected_ema_every_foreach_path_agrees_with_float64(live_dtype: torch.dtype) -> None:
    """bias_corrected_ema_ is equal on every foreach path and matches its float64 formula."""
    ema0, ref = _lists(torch.float32)
    g = torch.Generator().manual_seed(7)
    live = [torch.randn(t.shape, generator=g).to(live_dtype) for t in ref]
    w, c = 0.3, 0.2
    results = {}
    for foreach in (True, False, None):
        ema = [t.clone() for t in ema0]
        out = [torch.empty_like(t) for t in ema0]
        F.bias_corrected_ema_(out, ema, ref, live, w, c, foreach=foreach)
        results[foreach] = (ema, out)
    for ema, out in results.values():
        for a, b in zip(ema + out, results[False][0] + results[False][1], strict=True):
            assert torch.equal(a, b)
    ema, out = results[None]
    for i in range(len(ema0)):
        mu = (1 - w) * ema0[i].double() + w * live[i].double()
        torch.testing.assert_close(ema[i].double(), mu, rtol=1e-6, atol=1e-7)
        expected = mu + c * (live[i].double() - ref[i].double())
        torch.testing.assert_close(out[i].double(), expected, rtol=1e-6, atol=1e-6)
