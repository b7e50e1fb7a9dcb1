"""The conformance battery, run over every averager in ``registry.AVERAGERS``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emaweights.averager import AveragerProtocol
from tests.conformance.registry import (
    AVERAGERS,
    Case,
    Tied,
    bn_model,
    copy_files,
    train_step,
    use_scratch,
)

ROOT = Path(__file__).resolve().parents[2]
cases = pytest.mark.parametrize("case", AVERAGERS, ids=[c.name for c in AVERAGERS])


def _trained(case: Case, steps: int = 3) -> tuple[torch.nn.Module, object]:
    model = bn_model()
    averager = case.make(model)
    for step in range(1, steps + 1):
        train_step(model, step)
        averager.update()
    return model, averager


def _same(a: object, b: object) -> bool:
    """Bitwise equality of nested states (tensors, mappings, lists, plain values)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _live(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@cases
def test_protocol_attributes(case: Case) -> None:
    """Every averager has the protocol's methods and counters."""
    _, averager = _trained(case)
    assert isinstance(averager, AveragerProtocol)
    assert averager.step == 3 and 0 < averager.num_updates <= averager.step


@cases
def test_resume_in_a_new_process_is_bitwise(case: Case, tmp_path: Path) -> None:
    """State saved at step 3 and resumed in a fresh interpreter equals the uninterrupted run."""
    use_scratch(tmp_path / "run")  # files the uninterrupted run writes (post-hoc snapshots)
    model, averager = _trained(case)
    torch.save(
        {"model": model.state_dict(), "averager": averager.state_dict()}, tmp_path / "at3.pt"
    )
    copy_files(tmp_path / "run", tmp_path)  # the worker resumes with the files of step 3
    for step in range(4, 7):
        train_step(model, step)
        averager.update()
    expected = averager.averaged_state_dict()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    subprocess.run(
        [sys.executable, "-m", "tests.conformance._resume_worker", case.name, str(tmp_path)],
        check=True,
        cwd=ROOT,
        env=env,
    )
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert resumed.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(resumed[name], t), name


@cases
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_swap_and_restore_under_grad_modes_with_batchnorm(case: Case, mode: str) -> None:
    """applied() under inference_mode/no_grad swaps the average in and the live weights back."""
    model, averager = _trained(case)
    live = _live(model)
    expected = averager.averaged_state_dict()
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx, averager.applied() as m:
        assert torch.equal(m.state_dict()["0.weight"], expected["0.weight"])
        m.eval()
        m(torch.randn(2, 4))
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    model.train()
    model(torch.randn(3, 4)).sum().backward()  # the restored weights are ordinary tensors


@cases
@pytest.mark.parametrize("order", ["ab", "ba"])
def test_two_averagers_restored_in_either_order(case: Case, order: str) -> None:
    """Two averagers applied a then b, restored in either order: live weights back, unaliased."""
    model, a = _trained(case)
    b = AVERAGERS[0].make(model)
    train_step(model, 9)
    b.update()
    live = _live(model)
    first = a if hasattr(a, "apply_shadow") else a[0]  # MultiEMA: swap its first average
    first.apply_shadow()
    b.apply_shadow()
    for x in (first, b) if order == "ab" else (b, first):
        x.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    storages = [
        t.untyped_storage().data_ptr() for t in (*first.shadow.values(), *b.shadow.values())
    ]
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() not in storages


@cases
def test_tied_weights_export_the_average_under_every_alias(case: Case) -> None:
    """averaged_state_dict() and copy_to() give every tied name the averaged tensor."""
    model = Tied()
    averager = case.make(model)
    for step in range(1, 4):
        train_step(model, step)
        averager.update()
    out = averager.averaged_state_dict()
    assert torch.equal(out["head.weight"], out["emb.weight"])
    assert not torch.equal(out["head.weight"], model.emb.weight.detach())
    other = Tied()
    averager.copy_to(other)
    assert torch.equal(other.head.weight, out["emb.weight"])
    assert other.head.weight is other.emb.weight


@cases
def test_bad_state_refused_with_the_averager_unchanged(case: Case) -> None:
    """A state of another architecture is refused; the averager's state is unchanged."""
    _, averager = _trained(case)
    before = averager.state_dict()
    _, other = _trained(case)
    bad = other.state_dict()
    if "emas" in bad:
        bad["emas"][1] = {**bad["emas"][1], "step": -1}
    else:
        bad["shadow"] = {**bad["shadow"], "0.weight": torch.zeros(2, 2)}
    with pytest.raises((ValueError, KeyError)):
        averager.load_state_dict(bad)
    assert _same(averager.state_dict(), before)


@cases
def test_skipped_updates_leave_the_average_alone(case: Case) -> None:
    """nonfinite="skip" skips a NaN update: average and num_updates unchanged."""
    model = bn_model()
    averager = case.make(model, nonfinite="skip")
    train_step(model, 1)
    averager.update()
    before = averager.averaged_state_dict()
    n = averager.num_updates
    saved = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    averager.update()
    with torch.no_grad():
        model[0].weight.copy_(saved)
    assert averager.num_updates == n
    for k, v in averager.averaged_state_dict().items():
        assert torch.equal(v, before[k]), k
