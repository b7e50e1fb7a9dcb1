"""Tests of MultiEMA against separate EMAs (the oracle) and float64 references."""

from __future__ import annotations

import pytest
import torch

from emaweights import EMA, NonFiniteError
from emaweights.flat import flatten_parameters
from emaweights.multi import MultiEMA
from emaweights.schedules import Warmup
from tests._models import mlp, train_step

DECAYS = [0.5, 0.9, Warmup(0.99), 0.999]


def _run(model: torch.nn.Module, averagers: list, steps: int = 12) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(steps):
        train_step(model, opt, seed=s)
        for a in averagers:
            a.update()


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "options", [{}, {"update_every": 3, "start_step": 2}, {"anchor": "debiased"}]
)
def test_matches_separate_emas(foreach: bool, options: dict) -> None:
    """Each average of a MultiEMA equals a separate EMA with the same decay and options."""
    torch.manual_seed(0)
    model = mlp(batchnorm=True)
    multi = MultiEMA(model, DECAYS, foreach=foreach, **options)
    singles = [EMA(model, d, **options) for d in DECAYS]
    _run(model, [multi, *singles])
    for i, single in enumerate(singles):
        for name, t in single.shadow.items():
            torch.testing.assert_close(multi[i].shadow[name], t, rtol=1e-6, atol=1e-7)
        assert multi[i].init_weight == pytest.approx(single.init_weight)


def test_matches_float64_closed_form() -> None:
    """A constant decay gives the unrolled float64 sum b^T th0 + sum (1-b) b^(T-t) th_t."""
    torch.manual_seed(1)
    model = mlp()
    decays = [0.6, 0.95]
    multi = MultiEMA(model, decays)
    history = [{k: v.double().clone() for k, v in model.state_dict().items()}]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(10):
        train_step(model, opt, seed=s)
        multi.update()
        history.append({k: v.double().clone() for k, v in model.state_dict().items()})
    T = len(history) - 1
    for i, b in enumerate(decays):
        for name, avg in multi[i].shadow.items():
            ref = b**T * history[0][name] + sum(
                (1 - b) * b ** (T - t) * history[t][name] for t in range(1, T + 1)
            )
            torch.testing.assert_close(avg.double(), ref, rtol=1e-5, atol=1e-6)


def test_apply_and_export_each_decay() -> None:
    """applied(i) swaps in the i-th average and averaged_state_dict(i) returns it."""
    torch.manual_seed(2)
    model = mlp()
    multi = MultiEMA(model, [0.5, 0.9])
    _run(model, [multi], steps=4)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(2):
        with multi.applied(i) as m:
            for name, t in m.state_dict().items():
                torch.testing.assert_close(t, multi[i].shadow[name])
        exported = multi.averaged_state_dict(i)
        torch.testing.assert_close(exported["0.weight"], multi[i].shadow["0.weight"])
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, live[name])


def test_state_dict_round_trip() -> None:
    """A MultiEMA resumed from its state dict continues exactly like an uninterrupted one."""
    torch.manual_seed(3)
    model = mlp()
    a = MultiEMA(model, [0.5, 0.9])
    _run(model, [a], steps=3)
    b = MultiEMA(model, [0.5, 0.9])
    b.load_state_dict(a.state_dict())
    _run(model, [a, b], steps=3)
    for i in range(2):
        for name, t in a[i].shadow.items():
            torch.testing.assert_close(b[i].shadow[name], t, rtol=0, atol=0)


def test_bad_input() -> None:
    """Empty decays and a state with another number of decays are refused, naming the value."""
    model = mlp()
    with pytest.raises(ValueError, match=r"\[\]"):
        MultiEMA(model, [])
    state = MultiEMA(model, [0.5]).state_dict()
    with pytest.raises(ValueError, match="1 decays"):
        MultiEMA(model, [0.5, 0.9]).load_state_dict(state)


def test_bf16_model_fp32_shadows() -> None:
    """With a bf16 model, the fp32 averages equal separate fp32-shadow EMAs."""
    torch.manual_seed(4)
    model = mlp(dtype=torch.bfloat16)
    multi = MultiEMA(model, [0.5, 0.9])
    singles = [EMA(model, d) for d in (0.5, 0.9)]
    _run(model, [multi, *singles], steps=4)
    for i, single in enumerate(singles):
        assert multi[i].shadow["0.weight"].dtype == torch.float32
        for name, t in single.shadow.items():
            torch.testing.assert_close(multi[i].shadow[name], t, rtol=1e-6, atol=1e-7)


def test_nonfinite_average_is_named_in_the_right_member() -> None:
    """A NaN in one decay's average is reported by that EMA only (stacked storage)."""
    model = mlp()
    multi = MultiEMA(model, [0.5, 0.9, 0.99])
    multi.update()
    name = next(iter(multi[1].shadow))
    with torch.no_grad():
        multi[1].shadow[name].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match=name):
        multi[1].apply_shadow()
    for i in (0, 2):
        with multi.applied(i):
            pass


def test_member_update_matches_a_single_ema() -> None:
    """Updating one member of a flat-parameter MultiEMA alone matches a separate EMA."""
    torch.manual_seed(5)
    model = mlp()
    flatten_parameters(model)  # the live side is one flat run: the member must not use it
    multi, single = MultiEMA(model, [0.5, 0.9]), EMA(model, 0.9)
    _run(model, [multi[1], single], steps=3)
    for name, t in single.shadow.items():
        torch.testing.assert_close(multi[1].shadow[name], t, rtol=0, atol=0)


def test_bf16_update_allocates_nothing_after_the_first() -> None:
    """With a bf16 model, a MultiEMA update allocates no tensor memory after the first call."""
    from torch.profiler import ProfilerActivity, profile

    model = mlp(dtype=torch.bfloat16)
    multi = MultiEMA(model, [0.5, 0.9])
    multi.update()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        multi.update()
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
    assert allocated == 0, f"{allocated} bytes allocated by one update"
