"""Bad input: a clear exception naming the value, and the EMA left exactly as it was."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from emaweights import EMA
from emaweights.ema import NonFiniteError, SwapError
from emaweights.schedules import HalfLife, Warmup
from tests._models import mlp, train_step


def snapshot(ema: EMA) -> dict[str, Any]:
    """Everything an EMA holds: counters, configuration and shadow values (copied)."""
    return {
        "counters": (ema.step, ema._last_step, ema.num_updates, ema.skipped_updates),
        "init_weight": ema.init_weight,
        "config": ema._config(),
        "shadow": {k: v.clone() for k, v in ema.shadow.items()},
    }


def assert_unchanged(ema: EMA, before: dict[str, Any]) -> None:
    """The EMA's full state equals ``before`` bit for bit."""
    after = snapshot(ema)
    assert after["counters"] == before["counters"]
    assert after["init_weight"] == before["init_weight"]
    assert after["config"] == before["config"]
    assert after["shadow"].keys() == before["shadow"].keys()
    for k, v in before["shadow"].items():
        assert torch.equal(after["shadow"][k], v), k


def trained(**kwargs: Any) -> tuple[nn.Module, torch.optim.Optimizer, EMA]:
    """A model, SGD and an EMA that has seen three steps."""
    model = mlp(batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, **{"decay": 0.9, **kwargs})
    for s in range(1, 4):
        train_step(model, opt, s)
        ema.update()
    return model, opt, ema


# -- decay and options ---------------------------------------------------------

BAD_DECAYS = [-0.1, 1.5, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", BAD_DECAYS)
def test_decay_out_of_range_names_value(bad: float) -> None:
    """A decay outside [0, 1], NaN or infinite is refused by EMA and Warmup, naming it."""
    with pytest.raises(ValueError, match=f"got {bad!r}"):
        EMA(mlp(), bad)
    with pytest.raises(ValueError, match=f"got {bad!r}"):
        Warmup(bad)


@pytest.mark.parametrize("bad", ["0.9", None, True])
def test_decay_wrong_type_names_value(bad: object) -> None:
    """A decay that is not a number (a string, None, a bool) is refused, naming it."""
    with pytest.raises((TypeError, ValueError), match=repr(bad).replace(".", r"\.")):
        EMA(mlp(), bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0.0, -3.0, math.nan])
def test_half_life_bad_names_value(bad: float) -> None:
    """A half-life that is not positive and finite is refused, naming it."""
    with pytest.raises(ValueError, match=repr(bad)):
        HalfLife(bad)


@pytest.mark.parametrize(
    ("option", "bad"),
    [
        ("update_every", 0),
        ("update_every", 2.0),
        ("start_step", -1),
        ("anchor", "bias"),
        ("nonfinite", "ignore"),
        ("dtype", torch.int32),
    ],
)
def test_bad_option_names_value(option: str, bad: object) -> None:
    """Each out-of-range EMA option is refused with its value in the message."""
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        EMA(mlp(), 0.9, **{option: bad})


@pytest.mark.parametrize("bad", [2, -1, 2.5, "3"])
def test_bad_step_argument_changes_nothing(bad: object) -> None:
    """update(step=...) going backwards or not an int raises naming it; nothing changes."""
    _, _, ema = trained()
    before = snapshot(ema)
    with pytest.raises(ValueError, match=repr(bad)):
        ema.update(step=bad)  # type: ignore[arg-type]
    assert_unchanged(ema, before)


# -- another architecture --------------------------------------------------------


def test_other_architecture_lists_every_mismatch() -> None:
    """Loading a state from another model lists missing, unexpected, shape and dtype issues."""
    _, _, ema = trained()
    other = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
    state = EMA(other, 0.9).state_dict()
    state["shadow"]["9.extra"] = torch.zeros(2)  # unexpected
    del state["shadow"]["1.running_var"]  # missing
    before = snapshot(ema)
    with pytest.raises(KeyError, match=r"missing \['1.running_var'\].*unexpected \['9.extra'\]"):
        ema.load_state_dict(state)
    assert_unchanged(ema, before)
    # Same names, different shapes and dtypes: each one listed.
    state = ema.state_dict()
    state["shadow"] = dict(state["shadow"])
    state["shadow"]["3.weight"] = torch.zeros(5, 16)
    state["shadow"]["0.bias"] = torch.zeros(16, dtype=torch.float64)
    with pytest.raises(ValueError) as err:
        ema.load_state_dict(state)
    assert "3.weight: shape (5, 16) != (3, 16)" in str(err.value)
    assert "0.bias: dtype torch.float64 != torch.float32" in str(err.value)
    assert_unchanged(ema, before)


