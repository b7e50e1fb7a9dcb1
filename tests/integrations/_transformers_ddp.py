"""Two-process CPU DDP run of the Trainer callback (launched with torchrun by a test).

Usage: torchrun --nproc_per_node 2 _transformers_ddp.py OUT [RESUME_FOLDER]
Each rank writes its EMA state to OUT/ema_rank<r>[_resumed].pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import transformers

from emaweights.integrations.transformers import EMACallback
from emaweights.io import save_state
from tests.integrations._models import Tokens, tiny_bert, training_args


def main(out: str, resume: str | None) -> None:
    cb = EMACallback(0.7)
    trainer = transformers.Trainer(
        model=tiny_bert(5 if resume else 0),
        args=training_args(Path(out), ddp_backend="gloo"),
        train_dataset=Tokens(24),
        callbacks=[cb],
    )
    trainer.train(resume_from_checkpoint=resume)
    assert cb.ema is not None
    suffix = "_resumed" if resume else ""
    save_state(cb.ema.state_dict(), Path(out) / f"ema_rank{os.environ['RANK']}{suffix}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
