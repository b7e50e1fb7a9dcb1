# python examples/peft_lora_ema.py --steps 40 --out /tmp/emaweights-lora
"""LoRA fine-tuning with an EMA of the adapters only, exported as a PEFT adapter.

The EMA tracks trainable tensors only, so its memory is the adapters' (plus
the classification head), not a copy of the frozen backbone. The averaged
adapters are written with ``PeftModel.save_pretrained`` and load back with
``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import torch
import transformers

from emaweights import EMA
from emaweights.integrations.peft import save_averaged_adapter


def base_model() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=16,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("/tmp/emaweights-lora"))
    args = parser.parse_args()

    lora = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]
    )
    model = peft.get_peft_model(base_model(), lora)
    ema = EMA(model, decay=0.9)

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shadow = sum(t.numel() * t.element_size() for t in ema.shadow.values())
    print(f"model {total / 1024:.0f} KiB, EMA shadow {shadow / 1024:.1f} KiB (adapters + head)")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        ids = torch.randint(1, 50, (16, 12), generator=g)
        loss = model(input_ids=ids, labels=(ids == 7).any(1).long()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update()

    save_averaged_adapter(ema, args.out)
    reloaded = peft.PeftModel.from_pretrained(base_model(), args.out)
    params = dict(reloaded.named_parameters())
    same = all(torch.equal(params[n].detach(), t) for n, t in ema.shadow.items())
    print(f"averaged adapter written to {args.out}; reloaded equals the average: {same}")


if __name__ == "__main__":
    main()
