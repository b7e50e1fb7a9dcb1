"""PostHocEMA checkpoints: a resume in a new process continues the snapshot directory exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from emaweights.averager import SwapError
from emaweights.io import LoadError, load_safetensors
from emaweights.post_hoc import MANIFEST, PostHocEMA, load_manifest, reconstruct
from tests._models import mlp
from tests.conformance.registry import train_step  # no optimizer: keeps the worker's start short

pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVED, EVERY = 12, 6, 3


def _tracker(folder: Path, **options: Any) -> tuple[torch.nn.Module, PostHocEMA]:
    torch.manual_seed(0)
    model = mlp()
    options = {"snapshot_every": EVERY, "update_every": 1, **options}
    return model, PostHocEMA(model, folder, sigma_rels=(0.05, 0.10), **options)


def _run(tracker: PostHocEMA, model: torch.nn.Module, first: int, last: int) -> None:
    for s in range(first, last + 1):
        train_step(model, s)
        tracker.update()


def _checkpoint(folder: Path) -> tuple[PostHocEMA, Path]:
    """A run in ``folder`` to step SAVED, its checkpoint saved next to it."""
    model, tracker = _tracker(folder / "snaps")
    _run(tracker, model, 1, SAVED)
    path = folder / "ckpt.pt"
    torch.save({"model": model.state_dict(), "ema": tracker.state_dict()}, path)
    return tracker, path


def resume(folder: str) -> None:
    """In a fresh interpreter: load the checkpoint (weights_only) and run to step STEPS."""
    model, tracker = _tracker(Path(folder) / "snaps")
    saved = torch.load(Path(folder) / "ckpt.pt", weights_only=True)
    model.load_state_dict(saved["model"])
    tracker.load_state_dict(saved["ema"])
    _run(tracker, model, SAVED + 1, STEPS)


def test_resume_in_a_new_process_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """Resumed in a new process: same manifest, same files, reconstruct() bitwise equal."""
    model, tracker = _tracker(tmp_path / "whole")
    _run(tracker, model, 1, STEPS)
    _checkpoint(tmp_path / "resumed")
    before = {p.name: p.read_bytes() for p in (tmp_path / "resumed" / "snaps").iterdir()}
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    code = f"from tests.test_post_hoc_resume import resume; resume({str(tmp_path / 'resumed')!r})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=120)

    whole, resumed = tmp_path / "whole", tmp_path / "resumed" / "snaps"
    assert load_manifest(resumed) == load_manifest(whole)
    assert len(load_manifest(whole)["snapshots"]) == 2 * (STEPS // EVERY)
    for name, data in before.items():
        if name != MANIFEST:  # the earlier snapshots are kept, not overwritten
            assert (resumed / name).read_bytes() == data, name
    for entry in load_manifest(whole)["snapshots"]:
        a, b = load_safetensors(whole / entry["file"]), load_safetensors(resumed / entry["file"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), entry["file"]
    for sigma_rel in (0.05, 0.07):
        for step in (SAVED, STEPS):
            a, b = reconstruct(whole, sigma_rel, step), reconstruct(resumed, sigma_rel, step)
            assert a.keys() == b.keys()
            for key, value in a.items():
                assert torch.equal(b[key], value), (sigma_rel, step, key)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.dumps(_plain(a), sort_keys=True) == json.dumps(_plain(b), sort_keys=True)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _corrupt(state: dict[str, Any], how: str) -> dict[str, Any]:
    state = {**state, "snapshots": [dict(e) for e in state["snapshots"]]}
    if how == "format":
        state["format"] = "emaweights.MultiEMA"
    elif how == "version":
        state["version"] = 2
    elif how == "config":
        state["config"] = {**state["config"], "sigma_rels": [0.05, 0.2]}
    elif how == "tensor-shape":
        first = dict(state["emas"][0])
        first["shadow"] = {**first["shadow"], "0.weight": torch.zeros(2, 2)}
        state["emas"] = [first, *state["emas"][1:]]
    elif how == "tensor-name":
        first = dict(state["emas"][0])
        first["shadow"] = {**first["shadow"], "extra": torch.zeros(1)}
        state["emas"] = [first, *state["emas"][1:]]
    elif how == "snapshot-after-step":
        state["snapshots"][-1]["step"] = state["snapshots"][-2]["step"] = SAVED + 3
    elif how == "numbering":
        state["snapshots"][0]["file"] = "000009.safetensors"
    elif how == "profile":
        state["snapshots"][1]["gamma"] = state["snapshots"][0]["gamma"]
    elif how == "odd-count":
        state["snapshots"] = state["snapshots"][:-1]
    elif how == "counters":
        state["emas"] = [{**e, "num_updates": e["step"] + 1} for e in state["emas"]]
    return state


CORRUPTIONS = {  # how -> what the refusal names
    "format": "not an emaweights PostHocEMA state",
    "version": "unsupported PostHocEMA state version 2",
    "config": r"sigma_rels.*\[0\.05, 0\.2\]",
    "tensor-shape": r"0\.weight: shape \(2, 2\)",
    "tensor-name": "unexpected.*extra",
    "snapshot-after-step": "past the saved step 6",
    "numbering": "000009",
    "profile": "snapshot 1: expected file 000001.safetensors of gamma",
    "odd-count": "multiple of 2",
    "counters": "num_updates 7 is more than the saved step 6",
}


@pytest.mark.parametrize(("how", "message"), CORRUPTIONS.items())
def test_a_bad_state_is_refused_with_the_tracker_unchanged(
    tmp_path: Path, how: str, message: str
) -> None:
    """Wrong format, version, options, tensors, snapshot list or counters: refused, unchanged."""
    tracker, path = _checkpoint(tmp_path)
    before = tracker.state_dict()
    state = torch.load(path, weights_only=True)["ema"]
    with pytest.raises((ValueError, KeyError), match=message):
        tracker.load_state_dict(_corrupt(state, how))
    assert _same(tracker.state_dict(), before)
    tracker.load_state_dict(state)  # the intact state still loads


@pytest.mark.parametrize("option", [{"snapshot_every": EVERY + 1}, {"dtype": torch.float16}])
def test_other_snapshot_options_are_refused(tmp_path: Path, option: dict[str, Any]) -> None:
    """A tracker with another snapshot_every or dtype refuses the state, naming the option."""
    _, path = _checkpoint(tmp_path)
    _, other = _tracker(tmp_path / "snaps", **option)
    with pytest.raises(ValueError, match=next(iter(option)).replace("dtype", "float")):
        other.load_state_dict(torch.load(path, weights_only=True)["ema"])
    assert other.snapshots == [] and other.step == 0


def test_a_manifest_with_later_snapshots_is_refused(tmp_path: Path) -> None:
    """The run went on after the checkpoint: the manifest lists extra snapshots, refused."""
    tracker, path = _checkpoint(tmp_path)
    _run(tracker, tracker.model, SAVED + 1, SAVED + EVERY)
    _, fresh = _tracker(tmp_path / "snaps")
    with pytest.raises(LoadError, match="lists 6 snapshots, the state 4"):
        fresh.load_state_dict(torch.load(path, weights_only=True)["ema"])
    assert fresh.snapshots == [] and fresh.step == 0


def test_a_missing_manifest_or_snapshot_is_refused(tmp_path: Path) -> None:
    """Another (empty) directory, or a snapshot file deleted: refused, tracker unchanged."""
    _, path = _checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)["ema"]
    _, elsewhere = _tracker(tmp_path / "other")
    with pytest.raises(LoadError, match=r"has no manifest\.json"):
        elsewhere.load_state_dict(state)
    (tmp_path / "snaps" / "000001.safetensors").unlink()
    _, fresh = _tracker(tmp_path / "snaps")
    with pytest.raises(FileNotFoundError, match="000001"):
        fresh.load_state_dict(state)
    assert elsewhere.step == fresh.step == 0 and not elsewhere.snapshots and not fresh.snapshots


def test_a_state_without_snapshots_refuses_a_directory_with_some(tmp_path: Path) -> None:
    """A state saved before the first snapshot does not adopt a directory that has some."""
    model, early = _tracker(tmp_path / "snaps")
    _run(early, model, 1, EVERY - 1)
    state = early.state_dict()
    _run(early, model, EVERY, EVERY)
    _, fresh = _tracker(tmp_path / "snaps")
    with pytest.raises(LoadError, match="the state 0"):
        fresh.load_state_dict(state)


def test_a_manifest_missing_later_snapshots_is_refused(tmp_path: Path) -> None:
    """A manifest put back to an earlier step lacks the state's later snapshots: refused."""
    model, tracker = _tracker(tmp_path / "snaps")
    _run(tracker, model, 1, EVERY)
    early = (tmp_path / "snaps" / MANIFEST).read_bytes()
    _run(tracker, model, EVERY + 1, SAVED)
    state = tracker.state_dict()
    (tmp_path / "snaps" / MANIFEST).write_bytes(early)
    _, fresh = _tracker(tmp_path / "snaps")
    with pytest.raises(LoadError, match="lists 2 snapshots, the state 4"):
        fresh.load_state_dict(state)
    assert fresh.snapshots == [] and fresh.step == 0


