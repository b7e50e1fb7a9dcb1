"""Run the forgetting benchmark: pre-train on A, fine-tune on B, evaluate every method.

The design is paired: within one (task, seed), every method starts from the
same pre-trained weights and sees the same batches in the same order, so the
differences between methods are not seed noise. Methods that only read the run
share one fine-tuning run; methods that change training get their own run with
the same batch order.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from emaweights.bench.methods import Method, default_methods, state_of
from emaweights.bench.tasks import Split, TaskPair
from emaweights.interpolate import interpolate

__all__ = ["Adam", "Config", "Evaluation", "RunResult", "mlp", "pretrain", "run", "run_one"]


@dataclass(frozen=True)
class Config:
    """Training set-up of the benchmark (defaults: the demo's).

    Attributes:
        seeds: the seeds; each gives its own pre-trained model and batch order.
        pretrain_epochs: epochs on task A.
        finetune_epochs: epochs on task B.
        batch_size: mini-batch size in both phases.
        pretrain_lr: Adam learning rate on A.
        finetune_lr: Adam learning rate on B.
        alphas: interpolation coefficients of the reference curve.
        hidden: hidden width of the default MLP.
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    pretrain_epochs: int = 30
    finetune_epochs: int = 10
    batch_size: int = 32
    pretrain_lr: float = 3e-3
    finetune_lr: float = 3e-3
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


class Adam:
    r"""Adam (Kingma & Ba, 2015) over a parameter list, with multi-tensor kernels.

    .. math::

        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}
            \frac{m_t}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}

    The same arithmetic as ``torch.optim.Adam`` (no weight decay, no amsgrad).
    It lives here because the first ``torch.optim`` step imports the compiler
    stack, which costs seconds: more than a whole ``--quick`` run. Parameters
    without a gradient are skipped, as ``torch.optim`` does.

    Raises:
        ValueError: ``lr`` is not positive.
    """

    def __init__(
        self,
        params: Iterator[nn.Parameter] | Sequence[nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = [0 for _ in self.params]  # per tensor: a tensor may miss a step

    def zero_grad(self) -> None:
        """Drop the gradients (set them to ``None``)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step on every parameter that has a gradient."""
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        b1, b2 = self.betas
        params = [self.params[i] for i in live]
        grads = [g for g in (p.grad for p in params) if g is not None]
        m, v = [self.m[i] for i in live], [self.v[i] for i in live]
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        for i, p, mi, vi in zip(live, params, m, v, strict=True):
            self.t[i] += 1
            t = self.t[i]
            denom = (vi.sqrt() / math.sqrt(1 - b2**t)).add_(self.eps)
            p.addcdiv_(mi, denom, value=-self.lr / (1 - b1**t))


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
    opt = Adam(list(model.parameters()), lr=cfg.pretrain_lr)
    for _ in range(cfg.pretrain_epochs):
        for idx in _batches(len(split.y_train), cfg.batch_size, g):
            opt.zero_grad()
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
    torch.manual_seed(20_000 + seed)  # dropout etc.: independent of what ran before
    opt = Adam(list(model.parameters()), lr=cfg.finetune_lr)
    for m in methods:
        m.start(model)
    step = 0
    for epoch in range(1, cfg.finetune_epochs + 1):
        for idx in _batches(len(split.y_train), cfg.batch_size, g):
            opt.zero_grad()
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
MethodFactory = Callable[[int, int], Sequence[Method]]
"""Builds fresh methods from ``(steps_per_epoch, total_steps)`` of the fine-tuning run."""


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


def finetune_steps(task: TaskPair, cfg: Config) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)`` of fine-tuning on ``task.b`` under ``cfg``."""
    per_epoch = math.ceil(len(task.b.y_train) / cfg.batch_size)
    return per_epoch, per_epoch * cfg.finetune_epochs


def run_one(
    task: TaskPair,
    cfg: Config,
    seed: int,
    make_methods: MethodFactory = default_methods,
    make_model: ModelFactory = _default_model,
    theta0: dict[str, Tensor] | None = None,
) -> RunResult:
    """Pre-train on A, fine-tune on B, and evaluate every method, for one seed.

    Args:
        task: the task pair.
        cfg: the training set-up.
        seed: seeds the model's initialization, the pre-training and the batch order.
        make_methods: builds the methods from ``(steps_per_epoch, total_steps)``.
        make_model: builds the (untrained) model.
        theta0: pre-trained weights to start from instead of pre-training
            (they must be what :func:`pretrain` gives for this task A and seed).
    """
    if theta0 is None:
        model = pretrain(task, cfg, seed, make_model)
        theta0 = state_of(model)
    else:
        model = make_model(task, cfg)
        model.load_state_dict(theta0)
    pre = evaluate(model, task)
    methods = list(make_methods(*finetune_steps(task, cfg)))
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


def _fingerprint(split: Split) -> str:
    """A digest of a training set: equal digests mean equal pre-training data."""
    h = hashlib.sha256()
    for t in (split.x_train, split.y_train):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(
    tasks: Sequence[TaskPair] | Callable[[int], Sequence[TaskPair]],
    cfg: Config = Config(),
    make_methods: MethodFactory = default_methods,
    make_model: ModelFactory = _default_model,
    progress: Callable[[str], None] | None = None,
    workers: int = 1,
) -> list[RunResult]:
    """Run every (task, seed) pair; ``progress`` is called after each with a label.

    Tasks with the same old-task training data (the pixel shifts of
    ``load_digits`` all share task A) share the pre-trained model of a seed:
    pre-training is deterministic for the seed, so this only saves time.

    Args:
        tasks: the task pairs, or a function of the seed giving that seed's task
            pairs (the same tasks in the same order, e.g. with a train/val/test
            split drawn from the seed, as ``emaweights demo --task digits`` does).
        cfg: the training set-up.
        make_methods: builds the methods of one run (with ``workers > 1`` it
            must be picklable: a module-level function, not a lambda).
        make_model: builds the untrained model (picklable likewise).
        progress: called with a ``"task seed N"`` label after each run.
        workers: processes to spread the runs over. Each worker computes on one
            thread, so the results equal those of ``workers=1`` under
            ``torch.set_num_threads(1)`` digit for digit, in the same order.
            Workers are spawned, so a script calling this must do so under
            ``if __name__ == "__main__":``, as with any multiprocessing code.

    Raises:
        ValueError: ``workers`` is not a positive integer, or ``tasks`` gives
            different task names for different seeds.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    per_seed = {s: list(tasks(s) if callable(tasks) else tasks) for s in cfg.seeds}
    names = {s: [t.name for t in ts] for s, ts in per_seed.items()}
    if len({tuple(n) for n in names.values()}) > 1:
        raise ValueError(f"tasks must give the same task names for every seed, got {names}")
    width = len(next(iter(per_seed.values()), []))
    # task-major order: all seeds of the first task, then the next task
    jobs = [(per_seed[s][i], s) for i in range(width) for s in cfg.seeds]
    keys = {id(task): _fingerprint(task.a) for task, _ in jobs}

    def key(task: TaskPair, seed: int) -> tuple[str, int, int, int]:
        return (keys[id(task)], task.num_features, task.num_classes, seed)

    if workers == 1:
        results = []
        pretrained: dict[tuple[str, int, int, int], dict[str, Tensor]] = {}
        for task, seed in jobs:
            k = key(task, seed)
            if k not in pretrained:
                pretrained[k] = _pretrained_state(task, cfg, seed, make_model)
            results.append(run_one(task, cfg, seed, make_methods, make_model, pretrained[k]))
            if progress is not None:
                progress(f"{task.name} seed {seed}")
        return results
    return _run_parallel(jobs, key, cfg, make_methods, make_model, progress, workers)


def _run_parallel(
    jobs: Sequence[tuple[TaskPair, int]],
    key: Callable[[TaskPair, int], tuple[str, int, int, int]],
    cfg: Config,
    make_methods: MethodFactory,
    make_model: ModelFactory,
    progress: Callable[[str], None] | None,
    workers: int,
) -> list[RunResult]:
    """:func:`run` over a process pool: pre-train each distinct model, then fine-tune."""
    # spawn, not fork: a forked child inherits the parent's OpenMP thread pool
    # in an undefined state and can hang in its first parallel kernel.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_one_thread) as pool:
        # one pre-training job per distinct (task A, seed)
        first: dict[tuple[str, int, int, int], tuple[TaskPair, int]] = {}
        for task, seed in jobs:
            first.setdefault(key(task, seed), (task, seed))
        pre = {
            k: pool.submit(_pretrained_state, task, cfg, seed, make_model)
            for k, (task, seed) in first.items()
        }
        theta0 = {k: f.result() for k, f in pre.items()}
        futures = [
            pool.submit(run_one, task, cfg, seed, make_methods, make_model, theta0[key(task, seed)])
            for task, seed in jobs
        ]
        try:
            for done in as_completed(futures):
                r = done.result()
                if progress is not None:
                    progress(f"{r.task} seed {r.seed}")
        except BaseException:
            for f in futures:  # a failed run (or Ctrl-C) ends the benchmark now
                f.cancel()
            raise
        return [f.result() for f in futures]


def _one_thread() -> None:
    """Worker initializer: tiny models, and several workers share the cores."""
    torch.set_num_threads(1)


def _pretrained_state(
    task: TaskPair, cfg: Config, seed: int, make_model: ModelFactory
) -> dict[str, Tensor]:
    """The weights :func:`pretrain` gives (a module-level function: workers pickle it)."""
    return state_of(pretrain(task, cfg, seed, make_model))
