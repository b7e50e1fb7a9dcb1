"""Hostile post-hoc snapshot folders end in a clear error, in bounded time and memory.

Hand-written attacks first, then Hypothesis mutating one manifest field at a
time (``EMAWEIGHTS_FUZZ_EXAMPLES`` examples, as in test_fuzz.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emaweights import io
from emaweights.cli import main as cli_main
from emaweights.post_hoc import MANIFEST, PostHocEMA, reconstruct
from tests._models import mlp, train_step

pytest.importorskip("safetensors.torch")

EXAMPLES = int(os.environ.get("EMAWEIGHTS_FUZZ_EXAMPLES", "150"))
FAST = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid snapshot folder (snapshots at steps 4 and 8)."""
    folder = tmp_path_factory.mktemp("posthoc") / "snaps"
    torch.manual_seed(0)
    model = mlp()
    tracker = PostHocEMA(model, folder, snapshot_every=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for s in range(1, 9):
        train_step(model, opt, seed=s)
        tracker.update()
    return folder


@pytest.fixture
def folder(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the valid folder, beside a decoy file outside it."""
    copy = tmp_path / "snaps"
    shutil.copytree(pristine, copy)
    shutil.copy(copy / "000000.safetensors", tmp_path / "outside.safetensors")
    return copy


def _manifest(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / MANIFEST).read_text())
    return data


def _write(folder: Path, data: object) -> None:
    (folder / MANIFEST).write_text(json.dumps(data))


def _entry(folder: Path, key: str, value: object) -> None:
    data = _manifest(folder)
    data["snapshots"][0][key] = value
    _write(folder, data)


def _refused(folder: Path, match: str) -> None:
    """The folder is refused: LoadError matching ``match``, and the CLI exits 2 saying it."""
    with pytest.raises(io.LoadError, match=match):
        reconstruct(folder, 0.07)
    out = folder.parent / "w.safetensors"
    err = StringIO()
    with redirect_stderr(err):
        code = cli_main(["posthoc", str(folder), "--sigma-rel", "0.07", "--out", str(out)])
    assert code == 2 and re.search(match, err.getvalue())
    assert not out.exists()


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors"])
def test_file_outside_folder_refused(folder: Path, name: str) -> None:
    """A manifest `file` that climbs out of the folder is refused before anything is read."""
    _entry(folder, "file", name)
    _refused(folder, "not a plain name")


def test_absolute_file_refused(folder: Path) -> None:
    """An absolute `file` is refused, even when it names a valid snapshot."""
    _entry(folder, "file", str(folder.parent / "outside.safetensors"))
    _refused(folder, "not a plain name")


def test_symlink_out_refused(folder: Path) -> None:
    """A snapshot that is a symlink to a file outside the folder is refused."""
    (folder / "link.safetensors").symlink_to(folder.parent / "outside.safetensors")
    _entry(folder, "file", "link.safetensors")
    _refused(folder, "links outside")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("num_updates", 3e9, "num_updates must be an int"),
        ("num_updates", 3 * 10**9, "exceeds step"),
        ("num_updates", 10**30, "num_updates must be an int"),
        ("num_updates", -1, "num_updates must be an int"),
        ("step", True, "step must be an int"),
        ("step", "8", "step must be an int"),
        ("gamma", "x", "gamma must be a number"),
        ("gamma", float("nan"), "gamma must be a number"),
        ("gamma", -1, "gamma must be a number"),
        ("file", 5, "file must be a file name"),
        ("file", "", "file must be a file name"),
    ],
)
def test_bad_entry_field_refused(folder: Path, key: str, value: object, match: str) -> None:
    """A snapshot entry field of the wrong type or out of range is refused, naming it."""
    _entry(folder, key, value)
    _refused(folder, match)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("snapshots", 5, "snapshots must be a non-empty list"),
        ("snapshots", {}, "snapshots must be a non-empty list"),
        ("snapshots", [], "snapshots must be a non-empty list"),
        ("snapshots", [5], "malformed snapshot entry"),
        ("snapshots", [{}] * 5000, "more than 4096"),
        ("update_every", 0, "update_every must be an int"),
        ("update_every", "1", "update_every must be an int"),
        ("snapshot_every", 0, "snapshot_every must be an int"),
        ("start_step", -1, "start_step must be an int"),
        ("version", 2, "unsupported version"),
        ("format", "other", "not a post-hoc EMA manifest"),
    ],
)
def test_bad_manifest_field_refused(folder: Path, key: str, value: object, match: str) -> None:
    """A top-level manifest field of the wrong type or out of range is refused, naming it."""
    data = _manifest(folder)
    data[key] = value
    _write(folder, data)
    _refused(folder, match)


def test_disagreeing_counts_refused(folder: Path) -> None:
    """Snapshots of one step that disagree on num_updates are refused."""
    data = _manifest(folder)
    data["snapshots"][-1]["num_updates"] = 3
    _write(folder, data)
    _refused(folder, "disagree on num_updates")


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe not utf-8", b"[" * 100_000 + b"]" * 100_000, b"{", b"null"],
    ids=["bytes", "deep", "cut", "null"],
)
def test_unparseable_manifest_refused(folder: Path, payload: bytes) -> None:
    """Bad UTF-8, 100k-deep nesting, truncated or non-object JSON is refused as LoadError."""
    (folder / MANIFEST).write_bytes(payload)
    _refused(folder, "JSON|not a post-hoc")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_manifest_and_snapshot_refused(folder: Path) -> None:
    """A FIFO as manifest or as snapshot is refused without blocking on it."""
    os.replace(folder / "000000.safetensors", folder / "moved")
    os.mkfifo(folder / "000000.safetensors")
    _refused(folder, "not a regular file")
    os.replace(folder / MANIFEST, folder / "manifest.moved")
    os.mkfifo(folder / MANIFEST)
    _refused(folder, "not a regular file")


@pytest.mark.parametrize("damage", ["truncated", "pickled", "other tensors"])
def test_damaged_snapshot_refused(folder: Path, damage: str) -> None:
    """A truncated, pickled, or differently shaped snapshot is refused as LoadError."""
    victim = folder / "000003.safetensors"
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:64])
    elif damage == "pickled":
        torch.save({"w": torch.zeros(2)}, victim)
    else:
        io.save_safetensors({"w": torch.zeros(2)}, victim)
    _refused(folder, "000003.safetensors")


_json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(["../outside.safetensors", "/etc/passwd", "000001.safetensors"]),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
_fields = st.sampled_from(
    ["format", "version", "snapshot_every", "update_every", "start_step", "snapshots"]
    + [f"snapshots.{i}.{k}" for i in (0, 3) for k in ("file", "step", "gamma", "num_updates")]
)


@FAST
@given(field=_fields, value=_json_values)
def test_mutated_manifest_refused_or_valid(pristine: Path, field: str, value: object) -> None:
    """One manifest field replaced by any JSON value: a LoadError/ValueError or valid weights."""
    data = _manifest(pristine)
    original = json.dumps(data)
    node: Any = data
    *path, last = field.split(".")
    for key in path:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    try:
        _write(pristine, data)
        weights = reconstruct(pristine, 0.07)
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    except (ValueError, FileNotFoundError):  # LoadError is a ValueError
        pass
    finally:
        (pristine / MANIFEST).write_text(original)
