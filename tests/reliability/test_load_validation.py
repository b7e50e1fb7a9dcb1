"""Validation of saved EMA states: bad tensors and junk fields are refused, the EMA unchanged."""

from __future__ import annotations

import collections
import copy
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from emaweights import EMA
from emaweights.schedules import Constant, HalfLife, PowerFunction, PowerWarmup, Warmup
from tests._models import mlp, train_step
from tests.reliability._state import assert_unchanged, snapshot

FAST, SLOW = 60, 2000  # fuzz examples: default suite, slow marker
TRIED: collections.Counter[str] = collections.Counter()
ALLOWED = (ValueError, KeyError, TypeError)


def trained() -> tuple[nn.Module, EMA]:
    """A model with BatchNorm and an EMA that has seen three steps."""
    model = mlp(batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, 0.9)
    for s in range(1, 4):
        train_step(model, opt, s)
        ema.update()
    return model, ema


def _settings(n: int) -> Any:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=n == FAST,  # the default suite is reproducible; slow runs explore
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    """Print how many inputs the fuzz tests tried (run with -s to see it)."""
    yield
    print(f"\nfuzz inputs tried: {dict(TRIED)}")


def test_last_step_after_step_refused() -> None:
    """A state whose last_step is after its step is refused naming both; nothing changes."""
    _, ema = trained()
    state = {**ema.state_dict(), "last_step": 1000}
    before = snapshot(ema)
    with pytest.raises(ValueError, match="1000"):
        ema.load_state_dict(state)
    assert_unchanged(ema, before)


@pytest.mark.parametrize(
    ("where", "key"),
    [((), "version"), ((), "format"), (("config",), "anchor"), (("config",), "nonfinite")],
)
@pytest.mark.parametrize("junk", [torch.zeros(0), torch.ones(3), torch.tensor(1)])
def test_tensor_in_plain_field_refused(where: tuple[str, ...], key: str, junk: object) -> None:
    """A tensor where a plain value belongs is refused with a ValueError (found by fuzzing)."""
    _, ema = trained()
    state = ema.state_dict()
    holder = state
    for k in where:
        holder[k] = dict(holder[k])
        holder = holder[k]
    holder[key] = junk
    before = snapshot(ema)
    with pytest.raises(ValueError, match="tensor"):
        ema.load_state_dict(state, strict=False)
    assert_unchanged(ema, before)


def test_nonfinite_saved_shadow_refused() -> None:
    """A saved shadow holding NaN is refused naming the tensor; nothing changes."""
    _, ema = trained()
    state = copy.deepcopy(ema.state_dict())
    state["shadow"]["0.weight"][1, 2] = math.nan
    before = snapshot(ema)
    with pytest.raises(ValueError, match=r"0\.weight: holds NaN"):
        ema.load_state_dict(state)
    assert_unchanged(ema, before)


def test_meta_and_uncastable_tensors_refused() -> None:
    """Saved tensors without data (meta) or of another kind (int for float) are refused."""
    _, ema = trained()
    state = copy.deepcopy(ema.state_dict())
    state["shadow"]["0.weight"] = torch.empty(16, 6, device="meta")
    state["shadow"]["0.bias"] = torch.zeros(16, dtype=torch.int64)
    before = snapshot(ema)
    with pytest.raises(ValueError) as err:
        ema.load_state_dict(state, strict=False)
    assert "0.weight: holds no data" in str(err.value)
    assert "0.bias: dtype torch.int64 cannot be cast" in str(err.value)
    assert_unchanged(ema, before)


def test_non_string_keys_listed() -> None:
    """Unexpected shadow keys of mixed types (int and str) are listed, not a sort TypeError."""
    _, ema = trained()
    state = ema.state_dict()
    state["shadow"] = {**state["shadow"], 3: torch.zeros(1), "x": torch.zeros(1)}
    before = snapshot(ema)
    with pytest.raises(KeyError, match=r"unexpected \[3, 'x'\]"):
        ema.load_state_dict(state)
    assert_unchanged(ema, before)


# Values a hand-edited or corrupted state could hold in place of a field.
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    st.builds(
        lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
        st.lists(st.integers(0, 17), max_size=2).map(tuple),
        st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool, torch.complex64]),
        st.sampled_from([0.0, 1.0, math.nan, math.inf]),
    ),
)


