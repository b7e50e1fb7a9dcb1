"""FSDP2 edge cases: one rank sees NaN; the root is left unsharded by an eval forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import _edge_workers
from tests.distributed._harness import launch

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """FSDP2 at 2 ranks, NaN in rank 0's shard only."""
    return launch(_edge_workers.one_rank_nan, 2, tmp_path_factory.mktemp("nan"))


def test_skip_is_decided_by_all_ranks(run: list[dict[str, Any]]) -> None:
    """nonfinite='skip' skips the update on every rank, not only where the NaN is."""
    assert [r["skipped"] for r in run] == [1, 1]


def test_swap_of_a_nonfinite_shard_is_refused_on_every_rank(run: list[dict[str, Any]]) -> None:
    """A NaN in one rank's shadow shard makes applied() raise on every rank (no rank hangs)."""
    assert [r["swap_refused"] for r in run] == [True, True]


def test_torch_save_of_a_sharded_state_is_refused(run: list[dict[str, Any]]) -> None:
    """io.save_state refuses a DTensor state, of which torch.save would keep one shard."""
    assert [r["torch_save_refused"] for r in run] == [True, True]


def test_ema_made_and_copied_after_an_eval_forward(tmp_path: Path) -> None:
    """After an eval forward, EMA(model) still shards, and copy_to changes the next forward."""
    results = launch(_edge_workers.after_eval_forward, 2, tmp_path)
    assert all(r["sharded_shadow"] and r["copy_to_used"] for r in results)
