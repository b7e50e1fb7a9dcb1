"""The loaders answer corrupt, truncated and random input with a clear error, never a crash.

Hypothesis drives the inputs; the default suite tries a bounded number of examples
per test (see ``EXAMPLES``), the ``slow`` marker many more.
"""

from __future__ import annotations

import copy
import io as _io
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from emaweights import EMA, io

EXAMPLES = int(os.environ.get("EMAWEIGHTS_FUZZ_EXAMPLES", "150"))
FAST = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _valid_bytes() -> bytes:
    buf = _io.BytesIO()
    torch.save(EMA(_model()).state_dict(), buf)
    return buf.getvalue()


VALID = _valid_bytes()


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.arange(6.0).view(2, 3)})


VALID_ST = _safetensors_bytes()


def _load_bytes(tmp: Path, data: bytes, loader: Any) -> object:
    path = tmp / "f.bin"
    path.write_bytes(data)
    return loader(path)


@FAST
@given(data=st.binary(max_size=4096))
def test_random_bytes_state(tmp_path: Path, data: bytes) -> None:
    """Random bytes given to load_state raise LoadError."""
    with pytest.raises(io.LoadError):
        _load_bytes(tmp_path, data, io.load_state)


@FAST
@given(cut=st.integers(min_value=0, max_value=len(VALID) - 1))
def test_truncated_state(tmp_path: Path, cut: int) -> None:
    """Every truncation of a valid EMA state file raises LoadError."""
    with pytest.raises(io.LoadError):
        _load_bytes(tmp_path, VALID[:cut], io.load_state)


@FAST
@given(pos=st.integers(min_value=0, max_value=len(VALID) - 1), byte=st.integers(0, 255))
def test_flipped_byte_state(tmp_path: Path, pos: int, byte: int) -> None:
    """A corrupted byte either raises LoadError or yields a state the EMA validates."""
    data = bytearray(VALID)
    data[pos] = byte
    try:
        state = _load_bytes(tmp_path, bytes(data), io.load_state)
    except io.LoadError:
        return
    ema = EMA(_model())
    before = {k: v.clone() for k, v in ema.shadow.items()}
    try:
        ema.load_state_dict(state)  # type: ignore[arg-type]
    except (ValueError, KeyError):
        for k, v in ema.shadow.items():
            assert torch.equal(v, before[k])


@FAST
@given(data=st.binary(max_size=2048))
def test_random_bytes_safetensors(tmp_path: Path, data: bytes) -> None:
    """Random bytes given to load_safetensors raise LoadError."""
    with pytest.raises(io.LoadError):
        _load_bytes(tmp_path, data, io.load_safetensors)


@FAST
@given(cut=st.integers(min_value=0, max_value=len(VALID_ST) - 1))
def test_truncated_safetensors(tmp_path: Path, cut: int) -> None:
    """Every truncation of a valid safetensors file raises LoadError."""
    with pytest.raises(io.LoadError):
        _load_bytes(tmp_path, VALID_ST[:cut], io.load_safetensors)


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_paths = st.sampled_from(
    [
        ("step",),
        ("last_step",),
        ("num_updates",),
        ("init_weight",),
        ("version",),
        ("format",),
        ("shadow",),
        ("config",),
        ("config", "update_every"),
        ("config", "start_step"),
        ("config", "anchor"),
        ("config", "schedule"),
        ("config", "schedule", "decay"),
        ("config", "schedule", "kind"),
        ("shadow", "0.weight"),
    ]
)


@FAST
@given(path=_paths, value=_values)
def test_mutated_state_rejected_cleanly(path: tuple[str, ...], value: object) -> None:
    """A state with one field replaced is loaded or rejected with ValueError/KeyError, unchanged."""
    ema = EMA(_model())
    state = copy.deepcopy(ema.state_dict())
    node: Any = state
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    target = EMA(_model(), 0.5)
    before = ({k: v.clone() for k, v in target.shadow.items()}, target.step, target.schedule)
    try:
        target.load_state_dict(state)
    except (ValueError, KeyError):
        after = ({k: v.clone() for k, v in target.shadow.items()}, target.step, target.schedule)
        assert after[1:] == before[1:]
        for k, v in after[0].items():
            assert torch.equal(v, before[0][k])


@pytest.mark.slow
def test_fuzz_many() -> None:
    """Re-run the fuzz tests with 20x the examples (slow suite)."""
    import subprocess
    import sys

    env = {**os.environ, "EMAWEIGHTS_FUZZ_EXAMPLES": str(EXAMPLES * 20)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-m",
            "not slow",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:]
