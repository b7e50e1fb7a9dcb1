"""The shared base: swap guards, clock, partial model changes, recovery (issues 13 and 14)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

from emaweights import EMA, SWA, MultiEMA, SwapError, update_bn
from emaweights.schedules import PowerWarmup, Schedule, Warmup


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3), nn.Linear(3, 3))


def test_swa_skip_keeps_equal_weights() -> None:
    """SWA fed 1, 2, nan, 4 with nonfinite='skip' averages to 7/3 (kept points weigh the same)."""
    model = nn.Linear(1, 1, bias=False)
    swa = SWA(model, nonfinite="skip")
    for value in (1.0, 2.0, float("nan"), 4.0):
        with torch.no_grad():
            model.weight.fill_(value)
        swa.update()
    assert swa.shadow["weight"].item() == pytest.approx(7 / 3)


def test_swa_weighs_points_not_time() -> None:
    """SWA with irregular update(step=...) spacing is the plain mean of the points."""
    model = nn.Linear(1, 1, bias=False)
    swa = SWA(model)
    for step, value in ((1, 1.0), (2, 2.0), (10, 6.0)):
        with torch.no_grad():
            model.weight.fill_(value)
        swa.update(step=step)
    assert swa.shadow["weight"].item() == pytest.approx(3.0)


def test_update_bn_inside_applied_reaches_the_average() -> None:
    """With swa.applied() as m: update_bn(loader, m) exports the new statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    swa = SWA(model)
    swa.update()
    loader = [torch.randn(8, 4) * 3 + 1 for _ in range(3)]
    with swa.applied() as m:
        update_bn(loader, m)
        stats = m[1].running_mean.clone()
    assert torch.equal(swa.averaged_state_dict()["1.running_mean"], stats)


def test_update_bn_inside_ema_applied_is_put_back() -> None:
    """EMA.applied(): buffers recomputed inside are discarded at restore, the live ones return."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    ema = EMA(model, 0.9, anchor="debiased")
    ema.update()
    before, live = ema.averaged_state_dict()["1.running_mean"], model[1].running_mean.clone()
    with ema.applied() as m:
        update_bn([torch.randn(8, 4) * 3 + 1 for _ in range(3)], m)
        assert not torch.equal(m[1].running_mean, before)
    assert torch.equal(ema.averaged_state_dict()["1.running_mean"], before)
    assert torch.equal(model[1].running_mean, live)


def test_write_through_data_is_detected() -> None:
    """p.data.mul_(0) on the swapped-in average raises SwapError at restore."""
    model = _mlp()
    ema = EMA(model, 0.9)
    with pytest.raises(SwapError), ema.applied() as m:
        m[0].weight.data.mul_(0)
    assert not ema.is_applied


@pytest.mark.parametrize("schedule", [Warmup(0.99), PowerWarmup()])
def test_update_past_start_step_sees_no_negative_step(schedule: Schedule) -> None:
    """update(step=...) jumping past start_step gives a real decay in [0, 1] (no negative step)."""
    ema = EMA(_mlp(), schedule, start_step=5)
    ema.update(step=8)
    assert isinstance(ema.init_weight, float) and 0.0 <= ema.init_weight <= 1.0
    assert all(torch.isfinite(v).all() for v in ema.shadow.values())


def _double_last(m: nn.Sequential) -> None:
    m[-1].double()


def _bf16_layer(m: nn.Sequential) -> None:
    m[2].bfloat16()


def _data_dtype(m: nn.Sequential) -> None:
    m[2].bias.data = m[2].bias.data.double()


def _replace_param(m: nn.Sequential) -> None:
    m[2].bias = nn.Parameter(torch.zeros(3))


def _assign_load(m: nn.Sequential) -> None:
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)


def _broadcast_shape(m: nn.Sequential) -> None:
    m[2].weight.data = torch.zeros(1, 16)


@pytest.mark.parametrize(
    "change",
    [_double_last, _bf16_layer, _data_dtype, _replace_param, _assign_load, _broadcast_shape],
)
def test_partial_model_change_refused_without_effect(
    change: Callable[[nn.Sequential], None],
) -> None:
    """A partial model change is refused at the next update, naming the tensor, with no effect."""
    model = _mlp()
    ema = EMA(model, 0.9)
    ema.update()
    before = ({k: v.clone() for k, v in ema.shadow.items()}, ema.step, ema.init_weight)
    change(model)
    with pytest.raises(RuntimeError, match=r"\d\.(weight|bias)"):
        ema.update()
    assert (ema.step, ema.init_weight) == before[1:]
    for k, v in ema.shadow.items():
        assert torch.equal(v, before[0][k]), k


def test_non_strict_load_refuses_float32_overflow() -> None:
    """strict=False refuses float64 values that would become infinite in a float32 shadow."""
    ema = EMA(_mlp(), 0.9)
    state = ema.state_dict()
    shadow = {k: v.double() for k, v in state["shadow"].items()}
    shadow["0.bias"][0] = 1e300
    with pytest.raises(ValueError, match=r"0\.bias"):
        ema.load_state_dict({**state, "shadow": shadow}, strict=False)


def test_multi_ema_recovers_from_nan_with_a_good_checkpoint() -> None:
    """MultiEMA.load_state_dict restores a NaN-poisoned averager from a good state."""
    model = _mlp()
    multi = MultiEMA(model, [0.9, 0.5])
    multi.update()
    good = multi.state_dict()
    good = {
        **good,
        "emas": [
            {**s, "shadow": {k: v.clone() for k, v in s["shadow"].items()}} for s in good["emas"]
        ],
    }
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    multi.update()
    multi.load_state_dict(good)
    assert torch.isfinite(multi.averaged_state_dict(1)["0.weight"]).all()


def test_config_mismatch_shows_both_schedules() -> None:
    """A strict load into an EMA with another schedule names both schedules' values."""
    from emaweights import HalfLife

    model = torch.nn.Linear(3, 2)
    state = EMA(model, HalfLife(20)).state_dict()
    other = EMA(model, HalfLife(30))
    with pytest.raises(ValueError, match=r"schedule.*20.*30"):
        other.load_state_dict(state)


def test_config_mismatch_message_bounded_on_a_nested_dag() -> None:
    """A hostile, deeply shared nested config is described in bounded length and time."""
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.9)
    state = ema.state_dict()
    node: list[object] = [1]
    for _ in range(200):  # a DAG: 2**200 paths if printed in full
        node = [node, node]
    state["config"] = dict(state["config"], update_every=node)
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        ema.load_state_dict(state)
    assert time.perf_counter() - start < 5.0
    assert len(str(err.value)) < 2000
