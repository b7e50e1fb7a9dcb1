"""Rank body of the DeepSpeed ZeRO-3 test: an EMA on the partitions against a float64 oracle.

Every rank builds the same model from the same seed, trains it under ZeRO-3 on
its slice of a global batch, and also trains a float64 copy on the whole global
batch in the same process with a hand-written EMA: the oracle every check uses.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from emaweights import EMA
from emaweights.integrations.deepspeed import (
    gathered_shadow,
    gathered_state_dict,
    load_gathered_state_dict,
)

DECAY = 0.8
STEPS = 4
GLOBAL_BATCH = 8
LR = 0.1
# The first weight (35 elements) is partitioned; the smaller tensors are "persistent"
# (ZeRO-3 keeps them gathered outside forward), so both kinds are exercised.
PERSISTENCE_THRESHOLD = 30


def make_model() -> nn.Module:
    """A small MLP, the same on every rank."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def batch(step: int) -> tuple[Tensor, Tensor]:
    """The global batch of ``step``: the same on every rank."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 5, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


def _loss(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean()


def _max_err(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _gathered_live(engine: Any) -> dict[str, Tensor]:
    """The full live weights of a ZeRO-3 model, in float64 (a collective)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params), torch.no_grad():
        return {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}


def zero3(rank: int, world: int, folder: Path, bf16: bool = False) -> dict[str, Any]:
    """Train under ZeRO-3 with an EMA; return errors against the float64 oracles.

    With ``bf16`` the model trains in bfloat16 (fp32 shadow): the float64
    training oracle no longer applies, but the EMA of the gathered live
    weights does.
    """
    import deepspeed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.init_distributed(dist_backend="gloo")  # reuses the group the harness made
    model = make_model()
    ref = copy.deepcopy(model).double()  # the oracle, trained on the whole global batch
    ref_ema = {n: p.detach().clone() for n, p in ref.named_parameters()}
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD,
        },
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default; the oracle does not
        "bf16": {"enabled": bf16},
    }
    dtype = torch.bfloat16 if bf16 else torch.float32
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config
    )
    ema = EMA(engine.module, DECAY)
    live_ema = _gathered_live(engine)  # the EMA of the weights ZeRO-3 really holds
    part = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        mine = slice(rank * part, (rank + 1) * part)
        engine.backward(_loss(engine(x[mine].to(dtype)).float(), y[mine]))
        engine.step()
        ema.update()
        with torch.no_grad():
            for n, p in _gathered_live(engine).items():
                live_ema[n].lerp_(p, 1 - DECAY)
        ref_opt.zero_grad()
        _loss(ref(x.double()), y.double()).backward()
        ref_opt.step()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                ref_ema[n].lerp_(p, 1 - DECAY)

    full = gathered_shadow(ema)
    result: dict[str, Any] = {
        "shadow_dtype": str(next(iter(full.values())).dtype),
        "live_ema_err": _max_err(full, live_ema),
        "ref_err": _max_err(full, ref_ema),
        "numel": ema._shadow.numel(),
        "full_numel": sum(p.numel() for p in ref.parameters()),
    }

    # Swap: the forward must use the average, and the live weights must come back.
    x, _ = batch(STEPS)
    ema_model = make_model().to(dtype)  # the forward in the model's dtype, with the average
    ema_model.load_state_dict({n: t.to(dtype) for n, t in live_ema.items()})
    engine.eval()
    with torch.no_grad():
        x = x.to(dtype)
        live_out = engine(x).double()
        with ema.applied():
            ema_out = engine(x).double()
        after_out = engine(x).double()
        result["swap_err"] = float((ema_out - ema_model(x).double()).abs().max())
        result["swap_changed"] = float((ema_out - live_out).abs().max())
        result["restore_err"] = float((after_out - live_out).abs().max())
        result["live_err"] = float((live_out - ref(x.double())).abs().max())

    # Checkpoints: per-rank partitions, and full tensors that load at any world size.
    partitions = ema.state_dict()
    torch.save(partitions, folder / f"ema_rank{rank}.pt")
    again = EMA(engine.module, DECAY)
    again.load_state_dict(torch.load(folder / f"ema_rank{rank}.pt", weights_only=True))
    result["partition_roundtrip_err"] = _max_err(gathered_shadow(again), full)
    gathered = gathered_state_dict(ema)
    if rank == 0:
        torch.save(gathered, folder / "ema_full.pt")
    torch.distributed.barrier()
    from_file = torch.load(folder / "ema_full.pt", weights_only=True)
    third = EMA(engine.module, DECAY)
    load_gathered_state_dict(third, from_file)
    result["gathered_roundtrip_err"] = _max_err(gathered_shadow(third), full)
    plain = EMA(make_model().to(dtype), DECAY)  # unsharded
    plain.load_state_dict(from_file)
    result["plain_err"] = _max_err(dict(plain.shadow), full)
    return result
