"""Rank bodies of the distributed tests; each returns what the parent checks.

Every rank builds the same model from the same seed and also runs a
single-process reference on the full global batch, so each check is against
an oracle computed in the same process.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from emaweights import EMA
from emaweights.distributed import (
    average_buffers_,
    full_shadow,
    load_consolidated,
    load_dcp,
    save_consolidated,
    save_dcp,
    shadow_nbytes,
)

DECAY = 0.8
STEPS = 5
GLOBAL_BATCH = 8


def batch(step: int, n_in: int = 6) -> tuple[Tensor, Tensor]:
    """The global batch of ``step``: the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, n_in, generator=g), torch.randint(
        0, 3, (GLOBAL_BATCH,), generator=g
    )


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _gather_flat(t: Tensor) -> list[Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def _flat(tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([tensors[k].detach().reshape(-1).float() for k in sorted(tensors)])


def mlp(batchnorm: bool = False) -> nn.Module:
    """A small MLP, the same on every rank (fixed seed)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(16, 3))


# -- DDP ---------------------------------------------------------------------------


def ddp(rank: int, world: int, folder: Path) -> dict[str, Any]:
    """DDP: EMA equals the single-process EMA on every rank; checkpoints cross over."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    bare = mlp()
    ref = copy.deepcopy(bare)
    model = DDP(bare)
    ema, ref_ema = EMA(model, DECAY), EMA(ref, DECAY)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        _step(model, opt, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])
        _step(ref, ref_opt, x, y)
        ema.update()
        ref_ema.update()
    mine = _flat(ema.shadow)
    same_on_all = all(torch.equal(mine, other) for other in _gather_flat(mine))
    err = (mine - _flat(ref_ema.shadow)).abs().max().item()

    # DDP -> bare: the state of the wrapped model's EMA loads into an EMA of a bare model.
    path = folder / "ddp_ema.pt"
    if rank == 0:
        torch.save(ema.state_dict(), path)
    dist.barrier()
    plain = EMA(mlp(), DECAY)
    plain.load_state_dict(torch.load(path, weights_only=True))
    to_bare = torch.equal(_flat(plain.shadow), mine)
    # bare -> DDP: and back.
    fresh = EMA(DDP(mlp()), DECAY)
    fresh.load_state_dict(ref_ema.state_dict())
    to_ddp = torch.equal(_flat(fresh.shadow), _flat(ref_ema.shadow))
    return {"same_on_all": same_on_all, "ref_err": err, "to_bare": to_bare, "to_ddp": to_ddp}


def ddp_buffers(rank: int, world: int, folder: Path) -> dict[str, Any]:
    """DDP + BatchNorm: averaged buffers differ across ranks until average_buffers_."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(mlp(batchnorm=True))
    ema = EMA(model, DECAY)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        _step(model, opt, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])
        ema.update()
    name = "1.running_mean"
    before = _gather_flat(ema.shadow[name].clone())
    expected = torch.stack(before).mean(0)
    average_buffers_(ema)
    after = _gather_flat(ema.shadow[name].clone())
    # Evaluating through the DDP wrapper broadcasts rank 0's buffers into the swapped-in
    # average; once averaged they agree, so the EMA is unchanged.
    x, _ = batch(99)
    model.eval()
    with torch.no_grad(), ema.applied():
        model(x)
    return {
        "unchanged_by_ddp_eval": torch.equal(ema.shadow[name], after[rank]),
        "differed": not all(torch.equal(before[0], b) for b in before),
        "equal_after": all(torch.equal(after[0], a) for a in after),
        "mean_err": (after[0] - expected).abs().max().item(),
    }


# -- FSDP2 -------------------------------------------------------------------------


def small() -> nn.Module:
    """Uneven shapes: 5 rows on 4 ranks shard as 2, 2, 1, 0."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 3))


def sharded(model: nn.Module) -> nn.Module:
    """Apply FSDP2 to each Linear and to the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def fsdp(rank: int, world: int, folder: Path, load_from: str | None) -> dict[str, Any]:
    """FSDP2: sharded EMA vs single process; swap; DCP and consolidated checkpoints."""
    ref = small()
    model = sharded(small())
    ema, ref_ema = EMA(model, DECAY), EMA(ref, DECAY)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05)
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        _step(model, opt, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])
        _step(ref, ref_opt, x, y)
        ema.update()
        ref_ema.update()
    full = full_shadow(ema)
    out: dict[str, Any] = {
        "ref_err": (_flat(full) - _flat(ref_ema.shadow)).abs().max().item(),
        "dtensor": all(type(t).__name__ == "DTensor" for t in ema.shadow.values()),
        "numel": ema._shadow.numel(),
        "nbytes": shadow_nbytes(ema),
    }

    # Swap: the forward must use the average, then the live weights again.
    x, _ = batch(99)
    with torch.no_grad():
        live_out = model(x)
        with ema.applied():
            ema_out = model(x)
        after_out = model(x)
        with ref_ema.applied():
            ref_out = ref(x)
    out["swap_err"] = (ema_out - ref_out).abs().max().item()
    out["swap_moved"] = (ema_out - live_out).abs().max().item()
    out["restored"] = torch.equal(after_out, live_out)
    # Training goes on after an evaluation forward (the EMA resharded the root).
    _step(model, opt, x[:per], torch.zeros(per, dtype=torch.long))
    ema.update()

    save_dcp(ema, folder / "dcp")
    save_consolidated(ema, folder / "full.safetensors")
    saved_full = full_shadow(ema)
    if rank == 0:
        torch.save({"shadow": saved_full, "step": ema.step}, folder / "oracle.pt")
    # Updates are local: rank 0 alone updates; any collective inside would hang it.
    if rank == 0:
        for _ in range(3):
            ema.update()
    out["solo_updates"] = True
    if load_from is not None:
        oracle = torch.load(Path(load_from) / "oracle.pt", weights_only=True)
        for kind, load in (("dcp", load_dcp), ("full.safetensors", load_consolidated)):
            fresh = EMA(sharded(small()), DECAY)
            load(fresh, Path(load_from) / kind)
            got = full_shadow(fresh)
            out[f"load_{kind}_bitwise"] = all(
                torch.equal(got[k], oracle["shadow"][k]) for k in oracle["shadow"]
            ) and set(got) == set(oracle["shadow"])
            out[f"load_{kind}_step"] = fresh.step == oracle["step"]
    # The averaged model state dict (DTensors) and copy_to agree with the gathered shadow.
    current = full_shadow(ema)  # rank 0 has moved on alone: not saved_full any more
    averaged = {k: v.full_tensor() for k, v in ema.averaged_state_dict().items()}
    ema.copy_to()
    written = {k: v.full_tensor() for k, v in model.state_dict().items()}
    out["averaged_state_dict"] = all(torch.equal(averaged[k], t) for k, t in current.items())
    out["copy_to"] = all(torch.equal(written[k], t) for k, t in current.items())
    return out
