"""Every averager of the conformance registry through the frameworks' evaluation loops.

Lightning runs validate/test/predict under ``torch.inference_mode``; the Hugging Face
Trainer's ``evaluate()`` runs between training steps. Both get the averager's callback in
a list beside another callback, as users pass them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tests.conformance.models import averagers, gpt2
from tests.conformance.registry import Case


def _live(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_live_back(model: nn.Module, live: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, live[key]), key
        assert not value.is_inference(), key


# -- Lightning ---------------------------------------------------------------------


def _loader(n: int = 16) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g)
    return DataLoader(TensorDataset(x, x[:, :1] * 2), batch_size=4, shuffle=False)


@averagers(fast=("EMA", "MultiEMA", "SWA", "PullBack"))  # the rest with -m slow
def test_lightning_loops_evaluate_the_average_with_batchnorm(case: Case) -> None:
    """Fit (with validation), validate, test, predict: the average inside, live weights after."""
    L = pytest.importorskip("lightning.pytorch")
    from emaweights.integrations.lightning import EMACallback
    from tests.integrations._lightning_trainer import quiet_trainer

    class Net(L.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
            self.seen: list[dict[str, torch.Tensor]] = []

        def _loss(self, batch: Any) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self._loss(batch)

        def _eval(self, batch: Any) -> torch.Tensor:
            self.seen.append(_live(self.net))
            return self._loss(batch)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", self._eval(batch))

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.log("test_loss", self._eval(batch))

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self._eval(batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class Grads(L.Callback):  # type: ignore[misc]
        """Another callback in the list: checks the live weights train after evaluation."""

        steps = 0

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            assert all(p.grad is not None for p in pl_module.parameters())
            self.steps += 1

    model = Net()
    cb, other = EMACallback(averager=lambda m: case.make(m)), Grads()
    quiet_trainer(max_epochs=2, callbacks=[other, cb]).fit(
        model, train_dataloaders=_loader(), val_dataloaders=_loader(4)
    )
    assert other.steps == 8 and cb.averager.step == 8
    average = {k.removeprefix("net."): v for k, v in cb.averager.averaged_state_dict().items()}
    live = _live(model)
    for loop in ("validate", "test", "predict"):
        model.seen.clear()
        getattr(quiet_trainer(callbacks=[other, cb], inference_mode=True), loop)(model, _loader(4))
        for key, value in average.items():
            assert torch.equal(model.seen[0][key], value), (loop, key)
        _assert_live_back(model, live)
    # fitting on with a new Trainer (its step count starts at 0) keeps averaging every step
    quiet_trainer(max_epochs=1, callbacks=[other, cb]).fit(model, train_dataloaders=_loader())
    assert other.steps == 12 and cb.averager.step == 12


# -- Hugging Face Trainer -------------------------------------------------------------


class Text(Dataset[dict[str, torch.Tensor]]):
    """Random token sequences for causal language modelling (labels are the inputs)."""

    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, 50, (n, 8), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@averagers(fast=("EMA", "PullBack"))  # the rest with -m slow (a Trainer each: ~2 s)
def test_hf_evaluation_scores_the_average_of_tied_gpt2(case: Case, tmp_path: Path) -> None:
    """Scheduled and hand-wrapped evaluate() score the averaged GPT-2, tie kept, live back."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from emaweights.integrations.transformers import EMACallback
    from tests.integrations._models import training_args

    cb = EMACallback(averager=lambda m: case.make(m))
    seen: list[tuple[bool, torch.Tensor]] = []

    class Tie(transformers.TrainerCallback):  # type: ignore[misc]
        """Another callback in the list: what the model holds while it is evaluated."""

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            m = kw["model"]
            tied = m.lm_head.weight is m.transformer.wte.weight
            seen.append((tied, m.transformer.wte.weight.detach().clone()))

    model = gpt2(0)
    args = training_args(
        tmp_path, max_steps=3, save_strategy="no", eval_strategy="steps", eval_steps=3
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Text(12, seed=1),
        eval_dataset=Text(4, seed=2),
        callbacks=[Tie(), cb],
    )
    trainer.train()  # evaluates once, after the third (last) update
    assert cb.averager.step == 3
    scheduled = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    live = _live(model)
    average = cb.averager.averaged_state_dict()
    averaged = gpt2(1)
    cb.averager.copy_to(averaged)
    alone = transformers.Trainer(model=averaged, args=args, eval_dataset=Text(4, seed=2))
    expected = alone.evaluate()["eval_loss"]  # the Trainer's own loss, on the average
    with cb.averager.applied():  # the documented way to evaluate the average by hand
        by_hand = trainer.evaluate()["eval_loss"]
    assert scheduled == [expected] and by_hand == expected
    assert [tied for tied, _ in seen] == [True, True]  # scheduled, then by hand
    for _, wte in seen:
        assert torch.equal(wte, average["transformer.wte.weight"])
    _assert_live_back(model, live)
    assert model.lm_head.weight is model.transformer.wte.weight
