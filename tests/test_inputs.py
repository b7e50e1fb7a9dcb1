"""Input validation of the averager surface: numbers, bools, patterns, indices, mappings, steps."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from emaweights import EMA, MultiEMA
from tests._models import mlp, train_step


@pytest.mark.parametrize(
    "decay", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor([0.5])]
)
def test_real_scalar_decays_are_accepted(decay: object) -> None:
    """NumPy scalars and one-element real tensors are decays like the float they hold."""
    torch.manual_seed(0)
    model = mlp()
    a, b = EMA(model, decay), EMA(model, 0.5)  # type: ignore[arg-type]
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 0)
    a.update()
    b.update()
    assert type(a.schedule.decay) is float  # type: ignore[attr-defined]
    assert all(torch.equal(a.shadow[k], b.shadow[k]) for k in a.shadow)


@pytest.mark.parametrize(
    ("decay", "shown"),
    [
        (torch.tensor([0.5, 0.9]), "shape (2,)"),
        (torch.tensor(True), "shape ()"),
        (torch.tensor(0.5 + 0j), "shape ()"),
        (np.bool_(True), "True"),
        (0.5j, "0.5j"),
        ("0.9", "'0.9'"),
    ],
)
def test_non_real_or_multi_element_decays_are_refused(decay: object, shown: str) -> None:
    """A multi-element, bool or complex decay raises TypeError naming what was passed."""
    with pytest.raises(TypeError, match="real number") as err:
        EMA(mlp(), decay)  # type: ignore[arg-type]
    assert shown in str(err.value)


@pytest.mark.parametrize("name", ["foreach", "include_frozen"])
def test_non_bool_flags_are_refused(name: str) -> None:
    """foreach='yes' / include_frozen='yes' raise TypeError naming the value."""
    with pytest.raises(TypeError, match=f"{name} must be .*'yes'"):
        EMA(mlp(), 0.9, **{name: "yes"})  # type: ignore[arg-type]


def test_exclude_pattern_matching_nothing_warns_naming_it() -> None:
    """An exclude pattern matching no tensor warns with the pattern; a matching one is silent."""
    with pytest.warns(UserWarning, match=r"\['encoder\.\*'\]"):
        EMA(mlp(), 0.9, exclude=["encoder.*", "0.*"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EMA(mlp(), 0.9, exclude=["0.*"])


@pytest.mark.parametrize("use", ["applied", "getitem", "copy_to", "export"])
def test_multi_ema_index_out_of_range_names_index_and_count(use: str) -> None:
    """MultiEMA(…, 2 decays).applied(5) etc. raise IndexError naming 5 and the count 2."""
    multi = MultiEMA(mlp(), [0.9, 0.99])
    with pytest.raises(IndexError, match=r"index 5 .*holds 2 decays"):
        if use == "applied":
            multi.applied(5).__enter__()
        elif use == "getitem":
            multi[5]
        elif use == "copy_to":
            multi.copy_to(mlp(), index=5)
        else:
            multi.averaged_state_dict(5)


def test_shadow_is_read_only() -> None:
    """ema.shadow['w'] = t raises instead of being silently ignored."""
    ema = EMA(mlp(), 0.9)
    with pytest.raises(TypeError):
        ema.shadow["0.weight"] = torch.zeros(16, 6)  # type: ignore[index]
    for change in (lambda m: m.update({}), lambda m: m.pop("0.weight"), lambda m: m.clear()):
        with pytest.raises(TypeError, match="read-only"):
            change(ema.shadow)
    assert set(ema.shadow) == set(ema.storage.state())


def test_shadow_copies_and_pickles_as_a_plain_dict(tmp_path: Path) -> None:
    """dict(ema.shadow) saves for weights_only loads; pickling ema.shadow gives a plain dict."""
    ema = EMA(mlp(), 0.9)
    torch.save(dict(ema.shadow), tmp_path / "shadow.pt")
    loaded = torch.load(tmp_path / "shadow.pt", weights_only=True)
    unpickled = pickle.loads(pickle.dumps(ema.shadow))
    for got in (loaded, unpickled):
        assert type(got) is dict
        assert all(torch.equal(got[k], v) for k, v in ema.shadow.items())


def test_the_same_step_twice_counts_once() -> None:
    """update(step=n) twice is one update: the second is a no-op, as the docstring says."""
    torch.manual_seed(0)
    model = mlp()
    once, twice = EMA(model, 0.5), EMA(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for n in (1, 2, 3):
        train_step(model, opt, n)
        once.update(step=n)
        twice.update(step=n)
        twice.update(step=n)
    assert twice.num_updates == once.num_updates == 3
    assert all(torch.equal(once.shadow[k], twice.shadow[k]) for k in once.shadow)


def test_update_with_the_model_says_what_to_do() -> None:
    """ema.update(model) (the timm/diffusers habit) raises TypeError telling to call update()."""
    model = mlp()
    ema = EMA(model, 0.9)
    with pytest.raises(TypeError, match=r"not a model .*call update\(\)"):
        ema.update(model)  # type: ignore[arg-type]
    assert ema.step == 0
