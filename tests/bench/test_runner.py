"""The benchmark runner: its Adam, shared pre-training, method factory arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emaweights.bench.methods import EMAMethod, Method, default_methods
from emaweights.bench.runner import Adam, Config, finetune_steps, run, run_one
from emaweights.bench.tasks import digits_task

TINY = Config(seeds=(0,), pretrain_epochs=2, finetune_epochs=2)


def test_adam_matches_torch_optim() -> None:
    """The runner's Adam gives torch.optim.Adam's weights, step by step."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    ours = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    ours.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)
    opt = Adam(list(ours.parameters()), lr=1e-2)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    for _ in range(25):
        for model, o in ((ref, opt_ref), (ours, opt)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adam_refuses_bad_lr() -> None:
    """A non-positive learning rate is refused, naming the value."""
    with pytest.raises(ValueError, match=r"-0\.1"):
        Adam([nn.Parameter(torch.zeros(2))], lr=-0.1)


def test_shared_pretraining_equals_separate_runs() -> None:
    """run() reuses the pre-trained model across shifts with the same task A; same numbers."""
    shared = run([digits_task("permuted"), digits_task("rotated")], TINY)
    alone = run_one(digits_task("rotated"), TINY, seed=0)
    assert shared[1].to_dict() == alone.to_dict()


def test_methods_get_the_run_step_counts() -> None:
    """The method factory receives (steps per epoch, total steps) of the fine-tuning run."""
    task = digits_task("class_split")
    seen: list[tuple[int, int]] = []

    def make(per_epoch: int, total: int) -> list[Method]:
        seen.append((per_epoch, total))
        return [EMAMethod(0.9)]

    r = run_one(task, TINY, 0, make_methods=make)
    per_epoch = -(-len(task.b.y_train) // TINY.batch_size)  # ceil
    assert seen == [(per_epoch, 2 * per_epoch)] == [finetune_steps(task, TINY)]
    assert r.steps == 2 * per_epoch


def test_default_methods_refuse_zero_steps() -> None:
    """default_methods refuses a step count of zero, naming it."""
    with pytest.raises(ValueError, match="total_steps=0"):
        default_methods(1, 0)


def test_workers_give_the_serial_numbers_in_order() -> None:
    """run(workers=2) returns the same results, in the same order, as a one-thread serial run."""
    tasks = [digits_task("permuted"), digits_task("class_split")]
    cfg = Config(seeds=(0, 1), pretrain_epochs=2, finetune_epochs=2)
    labels: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = run(tasks, cfg)
    finally:
        torch.set_num_threads(threads)
    parallel = run(tasks, cfg, progress=labels.append, workers=2)
    assert [r.to_dict() for r in parallel] == [r.to_dict() for r in serial]
    assert sorted(labels) == sorted(f"{r.task} seed {r.seed}" for r in serial)


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_bad_workers_named(workers: object) -> None:
    """A worker count that is not a positive integer is refused, naming the value."""
    with pytest.raises(ValueError, match=f"workers must be a positive integer, got {workers!r}"):
        run([digits_task("permuted")], TINY, workers=workers)  # type: ignore[arg-type]


def test_failed_run_in_a_worker_is_raised() -> None:
    """An exception in a worker reaches the caller of run(workers=2): no hang, no partial list."""
    bad = digits_task("permuted")
    bad = type(bad)(bad.name, bad.a, bad.b, bad.num_features + 1, bad.num_classes)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run([bad], Config(seeds=(0, 1), pretrain_epochs=1, finetune_epochs=1), workers=2)


def test_tasks_per_seed_get_their_own_split_and_pretraining() -> None:
    """With a function of the seed, each seed runs on its own split: as run_one on that split."""
    from emaweights.bench.tasks import digits_tasks

    cfg = Config(seeds=(0, 1), pretrain_epochs=1, finetune_epochs=1)
    results = run(lambda s: digits_tasks(("inverted",), s), cfg, make_methods=lambda *_: [])
    assert [(r.task, r.seed) for r in results] == [("inverted", 0), ("inverted", 1)]
    for r in results:
        alone = run_one(digits_task("inverted", r.seed), cfg, r.seed, make_methods=lambda *_: [])
        assert r.to_dict() == alone.to_dict()
    assert results[0].pretrained != results[1].pretrained


def test_tasks_per_seed_must_keep_names() -> None:
    """A task function that names different tasks for different seeds is refused, naming them."""
    from emaweights.bench.tasks import SHIFTS

    cfg = Config(seeds=(0, 1), pretrain_epochs=1, finetune_epochs=1)
    with pytest.raises(ValueError, match="same task names"):
        run(lambda s: [digits_task(SHIFTS[s])], cfg, make_methods=lambda *_: [])
