"""averager.module: the averaged model as a callable module beside the live one."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from emaweights import EMA, MultiEMA
from tests._models import train_step


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3))


def _trained(steps: int = 4, **options: object) -> tuple[nn.Module, EMA, torch.optim.Optimizer]:
    model = _model()
    ema = EMA(model, 0.8, anchor="debiased", **options)  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(steps):
        train_step(model, opt, i)
        ema.update()
    return model, ema, opt


def _reference(model: nn.Module, ema: EMA) -> nn.Module:
    """The oracle: a deep copy of the model holding the average, in eval mode."""
    ref = copy.deepcopy(model)
    ema.copy_to(ref)
    return ref.eval()


def test_module_computes_what_the_averaged_model_computes() -> None:
    """averager.module(x) equals a copy of the model holding the average, in eval mode."""
    model, ema, _ = _trained()
    x = torch.randn(5, 6)
    assert torch.equal(ema.module(x), _reference(model, ema)(x))


def test_module_leaves_the_live_model_alone() -> None:
    """Calling the module changes neither the live weights, buffers, nor the training flag."""
    model, ema, _ = _trained()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema.module(torch.randn(5, 6))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_module_makes_no_copy_of_the_weights() -> None:
    """Each weight the model sees during the call is the storage itself (same data pointer)."""
    model, ema, _ = _trained()
    seen: list[int] = []
    linear = model[0]
    hook = linear.register_forward_pre_hook(lambda m, a: seen.append(m.weight.data_ptr()))
    ema.module(torch.randn(5, 6))
    hook.remove()
    assert seen == [ema.shadow["0.weight"].data_ptr()]


def test_module_follows_every_update_and_load() -> None:
    """The same module object reflects later updates and load_state_dict without a re-sync."""
    model, ema, opt = _trained()
    module = ema.module
    x = torch.randn(5, 6)
    first = module(x)
    state = copy.deepcopy(ema.state_dict())  # state_dict() holds views of the storage
    train_step(model, opt, 99)
    ema.update()
    assert ema.module is module
    assert torch.equal(module(x), _reference(model, ema)(x))
    assert not torch.equal(module(x), first)
    ema.load_state_dict(state)
    assert torch.equal(module(x), first)


def test_module_uses_averaged_batchnorm_statistics_and_never_updates_them() -> None:
    """BatchNorm runs on the averaged running statistics, which the call does not change."""
    model, ema, _ = _trained()
    running = ema.shadow["1.running_mean"].clone()
    ema.module(torch.randn(64, 6) * 5 + 3)
    assert torch.equal(ema.shadow["1.running_mean"], running)
    assert not torch.equal(model[1].running_mean, running)  # the live statistics differ


def test_module_refuses_training() -> None:
    """It has no parameters (an optimizer over them raises), and .train() keeps eval mode."""
    _, ema, _ = _trained()
    assert list(ema.module.parameters()) == []
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.SGD(ema.module.parameters(), lr=0.1)
    assert ema.module.train() is ema.module and not ema.module.training
    out = ema.module(torch.randn(5, 6))
    assert not out.requires_grad  # no gradient can reach the average


def test_module_inside_a_parent_module_keeps_parent_parameters_clean() -> None:
    """A parent holding the teacher: its parameters are the student's only; .train() works."""
    model, ema, _ = _trained()

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = model
            self.teacher = ema.module

    pair = Pair().train()
    assert {id(p) for p in pair.parameters()} == {id(p) for p in model.parameters()}
    assert not pair.teacher.training
    assert all(k.startswith("student.") for k in pair.state_dict())


def test_module_uses_live_values_of_tensors_not_averaged() -> None:
    """An excluded parameter is the live one inside the module, as under applied()."""
    model, ema, _ = _trained(exclude=["3.*"])
    x = torch.randn(5, 6)
    ref = _reference(model, ema)
    ref[3].load_state_dict(model[3].state_dict())
    assert torch.equal(ema.module(x), ref(x))


def test_module_with_an_fp32_shadow_of_a_bf16_model_matches_applied() -> None:
    """A shadow of another dtype is cast per call: the result equals evaluating under applied()."""
    model = _model().to(torch.bfloat16)
    ema = EMA(model, 0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        train_step(model, opt, i)
        ema.update()
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ema.applied():
            expected = model(x)
        assert torch.equal(ema.module(x), expected)


def test_module_works_under_torch_compile() -> None:
    """torch.compile(averager.module) computes the average's output and follows updates."""
    model, ema, opt = _trained()
    compiled = torch.compile(ema.module, backend="eager")
    x = torch.randn(5, 6)
    assert torch.equal(compiled(x), _reference(model, ema)(x))
    train_step(model, opt, 7)
    ema.update()
    assert torch.equal(compiled(x), _reference(model, ema)(x))


def test_module_of_a_multi_ema_member() -> None:
    """multi[i].module computes with the i-th average."""
    model = _model()
    multi = MultiEMA(model, [0.5, 0.9], anchor="debiased")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        train_step(model, opt, i)
        multi.update()
    x = torch.randn(5, 6)
    assert torch.equal(multi[1].module(x), _reference(model, multi[1])(x))
    assert not torch.equal(multi[0].module(x), multi[1].module(x))


def test_mean_teacher_step_trains_the_student_only() -> None:
    """A consistency loss against the teacher trains the student and leaves the average."""
    model, ema, opt = _trained()
    before = {k: v.clone() for k, v in ema.shadow.items()}
    x = torch.randn(8, 6)
    with torch.no_grad():
        target = ema.module(x)
    loss = nn.functional.mse_loss(model(x), target)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in ema.shadow.items())


@pytest.mark.parametrize("anchor", ["init", "debiased"])
def test_compiled_module_compiles_once_across_updates(anchor: str) -> None:
    """torch.compile(averager.module) builds one graph, reused after every update."""
    model = _model()
    ema = EMA(model, 0.8, anchor=anchor)  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    graphs: list[object] = []

    def backend(gm: torch.fx.GraphModule, inputs: object) -> object:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(ema.module, backend=backend)
    x = torch.randn(5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anchor="init": the early-average warning
        for i in range(4):
            train_step(model, opt, i)
            ema.update()
            assert torch.equal(compiled(x), _reference(model, ema)(x))
    assert len(graphs) == 1
