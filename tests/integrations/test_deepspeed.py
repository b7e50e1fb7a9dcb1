"""DeepSpeed ZeRO-3 on CPU (gloo, 2 ranks): the EMA on parameter partitions.

Slow (DeepSpeed's first start compiles an extension) and skipped unless
DeepSpeed is installed (``pip install 'emaweights[deepspeed]'``).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks an accelerator
pytest.importorskip("deepspeed")

from tests.distributed import _harness
from tests.integrations import _deepspeed_zero3 as _worker

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed"),
]

TOL = 1e-6  # float32 under ZeRO-3 against the float64 oracle
WORLD = 2


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    """One ZeRO-3 run at 2 ranks per model dtype (DeepSpeed's first start may compile ~80 s)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_harness, "TIMEOUT_S", 300.0)
        folder = tmp_path_factory.mktemp(f"zero3_{request.param}")
        results = _harness.launch(_worker.zero3, WORLD, folder, request.param == "bf16")
    for r in results:
        r["bf16"] = request.param == "bf16"
    return results


def test_zero3_ema_matches_float64_references(runs: list[dict[str, Any]]) -> None:
    """The float32 average equals float64 EMAs of the live weights and of fp32 training."""
    for r in runs:
        assert r["shadow_dtype"] == "torch.float32"
        assert r["live_ema_err"] < TOL
        if not r["bf16"]:
            assert r["ref_err"] < TOL


def test_zero3_shadow_is_partitioned(runs: list[dict[str, Any]]) -> None:
    """Each rank stores only its partitions (padding excluded): they sum to the full size."""
    full = runs[0]["full_numel"]
    for r in runs:
        assert r["numel"] < full
    assert sum(r["numel"] for r in runs) == full


def test_zero3_swap_changes_the_forward_to_the_average(runs: list[dict[str, Any]]) -> None:
    """Inside applied() the forward is the EMA model's; afterwards it is the live model's again."""
    for r in runs:
        if not r["bf16"]:
            assert r["live_err"] < TOL
        assert r["swap_changed"] > 100 * TOL
        assert r["swap_err"] < TOL
        assert r["restore_err"] == 0.0


def test_zero3_state_round_trips(runs: list[dict[str, Any]]) -> None:
    """Partition state and gathered state reload exactly; gathered state loads unsharded."""
    for r in runs:
        assert r["partition_roundtrip_err"] == 0.0
        assert r["gathered_roundtrip_err"] == 0.0
        assert r["plain_err"] < TOL
