"""The conveniences of the base (module, stats, shadow, step checks, joining), per averager."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch

from tests.conformance.registry import AVERAGERS, Case, bn_model, train_step

cases = pytest.mark.parametrize("case", AVERAGERS, ids=[c.name for c in AVERAGERS])


def _single(averager: Any) -> Any:
    """The averager itself, or a composite's first member (MultiEMA)."""
    return averager[0] if hasattr(averager, "emas") else averager


def _trained(case: Case, steps: int = 3, **options: Any) -> tuple[torch.nn.Module, Any]:
    model = bn_model()
    averager = case.make(model, **options)
    for step in range(1, steps + 1):
        train_step(model, step)
        averager.update()
    return model, averager


@cases
def test_module_computes_with_the_exported_average(case: Case) -> None:
    """averager.module(x) equals the model loaded with averaged_state_dict(), in eval mode."""
    model, averager = _trained(case)
    one = _single(averager)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EarlyAverageWarning: a 3-step average
        ref = copy.deepcopy(model)
        ref.load_state_dict(one.averaged_state_dict())
        x = torch.randn(5, 4)
        assert torch.equal(one.module(x), ref.eval()(x))
    assert list(one.module.parameters()) == []


@cases
def test_shadow_is_read_only_and_stats_are_plain(case: Case) -> None:
    """The shadow refuses assignment; stats() gives floats and a drift tensor on request."""
    _, averager = _trained(case)
    one = _single(averager)
    with pytest.raises(TypeError):
        one.shadow["0.weight"] = torch.zeros(6, 4)
    stats = averager.stats(drift=True)
    drift = [v for k, v in stats.items() if k.startswith("drift")]
    assert drift and all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in drift)
    assert all(type(v) is float for k, v in stats.items() if not k.startswith("drift"))


@cases
def test_update_with_a_model_and_the_same_step_twice(case: Case) -> None:
    """update(model) raises TypeError; update(step=n) twice equals once."""
    model = bn_model()
    once, twice = case.make(model), case.make(copy.deepcopy(model))
    with pytest.raises(TypeError, match="not a model"):
        once.update(model)
    for n in (1, 2, 3):
        train_step(model, n)
        train_step(twice.model, n)
        once.update(step=n)
        twice.update(step=n)
        twice.update(step=n)
    assert once.num_updates == twice.num_updates
    a, b = _single(once).shadow, _single(twice).shadow
    assert all(torch.equal(a[k], b[k]) for k in a)


@cases
def test_an_unfrozen_layer_joins_and_the_rest_keeps_its_average(case: Case) -> None:
    """A layer frozen at creation and unfrozen later joins; the other tensors are not reset.

    ``train_step`` moves every parameter alike (frozen or not), so the twin whose layer stays
    frozen holds the oracle of every other tensor.
    """
    model = bn_model()
    model[0].requires_grad_(False)
    averager = case.make(model)
    twin = copy.deepcopy(model)
    reference = case.make(twin)  # never unfrozen: the oracle of the other tensors
    for step in range(1, 6):
        if step == 3:
            model[0].requires_grad_(True)
        train_step(model, step)
        train_step(twin, step)
        averager.update()
        reference.update()
    one, ref = _single(averager), _single(reference)
    assert "0.weight" in one.shadow and "0.weight" not in ref.shadow
    for k in ref.shadow:
        # Stochastic rounding in a low-precision shadow draws its noise over more elements once
        # a tensor joins, so the other tensors may round the other way.
        # Each update may round the other way, so allow one rounding step per update.
        t = ref.shadow[k]
        low = t.dtype in (torch.bfloat16, torch.float16)
        band = 5 * torch.finfo(t.dtype).eps * t.float().abs().max() if low else 0.0
        assert ((one.shadow[k].float() - t.float()).abs() <= band + 1e-6).all(), k
