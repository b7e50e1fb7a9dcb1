"""Tests of the decay schedules."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from emaweights import EMA
from emaweights.schedules import (
    Constant,
    HalfLife,
    PowerWarmup,
    Schedule,
    Warmup,
    as_schedule,
    schedule_from_dict,
)
from tests import _schedules as _user


def test_constant_decay_over_is_power() -> None:
    """A constant schedule's k-step decay is decay**k."""
    s = Constant(0.99)
    assert s.decay_over(17, 5) == pytest.approx(0.99**5, rel=1e-15)


def test_half_life_halves() -> None:
    """After half_life steps the weight on old values is exactly one half."""
    s = HalfLife(40)
    assert s.decay_over(0, 40) == pytest.approx(0.5, rel=1e-12)
    assert s(3) ** 40 == pytest.approx(0.5, rel=1e-12)


def test_warmup_formula() -> None:
    """Warmup is min(decay, (1+t)/(10+t))."""
    s = Warmup(0.95)
    for t in (0, 1, 5, 100, 10_000):
        assert s(t) == min(0.95, (1 + t) / (10 + t))


def test_power_warmup_formula() -> None:
    """PowerWarmup is 1 - (1 + t/inv_gamma)^-power, clipped."""
    s = PowerWarmup(inv_gamma=2.0, power=0.75, min_decay=0.0, max_decay=0.999)
    for t in (0, 3, 50, 10**6):
        assert s(t) == pytest.approx(min(0.999, 1 - (1 + t / 2.0) ** -0.75))


def test_decay_over_is_product_of_steps() -> None:
    """The decay of one update covering k steps is the product of per-step decays."""
    s = Warmup(0.999)
    assert s.decay_over(3, 4) == pytest.approx(math.prod(s(t) for t in range(3, 7)))


@pytest.mark.parametrize(
    "s", [Constant(0.9), HalfLife(12.5), Warmup(0.99, offset=1), PowerWarmup(offset=2)]
)
def test_round_trip(s: object) -> None:
    """to_dict / schedule_from_dict round-trips every schedule."""
    assert schedule_from_dict(s.to_dict()) == s  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.9", True])
def test_bad_decay_names_value(bad: object) -> None:
    """A decay outside [0, 1], NaN or not a number raises, naming the value."""
    with pytest.raises((ValueError, TypeError), match=repr(bad).replace("(", r"\(")):
        as_schedule(bad)  # type: ignore[arg-type]


def test_bad_half_life() -> None:
    """A non-positive half-life raises, naming it."""
    with pytest.raises(ValueError, match="-3"):
        HalfLife(-3)


def test_unknown_kind() -> None:
    """An unknown schedule kind in a checkpoint raises, naming it."""
    with pytest.raises(ValueError, match="'cosine'"):
        schedule_from_dict({"kind": "cosine"})


@pytest.mark.parametrize("offset", [0, 1, 7])
def test_warmup_offset_shifts_the_count(offset: int) -> None:
    """Warmup(offset=o) at t is the formula at t + o, i.e. Warmup() at t + o."""
    s, base = Warmup(0.95, offset=offset), Warmup(0.95)
    for t in (0, 1, 5, 100):
        assert s(t) == min(0.95, (1 + t + offset) / (10 + t + offset)) == base(t + offset)


@pytest.mark.parametrize("offset", [0, 1, 7])
def test_power_warmup_offset_shifts_the_count(offset: int) -> None:
    """PowerWarmup(offset=o) at t is PowerWarmup() at t + o, clip included."""
    kw = dict(inv_gamma=2.0, power=0.75, min_decay=0.2, max_decay=0.99)
    s, base = PowerWarmup(**kw, offset=offset), PowerWarmup(**kw)  # type: ignore[arg-type]
    for t in (0, 1, 3, 50, 10**6):
        assert s(t) == base(t + offset)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_offset_names_value(bad: object) -> None:
    """A negative or non-int offset raises, naming the value."""
    with pytest.raises(ValueError, match=repr(bad)):
        Warmup(0.9, offset=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=repr(bad)):
        PowerWarmup(offset=bad)  # type: ignore[arg-type]


def test_schedule_saved_before_offset_loads_with_offset_zero() -> None:
    """A warm-up schedule saved without 'offset' (older checkpoints) loads with offset 0."""
    assert schedule_from_dict({"kind": "warmup", "decay": 0.99}) == Warmup(0.99)
    old = {k: v for k, v in PowerWarmup(power=0.75).to_dict().items() if k != "offset"}
    assert schedule_from_dict(old) == PowerWarmup(power=0.75)


