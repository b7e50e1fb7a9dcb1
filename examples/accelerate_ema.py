# python examples/accelerate_ema.py --epochs 3 --out /tmp/emaweights-accelerate
"""An Accelerate loop with an EMA: gradient accumulation, save_state/load_state, export.

``update(ema, accelerator)`` after every micro-batch moves the average only
when the optimizer stepped (``accelerator.sync_gradients``). The EMA is saved
by ``accelerator.save_state`` and restored by ``load_state`` (loaded with
``weights_only=True``); the averaged weights are exported as safetensors that
load into the bare model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emaweights.export import load_averaged, save_averaged
from emaweights.integrations.accelerate import prepare_ema, unwrap, update


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/emaweights-accelerate"))
    args = parser.parse_args()
    torch.manual_seed(0)

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.5 * torch.randn(1024, 1, generator=g)
    train = DataLoader(TensorDataset(x[:896], y[:896]), batch_size=16, shuffle=True)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt, train = accelerator.prepare(model, opt, train)
    ema = prepare_ema(accelerator, model, decay=0.98, anchor="debiased")

    micro_batches = 0
    for epoch in range(args.epochs):
        model.train()
        for xb, yb in train:
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.mse_loss(model(xb), yb))
                opt.step()
                opt.zero_grad()
            update(ema, accelerator)
            micro_batches += 1
        accelerator.save_state(str(args.out / f"epoch{epoch}"))

    model.eval()
    with torch.no_grad():
        live = nn.functional.mse_loss(model(x[896:]), y[896:]).item()
        with ema.applied():
            averaged = nn.functional.mse_loss(model(x[896:]), y[896:]).item()
    print(f"{micro_batches} micro-batches -> {ema.num_updates} EMA updates (accumulation 4)")
    print(f"held-out mse: live {live:.4f}   averaged {averaged:.4f}")

    # Resume: a fresh EMA gets its state back from the last save_state folder.
    ema_state = {k: v.clone() for k, v in ema.shadow.items()}
    ema.register()  # forget everything
    accelerator.load_state(str(args.out / f"epoch{args.epochs - 1}"))
    same = all(torch.equal(ema.shadow[k], v) for k, v in ema_state.items())
    print(f"load_state restored the EMA (step {ema.step}): {same}")

    if accelerator.is_main_process:
        save_averaged(ema, args.out / "averaged.safetensors")
        bare = make_model()
        load_averaged(args.out / "averaged.safetensors", model=bare)
        name = type(unwrap(accelerator, model)).__name__
        print(f"averaged weights exported; loaded into a bare {name}")


if __name__ == "__main__":
    main()
