"""Stochastic rounding is honoured on every update path of the kernel dispatch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emaweights import EMA, MultiEMA
from emaweights.functional import lerp_stochastic_, stage_batches

W, STEPS = 1e-3, 20


def _conv(channels_last: bool) -> nn.Sequential:
    """A conv net whose 4-D weights are non-contiguous under channels_last."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 8, 1))
    if channels_last:
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return net


def _run(model: nn.Module, **kw: object) -> dict[str, torch.Tensor]:
    """Average a drift of the weights that nearest rounding in bf16 cannot follow."""
    kw = {"seed": 3, **kw} if kw.get("rounding") == "stochastic" else kw
    ema = EMA(model, 1 - W, dtype=torch.bfloat16, **kw)  # type: ignore[arg-type]
    for _ in range(STEPS):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25)
        ema.update()
    return {n: t.clone() for n, t in ema.shadow.items()}


def test_channels_last_weights_are_really_non_contiguous() -> None:
    """The channels_last model holds non-contiguous conv weights (the case under test)."""
    weight = _conv(channels_last=True)[0].weight
    assert isinstance(weight, torch.Tensor) and not weight.is_contiguous()


@pytest.mark.parametrize("foreach", [None, False])
def test_stochastic_rounding_on_channels_last_is_not_dropped(foreach: bool | None) -> None:
    """channels_last weights round stochastically on every path: not nearest, same noise law."""
    channels_last = _run(_conv(True), rounding="stochastic", foreach=foreach)
    contiguous = _run(_conv(False), rounding="stochastic", foreach=foreach)
    nearest = _run(_conv(True), rounding="nearest")
    assert any(not torch.equal(nearest[n], t) for n, t in channels_last.items())
    for name, t in contiguous.items():
        # the element order of the noise may follow the memory layout: compare in mean
        diff = (channels_last[name].double() - t.double()).mean().abs().item()
        assert diff < 5 * 2**-7 / t.numel() ** 0.5 * 2**0.5 * max(1.0, t.abs().max().item()), name


def test_foreach_false_runs_the_stochastic_reference_with_the_same_bits() -> None:
    """foreach=False rounds stochastically too, bit for bit like the staged default path."""
    staged = _run(_conv(False), rounding="stochastic")
    loop = _run(_conv(False), rounding="stochastic", foreach=False)
    nearest = _run(_conv(False), rounding="nearest", foreach=False)
    for name, t in staged.items():
        assert torch.equal(loop[name], t), name
    assert any(not torch.equal(nearest[n], t) for n, t in staged.items())


@pytest.mark.parametrize("foreach", [None, False])
def test_stochastic_channels_last_tracks_the_exact_average(foreach: bool | None) -> None:
    """On channels_last weights the stochastic bf16 shadow follows the float64 EMA in mean."""
    model = _conv(True)
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    shadow = _run(model, rounding="stochastic", foreach=foreach)
    # Every weight moved by 0.25 per step: the exact EMA of p0 + 0.25 k.
    exact_shift = sum(W * (1 - W) ** (STEPS - k) * 0.25 * k for k in range(1, STEPS + 1))
    for name, p0 in start.items():
        err = (shadow[name].double() - p0).mean().item() - exact_shift
        assert abs(err) < 0.25 * exact_shift, (name, err, exact_shift)


def test_stage_batches_slices_a_non_contiguous_source_by_rows() -> None:
    """A non-contiguous source is staged in first-dimension slices under its own shape."""
    target = torch.zeros(6, 4, 3, 3)
    source = torch.randn(6, 4, 3, 3).to(memory_format=torch.channels_last)
    staging = torch.empty(2 * 4 * 9)
    batches = stage_batches([target], [source], staging)
    assert [tuple(t.shape) for b in batches for t in b[0]] == [(2, 4, 3, 3)] * 3
    with pytest.raises(ValueError, match="exceeds the staging buffer"):
        stage_batches([target], [source], torch.empty(10))


def test_lerp_stochastic_reference_is_unbiased() -> None:
    """The per-tensor reference rounds to bf16 neighbours with the exact mean."""
    t = torch.ones(50_000, dtype=torch.bfloat16)
    lerp_stochastic_([t], [torch.full((50_000,), 1.001)], 1.0, generator=torch.Generator())
    assert set(t.float().tolist()) <= {1.0, 1.0078125}
    assert abs(t.double().mean().item() - 1.001) < 5 * (2**-7) / 50_000**0.5


@pytest.mark.parametrize(
    ("option", "value"), [("rounding", "stochastic"), ("compiled", True), ("overlap", True)]
)
def test_multi_ema_refuses_what_its_fused_kernel_lacks(option: str, value: object) -> None:
    """MultiEMA refuses stochastic rounding, compiled and overlap by name (never ignores them)."""
    with pytest.raises(ValueError, match=f"{option}={value!r}"):
        MultiEMA(_conv(False), [0.9, 0.99], dtype=torch.bfloat16, **{option: value})


def test_multi_ema_foreach_false_equals_default() -> None:
    """MultiEMA's foreach=False path gives the default path's numbers."""
    out = []
    for foreach in (None, False):
        model = _conv(False)
        multi = MultiEMA(model, [0.9, 0.99], foreach=foreach)
        for _ in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.1)
            multi.update()
        out.append([{n: t.clone() for n, t in multi[i].shadow.items()} for i in range(2)])
    for a, b in zip(out[0], out[1], strict=True):
        for n, t in a.items():
            torch.testing.assert_close(b[n], t, rtol=0, atol=0)
