"""Old-task / new-task pairs for the forgetting benchmark, built from data that ships offline.

Every task pair uses scikit-learn's bundled ``load_digits`` (1,797 8x8 images,
no download). Task A is what the model learns first ("pre-training"), task B
what it is fine-tuned on; forgetting is the drop of accuracy on A.

Shifts:
    permuted: B is A with a fixed permutation of the 64 pixels.
    rotated: B is A rotated by 90 degrees.
    inverted: B is A with pixel intensities inverted (1 - x).
    class_split: A is digits 0-4, B is digits 5-9, one 10-way head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SHIFTS", "Split", "TaskPair", "digits_task", "digits_tasks"]

SHIFTS = ("permuted", "rotated", "inverted", "class_split")


@dataclass(frozen=True)
class Split:
    """Features and labels of one task, split into train, validation and test."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass(frozen=True)
class TaskPair:
    """An old task A and a new task B over the same input and label spaces."""

    name: str
    a: Split
    b: Split
    num_features: int
    num_classes: int


def _load() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the benchmark needs scikit-learn; install `pip install 'emaweights[bench]'`"
        ) from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


def _split_indices(y: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stratified 60/20/20 split, deterministic for ``seed``."""
    g = torch.Generator().manual_seed(seed)
    parts: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_tr, n_va = int(0.6 * len(idx)), int(0.2 * len(idx))
        parts[0].append(idx[:n_tr])
        parts[1].append(idx[n_tr : n_tr + n_va])
        parts[2].append(idx[n_tr + n_va :])
    return torch.cat(parts[0]), torch.cat(parts[1]), torch.cat(parts[2])


def _make_split(x: Tensor, y: Tensor, idx: tuple[Tensor, Tensor, Tensor]) -> Split:
    tr, va, te = idx
    return Split(x[tr], y[tr], x[va], y[va], x[te], y[te])


def _shifted(x: Tensor, shift: str) -> Tensor:
    if shift == "permuted":
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(12345))
        return x[:, perm]
    if shift == "rotated":
        return torch.rot90(x.view(-1, 8, 8), k=1, dims=(1, 2)).reshape(-1, 64)
    if shift == "inverted":
        return 1.0 - x
    raise ValueError(f"unknown shift {shift!r}; known: {SHIFTS}")


def digits_task(shift: str, split_seed: int = 0) -> TaskPair:
    """Build one task pair from ``load_digits``.

    Args:
        shift: one of :data:`SHIFTS`.
        split_seed: seed of the stratified train/validation/test split.

    Raises:
        ValueError: ``shift`` is unknown.
    """
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; known: {SHIFTS}")
    x, y = _load()
    if shift == "class_split":
        old, new = y < 5, y >= 5
        a = _make_split(x[old], y[old], _split_indices(y[old], split_seed))
        b = _make_split(x[new], y[new], _split_indices(y[new], split_seed))
        return TaskPair(shift, a, b, 64, 10)
    idx = _split_indices(y, split_seed)
    return TaskPair(shift, _make_split(x, y, idx), _make_split(_shifted(x, shift), y, idx), 64, 10)


def digits_tasks(shifts: tuple[str, ...] = SHIFTS, split_seed: int = 0) -> list[TaskPair]:
    """Build the task pairs for ``shifts``."""
    return [digits_task(s, split_seed) for s in shifts]
