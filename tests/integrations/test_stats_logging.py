"""The integrations log the averager's stats (decay, horizon, init_weight, drift) when asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def _data() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def test_lightning_logs_stats_with_log_dict() -> None:
    """EMACallback(log_stats=True, log_drift=True) logs ema/* that match the averager."""
    L = pytest.importorskip("lightning.pytorch")
    from emaweights.integrations.lightning import EMACallback
    from tests.integrations._lightning_trainer import quiet_trainer

    class Net(L.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Linear(5, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    cb = EMACallback(0.9, log_stats=True, log_drift=True)
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb])
    trainer.fit(Net(), train_dataloaders=_data())
    metrics = trainer.callback_metrics
    assert float(metrics["ema/decay"]) == pytest.approx(0.9)
    assert float(metrics["ema/horizon"]) == pytest.approx(10.0)
    assert float(metrics["ema/init_weight"]) == pytest.approx(0.9**4)
    assert float(metrics["ema/drift"]) == pytest.approx(float(cb.averager.drift()))


def test_lightning_logs_nothing_by_default() -> None:
    """Without log_stats no ema/* key is logged."""
    pytest.importorskip("lightning.pytorch")
    from emaweights.integrations.lightning import EMACallback

    assert EMACallback(0.9).log_stats is False
    with pytest.raises(TypeError, match="log_stats must be a bool, got 'yes'"):
        EMACallback(0.9, log_stats="yes")


def test_transformers_adds_stats_to_the_logs(tmp_path: Path) -> None:
    """Trainer callback, log_stats=True: on_log adds ema/* floats to the logs and the history."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from emaweights.integrations.transformers import EMACallback
    from tests.integrations._models import Tokens, tiny_bert, training_args

    seen: list[dict[str, Any]] = []

    class Spy(transformers.TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            seen.append(dict(logs or {}))

    cb = EMACallback(0.7, log_stats=True, log_drift=True)
    args = training_args(tmp_path, logging_steps=2, save_strategy="no", eval_strategy="no")
    trainer = transformers.Trainer(
        model=tiny_bert(0), args=args, train_dataset=Tokens(12), callbacks=[cb, Spy()]
    )
    trainer.train()
    logged = [s for s in seen if "ema/decay" in s]
    assert logged and all(isinstance(s["ema/drift"], float) for s in logged)
    assert logged[0]["ema/decay"] == pytest.approx(0.7)
    assert any("ema/init_weight" in h for h in trainer.state.log_history)


def test_accelerate_update_logs_to_trackers() -> None:
    """update(..., log_stats=True) calls accelerator.log with ema/* floats at the step."""
    accelerate = pytest.importorskip("accelerate")
    from emaweights.integrations.accelerate import prepare_ema, update

    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = accelerate.Accelerator(cpu=True)
    logged: list[tuple[dict[str, Any], Any]] = []
    accelerator.log = lambda values, step=None, **kw: logged.append((values, step))  # type: ignore[method-assign]
    model = accelerator.prepare(nn.Linear(5, 1))
    ema = prepare_ema(accelerator, model, 0.9, checkpointing="none")
    update(ema, accelerator, log_stats=True)
    update(ema, accelerator)
    assert len(logged) == 1
    values, step = logged[0]
    assert step == 1 and values["ema/decay"] == pytest.approx(0.9)
    assert type(values["ema/init_weight"]) is float


@pytest.mark.parametrize(("decay", "options"), [(1.5, {}), (0.9, {"foreahc": True})])
def test_accelerate_prepare_ema_refuses_bad_options(decay: float, options: dict[str, Any]) -> None:
    """prepare_ema(decay=1.5) or a misspelt option raises before training starts."""
    accelerate = pytest.importorskip("accelerate")
    from emaweights.integrations.accelerate import prepare_ema

    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = accelerate.Accelerator(cpu=True)
    with pytest.raises((ValueError, TypeError), match=r"1\.5|foreahc"):
        prepare_ema(accelerator, nn.Linear(2, 2), decay, **options)
