"""Snapshot helpers: prove that a refused call left an EMA exactly as it was."""

from __future__ import annotations

from typing import Any

import torch

from emaweights import EMA


def snapshot(ema: EMA) -> dict[str, Any]:
    """Everything an EMA holds: counters, configuration and shadow values (copied)."""
    return {
        "counters": (ema.step, ema._last_step, ema.num_updates, ema.skipped_updates),
        "init_weight": ema.init_weight,
        "config": ema._config(),
        "shadow": {k: v.clone() for k, v in ema.shadow.items()},
    }


def assert_unchanged(ema: EMA, before: dict[str, Any]) -> None:
    """The EMA's full state equals ``before`` bit for bit."""
    after = snapshot(ema)
    assert after["counters"] == before["counters"]
    assert after["init_weight"] == before["init_weight"]
    assert after["config"] == before["config"]
    assert after["shadow"].keys() == before["shadow"].keys()
    for k, v in before["shadow"].items():
        assert torch.equal(after["shadow"][k], v), k
