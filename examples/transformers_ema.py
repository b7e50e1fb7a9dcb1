# python examples/transformers_ema.py --steps 60 --out /tmp/emaweights-hf
"""Hugging Face Trainer + EMACallback with a tiny BERT built from a config (no download).

Gradient accumulation, evaluation with the averaged weights, checkpoints that
carry the EMA state, a resume from the middle checkpoint, and the final
averaged model written in ``save_pretrained`` format.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from torch.utils.data import Dataset

from emaweights.integrations.transformers import EMACallback


class Tokens(Dataset[dict[str, torch.Tensor]]):
    """Label: does token 7 occur in the sequence?"""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 50, (n, 12), generator=g)
        self.labels = (self.ids == 7).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def model() -> transformers.BertForSequenceClassification:
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def run(out: Path, steps: int, resume: Path | None = None) -> tuple[dict[str, float], EMACallback]:
    ema_cb = EMACallback(decay=0.95, save_averaged_to=out / "averaged")
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,  # the EMA moves once per 2 micro-batches
        learning_rate=2e-3,
        eval_strategy="steps",
        eval_steps=steps // 2,
        save_strategy="steps",
        save_steps=steps // 2,
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model(),
        args=args,
        train_dataset=Tokens(512, seed=0),
        eval_dataset=Tokens(128, seed=1),
        callbacks=[ema_cb],
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    live = trainer.evaluate()  # after training: the live weights
    return live, ema_cb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("/tmp/emaweights-hf"))
    args = parser.parse_args()

    live, ema_cb = run(args.out, args.steps)
    with ema_cb.ema.applied():
        # the callback swaps only for the Trainer's scheduled evaluations; by hand:
        averaged = transformers.Trainer(
            model=ema_cb.ema.model,
            args=transformers.TrainingArguments(
                output_dir=str(args.out / "eval"), report_to=[], use_cpu=True
            ),
            eval_dataset=Tokens(128, seed=1),
        ).evaluate()
    print(f"{ema_cb.ema.num_updates} EMA updates for {args.steps} optimizer steps")
    print(f"eval_loss live {live['eval_loss']:.4f}   averaged {averaged['eval_loss']:.4f}")

    middle = args.out / f"checkpoint-{args.steps // 2}"
    _, resumed = run(args.out, args.steps, resume=middle)
    same = all(torch.equal(t, resumed.ema.shadow[name]) for name, t in ema_cb.ema.shadow.items())
    print(f"resumed from {middle.name}: EMA identical to the uninterrupted run: {same}")
    print(f"averaged model written to {args.out / 'averaged'} (load with from_pretrained)")


if __name__ == "__main__":
    main()
