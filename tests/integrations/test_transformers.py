"""The Hugging Face Trainer callback with a real Trainer and a tiny BERT on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from emaweights.integrations.transformers import STATE_FILE, EMACallback  # noqa: E402
from tests.integrations._models import Tokens, tiny_bert, training_args  # noqa: E402

DECAY = 0.7


class Recorder(transformers.TrainerCallback):  # type: ignore[misc]
    """Records the weights right after each optimizer step, and what evaluation sees."""

    def __init__(self, ema_cb: EMACallback) -> None:
        self.ema_cb = ema_cb
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.eval_matches_average: list[bool] = []

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]
        self.after_step.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, ema = kwargs["model"], self.ema_cb.ema
        assert ema is not None
        self.eval_matches_average.append(
            all(torch.equal(p, ema.shadow[n]) for n, p in model.named_parameters())
        )


def _train(out: Path, seed: int = 0, resume: Path | None = None, **kwargs: Any) -> Any:
    model = tiny_bert(seed)
    ema_cb = EMACallback(DECAY, **kwargs.pop("callback_options", {}))
    recorder = Recorder(ema_cb)
    trainer = transformers.Trainer(
        model=model,
        args=training_args(out, **kwargs),
        train_dataset=Tokens(12),
        eval_dataset=Tokens(4, seed=2),
        callbacks=[ema_cb, recorder],
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model, ema_cb, recorder


def test_updates_once_per_optimizer_step_and_matches_float64(tmp_path: Path) -> None:
    """6 optimizer steps over 12 micro-batches give 6 updates equal to a float64 EMA."""
    theta0 = {n: p.detach().double() for n, p in tiny_bert(0).named_parameters()}
    model, ema_cb, rec = _train(tmp_path, save_strategy="no")
    assert len(rec.after_step) == 6
    assert ema_cb.ema.num_updates == ema_cb.ema.step == 6
    avg = theta0
    for snap in rec.after_step:
        avg = {n: DECAY * avg[n] + (1 - DECAY) * snap[n].double() for n in avg}
    for name, t in ema_cb.ema.shadow.items():
        if name in avg:
            torch.testing.assert_close(t.double(), avg[name], rtol=1e-6, atol=1e-6)
    # training ends with the live weights in the model
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), rec.after_step[-1][name]), name


@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_evaluation_uses_average_and_checkpoints_hold_live_weights(
    tmp_path: Path, strategy: str
) -> None:
    """Scheduled evaluations (per step or epoch) see the average; checkpoints hold live weights."""
    _, _, rec = _train(tmp_path, eval_strategy=strategy, eval_steps=2)
    # eval set of 4 in one batch: 3 evaluations per 2 steps, 2 per epoch (3 steps)
    assert len(rec.eval_matches_average) == (3 if strategy == "steps" else 2)
    assert all(rec.eval_matches_average)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    live_at_4 = rec.after_step[3]
    for name, t in live_at_4.items():
        assert torch.equal(saved[name], t), name


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path: Path) -> None:
    """Resuming from checkpoint-4 ends with the same EMA as the run that went straight to 6."""
    _, straight, _ = _train(tmp_path / "a")
    assert (tmp_path / "a" / "checkpoint-4" / STATE_FILE).is_file()
    _, resumed, _ = _train(tmp_path / "a", seed=99, resume=tmp_path / "a" / "checkpoint-4")
    a, b = straight.ema.state_dict(), resumed.ema.state_dict()
    assert (a["step"], a["num_updates"]) == (b["step"], b["num_updates"]) == (6, 6)
    for name, t in a["shadow"].items():
        torch.testing.assert_close(b["shadow"][name], t, rtol=1e-6, atol=1e-7)


def test_resume_without_state_warns(tmp_path: Path) -> None:
    """A resume whose checkpoint lacks the EMA file warns and restarts the average."""
    _train(tmp_path, max_steps=2)
    (tmp_path / "checkpoint-2" / STATE_FILE).unlink()
    with pytest.warns(UserWarning, match="without an EMA state"):
        _, cb, _ = _train(tmp_path, max_steps=4, resume=tmp_path / "checkpoint-2")
    assert cb.ema.step == 2


def test_save_averaged_to_writes_loadable_model(tmp_path: Path) -> None:
    """save_averaged_to writes the averaged weights in save_pretrained format."""
    opts = {"save_averaged_to": tmp_path / "avg"}
    model, ema_cb, _ = _train(tmp_path / "run", save_strategy="no", callback_options=opts)
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "avg")
    expected = ema_cb.ema.averaged_state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, expected[name]), name
    assert not torch.equal(
        loaded.classifier.weight, model.classifier.weight
    )  # the live model is not what was saved


def test_manual_evaluate_inside_applied_keeps_user_swap(tmp_path: Path) -> None:
    """`with ema.applied(): trainer.evaluate()` works: the callback undoes only its own swaps."""
    model = tiny_bert(0)
    ema_cb = EMACallback(DECAY)
    trainer = transformers.Trainer(
        model=model,
        args=training_args(tmp_path, save_strategy="no", max_steps=2),
        train_dataset=Tokens(8),
        eval_dataset=Tokens(4, seed=2),
        callbacks=[ema_cb],
    )
    trainer.train()
    live = trainer.evaluate()["eval_loss"]
    with ema_cb.ema.applied():
        averaged = trainer.evaluate()["eval_loss"]
        assert ema_cb.ema.is_applied  # on_evaluate did not restore the user's swap
    oracle = tiny_bert(1)
    oracle.load_state_dict(ema_cb.ema.averaged_state_dict())
    batch = Tokens(4, seed=2)
    with torch.no_grad():
        expected = oracle(
            input_ids=batch.ids, attention_mask=torch.ones_like(batch.ids), labels=batch.labels
        ).loss
    assert averaged == pytest.approx(expected.item(), rel=1e-5)
    assert averaged != pytest.approx(live, rel=1e-6)


def test_bad_options_raise_at_construction() -> None:
    """decay=1.5 and a misspelt option raise when the callback is built, naming them."""
    with pytest.raises(ValueError, match=r"1\.5"):
        EMACallback(decay=1.5)
    with pytest.raises(TypeError, match=r"include_frozn.*include_frozen"):
        EMACallback(0.9, include_frozn=True)


class _EveryOther(EMACallback):
    """Feeds the average on even optimizer steps only."""

    def should_update(self, step: int | None = None, epoch: int | None = None) -> bool:
        return step is not None and step % 2 == 0


def test_should_update_override_chooses_the_steps(tmp_path: Path) -> None:
    """An even-steps should_update gives 3 updates over 6 optimizer steps, at steps 2, 4, 6."""
    ema_cb = _EveryOther(DECAY)
    trainer = transformers.Trainer(
        model=tiny_bert(0),
        args=training_args(tmp_path, save_strategy="no"),
        train_dataset=Tokens(12),
        callbacks=[ema_cb],
    )
    trainer.train()
    assert ema_cb.averager.num_updates == 3
    assert ema_cb.averager.step == 6
