"""Ranks for the distributed crash tests (forkable: module-level functions).

A rank killed or stuck inside save_dcp, or a peer that never joins the
cross-rank non-finite check.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from emaweights import EMA
from emaweights.distributed import PeerTimeoutError, full_shadow, save_dcp, set_timeout

WALL_S = 60.0  # the parent kills any rank still alive after this
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _model() -> torch.nn.Module:
    from tests.distributed._workers import sharded, small

    return sharded(small())


def _advance(ema: EMA, n: int) -> None:
    """Change the weights and average them, so every save holds new values in every row."""
    with torch.no_grad():
        for _ in range(n):
            for p in ema.model.parameters():
                p.to_local().add_(1.0)
            ema.update()


def _record(folder: Path, name: str, ema: EMA) -> None:
    """Rank 0 keeps the full average and step of a save: the oracle the loaded folder must equal."""
    full = {k: v.clone() for k, v in full_shadow(ema).items()}  # a collective: every rank calls
    if dist.get_rank() == 0:
        torch.save({"step": ema.step, "shadow": full}, folder / f"{name}.pt")


def _arm(mode: str, delay: float) -> None:
    """On the victim rank: die or hang inside the next DCP write, or die after ``delay`` s."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    original = FileSystemWriter.write_data

    def write_data(self: Any, plan: Any, planner: Any) -> Any:
        if mode == "before_write":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "hang":
            time.sleep(WALL_S)
            os._exit(0)
        future = original(self, plan, planner)
        future.wait()
        if mode == "after_write":
            os.kill(os.getpid(), signal.SIGKILL)
        return future

    FileSystemWriter.write_data = write_data  # type: ignore[method-assign]
    if mode == "random":
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()


def save_killed(
    rank: int, folder: Path, mode: str, delay: float, timeout: float, naive: bool
) -> None:
    """Save A, advance, save B into the same folder while rank 1 dies (or hangs) in the save."""
    ema = EMA(_model(), 0.8)
    _advance(ema, 2)
    _record(folder, "A", ema)
    save_dcp(ema, folder / "ck", timeout=timeout)  # the first save also makes the side group
    begin = time.monotonic()
    save_dcp(ema, folder / "ck", timeout=timeout)
    took = time.monotonic() - begin  # random kills land in [0, delay x this]: inside the save
    _advance(ema, 3)
    _record(folder, "B", ema)
    dist.barrier()
    out: dict[str, Any] = {"rank": rank}
    if rank == 1:
        (folder / "rank1.json").write_text(json.dumps({"armed": mode}))  # its end: about to die
        _arm(mode, delay * took)
    begin = time.monotonic()
    try:
        if naive:  # the unsafe way: DCP straight into the folder of the previous save
            import torch.distributed.checkpoint as dcp

            dcp.save({"ema": ema.state_dict()}, checkpoint_id=str(folder / "ck"))
        else:
            save_dcp(ema, folder / "ck", timeout=timeout)
        out["outcome"] = "saved"
    except Exception as err:
        out["outcome"] = type(err).__name__
        out["message"] = str(err)[-300:]  # its end says what the folder holds
    out["elapsed"] = time.monotonic() - begin
    if rank == 0:
        (folder / "rank0.json").write_text(json.dumps(out))


def agreement_stuck(
    rank: int, folder: Path, mode: str, delay: float, timeout: float, naive: bool
) -> None:
    """Rank 1 never joins the non-finite agreement of nonfinite='skip': rank 0 must raise."""
    set_timeout(timeout)
    ema = EMA(_model(), 0.8, nonfinite="skip")
    ema.update()  # both ranks: the agreement works
    out: dict[str, Any] = {"rank": rank}
    if rank == 1:
        (folder / "rank1.json").write_text(json.dumps({"armed": mode}))
        if mode == "hang":
            time.sleep(WALL_S)
        os._exit(0)
    begin = time.monotonic()
    try:
        ema.update()
        out["outcome"] = "updated"
    except PeerTimeoutError as err:
        out["outcome"] = "PeerTimeoutError"
        out["message"] = str(err)[:300]
    out["elapsed"] = time.monotonic() - begin
    out["step"] = ema.step
    (folder / f"rank{rank}.json").write_text(json.dumps(out))


def _entry(rank: int, fn_name: str, world: int, folder: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=WALL_S),
    )
    globals()[fn_name](rank, Path(folder), *args)
    os._exit(0)  # a peer is dead: destroying the process group could wait for it


def launch(
    fn_name: str,
    folder: Path,
    mode: str,
    delay: float = 0.0,
    timeout: float = 5.0,
    naive: bool = False,
) -> list[dict[str, Any]]:
    """Run 2 gloo ranks; return both markers (each rank writes one at its end)."""
    folder.mkdir(parents=True, exist_ok=True)
    if START_METHOD == "fork":
        import torch.distributed.checkpoint
        import torch.distributed.fsdp  # noqa: F401
    ctx = mp.start_processes(
        _entry,
        args=(fn_name, 2, str(folder), (mode, delay, timeout, naive)),
        nprocs=2,
        join=False,
        start_method=START_METHOD,
    )
    deadline = time.monotonic() + WALL_S
    ends = [folder / f"rank{rank}.json" for rank in range(2)]
    # Once both markers exist the trial is over: a rank still sleeping in its hang is killed.
    while time.monotonic() < deadline and any(p.is_alive() for p in ctx.processes):
        if all(e.exists() for e in ends):
            ctx.processes[0].join(2.0)
            break
        time.sleep(0.05)
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
            p.join()
    markers = []
    for rank in range(2):
        marker = folder / f"rank{rank}.json"
        if not marker.exists():
            raise AssertionError(f"rank {rank} did not reach its end")
        markers.append(json.loads(marker.read_text()))
    return markers


def random_delay(seed: int, upto: float) -> float:
    """A reproducible kill moment in [0, upto], in units of one save's duration."""
    return random.Random(seed).uniform(0.0, upto)
