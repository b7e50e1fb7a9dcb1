"""load_dcp never runs code from a crafted ``.metadata`` and still loads a real checkpoint."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from emaweights import EMA, io
from emaweights.distributed import load_dcp, save_dcp

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no distributed")


class _Evil:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def _saved(folder: Path) -> EMA:
    torch.manual_seed(0)
    ema = EMA(nn.Linear(3, 2), 0.5)
    ema.update()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        save_dcp(ema, folder)
    return ema


def test_crafted_metadata_runs_nothing(tmp_path: Path) -> None:
    """A .metadata pickle that would touch a marker is refused with LoadError; nothing runs."""
    folder = tmp_path / "ck"
    _saved(folder)
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(io.LoadError, match="refused DCP metadata"):
        load_dcp(EMA(nn.Linear(3, 2)), folder)
    assert not marker.exists()
    pickle.loads((folder / ".metadata").read_bytes())  # the oracle: a full unpickle runs it
    assert marker.exists()


def test_shard_outside_folder_refused(tmp_path: Path) -> None:
    """Metadata naming a shard file outside the folder (../x) is refused."""
    folder = tmp_path / "ck"
    _saved(folder)
    meta = pickle.loads((folder / ".metadata").read_bytes())
    for info in meta.storage_data.values():
        info.relative_path = "../outside.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(io.LoadError, match="outside its folder"):
        load_dcp(EMA(nn.Linear(3, 2)), folder)


def test_real_checkpoint_still_loads(tmp_path: Path) -> None:
    """The allow-listed reader loads what save_dcp wrote, bit for bit (oracle: the saved EMA)."""
    saved = _saved(tmp_path / "ck")
    fresh = EMA(nn.Linear(3, 2), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dcp(fresh, tmp_path / "ck")
    assert fresh.step == saved.step
    for k, v in saved.shadow.items():
        assert torch.equal(fresh.shadow[k], v)


def test_fifo_metadata_refused(tmp_path: Path) -> None:
    """A FIFO in place of .metadata is refused before it is opened."""
    folder = tmp_path / "ck"
    _saved(folder)
    (folder / ".metadata").unlink()
    import os

    os.mkfifo(folder / ".metadata")
    with pytest.raises(io.LoadError, match="not a regular file"):
        load_dcp(EMA(nn.Linear(3, 2)), folder)


def test_checkpoint_exception_becomes_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CheckpointException of torch (a BaseException) leaves save_dcp as CheckpointError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from emaweights.distributed import CheckpointError

    def failing(*args: object, **kwargs: object) -> None:
        raise CheckpointException("rank 1 failed", {})

    monkeypatch.setattr(dcp, "save", failing)
    with pytest.raises(CheckpointError, match=r"save_dcp to .*failed: CheckpointException"):
        save_dcp(EMA(nn.Linear(3, 2)), tmp_path / "ck")
    assert issubclass(CheckpointError, Exception)


@pytest.mark.parametrize(
    "meta", ["[" * 100_000 + "]" * 100_000, "[1, 2]", '{"step": 1e999999}', '{"step": [[]]}']
)
def test_hostile_consolidated_metadata_is_a_load_error(tmp_path: Path, meta: str) -> None:
    """Deep nesting, a non-object, huge numbers and wrong types in the metadata give LoadError."""
    from emaweights.distributed import load_consolidated

    path = tmp_path / "full.safetensors"
    io.save_safetensors(
        {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)},
        path,
        metadata={"emaweights.state": meta},
    )
    ema = EMA(nn.Linear(3, 2))
    with pytest.raises((io.LoadError, ValueError, KeyError)):
        load_consolidated(ema, path)


def test_load_dcp_recovers_a_nan_poisoned_ema(tmp_path: Path) -> None:
    """A good DCP checkpoint restores an EMA whose average holds NaN (no state_dict() backup)."""
    saved = _saved(tmp_path / "ck")
    poisoned = EMA(nn.Linear(3, 2), 0.5)
    with torch.no_grad():
        next(iter(poisoned.storage.local_tensors.values())).fill_(float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dcp(poisoned, tmp_path / "ck")
    for k, v in saved.shadow.items():
        assert torch.equal(poisoned.shadow[k], v)


def _save_quiet(ema: EMA, folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_dcp(ema, folder)


def test_save_dcp_replaces_the_folder_whole(tmp_path: Path) -> None:
    """A second save into the same folder replaces it whole; no sibling is left behind."""
    ema = _saved(tmp_path / "ck")
    ema.model.weight.data.add_(1.0)
    ema.update()
    _save_quiet(ema, tmp_path / "ck")
    fresh = EMA(nn.Linear(3, 2), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dcp(fresh, tmp_path / "ck")
    assert fresh.step == ema.step == 2
    assert torch.equal(fresh.shadow["weight"], ema.shadow["weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_killed_save_sibling_is_never_read_and_is_cleaned(tmp_path: Path) -> None:
    """A killed save's sibling (no commit marker) is never read; the next save removes it."""
    ema = _saved(tmp_path / "ck")
    stale = tmp_path / ".ck.0123456789ab.dcp-tmp"
    stale.mkdir()
    (stale / ".metadata").write_bytes(b"torn")
    _save_quiet(ema, tmp_path / "ck")
    assert not stale.exists()


def test_load_between_the_two_renames_finds_the_committed_save(tmp_path: Path) -> None:
    """Without an atomic exchange a commit is two renames; a load between them gets the new save."""
    from emaweights import distributed

    old = _saved(tmp_path / "ck")
    new = _saved(tmp_path / "staged")
    new.model.weight.data.add_(1.0)
    new.update()
    _save_quiet(new, tmp_path / "staged")
    # The state the two-rename commit passes through: old folder renamed, committed sibling not yet.
    (tmp_path / "ck").rename(tmp_path / ".ck.aaaaaaaaaaaa.dcp-old")
    (tmp_path / "staged").rename(tmp_path / ".ck.aaaaaaaaaaaa.dcp-tmp")
    (tmp_path / ".ck.aaaaaaaaaaaa.dcp-tmp" / distributed._COMMITTED).write_bytes(b"complete\n")
    fresh = EMA(nn.Linear(3, 2), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dcp(fresh, tmp_path / "ck")
    assert fresh.step == new.step != old.step
    assert torch.equal(fresh.shadow["weight"], new.shadow["weight"])


def test_two_rename_fallback_commits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where renameat2 is missing the fallback commit still leaves exactly the new save."""
    from emaweights import distributed

    monkeypatch.setattr(distributed, "_exchange", lambda a, b: False)
    ema = _saved(tmp_path / "ck")
    ema.update()
    _save_quiet(ema, tmp_path / "ck")
    fresh = EMA(nn.Linear(3, 2), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dcp(fresh, tmp_path / "ck")
    assert fresh.step == ema.step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "5", True])
def test_bad_timeout_refused(tmp_path: Path, bad: object) -> None:
    """A timeout that is not a positive finite number is refused, naming it; nothing written."""
    from emaweights.distributed import set_timeout

    ema = EMA(nn.Linear(3, 2), 0.5)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        save_dcp(ema, tmp_path / "ck", timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        set_timeout(bad)  # type: ignore[arg-type]
    assert not (tmp_path / "ck").exists()
