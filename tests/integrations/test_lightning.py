"""The Lightning callback with a real Trainer on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

from emaweights.integrations.lightning import EMACallback  # noqa: E402
from tests.integrations._lightning_trainer import quiet_trainer  # noqa: E402

DECAY = 0.8


def _data(n: int = 28) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


class Regressor(L.LightningModule):
    """A tiny model that records its weights after every optimizer step (the oracle's input)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.seen_in_validation: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        if batch_idx == 0:
            self.seen_in_validation.append(_params(self))
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_step.append(_params(self))


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _oracle(
    theta0: dict[str, torch.Tensor], steps: list[dict[str, torch.Tensor]]
) -> dict[str, Any]:
    """Float64 EMA of the recorded post-step weights, starting from theta0."""
    avg = {n: t.double() for n, t in theta0.items()}
    for snap in steps:
        avg = {n: DECAY * avg[n] + (1 - DECAY) * snap[n].double() for n in avg}
    return avg


def test_one_update_per_optimizer_step_under_accumulation() -> None:
    """With accumulate_grad_batches=2 over 7 batches, updates = optimizer steps = 4 per epoch."""
    model = Regressor()
    theta0 = _params(model)
    cb = EMACallback(DECAY)
    trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[cb])
    trainer.fit(model, train_dataloaders=_data())
    assert cb.ema is not None
    assert len(model.after_step) == trainer.global_step == 8  # ceil(7 / 2) per epoch
    assert cb.ema.num_updates == cb.ema.step == 8
    expected = _oracle(theta0, model.after_step)
    for name, avg in cb.ema.shadow.items():
        torch.testing.assert_close(avg.double(), expected[name], rtol=1e-6, atol=1e-6)


def test_validation_sees_average_and_training_keeps_live() -> None:
    """Validation runs on the averaged weights; after fit the model holds the live weights."""
    model = Regressor()
    theta0 = _params(model)
    cb = EMACallback(DECAY)
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb], limit_val_batches=1)
    trainer.fit(model, train_dataloaders=_data(), val_dataloaders=_data(8))
    assert len(model.seen_in_validation) == 2
    per_epoch = len(model.after_step) // 2
    after_epoch1 = _oracle(theta0, model.after_step[:per_epoch])
    for name, seen in model.seen_in_validation[0].items():
        torch.testing.assert_close(seen.double(), after_epoch1[name], rtol=1e-6, atol=1e-6)
    live = model.after_step[-1]
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), live[name]), name


def test_log_live_is_refused_with_the_replacement() -> None:
    """log_live (removed: it mixed live and averaged metrics) raises, saying why."""
    with pytest.raises(TypeError, match="log_live was removed"):
        EMACallback(DECAY, log_live=True)


class _SaveDuringValidation(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        trainer.save_checkpoint(self.path)


def test_checkpoint_written_during_validation_holds_live_weights(tmp_path: Path) -> None:
    """A checkpoint saved while the average is swapped in stores the live weights as the model's."""
    model = Regressor()
    cb = EMACallback(DECAY)
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb])
    trainer.fit(model, train_dataloaders=_data())
    path = tmp_path / "during_validation.ckpt"
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb, _SaveDuringValidation(path)])
    trainer.validate(model, dataloaders=_data(8))
    ckpt = torch.load(path, weights_only=True)
    assert cb.ema is not None
    for name, p in model.state_dict().items():
        assert torch.equal(ckpt["state_dict"][name], p), name
    assert not torch.equal(ckpt["state_dict"]["net.0.weight"], cb.ema.shadow["net.0.weight"])


