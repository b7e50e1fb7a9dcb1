"""One list of every averager: a new averager gets the conformance battery by adding one line."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import emaweights
from emaweights import EMA, SWA, MultiEMA, SwitchEMA
from emaweights.post_hoc import PostHocEMA

# Where averagers that write files (PostHocEMA's snapshots) put them: the n-th one
# made since use_scratch(root) writes in root / "files<n>", so that a resume in a new
# process that calls use_scratch with the same root finds the directory its run wrote.
_SCRATCH: dict[str, Any] = {"root": None, "count": 0}


def use_scratch(root: Path) -> None:
    """Put the files of the averagers made from now on under ``root``, numbered from 0."""
    _SCRATCH.update(root=Path(root), count=0)


def scratch_dir() -> Path:
    """A fresh directory for one averager's files (under a temporary root if none is set)."""
    if _SCRATCH["root"] is None:
        use_scratch(Path(tempfile.mkdtemp(prefix="emaweights-conformance-")))
    folder: Path = _SCRATCH["root"] / f"files{_SCRATCH['count']}"
    _SCRATCH["count"] += 1
    return folder


def copy_files(root: Path, dest: Path) -> None:
    """Copy the files written under ``root`` into ``dest``, as they are now.

    A resume test copies them at the checkpoint: the uninterrupted run goes on
    writing under ``root``, and a state is loadable only with the files it lists.
    """
    if Path(root).is_dir():
        shutil.copytree(root, dest, dirs_exist_ok=True)


@dataclass(frozen=True)
class Case:
    """How to make one averager for the battery."""

    name: str
    make: Callable[..., Any]  # (model, **options) -> averager
    # (source, model, **options) -> an averager that can load source's state in this
    # process (PostHocEMA: in source's snapshot directory); default: make(model).
    make_like: Callable[..., Any] | None = None

    def like(self, source: Any, model: nn.Module, **options: Any) -> Any:
        """An averager of this case on ``model`` that can load ``source``'s state."""
        if self.make_like is None:
            return self.make(model, **options)
        return self.make_like(source, model, **options)


AVERAGERS = [
    Case("EMA", lambda m, **o: EMA(m, 0.9, **o)),
    Case("EMA-debiased", lambda m, **o: EMA(m, 0.9, anchor="debiased", **o)),
    Case(
        "EMA-stochastic",
        lambda m, **o: EMA(m, 0.9, dtype=torch.bfloat16, rounding="stochastic", seed=0, **o),
    ),
    Case("MultiEMA", lambda m, **o: MultiEMA(m, [0.9, 0.5], **o)),
    Case("SWA", lambda m, **o: SWA(m, **o)),
    Case("SwitchEMA", lambda m, **o: SwitchEMA(m, 0.9, switch_every=4, **o)),
    Case("LAWA", lambda m, **o: emaweights.LAWA(m, k=2, **o)),
    Case("BEMA", lambda m, **o: emaweights.BEMA(m, **o)),
    Case("PullBack", lambda m, **o: emaweights.PullBack(m, update_every=2, **o)),
    Case(
        "PostHocEMA",
        lambda m, **o: PostHocEMA(m, scratch_dir(), snapshot_every=2, **o),
        lambda src, m, **o: PostHocEMA(m, src.directory, snapshot_every=2, **o),
    ),
]

BY_NAME = {c.name: c for c in AVERAGERS}


def bn_model(seed: int = 0) -> nn.Module:
    """A tiny model with BatchNorm (float and integer buffers)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


class Tied(nn.Module):
    """A tiny language-model shape: the head shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight


@torch.no_grad()
def train_step(model: nn.Module, step: int) -> None:
    """A deterministic stand-in for an optimizer step (depends only on ``step``)."""
    for i, p in enumerate(model.parameters()):
        p.add_(torch.sin(torch.arange(p.numel(), dtype=p.dtype) + step + i).view(p.shape) * 0.1)