def _dag(depth: int) -> list[Any]:
    """A nested list whose full repr has 2**depth leaves in a few hundred bytes of pickle."""
    node: list[Any] = [0]
    for _ in range(depth):
        node = [node, node]
    return node


# Hostile classes: shared-node DAGs (a full repr never ends), counters up to the bound,
# every schedule kind (with a huge step gap, a per-step loop would never end).
HOSTILE = st.one_of(
    st.integers(1, 400).map(_dag),
    st.integers(0, 2**62),
    st.sampled_from(
        [
            Warmup(0.999).to_dict(),
            PowerWarmup().to_dict(),
            PowerWarmup(power=0.3, max_decay=1.0).to_dict(),
            Constant(0.9).to_dict(),
            HalfLife(10.0).to_dict(),
            PowerFunction(6.94).to_dict(),
        ]
    ),
)
COUNTERS = ("step", "last_step", "num_updates", "skipped_updates")


def _paths(state: dict[str, Any]) -> list[tuple[str, ...]]:
    """Every field of an EMA state, nested ones included."""
    out: list[tuple[str, ...]] = [(k,) for k in state]
    out += [("config", k) for k in state["config"]]
    out += [("config", "schedule", k) for k in state["config"]["schedule"]]
    out += [("shadow", k) for k in state["shadow"]]
    return out


@st.composite
def mutated_states(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """A valid EMA state with 1-3 fields replaced by junk, deleted, or added."""
    state = {
        **base,
        "config": {**base["config"], "schedule": dict(base["config"]["schedule"])},
        "shadow": {k: v.clone() for k, v in base["shadow"].items()},
    }
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(base)))
        holder = state
        for key in path[:-1]:
            holder = holder[key] if isinstance(holder.get(key), dict) else {}
        action = draw(st.sampled_from(["replace", "delete", "add", "hostile", "counters"]))
        if action == "replace":
            holder[path[-1]] = draw(JUNK)
        elif action == "hostile":
            holder[path[-1]] = draw(HOSTILE)
        elif action == "counters":  # far-apart counters, and a schedule that would loop per step
            state[draw(st.sampled_from(COUNTERS))] = draw(st.integers(0, 2**62))
            if isinstance(state.get("config"), dict):  # an earlier action may have replaced it
                state["config"]["schedule"] = draw(HOSTILE.filter(lambda v: isinstance(v, dict)))
        elif action == "delete":
            holder.pop(path[-1], None)
        else:
            holder[draw(st.one_of(st.text(max_size=6), st.integers()))] = draw(JUNK)
    return state


def _fuzz(n: int) -> None:
    _, ema = trained()
    base = ema.state_dict()
    base = {**base, "shadow": {k: v.clone() for k, v in base["shadow"].items()}}

    @_settings(n)
    @given(state=mutated_states(base), strict=st.booleans())
    def run(state: dict[str, Any], strict: bool) -> None:
        TRIED["EMA.load_state_dict"] += 1
        before = snapshot(ema)
        begin = time.perf_counter()
        try:
            ema.load_state_dict(state, strict=strict)
        except ALLOWED as err:
            assert str(err), "an error without a message"
            assert len(str(err)) < 4000, "an unbounded error message"
            assert_unchanged(ema, before)
        else:
            # An accepted state must also update in bounded time (no loop per step).
            try:
                ema.update()
            except ValueError as err:  # the step counter is at its bound
                assert "step must be" in str(err)
            shadow = [t for t in ema.shadow.values() if t.is_floating_point()]
            assert all(bool(torch.isfinite(t).all()) for t in shadow)
            ema.load_state_dict(base, strict=False)  # back to the base config and values
        assert time.perf_counter() - begin < 5.0, "a hostile state took unbounded time"

    run()


def test_fuzz_multi_field_mutations() -> None:
    """60 states, 1-3 fields replaced (junk, DAGs, huge counters, schedules), deleted or added.

    Each is accepted (finite, and it updates in bounded time) or refused intact
    with a bounded message.
    """
    _fuzz(FAST)


@pytest.mark.slow
def test_fuzz_multi_field_mutations_many() -> None:
    """2000 random (not derandomized) multi-field mutations: the same guarantee."""
    _fuzz(SLOW)
