"""The Lightning callback with every averager of the protocol, BatchNorm and inference mode."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

import emaweights  # noqa: E402
from emaweights.integrations.lightning import EMACallback  # noqa: E402
from tests.integrations._lightning_trainer import quiet_trainer  # noqa: E402

PROTOCOL = ("update", "applied", "state_dict", "load_state_dict", "step")

#: One line per averager: name -> factory. The missing ones are skipped by name.
FACTORIES: dict[str, Callable[[nn.Module], Any]] = {
    "EMA": lambda m: emaweights.EMA(m, 0.8),
    "MultiEMA": lambda m: emaweights.MultiEMA(m, [0.5, 0.8]),
    "SWA": lambda m: emaweights.SWA(m),
    "BEMA": lambda m: emaweights.BEMA(m),
    "SwitchEMA": lambda m: emaweights.SwitchEMA(m, 0.8),
    "PullBack": lambda m: emaweights.PullBack(m, update_every=2),
    "LAWA": lambda m: emaweights.LAWA(m),
}


def _factory(name: str) -> Callable[[nn.Module], Any]:
    """The factory, or a visible skip when this averager lacks a protocol method here."""
    try:
        probe = FACTORIES[name](nn.Linear(2, 1))
    except (AttributeError, TypeError) as err:
        pytest.skip(f"{name} cannot be built with defaults here: {err}")
    missing = [m for m in PROTOCOL if not hasattr(probe, m)]
    if missing:
        pytest.skip(f"{name} lacks {missing} of the averager protocol yet")
    return FACTORIES[name]


def _data(n: int = 28) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


class BNRegressor(L.LightningModule):
    """A tiny model with BatchNorm (buffers) that records its post-step weights."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def _eval(self, batch: Any) -> torch.Tensor:
        self.seen.append(self.net[0].weight.detach().clone())
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._eval(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._eval(batch))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _state(averager: Any) -> dict[str, torch.Tensor]:
    """The averaged weights, a comparable summary of any averager."""
    if isinstance(averager, emaweights.MultiEMA):
        return {f"{i}.{k}": v for i in range(len(averager)) for k, v in averager[i].shadow.items()}
    return dict(averager.averaged_state_dict())


# -- construction --------------------------------------------------------


def test_bad_decay_raises_at_construction() -> None:
    """EMACallback(decay=1.5) raises when built, naming the value, not when training starts."""
    with pytest.raises(ValueError, match=r"1\.5"):
        EMACallback(decay=1.5)


def test_misspelt_option_raises_with_a_hint() -> None:
    """A misspelt EMA option raises TypeError naming it and the closest valid option."""
    with pytest.raises(TypeError, match=r"update_evry.*update_every"):
        EMACallback(0.9, update_evry=2)


def test_averager_with_decay_is_refused() -> None:
    """Decay beside averager= is refused (it would be silently ignored)."""
    with pytest.raises(TypeError, match="decay"):
        EMACallback(0.9, averager=FACTORIES["SWA"])


def test_two_evaluating_callbacks_are_refused() -> None:
    """Two callbacks that both evaluate are refused at setup (the model holds one average)."""
    trainer = quiet_trainer(max_epochs=1, callbacks=[EMACallback(0.5), EMACallback(0.9)])
    with pytest.raises(ValueError, match="evaluate=False"):
        trainer.fit(BNRegressor(), train_dataloaders=_data())


# -- any averager ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_resume_equals_uninterrupted_for_every_averager(name: str, tmp_path: Path) -> None:
    """Two epochs, checkpoint, two more == four epochs straight, for each averager."""
    factory = _factory(name)
    straight = EMACallback(averager=factory, evaluate=False)
    quiet_trainer(max_epochs=4, callbacks=[straight]).fit(BNRegressor(), train_dataloaders=_data())
    first = EMACallback(averager=factory, evaluate=False)
    trainer = quiet_trainer(max_epochs=2, callbacks=[first])
    trainer.fit(BNRegressor(), train_dataloaders=_data())
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    second = EMACallback(averager=factory, evaluate=False)
    trainer = quiet_trainer(max_epochs=4, callbacks=[second])
    trainer.fit(BNRegressor(seed=5), train_dataloaders=_data(), ckpt_path=tmp_path / "half.ckpt")
    expected, got = _state(straight.averager), _state(second.averager)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_two_averagers_as_two_callbacks(tmp_path: Path) -> None:
    """An evaluating EMA and a non-evaluating SWA in one list each match their own run alone."""
    ema_cb = EMACallback(0.8)
    swa_cb = EMACallback(averager=FACTORIES["SWA"], evaluate=False)
    model = BNRegressor()
    quiet_trainer(max_epochs=2, callbacks=[ema_cb, swa_cb]).fit(
        model, train_dataloaders=_data(), val_dataloaders=_data(8)
    )
    for together in (ema_cb, swa_cb):
        alone = EMACallback(averager=together._factory, evaluate=False)
        quiet_trainer(max_epochs=2, callbacks=[alone]).fit(BNRegressor(), train_dataloaders=_data())
        for key, value in _state(alone.averager).items():
            torch.testing.assert_close(_state(together.averager)[key], value)
    assert torch.equal(model.seen[-1], ema_cb.averager.shadow["net.0.weight"])


