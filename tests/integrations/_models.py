"""Tiny Hugging Face models built from configs (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset


def tiny_bert(seed: int = 0) -> Any:
    """A 1-layer BERT classifier built from a config, without dropout (deterministic)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


class Tokens(Dataset[dict[str, torch.Tensor]]):
    """Random token sequences whose label is whether token 7 occurs."""

    def __init__(self, n: int, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 50, (n, 8), generator=g)
        self.labels = (self.ids == 7).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": self.labels[i],
        }


def training_args(out: Path, **kwargs: Any) -> Any:
    """Quiet, offline, CPU TrainingArguments: 6 steps of 2 micro-batches, saves every 2."""
    import transformers

    options: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    options.update(kwargs)
    return transformers.TrainingArguments(**options)
