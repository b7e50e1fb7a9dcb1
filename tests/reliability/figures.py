"""Print the figures of docs/reliability.md.

Hostile states and the time to refuse them, and the per-update cost of the
model identity check on the tiny MLP of bench-speed.

Run: ``PYTHONPATH=src python -m tests.reliability.figures`` (the kill-trial figures come
from ``pytest -m slow -s tests/reliability/test_dcp_crash.py``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from emaweights import EMA
from emaweights.schedules import PowerWarmup, Warmup


def _dag(depth: int) -> list[Any]:
    node: list[Any] = [0]
    for _ in range(depth):
        node = [node, node]
    return node


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _hostile_states() -> list[tuple[str, Callable[[], None]]]:
    def load(edit: Callable[[dict[str, Any]], None], schedule: Any = 0.9) -> Callable[[], None]:
        def run() -> None:
            ema = EMA(_model(), schedule)
            ema.update()
            state = ema.state_dict()
            state = {**state, "config": dict(state["config"])}
            edit(state)
            ema.load_state_dict(state, strict=False)
            ema.update()

        return run

    def far(state: dict[str, Any]) -> None:
        state["step"] = 10**12

    def key(k: str, v: Any) -> Callable[[dict[str, Any]], None]:
        return lambda s: s.__setitem__(k, v)

    def cfg(k: str, v: Any) -> Callable[[dict[str, Any]], None]:
        return lambda s: s["config"].__setitem__(k, v)

    return [
        ("step=10**12, Warmup (update after load)", load(far, Warmup(0.999))),
        ("step=10**12, PowerWarmup (update after load)", load(far, PowerWarmup())),
        ("format = 2**200-path list DAG", load(key("format", _dag(200)))),
        ("version = list DAG", load(key("version", _dag(200)))),
        ("config.anchor = list DAG", load(cfg("anchor", _dag(200)))),
        ("config.schedule.kind = list DAG", load(cfg("schedule", {"kind": _dag(200)}))),
        ("config.update_every = list DAG", load(cfg("update_every", _dag(200)))),
        ("num_updates > step", load(key("num_updates", 10**9))),
        ("last_step > step", load(key("last_step", 10**9))),
        ("step = 2**70", load(key("step", 2**70))),
    ]


def hostile() -> None:
    """Each hostile state: outcome and wall time to refuse (or accept and update)."""
    print("| hostile state | outcome | time |\n| --- | --- | --- |")
    for name, run in _hostile_states():
        begin = time.perf_counter()
        try:
            run()
            outcome = "accepted, updated"
        except Exception as err:  # printing the outcome is the point
            outcome = f"{type(err).__name__} ({len(str(err))} chars)"
        print(f"| {name} | {outcome} | {(time.perf_counter() - begin) * 1e3:.1f} ms |")


def identity_check_cost(rounds: int = 15, calls: int = 2000) -> None:
    """Median update time of the tiny MLP with the identity check as is, and replaced by a no-op."""
    from emaweights.averager import Averager
    from emaweights.bench.speed import build_model

    torch.set_num_threads(1)
    real = Averager._check_signature
    times: dict[str, list[float]] = {"with check": [], "check removed": []}
    ema = EMA(build_model("mlp"), 0.999)
    for _ in range(rounds):  # interleaved, so load on the machine hits both alike
        for label in times:
            Averager._check_signature = real if label == "with check" else (lambda self: None)  # type: ignore[method-assign]
            ema.update()
            begin = time.perf_counter()
            for _ in range(calls):
                ema.update()
            times[label].append((time.perf_counter() - begin) / calls * 1e6)
    Averager._check_signature = real  # type: ignore[method-assign]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"tiny MLP update: {med['with check']:.1f} us with the identity check, "
        f"{med['check removed']:.1f} us without "
        f"(+{(med['with check'] / med['check removed'] - 1) * 100:.1f} %), "
        f"median of {rounds} interleaved rounds of {calls} calls"
    )


if __name__ == "__main__":
    hostile()
    identity_check_cost()