class _EpochEnds(EMACallback):
    """Updates only at epoch ends (the override the hook exists for)."""

    def should_update(self, step: int | None = None, epoch: int | None = None) -> bool:
        return epoch is not None


def test_should_update_override_averages_epoch_ends() -> None:
    """An epoch-end should_update makes SWA the mean of the weights at the epoch ends."""
    ends: list[torch.Tensor] = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            ends.append(pl_module.net[0].weight.detach().double().clone())

    cb = _EpochEnds(averager=FACTORIES["SWA"], evaluate=False)
    trainer = quiet_trainer(max_epochs=3, callbacks=[Record(), cb])
    trainer.fit(BNRegressor(), train_dataloaders=_data())
    assert cb.averager.num_updates == 3
    expected = torch.stack(ends).mean(0)
    torch.testing.assert_close(cb.averager.shadow["net.0.weight"].double(), expected)


# -- BatchNorm under inference mode ---------------------------------------


@pytest.mark.parametrize("loop", ["validate", "test", "predict"])
def test_batchnorm_model_evaluates_under_inference_mode(loop: str) -> None:
    """validate/test/predict (under inference_mode) use the average on a BN model; it trains on."""
    model = BNRegressor()
    cb = EMACallback(0.8)
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(model, train_dataloaders=_data())
    live = {k: v.clone() for k, v in model.state_dict().items()}
    model.seen.clear()
    getattr(quiet_trainer(callbacks=[cb], inference_mode=True), loop)(model, _data(8))
    assert torch.equal(model.seen[0], cb.averager.shadow["net.0.weight"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, live[key]), key
        assert not value.is_inference(), key
    quiet_trainer(max_epochs=2, callbacks=[cb]).fit(model, train_dataloaders=_data())  # trains on


# -- resume in a new process ------------------------------------------------

_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from integrations.test_lightning_averagers import BNRegressor, _data, quiet_trainer
    from emaweights.integrations.lightning import EMACallback
    cb = EMACallback(0.8)
    trainer = quiet_trainer(max_epochs=4, callbacks=[cb])
    trainer.fit(BNRegressor(seed=3), train_dataloaders=_data(), ckpt_path={ckpt!r})
    torch.save(cb.averager.averaged_state_dict(), {out!r})
    """
)


def test_resume_in_a_new_process_equals_uninterrupted(tmp_path: Path) -> None:
    """A checkpoint resumed by another Python process ends on the uninterrupted average, bitwise."""
    straight = EMACallback(0.8)
    quiet_trainer(max_epochs=4, callbacks=[straight]).fit(BNRegressor(), train_dataloaders=_data())
    first = EMACallback(0.8)
    trainer = quiet_trainer(max_epochs=2, callbacks=[first])
    trainer.fit(BNRegressor(), train_dataloaders=_data())
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    script = _SCRIPT.format(
        tests=str(Path(__file__).parents[1]),
        ckpt=str(tmp_path / "half.ckpt"),
        out=str(tmp_path / "resumed.pt"),
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for key, value in straight.averager.averaged_state_dict().items():
        assert torch.equal(resumed[key], value), key


def test_fabric_module_around_ddp_has_wrapper_free_names(tmp_path: Path) -> None:
    """An EMA of Fabric's _FabricModule around DDP names tensors without the module. prefix."""
    import torch.distributed as dist
    from lightning.fabric.wrappers import _FabricModule

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = nn.Linear(3, 2)
        ddp = nn.parallel.DistributedDataParallel(model)
        wrapped = _FabricModule(ddp, strategy=None, original_module=model)  # type: ignore[arg-type]
        ema = emaweights.EMA(wrapped, 0.5)
        assert sorted(ema.averaged_state_dict()) == sorted(model.state_dict())
    finally:
        dist.destroy_process_group()
