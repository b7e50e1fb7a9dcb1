"""Model changes and refused updates: caught at the next update, and a refused update is a no-op."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from emaweights import EMA
from emaweights.ema import NonFiniteError
from tests._models import mlp, train_step
from tests.reliability._state import assert_unchanged, snapshot


def trained(**kwargs: Any) -> tuple[nn.Module, EMA]:
    """A model with BatchNorm and an EMA that has seen three steps (no periodic check due)."""
    model = mlp(batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, **{"decay": 0.9, **kwargs})
    for s in range(1, 4):
        train_step(model, opt, s)
        ema.update()
    return model, ema


@pytest.mark.parametrize("target", [torch.float64, torch.bfloat16, "meta"])
def test_model_moved_detected_at_next_update(target: object) -> None:
    """model.to(dtype or device) between periodic checks raises at the next update, unchanged."""
    model, ema = trained()
    model.to(target)  # type: ignore[call-overload]
    before = snapshot(ema)
    with pytest.raises(RuntimeError, match=f"-> {target}"):
        ema.update()
    assert_unchanged(ema, before)


def test_replaced_parameter_detected() -> None:
    """load_state_dict(assign=True) replaces Parameters: the EMA refuses to average stale ones."""
    model, ema = trained()
    model.load_state_dict(mlp(batchnorm=True).state_dict(), assign=True)
    before = snapshot(ema)
    with pytest.raises(RuntimeError, match=r"0\.weight: the Parameter object was replaced"):
        ema.update()
    assert_unchanged(ema, before)


def test_added_adapter_detected_on_first_update() -> None:
    """An adapter added before the first update is named by that update; nothing changes."""
    model = mlp()
    ema = EMA(model, 0.9)
    model.add_module("adapter", nn.Linear(3, 3))
    before = snapshot(ema)
    with pytest.raises(RuntimeError, match=r"'adapter\.bias'"):
        ema.update()
    assert_unchanged(ema, before)


@pytest.mark.parametrize("bad", [2, -1, 2.5, "3"])
def test_bad_step_argument_changes_nothing(bad: object) -> None:
    """update(step=...) going backwards or not an int raises naming it; counters unchanged."""
    _, ema = trained()
    before = snapshot(ema)
    with pytest.raises(ValueError, match=repr(bad)):
        ema.update(step=bad)  # type: ignore[arg-type]
    assert_unchanged(ema, before)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_raise_leaves_step_counter(value: float) -> None:
    """nonfinite='raise': the refused update does not advance step (a retry is the same step)."""
    model, ema = trained(nonfinite="raise")
    with torch.no_grad():
        model[0].weight[0, 0] = value  # type: ignore[index]
    before = snapshot(ema)
    with pytest.raises(NonFiniteError, match="step 4"):
        ema.update()
    assert_unchanged(ema, before)
    with pytest.raises(NonFiniteError, match="step 4"):
        ema.update()


# Every way one tensor of the model can change under the EMA: (name, change, refused?).
def _changes() -> list[tuple[str, Any, bool]]:
    def set_data(make: Any) -> Any:
        return lambda t: setattr(t, "data", make(t))

    return [
        ("double", set_data(lambda t: t.data.double()), True),
        ("bfloat16", set_data(lambda t: t.data.bfloat16()), True),
        ("one row", set_data(lambda t: t.data[:1].clone()), True),  # broadcastable, so folded in
        ("as a column", set_data(lambda t: t.data.reshape(-1, 1).clone()), True),
        ("new Parameter", None, True),
        ("same shape, new storage", set_data(lambda t: t.data.clone()), False),
    ]


@settings(max_examples=18, deadline=None, derandomize=True, database=None)
@given(which=st.integers(0, 10**6), how=st.sampled_from(range(len(_changes()))))
def test_fuzz_one_tensor_changed(which: int, how: int) -> None:
    """Any one tensor changed in dtype, device, shape or identity: refused naming it, no effect."""
    model, ema = trained()
    names = [n for n, _ in model.named_parameters()]
    name = names[which % len(names)]
    kind, change, refused = _changes()[how]
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if change is None:
        setattr(module, attr, nn.Parameter(getattr(module, attr).detach().clone()))
    else:
        change(getattr(module, attr))
    before = snapshot(ema)
    if refused:
        with pytest.raises(RuntimeError, match=re.escape(name)):
            ema.update()
        assert_unchanged(ema, before)
    else:  # a legal change: the update reads the new storage
        ema.update()
        assert ema.step == before["counters"][0] + 1, kind
