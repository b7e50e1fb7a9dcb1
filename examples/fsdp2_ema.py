# torchrun --standalone --nproc_per_node 2 examples/fsdp2_ema.py --out /tmp/emaweights-fsdp2
"""FSDP2 (``fully_shard``) with a sharded EMA, distributed and consolidated checkpoints.

CPU/gloo by default; one GPU per rank with nccl when CUDA is available. The
EMA's shadow is a DTensor per parameter with the parameter's placements: each
rank stores and updates only its shard (no communication per update), so the
EMA costs 1/world of the model per rank. ``ema.applied()`` copies the average
into the local shards, so the FSDP2 forward (a collective: every rank runs it)
really uses it. Checkpoints: ``save_dcp`` (every rank writes its shards; loads
on any number of ranks) and ``save_consolidated`` (one safetensors file written
by rank 0, loadable in a single process).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from emaweights import EMA
from emaweights.distributed import load_dcp, save_consolidated, save_dcp, shadow_nbytes


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 4))


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic classification task (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4] + 0.5 * torch.randn(n, 4, generator=g)).argmax(1)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--out", type=Path, default=Path("/tmp/emaweights-fsdp2"))
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    model = make_model().to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    ema = EMA(model, args.decay)  # DTensor shadow, this rank's shards only
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = (t.to(device) for t in make_data(4096, seed=0))
    x_test, y_test = (t.to(device) for t in make_data(1024, seed=1))
    per_rank = 64
    for step in range(args.steps):
        start = (step * per_rank * world + rank * per_rank) % (len(x) - per_rank)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(
            model(x[start : start + per_rank]), y[start : start + per_rank]
        )
        loss.backward()
        opt.step()
        ema.update()

    with torch.no_grad():  # every rank runs the forward: FSDP2 all-gathers inside it
        live = (model(x_test).argmax(1) == y_test).float().mean().item()
        with ema.applied():
            averaged = (model(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:
        print(f"world {world}: test accuracy live {live:.3f}, EMA {averaged:.3f}")
    print(f"rank {rank}: EMA shadow {shadow_nbytes(ema)} bytes")

    save_dcp(ema, args.out / "dcp")  # every rank writes its shards
    save_consolidated(ema, args.out / "ema.safetensors")  # gathered, written by rank 0
    fresh = EMA(model, args.decay)  # a new EMA (another world size would do), then load
    load_dcp(fresh, args.out / "dcp")
    if rank == 0:
        print(f"saved {args.out / 'dcp'} and {args.out / 'ema.safetensors'}")
        print(f"reloaded the sharded checkpoint: step {fresh.step} (saved at {ema.step})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
