"""Gradual unfreezing: tensors that become trainable join the average without resetting it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from emaweights import EMA, MultiEMA

DECAY = 0.8


def _backbone_and_adapter() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))  # 2: the adapter
    for p in [*model[0].parameters(), *model[1].parameters()]:
        p.requires_grad_(False)
    return model


def _step(model: nn.Module, seed: int) -> None:
    """One SGD step on every currently trainable parameter (a deterministic batch)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.functional.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, gr in zip(params, grads, strict=True):
            p.sub_(0.1 * gr)


def _oracle(history: list[dict[str, torch.Tensor]], start: int) -> torch.Tensor:
    """float64 EMA of one tensor's history, starting from its value at update ``start``."""
    avg = history[start]["w"].double()
    for h in history[start + 1 :]:
        avg = DECAY * avg + (1 - DECAY) * h["w"].double()
    return avg


def test_unfrozen_layer_joins_from_its_current_value_and_the_rest_keeps_averaging() -> None:
    """An unfrozen layer averages from its value then; the adapter's average goes on."""
    model = _backbone_and_adapter()
    ema = EMA(model, DECAY)
    assert set(ema.shadow) == {"2.weight", "2.bias"}
    adapter = [{"w": model[2].weight.detach().clone()}]
    layer: list[dict[str, torch.Tensor]] = []
    for t in range(1, 9):
        if t == 4:
            model[1].requires_grad_(True)  # unfreeze one layer mid-run
        _step(model, t)
        ema.update()
        adapter.append({"w": model[2].weight.detach().clone()})
        if t >= 4:
            layer.append({"w": model[1].weight.detach().clone()})
    assert "1.weight" in ema.shadow and "0.weight" not in ema.shadow
    torch.testing.assert_close(ema.shadow["2.weight"].double(), _oracle(adapter, 0))
    torch.testing.assert_close(ema.shadow["1.weight"].double(), _oracle(layer, 0))
    assert ema.step == 8 and ema.num_updates == 8  # counters not reset


def test_register_still_restarts_everything() -> None:
    """register() is the explicit restart: the whole average starts from the current weights."""
    model = _backbone_and_adapter()
    ema = EMA(model, DECAY)
    _step(model, 1)
    ema.update()
    ema.register()
    assert ema.step == 0 and torch.equal(ema.shadow["2.weight"], model[2].weight)


def test_resume_after_joining_is_bitwise() -> None:
    """A state saved after a join resumes bit for bit in an EMA made on the unfrozen model."""
    model = _backbone_and_adapter()
    ema = EMA(model, DECAY)
    for t in range(1, 4):
        _step(model, t)
        ema.update()
    model[1].requires_grad_(True)
    for t in range(4, 6):
        _step(model, t)
        ema.update()
    saved = copy.deepcopy(ema.state_dict())
    resumed_model = copy.deepcopy(model)
    resumed = EMA(resumed_model, DECAY)  # made fresh on the model as it is now
    resumed.load_state_dict(saved)
    for t in range(6, 9):
        _step(model, t)
        ema.update()
        _step(resumed_model, t)
        resumed.update()
    assert list(ema.shadow) == list(resumed.shadow)
    assert all(torch.equal(ema.shadow[k], resumed.shadow[k]) for k in ema.shadow)
    assert ema.state_dict()["init_weight"] == resumed.state_dict()["init_weight"]


def test_joined_layer_swaps_in_for_evaluation() -> None:
    """applied() after a join swaps the joined layer's average in too."""
    model = _backbone_and_adapter()
    ema = EMA(model, DECAY)
    _step(model, 1)
    ema.update()
    model[1].requires_grad_(True)
    _step(model, 2)
    ema.update()
    _step(model, 3)
    ema.update()
    with ema.applied():
        assert torch.equal(model[1].weight, ema.shadow["1.weight"])
    assert not torch.equal(model[1].weight, ema.shadow["1.weight"])


def test_multi_ema_members_join_and_stay_fused() -> None:
    """MultiEMA: the unfrozen layer joins every decay, each average as a lone EMA computes it."""
    model = _backbone_and_adapter()
    multi = MultiEMA(model, [0.5, DECAY])
    twin = copy.deepcopy(model)
    lone = EMA(twin, DECAY)
    for t in range(1, 6):
        if t == 3:
            model[1].requires_grad_(True)
            twin[1].requires_grad_(True)
        _step(model, t)
        _step(twin, t)
        multi.update()
        lone.update()
    assert set(multi[1].shadow) == set(lone.shadow)
    for k in lone.shadow:
        torch.testing.assert_close(multi[1].shadow[k], lone.shadow[k], rtol=0, atol=1e-6)


def test_changed_shape_is_still_refused() -> None:
    """Joining is for new tensors only: a tracked tensor that changed shape still raises."""
    model = _backbone_and_adapter()
    ema = EMA(model, DECAY)
    model[2].weight = nn.Parameter(torch.zeros(2, 9))
    with pytest.raises(RuntimeError, match=r"2\.weight"):
        ema.update()


def test_a_module_added_later_is_still_refused() -> None:
    """Only parameters frozen when the averager was made join; an added module raises, naming it."""
    model = _backbone_and_adapter()
    ema = EMA(model, DECAY)
    _step(model, 1)
    ema.update()
    model.append(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"gained tensors.*3\.weight"), ema.applied():
        pass


def test_unfrozen_before_the_first_update_joins_too() -> None:
    """A layer unfrozen between creation and the first update joins there, from its value then."""
    model = _backbone_and_adapter()
    ema = EMA(model, DECAY)
    model[1].requires_grad_(True)
    _step(model, 1)
    ema.update()
    assert torch.equal(ema.shadow["1.weight"], model[1].weight)
    joined = model[1].weight.detach().clone()
    _step(model, 2)
    ema.update()
    torch.testing.assert_close(
        ema.shadow["1.weight"], DECAY * joined + (1 - DECAY) * model[1].weight.detach()
    )


def test_with_many_frozen_tensors_an_unfrozen_one_joins_within_the_window() -> None:
    """With n frozen tensors, an unfrozen one joins within ceil(n / 16) updates (docs/ema.md)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(20)], nn.Linear(2, 2))
    for layer in model[:-1]:
        layer.requires_grad_(False)  # 40 frozen tensors: a window of 16 per update
    ema = EMA(model, DECAY)
    ema.update()
    model[7].bias.requires_grad_(True)
    for _ in range(-(-40 // 16)):
        ema.update()
    assert "7.bias" in ema.shadow and "7.weight" not in ema.shadow
