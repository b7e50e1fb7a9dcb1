# Run: python examples/forgetting_custom.py
"""The forgetting benchmark on your own model and data (here: generated Gaussian blobs)."""

from __future__ import annotations

import torch
from torch import nn

from emaweights.bench import Config, EMAMethod, Split, TaskPair, print_table, run, summarize


def blobs(seed: int, layout: int) -> Split:
    """A 3-class problem in 10 dimensions; another ``layout`` puts the classes elsewhere."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 10, generator=torch.Generator().manual_seed(layout)) * 1.5
    y = torch.randint(0, 3, (900,), generator=g)
    x = centres[y] + torch.randn(900, 10, generator=g)
    return Split(x[:600], y[:600], x[600:750], y[600:750], x[750:], y[750:])


def my_model(task: TaskPair, cfg: Config) -> nn.Module:
    return nn.Sequential(nn.Linear(task.num_features, 32), nn.Tanh(), nn.Linear(32, 3))


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny model: extra threads only add synchronization
    task = TaskPair(
        "blobs", a=blobs(0, layout=7), b=blobs(1, layout=8), num_features=10, num_classes=3
    )
    config = Config(seeds=(0, 1, 2), pretrain_epochs=5, finetune_epochs=5)
    results = run(
        [task],
        config,
        make_methods=lambda spe, total: [EMAMethod(0.99), EMAMethod(0.9)],
        make_model=my_model,
    )
    print_table(summarize(results))