def test_index_picks_the_profile_for_applied_export_and_copy_to(tmp_path: Path) -> None:
    """applied(i), averaged_state_dict(i), copy_to(index=i) use the i-th sigma_rel's EMA."""
    model, tracker = _tracker(tmp_path / "snaps")
    _run(tracker, model, 1, SAVED)
    for i in range(len(tracker)):
        expected = tracker[i].averaged_state_dict()
        assert all(torch.equal(tracker.averaged_state_dict(i)[k], v) for k, v in expected.items())
        with tracker.applied(i) as m:
            assert all(torch.equal(m.state_dict()[k], v) for k, v in expected.items())
        other = mlp()
        tracker.copy_to(other, index=i)
        assert all(torch.equal(other.state_dict()[k], v) for k, v in expected.items())
    assert not torch.equal(tracker.averaged_state_dict(0)["0.weight"], expected["0.weight"])
    state = tracker.state_dict()
    with tracker.applied(1), pytest.raises(SwapError, match="restore"):
        tracker.load_state_dict(state)


def test_a_tracker_that_loaded_nothing_does_not_overwrite_a_run(tmp_path: Path) -> None:
    """A new tracker in a directory with a manifest refuses its first snapshot unless overwrite."""
    _checkpoint(tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "snaps").iterdir()}
    model, fresh = _tracker(tmp_path / "snaps")
    with pytest.raises(FileExistsError, match="load_state_dict"):
        _run(fresh, model, 1, EVERY)
    assert {p.name: p.read_bytes() for p in (tmp_path / "snaps").iterdir()} == before
    model, over = _tracker(tmp_path / "snaps", overwrite=True)
    _run(over, model, 1, EVERY)
    assert len(load_manifest(tmp_path / "snaps")["snapshots"]) == 2
