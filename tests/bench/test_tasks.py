"""The load_digits task pairs are well-formed and deterministic."""

from __future__ import annotations

import pytest
import torch

from emaweights.bench.tasks import SHIFTS, digits_task


@pytest.mark.parametrize("shift", SHIFTS)
def test_task_shapes_and_disjoint_splits(shift: str) -> None:
    """Splits have 64 features, labels in range, and the same sizes for A and B where shared."""
    t = digits_task(shift)
    for s in (t.a, t.b):
        assert s.x_train.shape[1] == 64
        assert int(s.y_train.max()) < 10
        assert len(s.x_train) > len(s.x_val) > 0 and len(s.x_test) > 0
    if shift == "class_split":
        assert set(t.a.y_train.tolist()) == {0, 1, 2, 3, 4}
        assert set(t.b.y_train.tolist()) == {5, 6, 7, 8, 9}
    else:
        assert torch.equal(t.a.y_test, t.b.y_test)
        assert not torch.equal(t.a.x_test, t.b.x_test)


def test_rotation_and_inversion_are_exact() -> None:
    """B of 'rotated' is A rotated by 90°; B of 'inverted' is 1 - A."""
    rot = digits_task("rotated")
    img = rot.a.x_train[0].view(8, 8)
    assert torch.equal(rot.b.x_train[0].view(8, 8), torch.rot90(img, 1, (0, 1)))
    inv = digits_task("inverted")
    assert torch.equal(inv.b.x_val, 1.0 - inv.a.x_val)


def test_split_is_deterministic() -> None:
    """The same split seed gives the same split; another seed another one."""
    assert torch.equal(digits_task("permuted", 3).a.x_test, digits_task("permuted", 3).a.x_test)
    assert not torch.equal(digits_task("permuted", 3).a.x_test, digits_task("permuted", 4).a.x_test)


def test_unknown_shift_named() -> None:
    """An unknown shift raises, naming it."""
    with pytest.raises(ValueError, match="'blur'"):
        digits_task("blur")


def test_split_varies_with_the_seed() -> None:
    """Different split seeds give different test sets of the same size (the demo's seeds)."""
    one, two = digits_task("permuted", 0), digits_task("permuted", 1)
    assert one.a.x_test.shape == two.a.x_test.shape
    assert not torch.equal(one.a.x_test, two.a.x_test)
