"""Run the forgetting benchmark: pre-train on A, fine-tune on B, evaluate every method.

The design is paired: within one (task, seed), every method starts from the
same pre-trained weights and sees the same batches in the same order, so the
differences between methods are not seed noise. Methods that only read the run
share one fine-tuning run; methods that change training get their own run with
the same batch order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from emaweights.bench.methods import Method, default_methods, state_of
from emaweights.bench.tasks import Split, TaskPair
from emaweights.interpolate import interpolate

__all__ = ["Config", "Evaluation", "RunResult", "mlp", "run", "run_one"]


@dataclass(frozen=True)
class Config:
    """Training set-up of the benchmark (defaults: the demo's).

    Attributes:
        seeds: the seeds; each gives its own pre-trained model and batch order.
        pretrain_epochs: epochs on task A.
        finetune_epochs: epochs on task B.
        batch_size: mini-batch size in both phases.
        pretrain_lr: Adam learning rate on A.
        finetune_lr: SGD (momentum 0.9) learning rate on B.
        alphas: interpolation coefficients of the reference curve.
        hidden: hidden width of the default MLP.
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    pretrain_epochs: int = 30
    finetune_epochs: int = 10
    batch_size: int = 32
    pretrain_lr: float = 3e-3
    finetune_lr: float = 0.05
    alphas: tuple[float, ...] = tuple(i / 20 for i in range(21))
    hidden: int = 64


@dataclass(frozen=True)
class Evaluation:
    """Accuracies of one set of weights (old task A, new task B) on validation and test."""

    a_val: float
    b_val: float
    a_test: float
    b_test: float

    @property
    def point(self) -> tuple[float, float]:
        """The test point (B, A) of the trade-off plane."""
        return (self.b_test, self.a_test)

    @property
    def val_point(self) -> tuple[float, float]:
        """The validation point (B, A)."""
        return (self.b_val, self.a_val)


@dataclass
class RunResult:
    """Everything measured in one (task, seed) run."""

    task: str
    seed: int
    steps: int
    pretrained: Evaluation
    interpolation: list[tuple[float, Evaluation]]
    trajectory: list[tuple[int, Evaluation]]  # (epoch, evaluation); epoch 0 = pre-trained
    methods: dict[str, Evaluation] = field(default_factory=dict)
    families: dict[str, str] = field(default_factory=dict)
    w0: dict[str, float | None] = field(default_factory=dict)

    def curve(self, val: bool = False) -> list[tuple[float, float]]:
        """The interpolation curve as (B, A) points in alpha order."""
        return [e.val_point if val else e.point for _, e in self.interpolation]

    def path(self, val: bool = False) -> list[tuple[float, float]]:
        """The early-stopping path as (B, A) points in epoch order."""
        return [e.val_point if val else e.point for _, e in self.trajectory]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "task": self.task,
            "seed": self.seed,
            "steps": self.steps,
            "pretrained": asdict(self.pretrained),
            "interpolation": [{"alpha": a, **asdict(e)} for a, e in self.interpolation],
            "trajectory": [{"epoch": k, **asdict(e)} for k, e in self.trajectory],
            "methods": {
                n: {**asdict(e), "family": self.families[n], "w0": self.w0[n]}
                for n, e in self.methods.items()
            },
        }


