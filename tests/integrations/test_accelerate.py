"""The Accelerate helpers in a real Accelerate loop on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

accelerate = pytest.importorskip("accelerate")

from emaweights import EMA, SwapError  # noqa: E402
from emaweights.integrations.accelerate import STATE_FILE, prepare_ema, update  # noqa: E402

DECAY = 0.8


def _setup(seed: int, **ema_kwargs: Any) -> tuple[Any, nn.Module, Any, Any, EMA, list[Any]]:
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    ema = prepare_ema(accelerator, model, DECAY, **ema_kwargs)
    # Oracle input: the live parameters right after each real optimizer step.
    snaps: list[Any] = []
    opt.optimizer.register_step_post_hook(
        lambda *_: snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
    )
    return accelerator, model, opt, loader, ema, snaps


def _epoch(accelerator: Any, model: nn.Module, opt: Any, loader: Any, ema: EMA) -> None:
    model.train()
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            opt.step()
            opt.zero_grad()
        update(ema, accelerator)


def test_updates_once_per_optimizer_step() -> None:
    """8 micro-batches with accumulation 2: 4 optimizer steps, 4 updates, float64 EMA values."""
    accelerator, model, opt, loader, ema, snaps = _setup(0)
    theta0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    _epoch(accelerator, model, opt, loader, ema)
    assert len(snaps) == 4
    assert ema.num_updates == 4
    avg = theta0
    for snap in snaps:
        avg = {n: DECAY * avg[n] + (1 - DECAY) * snap[n].double() for n in avg}
    for name, expected in avg.items():
        torch.testing.assert_close(ema.shadow[name].double(), expected, rtol=1e-6, atol=1e-6)


def test_save_state_load_state_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """save_state after one epoch, load into a fresh run, train one more: equals two epochs."""
    accelerator, model, opt, loader, straight, _ = _setup(0)
    _epoch(accelerator, model, opt, loader, straight)
    accelerator.save_state(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / STATE_FILE).is_file()
    _epoch(accelerator, model, opt, loader, straight)
    expected = {k: v.clone() for k, v in straight.state_dict()["shadow"].items()}

    accelerator, model, opt, loader, resumed, _ = _setup(seed=42)
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert resumed.step == 4
    _epoch(accelerator, model, opt, loader, resumed)
    assert resumed.num_updates == straight.num_updates == 8
    for name, t in expected.items():
        torch.testing.assert_close(resumed.shadow[name], t, rtol=0, atol=0)


def test_register_for_checkpointing_round_trip(tmp_path: Path) -> None:
    """checkpointing='register' round-trips the EMA through Accelerate's own custom state."""
    accelerator, model, opt, loader, ema, _ = _setup(0, checkpointing="register")
    _epoch(accelerator, model, opt, loader, ema)
    accelerator.save_state(str(tmp_path / "ckpt"))
    expected = {k: v.clone() for k, v in ema.shadow.items()}
    accelerator, model, opt, loader, fresh, _ = _setup(seed=5, checkpointing="register")
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert fresh.step == 4
    for name, t in expected.items():
        assert torch.equal(fresh.shadow[name], t), name


def test_save_state_refused_while_applied(tmp_path: Path) -> None:
    """save_state inside ema.applied() raises before writing anything."""
    accelerator, model, opt, loader, ema, _ = _setup(0)
    _epoch(accelerator, model, opt, loader, ema)
    with ema.applied(), pytest.raises(SwapError, match="save_state"):
        accelerator.save_state(str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt" / STATE_FILE).exists()


def test_bad_checkpointing_choice_names_value() -> None:
    """An unknown checkpointing choice is refused, naming the value."""
    with pytest.raises(ValueError, match="'sometimes'"):
        _setup(0, checkpointing="sometimes")


def test_load_state_without_the_ema_file_warns_and_starts_afresh(tmp_path: Path) -> None:
    """Without the EMA file load_state warns; the average restarts from the restored weights.

    At step 0, as the Lightning and Trainer callbacks do.
    """
    accelerator, model, opt, loader, ema, _ = _setup(0, checkpointing="none")
    _epoch(accelerator, model, opt, loader, ema)
    accelerator.save_state(str(tmp_path / "plain"))
    restored = {
        k: v.detach().clone()
        for k, v in accelerate.utils.extract_model_from_parallel(model).state_dict().items()
    }
    accelerator, model, opt, loader, resumed, _ = _setup(seed=42)
    with pytest.warns(UserWarning, match=f"no {STATE_FILE}.*afresh"):
        accelerator.load_state(str(tmp_path / "plain"))
    with torch.no_grad():
        model(torch.zeros(2, 4))  # the next forward restarts the average
    assert resumed.step == 0
    for name, t in resumed.shadow.items():
        assert torch.equal(t, restored[name]), name
    _epoch(accelerator, model, opt, loader, resumed)
    assert resumed.step == 4  # counted from the restart