def test_schedule_missing_an_original_field_is_refused() -> None:
    """Only fields added later may be absent: a missing decay is still refused."""
    with pytest.raises(ValueError, match="expects fields"):
        schedule_from_dict({"kind": "warmup", "offset": 1})


def _exact_product(s: object, start: int, steps: int) -> float:
    """The oracle: the product of every per-step decay, summed in log space with fsum."""
    values = [s(t) for t in range(start, start + steps)]  # type: ignore[operator]
    if min(values) == 0.0:
        return 0.0
    return math.exp(math.fsum(math.log(v) for v in values))


_LONG = [
    Warmup(0.999),
    Warmup(1.0),
    PowerWarmup(),
    PowerWarmup(inv_gamma=10.0, power=0.75, min_decay=0.1, max_decay=0.99999),
    PowerWarmup(power=0.3, max_decay=1.0),
    Warmup(0.999, offset=7),
    PowerWarmup(inv_gamma=10.0, power=0.75, min_decay=0.1, max_decay=0.99999, offset=3),
]


@pytest.mark.parametrize("s", _LONG, ids=repr)
@pytest.mark.parametrize(("start", "steps"), [(0, 2000), (3, 50_000), (100_000, 300_000)])
def test_long_span_matches_the_exact_product(s: object, start: int, steps: int) -> None:
    """Past the exact-loop length the bounded forms still equal the product of per-step decays."""
    got = s.decay_over(start, steps)  # type: ignore[attr-defined]
    assert got == pytest.approx(_exact_product(s, start, steps), rel=1e-5, abs=1e-300)


@pytest.mark.parametrize("s", _LONG, ids=repr)
def test_huge_span_takes_bounded_time(s: object) -> None:
    """decay_over across 10**12 steps returns a decay in [0, 1] at once, not a loop per step."""
    import time

    begin = time.perf_counter()
    got = s.decay_over(1, 10**12)  # type: ignore[attr-defined]
    assert time.perf_counter() - begin < 0.5
    assert 0.0 <= got <= s.decay_over(1, 2000)  # type: ignore[attr-defined]


def test_user_schedule_resumes_in_a_new_process(tmp_path: Path) -> None:
    """A user Schedule subclass with a kind round-trips through state_dict into a fresh process."""
    net = _user.model()
    ema = EMA(net, _user.SCHEDULE)
    _user.train(net, ema, range(3))
    torch.save({"model": net.state_dict(), "ema": ema.state_dict()}, tmp_path / "at3.pt")
    _user.train(net, ema, range(3, 6))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    subprocess.run(
        [sys.executable, "-m", "tests._schedules", str(tmp_path)],
        check=True,
        cwd=root,
        env=env,
        timeout=120,
    )
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for name, t in ema.shadow.items():
        assert torch.equal(resumed[name], t), name


def test_user_schedule_round_trips_by_kind() -> None:
    """to_dict of a registered user schedule rebuilds an equal instance of its class."""
    data = _user.SCHEDULE.to_dict()
    assert data["kind"] == "tests.ramp"
    assert schedule_from_dict(data) == _user.SCHEDULE


def test_unknown_kind_on_load_is_refused_with_the_ema_unchanged() -> None:
    """A state naming a kind nobody registered is refused, naming the kind; nothing changes."""
    net = _user.model()
    ema = EMA(net, _user.SCHEDULE)
    _user.train(net, ema, range(2))
    state = ema.state_dict()
    state["config"] = {**state["config"], "schedule": {"kind": "elsewhere.cosine", "peak": 0.9}}
    before = {n: t.clone() for n, t in ema.shadow.items()}
    with pytest.raises(ValueError, match=r"'elsewhere\.cosine'"):
        ema.load_state_dict(state, strict=False)
    assert ema.step == 2
    assert all(torch.equal(before[n], t) for n, t in ema.shadow.items())


def test_a_kind_cannot_be_claimed_twice() -> None:
    """A second class claiming a registered kind is refused at definition, naming both."""
    with pytest.raises(TypeError, match="'constant' is already taken"):

        @dataclass(frozen=True)
        class Mine(Schedule):
            kind: ClassVar[str] = "constant"

            def __call__(self, step: int) -> float:
                return 0.5


def test_a_subclass_without_kind_cannot_be_saved() -> None:
    """A subclass without a kind of its own fails to serialize, saying what to add."""

    @dataclass(frozen=True)
    class Anonymous(Constant):
        pass

    with pytest.raises(TypeError, match="kind: ClassVar"):
        Anonymous(0.5).to_dict()