@pytest.mark.parametrize(
    ("field", "bad", "needle"),
    [
        ("format", "something.else", "something.else"),
        ("version", 99, "99"),
        ("step", -4, "-4"),
        ("step", 2.5, "2.5"),
        ("last_step", 1000, "1000"),
        ("init_weight", math.nan, "nan"),
        ("init_weight", 1.5, "1.5"),
        ("config", "garbage", "garbage"),
    ],
)
def test_corrupt_state_field_names_value(field: str, bad: object, needle: str) -> None:
    """A saved state with one bad field is refused naming the value; nothing changes."""
    _, _, ema = trained()
    state = ema.state_dict()
    state[field] = bad
    before = snapshot(ema)
    with pytest.raises(ValueError, match=needle):
        ema.load_state_dict(state)
    assert_unchanged(ema, before)


@pytest.mark.parametrize(
    ("key", "bad", "needle"),
    [
        ("anchor", "middle", "middle"),
        ("update_every", 0, "0"),
        ("schedule", {"kind": "constant", "decay": 7.0}, "7.0"),
        ("schedule", {"kind": "nope"}, "nope"),
    ],
)
def test_corrupt_saved_config_names_value(key: str, bad: object, needle: str) -> None:
    """A saved configuration with a bad value is refused naming it, even with strict=False."""
    _, _, ema = trained()
    state = ema.state_dict()
    state["config"] = {**state["config"], key: bad}
    before = snapshot(ema)
    with pytest.raises(ValueError, match=needle):
        ema.load_state_dict(state, strict=False)
    assert_unchanged(ema, before)


def test_nonfinite_saved_shadow_refused() -> None:
    """A saved shadow holding NaN is refused naming the tensor; nothing changes."""
    _, _, ema = trained()
    state = copy.deepcopy(ema.state_dict())
    state["shadow"]["0.weight"][1, 2] = math.nan
    before = snapshot(ema)
    with pytest.raises(ValueError, match=r"0\.weight: holds NaN"):
        ema.load_state_dict(state)
    assert_unchanged(ema, before)


def test_meta_and_uncastable_tensors_refused() -> None:
    """Saved tensors without data (meta) or of another kind (int for float) are refused."""
    _, _, ema = trained()
    state = copy.deepcopy(ema.state_dict())
    state["shadow"]["0.weight"] = torch.empty(16, 6, device="meta")
    state["shadow"]["0.bias"] = torch.zeros(16, dtype=torch.int64)
    before = snapshot(ema)
    with pytest.raises(ValueError) as err:
        ema.load_state_dict(state, strict=False)
    assert "0.weight: holds no data" in str(err.value)
    assert "0.bias: dtype torch.int64 cannot be cast" in str(err.value)
    assert_unchanged(ema, before)


# -- non-finite live weights ---------------------------------------------------------


def _poison(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        model[0].weight[0, 0] = value  # type: ignore[index]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_raise_policy_changes_nothing(value: float) -> None:
    """nonfinite='raise': a NaN/inf weight raises at update() and the EMA is untouched."""
    model, _, ema = trained(nonfinite="raise")
    _poison(model, value)
    before = snapshot(ema)
    with pytest.raises(NonFiniteError, match="step 4"):
        ema.update()
    assert_unchanged(ema, before)


def test_nonfinite_skip_policy_counts_and_keeps_average() -> None:
    """nonfinite='skip': the update is skipped and counted; the shadow stays finite and saved."""
    model, _, ema = trained(nonfinite="skip")
    shadow = {k: v.clone() for k, v in ema.shadow.items()}
    _poison(model, math.nan)
    ema.update()
    ema.update()
    assert ema.skipped_updates == 2 and ema.num_updates == 3 and ema.step == 5
    for k, v in shadow.items():
        assert torch.equal(ema.shadow[k], v), k
    state = ema.state_dict()
    assert state["skipped_updates"] == 2
    fresh = EMA(mlp(batchnorm=True), 0.9, nonfinite="skip")
    fresh.load_state_dict(state)
    assert fresh.skipped_updates == 2


def test_nonfinite_check_policy_never_uses_a_nan_average() -> None:
    """nonfinite='check' (default): a NaN that reached the average blocks every read of it."""
    model, _, ema = trained()
    _poison(model, math.nan)
    ema.update()
    before = [p.detach().clone() for p in model.parameters()]
    for read in (ema.apply_shadow, ema.state_dict, ema.averaged_state_dict, ema.copy_to):
        with pytest.raises(NonFiniteError, match=r"\['0\.weight'\]"):
            read()
    assert not ema.is_applied
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p, b, rtol=0, atol=0, equal_nan=True)  # live kept as is


