"""Bad input gets a clear error naming the value, and nothing is corrupted."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from emaweights import EMA, NonFiniteError, SwapError
from tests._models import mlp, train_step


def _snapshot(ema: EMA) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ema.shadow.items()}


def _same(ema: EMA, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in ema.shadow.items())


@pytest.mark.parametrize("decay", [-0.5, 1.0001, math.nan, math.inf, "0.9", None])
def test_bad_decay(decay: object) -> None:
    """A decay outside [0, 1], NaN, infinite or not a number is refused, naming it."""
    with pytest.raises((ValueError, TypeError), match="decay"):
        EMA(mlp(), decay)  # type: ignore[arg-type]


def test_bad_options_named() -> None:
    """Unknown anchor, buffers, nonfinite and dtype values are refused, naming them."""
    with pytest.raises(ValueError, match="'zero'"):
        EMA(mlp(), anchor="zero")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'mean'"):
        EMA(mlp(), buffers="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'warn'"):
        EMA(mlp(), nonfinite="warn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"torch\.int32"):
        EMA(mlp(), dtype=torch.int32)
    with pytest.raises(TypeError, match=r"'0\.bias'"):
        EMA(mlp(), exclude="0.bias")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Module"):
        EMA(torch.zeros(3))  # type: ignore[arg-type]


def _poison(model: nn.Module) -> None:
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")


def test_nonfinite_raise_keeps_average() -> None:
    """nonfinite='raise' raises before touching the average."""
    model = mlp()
    ema = EMA(model, 0.9, nonfinite="raise")
    snap = _snapshot(ema)
    _poison(model)
    with pytest.raises(NonFiniteError, match="optimizer step 1"):
        ema.update()
    assert _same(ema, snap)


def test_nonfinite_skip_counts_and_continues() -> None:
    """nonfinite='skip' skips the bad update, counts it, saves the count, and goes on."""
    model = mlp()
    ema = EMA(model, 0.9, nonfinite="skip")
    snap = _snapshot(ema)
    good = {n: p.detach().clone() for n, p in model.named_parameters()}
    _poison(model)
    ema.update()
    assert ema.skipped_updates == 1 and ema.num_updates == 0 and _same(ema, snap)
    assert ema.state_dict()["skipped_updates"] == 1
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(good[n])
    ema.update()
    assert ema.num_updates == 1
    assert all(bool(torch.isfinite(v).all()) for v in ema.shadow.values())


def test_nonfinite_check_never_saves_or_applies_nan() -> None:
    """With the default policy a NaN average is refused on swap, save, export and copy_to."""
    model = mlp()
    ema = EMA(model, 0.9)
    _poison(model)
    ema.update()
    for action in (ema.apply_shadow, ema.state_dict, ema.averaged_state_dict, ema.copy_to):
        with pytest.raises(NonFiniteError, match=r"0\.weight"):
            action()
    assert not ema.is_applied


def test_parameters_added_after_creation() -> None:
    """Parameters added after the EMA was made (e.g. adapters) are reported by name."""
    model = mlp()
    ema = EMA(model)
    model.add_module("adapter", nn.Linear(3, 3))
    with pytest.raises(RuntimeError, match=r"adapter\.weight"):
        ema.apply_shadow()
    with pytest.raises(RuntimeError, match=r"adapter\.weight"):
        ema.update()  # the first update runs the full check


def test_parameter_replaced_after_creation() -> None:
    """A parameter replaced by one of another shape is reported with both shapes."""
    model = mlp()
    ema = EMA(model)
    model[2].weight = nn.Parameter(torch.zeros(5, 16))
    with pytest.raises(RuntimeError, match=r"2\.weight: shape \(3, 16\) -> \(5, 16\)"):
        ema.apply_shadow()


def test_model_moved_to_other_device() -> None:
    """A model moved to another device after creation is reported, naming the devices."""
    model = mlp()
    ema = EMA(model)
    model.to("meta")
    with pytest.raises(RuntimeError, match="device cpu -> meta"):
        ema.apply_shadow()


def test_optimizer_step_while_applied_leaves_both_untouched() -> None:
    """An optimizer step while the average is applied raises; live and average are unchanged."""
    model = mlp()
    ema = EMA(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_step(model, opt, seed=0)
    ema.update()
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    snap = _snapshot(ema)
    with ema.applied():
        model(torch.randn(4, 6)).sum().backward()
        with pytest.raises(SwapError):
            opt.step()
    assert _same(ema, snap)
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters())


def test_restore_without_apply_and_double_apply() -> None:
    """restore() without apply_shadow() and a second apply_shadow() raise SwapError."""
    ema = EMA(mlp())
    with pytest.raises(SwapError, match="not applied"):
        ema.restore()
    ema.apply_shadow()
    with pytest.raises(SwapError, match="apply_shadow"):
        ema.apply_shadow()
    ema.restore()


def test_other_architecture_state_lists_everything() -> None:
    """Loading another architecture's state lists missing, unexpected and mismatched tensors."""
    ema = EMA(mlp())
    other = EMA(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 3)))
    snap = _snapshot(ema)
    with pytest.raises(KeyError, match=r"unexpected \['3.bias', '3.weight'\]"):
        ema.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match=r"0.weight: shape \(8, 6\) != \(16, 6\)"):
        ema.load_state_dict(other.state_dict(), strict=False)
    assert _same(ema, snap)
    state = ema.state_dict()
    state["shadow"] = {**state["shadow"], "0.bias": state["shadow"]["0.bias"].double()}
    with pytest.raises(ValueError, match=r"0.bias: dtype torch.float64 != torch.float32"):
        ema.load_state_dict(state)
