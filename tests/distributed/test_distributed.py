"""DDP and FSDP2 with gloo on CPU: the EMA against a single-process reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from emaweights import EMA
from emaweights.distributed import load_consolidated, shadow_nbytes
from tests.distributed import _workers
from tests.distributed._harness import launch

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed"),
]

TOL = 1e-6  # single-process vs data-parallel: only the order of the gradient sums differs


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """FSDP2 at 4 ranks (saves), then at 2 ranks (saves, and loads what 4 ranks saved)."""
    root = tmp_path_factory.mktemp("fsdp")
    four = launch(_workers.fsdp, 4, root / "w4", None)
    two = launch(_workers.fsdp, 2, root / "w2", str(root / "w4"))
    return {4: four, 2: two, 0: [{"folder": str(root)}]}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """DDP at 2 ranks."""
    return launch(_workers.ddp, 2, tmp_path_factory.mktemp("ddp"))


def test_ddp_ema_matches_single_process_on_every_rank(ddp_run: list[dict[str, Any]]) -> None:
    """Under DDP every rank's EMA is bitwise identical and equals the single-process EMA."""
    for r in ddp_run:
        assert r["same_on_all"]
        assert r["ref_err"] < TOL


def test_ddp_and_single_process_checkpoints_cross_over(ddp_run: list[dict[str, Any]]) -> None:
    """A DDP EMA's state loads into an EMA of the bare model, and the reverse, exactly."""
    for r in ddp_run:
        assert r["to_bare"] and r["to_ddp"]


def test_ddp_average_buffers_makes_batchnorm_statistics_agree(tmp_path: Path) -> None:
    """BatchNorm averages differ across DDP ranks; average_buffers_ sets them to their mean."""
    for r in launch(_workers.ddp_buffers, 2, tmp_path):
        assert r["differed"] and r["equal_after"] and r["unchanged_by_ddp_eval"]
        assert r["mean_err"] < TOL


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_gathered_shadow_matches_single_process(
    fsdp_runs: dict[int, list[dict[str, Any]]], world: int
) -> None:
    """The gathered FSDP2 shadow (DTensors) equals the single-process EMA on the same data."""
    for r in fsdp_runs[world]:
        assert r["dtensor"]
        assert r["ref_err"] < TOL


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_shards_sum_to_full_size(
    fsdp_runs: dict[int, list[dict[str, Any]]], world: int
) -> None:
    """Each rank stores only its shards: they sum to the single-process shadow size."""
    full = EMA(_workers.small(), _workers.DECAY)
    per_rank = [r["numel"] for r in fsdp_runs[world]]
    assert sum(per_rank) == full._shadow.numel()
    assert max(r["nbytes"] for r in fsdp_runs[world]) < shadow_nbytes(full)
    print(
        f"\nEMA bytes per rank, world 1: {shadow_nbytes(full)}; world {world}: "
        f"{[r['nbytes'] for r in fsdp_runs[world]]}"
    )


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_updates_need_no_communication(
    fsdp_runs: dict[int, list[dict[str, Any]]], world: int
) -> None:
    """Rank 0 updating alone finishes: an FSDP2 update makes no collective call."""
    assert all(r["solo_updates"] for r in fsdp_runs[world])


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_swap_changes_the_forward(
    fsdp_runs: dict[int, list[dict[str, Any]]], world: int
) -> None:
    """Inside applied() the FSDP2 forward gives the EMA's output; afterwards the live one."""
    for r in fsdp_runs[world]:
        assert r["swap_err"] < TOL
        assert r["swap_moved"] > 100 * TOL  # the average really differs from the live weights
        assert r["restored"]


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_averaged_state_dict_and_copy_to(
    fsdp_runs: dict[int, list[dict[str, Any]]], world: int
) -> None:
    """averaged_state_dict() and copy_to() of an FSDP2 EMA hold the gathered shadow."""
    for r in fsdp_runs[world]:
        assert r["averaged_state_dict"] and r["copy_to"]


@pytest.mark.parametrize("kind", ["dcp", "full.safetensors"])
def test_fsdp_checkpoint_saved_on_4_loads_on_2_bitwise(
    fsdp_runs: dict[int, list[dict[str, Any]]], kind: str
) -> None:
    """DCP and the consolidated file written by 4 ranks load bit-exactly on 2 ranks."""
    for r in fsdp_runs[2]:
        assert r[f"load_{kind}_bitwise"] and r[f"load_{kind}_step"]


def test_fsdp_consolidated_file_loads_in_a_single_process(
    fsdp_runs: dict[int, list[dict[str, Any]]],
) -> None:
    """The consolidated file of a 4-rank FSDP2 EMA loads into an EMA of the bare model."""
    folder = Path(fsdp_runs[0][0]["folder"]) / "w4"
    oracle = torch.load(folder / "oracle.pt", weights_only=True)
    ema = EMA(_workers.small(), _workers.DECAY)
    load_consolidated(ema, folder / "full.safetensors")
    assert ema.step == oracle["step"]
    for name, t in oracle["shadow"].items():
        assert torch.equal(ema.shadow[name], t)