# -- the model changed after creation ------------------------------------------------


def test_added_adapter_detected() -> None:
    """Parameters added after creation (an adapter) are named at the next full check."""
    model, _, ema = trained()
    model.add_module("adapter", nn.Linear(3, 3))
    before = snapshot(ema)
    with pytest.raises(RuntimeError, match=r"gained tensors .*'adapter\.weight'"):
        ema.apply_shadow()
    assert not ema.is_applied
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


@pytest.mark.parametrize("target", [torch.float64, torch.bfloat16, "meta"])
def test_model_moved_detected_at_next_update(target: object) -> None:
    """model.to(dtype or device) after creation raises at the very next update; nothing changes."""
    model, _, ema = trained()  # num_updates=3: not a periodic full check
    model.to(target)  # type: ignore[call-overload]
    before = snapshot(ema)
    with pytest.raises(RuntimeError, match=f"-> {target}"):
        ema.update()
    assert_unchanged(ema, before)


def test_replaced_parameter_detected() -> None:
    """load_state_dict(assign=True) replaces Parameters; the EMA refuses to follow stale ones."""
    model, _, ema = trained()
    model.load_state_dict(mlp(batchnorm=True).state_dict(), assign=True)
    before = snapshot(ema)
    with pytest.raises(RuntimeError, match=r"0\.weight: the Parameter object was replaced"):
        ema.update()
    assert_unchanged(ema, before)


# -- swapping misuse ---------------------------------------------------------------


def test_restore_without_apply() -> None:
    """restore() without apply_shadow() raises SwapError and changes nothing."""
    model, _, ema = trained()
    live = [p.detach().clone() for p in model.parameters()]
    before = snapshot(ema)
    with pytest.raises(SwapError, match="not applied"):
        ema.restore()
    assert_unchanged(ema, before)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), live, strict=True))


def test_double_apply_keeps_live_weights() -> None:
    """A second apply_shadow() raises; restore() then brings back the true live weights."""
    model, _, ema = trained()
    live = [p.detach().clone() for p in model.parameters()]
    ema.apply_shadow()
    with pytest.raises(SwapError, match="apply_shadow"):
        ema.apply_shadow()
    ema.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), live, strict=True))


def test_optimizer_step_while_applied_touches_nothing() -> None:
    """optimizer.step() while the average is applied raises; weights and optimizer untouched."""
    model, _, ema = trained()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    live = [p.detach().clone() for p in model.parameters()]
    before = snapshot(ema)
    model.eval()  # a train-mode forward would update BatchNorm's swapped-in statistics
    with ema.applied():
        nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.zeros(8).long()).backward()
        with pytest.raises(SwapError, match=r"Adam\.step"):
            opt.step()
        with pytest.raises(SwapError, match="update"):
            ema.update()
    assert opt.state_dict()["state"] == {}  # Adam never started
    assert_unchanged(ema, before)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), live, strict=True))
    opt.step()  # after restore, training works again


def test_non_string_keys_listed() -> None:
    """Unexpected shadow keys of mixed types (int and str) are listed, not a sort TypeError."""
    _, _, ema = trained()
    state = ema.state_dict()
    state["shadow"] = {**state["shadow"], 3: torch.zeros(1), "x": torch.zeros(1)}
    before = snapshot(ema)
    with pytest.raises(KeyError, match=r"unexpected \[3, 'x'\]"):
        ema.load_state_dict(state)
    assert_unchanged(ema, before)