class _Crash(L.Callback):
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == 2:
            raise RuntimeError("simulated crash")


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    """Crash in epoch 3, resume from the epoch-2 checkpoint: EMA and weights equal a plain run."""
    fit = dict(max_epochs=4, accumulate_grad_batches=2)

    straight = EMACallback(DECAY)
    oracle_model = Regressor()
    quiet_trainer(callbacks=[straight], **fit).fit(oracle_model, train_dataloaders=_data())

    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    crashed = EMACallback(DECAY)
    trainer = quiet_trainer(callbacks=[crashed, ckpt, _Crash()], enable_checkpointing=True, **fit)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(Regressor(), train_dataloaders=_data())
    last = sorted(tmp_path.glob("epoch=1-*.ckpt"))
    assert len(last) == 1, list(tmp_path.iterdir())

    resumed = EMACallback(DECAY)
    model = Regressor(seed=123)  # different init: everything must come from the checkpoint
    trainer = quiet_trainer(callbacks=[resumed], **fit)
    trainer.fit(model, train_dataloaders=_data(), ckpt_path=last[0])

    assert straight.ema is not None and resumed.ema is not None
    a, b = straight.ema.state_dict(), resumed.ema.state_dict()
    assert {k: a[k] for k in ("step", "num_updates")} == {k: b[k] for k in ("step", "num_updates")}
    assert a["init_weight"] == pytest.approx(b["init_weight"], rel=1e-12)
    for name, t in a["shadow"].items():
        torch.testing.assert_close(b["shadow"][name], t, rtol=0, atol=0)
    for (name, p), q in zip(oracle_model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("loop", ["test", "validate"])
def test_eval_from_checkpoint_uses_restored_average(tmp_path: Path, loop: str) -> None:
    """trainer.test/validate(ckpt_path=...) evaluate with the average stored in the checkpoint."""
    model = Regressor()
    cb = EMACallback(DECAY)
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb])
    trainer.fit(model, train_dataloaders=_data())
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    assert cb.ema is not None
    expected = {n: t.clone() for n, t in cb.ema.shadow.items()}

    fresh = Regressor(seed=7)
    fresh.test_step = fresh.validation_step  # type: ignore[method-assign]
    run = getattr(quiet_trainer(callbacks=[EMACallback(DECAY)]), loop)
    run(fresh, dataloaders=_data(8), ckpt_path=tmp_path / "end.ckpt")
    for name, seen in fresh.seen_in_validation[0].items():
        assert torch.equal(seen, expected[name]), name


def test_two_decays_checkpoint_and_resume_separately(tmp_path: Path) -> None:
    """Two callbacks with different decays keep separate states through a checkpoint."""
    fast, slow = EMACallback(0.5), EMACallback(0.9, evaluate=False)
    trainer = quiet_trainer(max_epochs=1, callbacks=[fast, slow])
    trainer.fit(Regressor(), train_dataloaders=_data())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    fast2, slow2 = EMACallback(0.5), EMACallback(0.9, evaluate=False)
    trainer = quiet_trainer(max_epochs=1, callbacks=[slow2, fast2])  # order does not matter
    trainer.fit(Regressor(seed=3), train_dataloaders=_data(), ckpt_path=tmp_path / "a.ckpt")
    for before, after in ((fast, fast2), (slow, slow2)):
        assert before.ema is not None and after.ema is not None
        for name, t in before.ema.shadow.items():
            assert torch.equal(after.ema.shadow[name], t), name
    assert fast.ema is not None and slow.ema is not None
    assert not torch.equal(fast.ema.shadow["net.0.weight"], slow.ema.shadow["net.0.weight"])


def test_state_key_names_decay_and_options() -> None:
    """The checkpoint key differs by decay and averaging options, not by device or foreach."""
    assert EMACallback(0.9).state_key == "EMACallback[decay=0.9]"
    assert EMACallback(0.9, update_every=2, foreach=False, device="cpu").state_key == (
        "EMACallback[decay=0.9, update_every=2]"
    )


def test_resume_without_ema_state_warns(tmp_path: Path) -> None:
    """Adding the callback to a resumed run without EMA state warns, then averages from there."""
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(Regressor(), train_dataloaders=_data())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    cb = EMACallback(DECAY)
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb])
    with pytest.warns(UserWarning, match="without averager state"):
        trainer.fit(Regressor(), train_dataloaders=_data(), ckpt_path=tmp_path / "plain.ckpt")
    assert cb.ema is not None and cb.ema.num_updates == trainer.global_step - 7 == 7