def mlp(num_features: int, num_classes: int, hidden: int = 64) -> nn.Module:
    """The default model: a two-hidden-layer MLP."""
    return nn.Sequential(
        nn.Linear(num_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def _batches(n: int, batch_size: int, g: torch.Generator) -> Iterator[Tensor]:
    perm = torch.randperm(n, generator=g)
    yield from torch.split(perm, batch_size)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in eval mode."""
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train(was_training)
    return float(acc)


def evaluate(
    model: nn.Module, task: TaskPair, state: dict[str, Tensor] | None = None
) -> Evaluation:
    """Accuracies of ``model`` (or of ``state`` loaded into it, restored after) on A and B."""
    saved = state_of(model) if state is not None else None
    if state is not None:
        model.load_state_dict(state)
    try:

        def acc(s: Split, test: bool) -> float:
            return (
                accuracy(model, s.x_test, s.y_test) if test else accuracy(model, s.x_val, s.y_val)
            )

        return Evaluation(
            acc(task.a, False), acc(task.b, False), acc(task.a, True), acc(task.b, True)
        )
    finally:
        if saved is not None:
            model.load_state_dict(saved)


def _pretrain(model: nn.Module, split: Split, cfg: Config, g: torch.Generator) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
    for _ in range(cfg.pretrain_epochs):
        for idx in _batches(len(split.y_train), cfg.batch_size, g):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            torch.autograd.backward(loss)
            opt.step()


def _finetune(
    model: nn.Module,
    split: Split,
    cfg: Config,
    seed: int,
    methods: Sequence[Method],
    on_epoch: Callable[[int], None] | None = None,
) -> int:
    """Fine-tune on B with a batch order fixed by ``seed``; drive ``methods``; return steps."""
    g = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.finetune_lr, momentum=0.9)
    for m in methods:
        m.start(model)
    step = 0
    for epoch in range(1, cfg.finetune_epochs + 1):
        for idx in _batches(len(split.y_train), cfg.batch_size, g):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            for m in methods:
                extra = m.penalty(model)
                if extra is not None:
                    loss = loss + extra
            torch.autograd.backward(loss)
            opt.step()
            step += 1
            for m in methods:
                m.after_step(model, step)
        for m in methods:
            m.after_epoch(model, epoch)
        if on_epoch is not None:
            on_epoch(epoch)
    return step


ModelFactory = Callable[[TaskPair, Config], nn.Module]
MethodFactory = Callable[[], Sequence[Method]]


def _default_model(task: TaskPair, cfg: Config) -> nn.Module:
    return mlp(task.num_features, task.num_classes, cfg.hidden)


def pretrain(
    task: TaskPair, cfg: Config, seed: int, make_model: ModelFactory = _default_model
) -> nn.Module:
    """The model trained on task A for ``seed`` (deterministic)."""
    torch.manual_seed(seed)
    model = make_model(task, cfg)
    _pretrain(model, task.a, cfg, torch.Generator().manual_seed(seed))
    return model


def run_one(
    task: TaskPair,
    cfg: Config,
    seed: int,
    make_methods: MethodFactory = default_methods,
    make_model: ModelFactory = _default_model,
) -> RunResult:
    """Pre-train on A, fine-tune on B, and evaluate every method, for one seed."""
    model = pretrain(task, cfg, seed, make_model)
    theta0 = state_of(model)
    pre = evaluate(model, task)
    methods = list(make_methods())
    _check_names(methods)
    riders = [m for m in methods if not m.changes_training]
    trajectory: list[tuple[int, Evaluation]] = [(0, pre)]
    steps = _finetune(
        model,
        task.b,
        cfg,
        seed,
        riders,
        on_epoch=lambda epoch: trajectory.append((epoch, evaluate(model, task))),
    )
    theta_t = state_of(model)
    result = RunResult(
        task=task.name,
        seed=seed,
        steps=steps,
        pretrained=pre,
        interpolation=[
            (a, evaluate(model, task, interpolate(theta0, theta_t, a))) for a in cfg.alphas
        ],
        trajectory=trajectory,
    )
    for m in riders:
        _record(result, m, evaluate(model, task, m.result(model)))
    for m in methods:
        if m.changes_training:
            model.load_state_dict(theta0)
            _finetune(model, task.b, cfg, seed, [m])
            _record(result, m, evaluate(model, task, m.result(model)))
    return result


def _record(result: RunResult, m: Method, e: Evaluation) -> None:
    result.methods[m.name] = e
    result.families[m.name] = m.family
    result.w0[m.name] = m.w0()


def _check_names(methods: Sequence[Method]) -> None:
    names = [m.name for m in methods]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"method names must be unique; repeated: {dup}")


def run(
    tasks: Sequence[TaskPair],
    cfg: Config = Config(),
    make_methods: MethodFactory = default_methods,
    make_model: ModelFactory = _default_model,
    progress: Callable[[str], None] | None = None,
) -> list[RunResult]:
    """Run every (task, seed) pair; ``progress`` is called after each with a label."""
    results = []
    for task in tasks:
        for seed in cfg.seeds:
            results.append(run_one(task, cfg, seed, make_methods, make_model))
            if progress is not None:
                progress(f"{task.name} seed {seed}")
    return results
