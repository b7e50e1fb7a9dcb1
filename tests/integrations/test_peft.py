"""PEFT/LoRA: adapter-sized EMA memory and export in PEFT's own format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from emaweights import EMA  # noqa: E402
from emaweights.integrations.peft import save_averaged_adapter  # noqa: E402
from tests.integrations._models import tiny_bert  # noqa: E402


def _lora(seed: int = 0) -> Any:
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"]
    )
    return peft.get_peft_model(tiny_bert(seed), config)


def _train(model: Any, ema: EMA, steps: int = 5) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(1, 50, (4, 8), generator=g)
        out = model(input_ids=ids, labels=(ids == 7).any(1).long())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update()


def test_shadow_is_adapter_sized() -> None:
    """The shadow holds exactly the trainable tensors (adapters + head), in float32."""
    model = _lora()
    ema = EMA(model, 0.9)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ema.shadow) == trainable
    trainable_bytes = sum(4 * p.numel() for p in model.parameters() if p.requires_grad)
    shadow_bytes = sum(t.numel() * t.element_size() for t in ema.shadow.values())
    assert shadow_bytes == trainable_bytes
    assert shadow_bytes < sum(4 * p.numel() for p in model.parameters()) / 5


def test_averaged_adapter_round_trips_through_peft(tmp_path: Path) -> None:
    """save_averaged_adapter writes adapters that PeftModel.from_pretrained loads as the average."""
    model = _lora()
    ema = EMA(model, 0.9)
    _train(model, ema)
    save_averaged_adapter(ema, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    loaded = peft.PeftModel.from_pretrained(tiny_bert(0), tmp_path / "adapter")
    loaded_params = dict(loaded.named_parameters())
    compared = 0
    for name, avg in ema.shadow.items():  # LoRA A/B and the modules_to_save head
        assert torch.equal(loaded_params[name].detach(), avg), name
        compared += "lora_" in name
    assert compared == 4  # query and value, A and B
    live = dict(model.named_parameters())
    assert not torch.equal(live[name].detach(), ema.shadow[name])  # the export is not the live


def test_refuses_non_peft_model(tmp_path: Path) -> None:
    """Exporting an EMA of a plain model as an adapter names the model type."""
    with pytest.raises(TypeError, match="BertForSequenceClassification"):
        save_averaged_adapter(EMA(tiny_bert(), 0.9), tmp_path / "x")


def test_trainer_save_averaged_to_writes_adapter(tmp_path: Path) -> None:
    """With a PEFT model, the Trainer callback's final export is the averaged adapter."""
    import transformers

    from emaweights.integrations.transformers import EMACallback
    from tests.integrations._models import Tokens, training_args

    model = _lora()
    cb = EMACallback(0.9, save_averaged_to=tmp_path / "adapter")
    trainer = transformers.Trainer(
        model=model,
        args=training_args(tmp_path / "run", save_strategy="no", max_steps=2),
        train_dataset=Tokens(8),
        callbacks=[cb],
    )
    trainer.train()
    assert cb.ema is not None
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # not the full model
    loaded = peft.PeftModel.from_pretrained(tiny_bert(0), tmp_path / "adapter")
    params = dict(loaded.named_parameters())
    for name, avg in cb.ema.shadow.items():
        assert torch.equal(params[name].detach(), avg), name
