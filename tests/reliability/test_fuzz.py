"""Fuzzing the loaders: corrupt bytes and corrupt states give a clear error, never damage."""

from __future__ import annotations

import collections
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emaweights import EMA, io
from tests._models import mlp
from tests.reliability.test_bad_input import assert_unchanged, snapshot

FAST, SLOW = 60, 2000  # examples per strategy: default suite, slow marker
TRIED: collections.Counter[str] = collections.Counter()
ALLOWED = (ValueError, KeyError, TypeError)  # LoadError is a ValueError


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
    """Print how many inputs each fuzz target was given (run with -s to see it)."""
    yield
    print(f"\nfuzz inputs tried: {dict(TRIED)}, total {sum(TRIED.values())}")


@pytest.fixture(scope="module")
def files() -> Iterator[dict[str, Any]]:
    """A scratch folder, a trained EMA and valid files to corrupt."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        model = mlp(batchnorm=True)
        ema = EMA(model, 0.9)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update()
        io.save_state(ema.state_dict(), folder / "valid.pt")
        io.save_safetensors(ema.averaged_state_dict(), folder / "valid.safetensors")
        yield {
            "folder": folder,
            "ema": ema,
            "state": (folder / "valid.pt").read_bytes(),
            "st": (folder / "valid.safetensors").read_bytes(),
        }


def corrupted(valid: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, truncations of ``valid``, and ``valid`` with a few bytes overwritten."""
    flips = st.lists(
        st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), min_size=1, max_size=8
    )

    def flip(edits: list[tuple[int, int]]) -> bytes:
        out = bytearray(valid)
        for i, b in edits:
            out[i] = b
        return bytes(out)

    return st.one_of(
        st.binary(max_size=2048),
        st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),
        flips.map(flip),
    )


def _check_state_file(files: dict[str, Any], data: bytes) -> None:
    """Load fuzzed bytes; anything loaded must then be accepted or refused cleanly by the EMA."""
    TRIED["io.load_state"] += 1
    path = files["folder"] / "fuzz.pt"
    path.write_bytes(data)
    try:
        state = io.load_state(path)
    except io.LoadError as err:
        assert "fuzz.pt" in str(err)
        return
    _check_ema_load(files["ema"], state)


def _check_ema_load(ema: EMA, state: Any) -> None:
    """EMA.load_state_dict either accepts (finite shadow) or raises cleanly, changing nothing."""
    before = snapshot(ema)
    try:
        ema.load_state_dict(state)
    except ALLOWED as err:
        assert str(err), "an error without a message"
        assert_unchanged(ema, before)
        return
    assert all(bool(torch.isfinite(t).all()) for t in ema.shadow.values() if t.is_floating_point())


def _check_st_file(files: dict[str, Any], data: bytes) -> None:
    TRIED["io.load_safetensors"] += 1
    path = files["folder"] / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        out = io.load_safetensors(path)
    except io.LoadError as err:
        assert "fuzz.safetensors" in str(err)
        return
    assert all(isinstance(v, torch.Tensor) for v in out.values())


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
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            holder[path[-1]] = draw(JUNK)
        elif action == "delete":
            holder.pop(path[-1], None)
        else:
            holder[draw(st.one_of(st.text(max_size=6), st.integers()))] = draw(JUNK)
    return state


def _fuzz_state_dict(files: dict[str, Any], n: int) -> None:
    base = files["ema"].state_dict()
    base = {**base, "shadow": {k: v.clone() for k, v in base["shadow"].items()}}

    @_settings(n)
    @given(state=mutated_states(base), strict=st.booleans())
    def run(state: dict[str, Any], strict: bool) -> None:
        TRIED["EMA.load_state_dict"] += 1
        ema = files["ema"]
        before = snapshot(ema)
        try:
            ema.load_state_dict(state, strict=strict)
        except ALLOWED as err:
            assert str(err)
            assert_unchanged(ema, before)
        else:
            ema.load_state_dict(base)  # back to the valid state for the next example

    run()


def test_fuzz_load_state(files: dict[str, Any]) -> None:
    """60 corrupt EMA-state files: each raises LoadError naming the file, or loads cleanly."""
    _settings(FAST)(
        given(data=corrupted(files["state"]))(lambda data: _check_state_file(files, data))
    )()


def test_fuzz_load_safetensors(files: dict[str, Any]) -> None:
    """60 corrupt safetensors files: each raises LoadError naming the file, or loads tensors."""
    _settings(FAST)(given(data=corrupted(files["st"]))(lambda data: _check_st_file(files, data)))()


def test_fuzz_ema_load_state_dict(files: dict[str, Any]) -> None:
    """60 mutated EMA states: each is refused with a message and no change, or accepted."""
    _fuzz_state_dict(files, FAST)


@pytest.mark.slow
def test_fuzz_loaders_many(files: dict[str, Any]) -> None:
    """2000 inputs per loader (random, not derandomized): the same guarantees as above."""
    _settings(SLOW)(
        given(data=corrupted(files["state"]))(lambda data: _check_state_file(files, data))
    )()
    _settings(SLOW)(given(data=corrupted(files["st"]))(lambda data: _check_st_file(files, data)))()
    _fuzz_state_dict(files, SLOW)
