"""docs/reliability.md: stochastic rounding draws from a generator the EMA owns and saves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emaweights import EMA

DECAY, STEPS, CUT = 0.99, 6, 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(256, 4).bfloat16()


def _drive(model: nn.Module, ema: EMA, steps: range) -> None:
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (step + 1))
        ema.update()


def _resumed() -> dict[str, torch.Tensor]:
    model = _model()
    first = EMA(model, DECAY, dtype=torch.bfloat16, rounding="stochastic", seed=7)
    _drive(model, first, range(CUT))
    state = first.state_dict()
    torch.manual_seed(123)  # what a new process would have
    second = EMA(model, DECAY, dtype=torch.bfloat16, rounding="stochastic", seed=99)
    second.load_state_dict(state)
    _drive(model, second, range(CUT, STEPS))
    return {n: t.clone() for n, t in second.shadow.items()}


def _uninterrupted(seed: int = 7) -> dict[str, torch.Tensor]:
    model = _model()
    ema = EMA(model, DECAY, dtype=torch.bfloat16, rounding="stochastic", seed=seed)
    _drive(model, ema, range(STEPS))
    return {n: t.clone() for n, t in ema.shadow.items()}


def test_resume_is_bit_exact_without_saving_torch_rng() -> None:
    """A state_dict round trip resumes the rounding noise: bitwise the uninterrupted run."""
    oracle, resumed = _uninterrupted(), _resumed()
    for name, t in oracle.items():
        assert torch.equal(resumed[name], t), name


def test_the_seed_matters() -> None:
    """Another seed gives other rounding noise (so the bitwise resume above is not vacuous)."""
    a, b = _uninterrupted(7), _uninterrupted(8)
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_updates_leave_the_global_rng_untouched() -> None:
    """Stochastic updates neither read nor advance torch's global generator."""
    model = _model()
    ema = EMA(model, DECAY, dtype=torch.bfloat16, rounding="stochastic")
    before = torch.get_rng_state()
    _drive(model, ema, range(STEPS))
    assert torch.equal(torch.get_rng_state(), before)


def test_default_seed_comes_from_torch_once_at_construction() -> None:
    """Without seed=, the EMA seeds itself from torch's generator: manual_seed reproduces it."""
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        model = _model()
        torch.manual_seed(5)
        ema = EMA(model, DECAY, dtype=torch.bfloat16, rounding="stochastic")
        _drive(model, ema, range(STEPS))
        runs.append({n: t.clone() for n, t in ema.shadow.items()})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_state_without_generator_is_refused_strictly() -> None:
    """A stochastic state lacking its generator is refused under strict, loaded otherwise."""
    model = _model()
    ema = EMA(model, DECAY, dtype=torch.bfloat16, rounding="stochastic", seed=1)
    _drive(model, ema, range(2))
    state = ema.state_dict()
    del state["rounding_rng"]
    with pytest.raises(ValueError, match="rounding_rng"):
        ema.load_state_dict(state)
    ema.load_state_dict(state, strict=False)
    assert ema.step == 2


def test_bad_generator_state_is_refused_with_the_ema_unchanged() -> None:
    """A corrupt generator state is refused, naming the field; the noise stream is unchanged."""
    model = _model()
    ema = EMA(model, DECAY, dtype=torch.bfloat16, rounding="stochastic", seed=1)
    _drive(model, ema, range(2))
    state = ema.state_dict()
    before = ema.storage.rng_state()
    state["rounding_rng"] = {"cpu": torch.zeros(3, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="rounding generator state for cpu"):
        ema.load_state_dict(state)
    state["rounding_rng"] = {"cuda:0": before["cpu"]}
    with pytest.raises(ValueError, match="devices"):
        ema.load_state_dict(state)
    assert torch.equal(ema.storage.rng_state()["cpu"], before["cpu"])


@pytest.mark.parametrize("bad", [-1, 1 << 63, 1.5, True])
def test_bad_seed_is_refused_naming_it(bad: object) -> None:
    """A seed that is not an int in [0, 2**63) is refused with its value."""
    with pytest.raises(ValueError, match=f"got {bad!r}"):
        EMA(_model(), DECAY, dtype=torch.bfloat16, rounding="stochastic", seed=bad)  # type: ignore[arg-type]


def test_seed_without_stochastic_rounding_is_refused() -> None:
    """seed= with rounding='nearest' has nothing to seed: refused, not ignored."""
    with pytest.raises(ValueError, match="seed=3 seeds stochastic rounding"):
        EMA(_model(), DECAY, seed=3)
