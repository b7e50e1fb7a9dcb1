"""Resume averagers in a fresh interpreter.

python -m tests.conformance._resume_worker NAME[,NAME...] DIR [MODEL]

One name reads ``DIR/at3.pt`` (or ``DIR/NAME/at3.pt`` when that folder exists), several
names read ``DIR/NAME/at3.pt`` each; MODEL is ``bn`` (default) or a shape of
``tests.conformance.models``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.conformance.registry import BY_NAME, bn_model, train_step, use_scratch


def main(name: str, folder: Path, shape: str = "bn") -> None:
    """Load the model and averager saved at step 3, run to step 6, save the average."""
    if shape == "bn":
        model = bn_model(seed=1)  # other initial weights: everything must come from the files
        step_fn = train_step
    else:
        from tests.conformance import models

        model = models.BY_NAME[shape].make(1)
        step_fn = models.train_step
    use_scratch(folder)  # an averager's files (snapshots) are where its run wrote them
    saved = torch.load(folder / "at3.pt", weights_only=True)
    model.load_state_dict(saved["model"])
    averager = BY_NAME[name].make(model)
    averager.load_state_dict(saved["averager"])
    for step in range(4, 7):
        step_fn(model, step)
        averager.update()
    torch.save(averager.averaged_state_dict(), folder / "resumed.pt")


if __name__ == "__main__":
    names, root = sys.argv[1].split(","), Path(sys.argv[2])
    for one in names:
        main(one, root / one if len(names) > 1 or (root / one).is_dir() else root, *sys.argv[3:])
