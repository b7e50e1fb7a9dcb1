"""Run a worker function on N gloo/CPU processes and check every rank reached its end."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60.0
# fork: the ranks inherit the imported torch instead of importing it again (seconds per rank
# on a loaded 2-core machine); each rank runs with one intra-op thread, so no OpenMP pool is
# used after the fork. spawn where fork does not exist.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _entry(
    rank: int, fn: Callable[..., dict[str, Any]], world: int, folder: str, args: tuple[Any, ...]
) -> None:
    torch.set_num_threads(1)  # CI has 2 cores shared by all ranks
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world
    )
    try:
        result = fn(rank, world, Path(folder), *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The marker the parent checks: written only when the worker ran to its end.
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps({"done": True, **result}))


def _preload() -> None:
    """Import once in the parent what every forked rank would import lazily (DDP: dynamo)."""
    import torch._dynamo
    import torch.distributed.checkpoint
    import torch.distributed.fsdp  # noqa: F401


def launch(
    fn: Callable[..., dict[str, Any]], world: int, folder: Path, *args: Any
) -> list[dict[str, Any]]:
    """Spawn ``world`` ranks running ``fn(rank, world, folder, *args)``; return their results.

    Raises if a rank fails, does not finish within :data:`TIMEOUT_S`, or leaves no marker.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if START_METHOD == "fork":
        _preload()
    ctx = mp.start_processes(
        _entry,
        args=(fn, world, str(folder), args),
        nprocs=world,
        join=False,
        start_method=START_METHOD,
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed workers did not finish within {TIMEOUT_S} s")
    results = []
    for rank in range(world):
        marker = folder / f"rank{rank}.json"
        if not marker.exists():
            raise AssertionError(f"rank {rank} did not report reaching its end")
        results.append(json.loads(marker.read_text()))
    return results
