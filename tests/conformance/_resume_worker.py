"""Resume an averager in a fresh interpreter.

python -m tests.conformance._resume_worker NAME DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.conformance.registry import BY_NAME, bn_model, train_step


def main(name: str, folder: Path) -> None:
    """Load the model and averager saved at step 3, run to step 6, save the average."""
    saved = torch.load(folder / "at3.pt", weights_only=True)
    model = bn_model(seed=1)  # other initial weights: everything must come from the files
    model.load_state_dict(saved["model"])
    averager = BY_NAME[name].make(model)
    averager.load_state_dict(saved["averager"])
    for step in range(4, 7):
        train_step(model, step)
        averager.update()
    torch.save(averager.averaged_state_dict(), folder / "resumed.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
