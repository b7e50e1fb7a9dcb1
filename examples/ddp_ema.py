# torchrun --standalone --nproc_per_node 2 examples/ddp_ema.py --out /tmp/emaweights-ddp
"""DDP with an EMA: identical on every rank, saved on rank 0, loadable without DDP.

CPU/gloo by default; one GPU per rank with nccl when CUDA is available. Each
rank trains on its own half of every batch; DDP averages the gradients, so the
weights (and the EMA of them) are the same on every rank. BatchNorm running
statistics are not: each rank's follow its own data, so the EMA's averaged
buffers are made identical with ``average_buffers_`` before evaluation and
saving. Evaluation runs on the unwrapped module: the DDP forward would
broadcast rank 0's buffers into the swapped-in average.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from emaweights import EMA
from emaweights.distributed import average_buffers_
from emaweights.io import load_state, save_state


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic classification task (the same on every rank)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4] + 0.5 * torch.randn(n, 4, generator=g)).argmax(1)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--out", type=Path, default=Path("/tmp/emaweights-ddp"))
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = DDP(make_model().to(device), device_ids=[device.index] if cuda else None)
    ema = EMA(model, args.decay)  # canonical names: "0.weight", not "module.0.weight"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = (t.to(device) for t in make_data(4096))
    x_test, y_test = (t.to(device) for t in make_data(1024))
    per_rank = 64
    for step in range(args.steps):
        start = (step * per_rank * world + rank * per_rank) % (len(x) - per_rank)
        xb, yb = x[start : start + per_rank], y[start : start + per_rank]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        ema.update()

    average_buffers_(ema)  # BatchNorm statistics: the mean over ranks, the same everywhere
    net = model.module
    net.eval()
    with torch.no_grad():
        live = (net(x_test).argmax(1) == y_test).float().mean().item()
        with ema.applied():
            averaged = (net(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:
        print(f"world {world}: test accuracy live {live:.3f}, EMA {averaged:.3f}")
        save_state(ema.state_dict(), args.out / "ema.pt")
        # The DDP EMA's state loads into an EMA of the bare model (no process group needed).
        bare = EMA(make_model().to(device), args.decay)
        bare.load_state_dict(load_state(args.out / "ema.pt", map_location=device))
        print(f"saved {args.out / 'ema.pt'}; reloaded into a bare-model EMA at step {bare.step}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
