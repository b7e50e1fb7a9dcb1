"""The language-model task: prose (task A) then code (task B), from the standard library.

Task A is the standard library's docstrings plus the pydoc topics; task B is the
standard library's source with docstrings and comments removed (``ast.unparse``).
Both are built at run time from files every Python installation ships; each file
goes to train, validation or test by a hash of its name. The model is a tiny
byte-level causal transformer; the metric is bits per byte on fixed windows.
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import json
import math
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from emaweights.bench.methods import EMAMethod, Method, state_of
from emaweights.bench.methods_family import (
    BEMAMethod,
    L2SPMethod,
    LAWAMethod,
    PostHocMethod,
    SWAMethod,
)
from emaweights.bench.runner import Adam
from emaweights.interpolate import interpolate

__all__ = [
    "BPB",
    "Corpus",
    "LMConfig",
    "LMRun",
    "TinyGPT",
    "build_corpus",
    "cache_dir",
    "pretrained",
    "run_condition",
]

SPLITS = ("train", "val", "test")
_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


@dataclass(frozen=True)
class Corpus:
    """Bytes of both tasks per split, with the digest of everything and the Python version."""

    prose: dict[str, bytes]
    code: dict[str, bytes]
    digest: str
    python: str
    files: int


def _split_of(name: str) -> str:
    h = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10
    return "test" if h == 9 else "val" if h == 8 else "train"


def _strip_docstrings(tree: ast.Module) -> list[str]:
    """Remove docstrings from ``tree`` in place; return them."""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc is not None:
                docs.append(doc)
                node.body = node.body[1:] or [ast.Pass()]
    return docs


def build_corpus(max_bytes: int = 300_000, stdlib: Path | None = None) -> Corpus:
    """Build both tasks from the standard library (deterministic for a Python install).

    Files are taken in the order of their name hashes until task B's training
    split holds ``max_bytes`` (validation and test get about a tenth each).

    Raises:
        ValueError: ``max_bytes`` is below 1000.
        RuntimeError: the standard library is not found.
    """
    if max_bytes < 1000:
        raise ValueError(f"max_bytes must be >= 1000, got {max_bytes}")
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    return _build_corpus(max_bytes, root.resolve())


@functools.lru_cache(maxsize=4)
def _build_corpus(max_bytes: int, root: Path) -> Corpus:
    """:func:`build_corpus` (cached: one process builds the same corpus once)."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP)  # never walk site-packages etc.
        rel = Path(folder).relative_to(root)
        files += [(rel / n).as_posix() for n in names if n.endswith(".py")]
    if not files:
        raise RuntimeError(f"no standard-library sources under {root}")
    files.sort(key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    budget = {"train": max_bytes, "val": max_bytes // 8, "test": max_bytes // 8}
    prose: dict[str, list[str]] = {s: [] for s in SPLITS}
    code: dict[str, list[str]] = {s: [] for s in SPLITS}
    size = dict.fromkeys(SPLITS, 0)
    used = 0
    for name in files:
        split = _split_of(name)
        if size[split] >= budget[split]:
            if all(size[s] >= budget[s] for s in SPLITS):
                break
            continue
        try:
            tree = ast.parse((root / name).read_text(encoding="utf-8"))
            prose[split] += _strip_docstrings(tree)
            text = ast.unparse(tree)
        except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
            continue  # a file this Python cannot parse is not part of the corpus
        code[split].append(text)
        size[split] += len(text)
        used += 1
    from pydoc_data.topics import topics

    for key in sorted(topics):
        prose[_split_of("pydoc:" + key)].append(topics[key])
    p = {s: "\n\n".join(prose[s]).encode() for s in SPLITS}
    c = {s: "\n\n".join(code[s]).encode() for s in SPLITS}
    h = hashlib.sha256()
    for part in (p, c):
        for s in SPLITS:
            h.update(hashlib.sha256(part[s]).digest())
    return Corpus(p, c, h.hexdigest(), sys.version.split()[0], used)


@dataclass(frozen=True)
class LMConfig:
    """Set-up of the language-model benchmark (defaults: the demo's).

    Attributes:
        context: bytes per window.
        d_model: width; n_layer: blocks; n_head: attention heads.
        batch_size: windows per step.
        pretrain_steps: steps on task A (cosine schedule, Adam).
        pretrain_lr: peak learning rate on A.
        finetune_lr: learning rate on B.
        eval_windows: fixed windows per split and task.
        path_points: evaluations along fine-tuning (the early-stopping path).
        alphas: interpolation coefficients.
        l2sp: L2-SP strengths (chosen on val).
        lora_rank: LoRA rank (LoRA's learning rate is 3x ``finetune_lr``; 0 skips LoRA).
        max_bytes: task B training bytes.
    """

    context: int = 64
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    batch_size: int = 16
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    finetune_lr: float = 1e-3
    eval_windows: int = 16
    path_points: int = 20
    alphas: tuple[float, ...] = tuple(i / 10 for i in range(11))
    l2sp: tuple[float, ...] = (0.01, 0.1)
    lora_rank: int = 8
    max_bytes: int = 300_000

    def model_key(self) -> dict[str, Any]:
        """The fields that determine the pre-trained model."""
        keys = ("context", "d_model", "n_layer", "n_head", "batch_size", "pretrain_steps")
        return {k: getattr(self, k) for k in (*keys, "pretrain_lr", "max_bytes")}


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, d // self.heads).unbind(2)
        y = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(y.transpose(1, 2).reshape(n, t, d))
        out: Tensor = x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))
        return out


class TinyGPT(nn.Module):
    """A byte-level causal transformer (pre-LayerNorm blocks, learned positions)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.context, cfg.d_model))
        self.blocks = nn.Sequential(*[_Block(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer)])
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 256)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits over the next byte at every position."""
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))  # type: ignore[no-any-return]


def _tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def windows(data: bytes, n: int, context: int) -> Tensor:
    """``n`` evenly spaced windows of ``context + 1`` bytes (fixed: no randomness)."""
    t = _tensor(data)
    last = len(t) - context - 1
    if last < 0:
        raise ValueError(f"{len(t)} bytes cannot hold a window of {context + 1}")
    starts = [round(i * last / max(1, n - 1)) for i in range(n)]
    return torch.stack([t[s : s + context + 1] for s in starts])


def _loss(model: nn.Module, batch: Tensor) -> Tensor:
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))


@torch.no_grad()
def bpb(model: nn.Module, wins: Tensor) -> float:
    """Bits per byte of ``model`` on ``wins`` (mean next-byte cross-entropy / ln 2)."""
    was = model.training
    model.eval()
    value = float(_loss(model, wins)) / math.log(2)
    model.train(was)
    return value


@dataclass(frozen=True)
class BPB:
    """Bits per byte on task A and B, validation and test (lower is better)."""

    a_val: float
    b_val: float
    a_test: float
    b_test: float

    def point(self, val: bool = False) -> tuple[float, float]:
        """The (B, A) point of the measure, higher is better: minus bits per byte."""
        return (-self.b_val, -self.a_val) if val else (-self.b_test, -self.a_test)

    def val_score(self) -> float:
        """Selection criterion on validation: mean bits per byte of A and B (lower wins)."""
        return (self.a_val + self.b_val) / 2


@dataclass(frozen=True)
class Data:
    """Training bytes of both tasks and the fixed evaluation windows."""

    a_train: Tensor
    b_train: Tensor
    evals: dict[str, Tensor]  # "a_val", "b_val", "a_test", "b_test"

    @classmethod
    def of(cls, corpus: Corpus, cfg: LMConfig) -> Data:
        """Tensors for ``corpus`` under ``cfg``."""
        ev = {
            f"{t}_{s}": windows(getattr(corpus, task)[s], cfg.eval_windows, cfg.context)
            for t, task in (("a", "prose"), ("b", "code"))
            for s in ("val", "test")
        }
        return cls(_tensor(corpus.prose["train"]), _tensor(corpus.code["train"]), ev)

    def evaluate(self, model: nn.Module, state: dict[str, Tensor] | None = None) -> BPB:
        """Bits per byte of ``model`` (or of ``state`` loaded into it, restored after)."""
        saved = state_of(model) if state is not None else None
        if state is not None:
            model.load_state_dict(state)
        try:
            return BPB(*(bpb(model, self.evals[k]) for k in ("a_val", "b_val", "a_test", "b_test")))
        finally:
            if saved is not None:
                model.load_state_dict(saved)


def _batch(data: Tensor, cfg: LMConfig, g: torch.Generator) -> Tensor:
    starts = torch.randint(0, len(data) - cfg.context - 1, (cfg.batch_size,), generator=g)
    return torch.stack([data[s : s + cfg.context + 1] for s in starts.tolist()])


def lr_at(schedule: str, peak: float, step: int, total: int) -> float:
    """Learning rate at ``step`` (1-based): ``constant``, or ``cosine`` with a 5% warm-up.

    Raises:
        ValueError: unknown schedule.
    """
    if schedule == "constant":
        return peak
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; known: ('constant', 'cosine')")
    warm = max(1, total // 20)
    if step <= warm:
        return peak * step / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def cache_dir() -> Path:
    """``$EMAWEIGHTS_CACHE``, else ``$XDG_CACHE_HOME/emaweights``, else ``~/.cache/emaweights``."""
    env = os.environ.get("EMAWEIGHTS_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emaweights"


def _cache_path(cfg: LMConfig, corpus: Corpus, seed: int, root: Path) -> Path:
    key = json.dumps(
        {"cfg": cfg.model_key(), "corpus": corpus.digest, "seed": seed, "torch": torch.__version__},
        sort_keys=True,
    )
    return root / f"lm-pretrain-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


def pretrained(
    corpus: Corpus,
    cfg: LMConfig,
    seed: int,
    cache: Path | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[dict[str, Tensor], bool]:
    """Pre-trained weights for ``seed`` and whether they came from the cache.

    The cache key is the model/pre-training configuration, the corpus digest,
    the seed and the torch version; ``cache=None`` uses :func:`cache_dir`.
    """
    path = _cache_path(cfg, corpus, seed, cache or cache_dir())
    if path.exists():
        return torch.load(path, weights_only=True), True
    torch.manual_seed(seed)
    model = TinyGPT(cfg)
    data = _tensor(corpus.prose["train"])
    g = torch.Generator().manual_seed(seed)
    opt = Adam(list(model.parameters()), lr=cfg.pretrain_lr)
    for step in range(1, cfg.pretrain_steps + 1):
        opt.lr = lr_at("cosine", cfg.pretrain_lr, step, cfg.pretrain_steps)
        opt.zero_grad()
        torch.autograd.backward(_loss(model, _batch(data, cfg, g)))
        opt.step()
        if on_step is not None and (step % 50 == 0 or step == cfg.pretrain_steps):
            on_step(step - 50 * ((step - 1) // 50))  # steps since the last report
    state = state_of(model)
    from emaweights.io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(state, f)
    return state, False


@dataclass
class LMRun:
    """Everything measured in one fine-tuning run (condition, pre-training and fine-tuning seed)."""

    condition: str
    pretrain_seed: int
    seed: int
    steps: int
    pretrained: BPB
    interpolation: list[tuple[float, BPB]]
    trajectory: list[tuple[int, BPB]]
    methods: dict[str, BPB] = field(default_factory=dict)
    families: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def curve(self, val: bool = False) -> list[tuple[float, float]]:
        """The interpolation curve as (B, A) points (minus bits per byte)."""
        return [e.point(val) for _, e in self.interpolation]

    def path(self, val: bool = False) -> list[tuple[float, float]]:
        """The fine-tuning path (early-stopping candidates) as (B, A) points."""
        return [e.point(val) for _, e in self.trajectory]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (per-seed raw values)."""
        return {
            "condition": self.condition,
            "pretrain_seed": self.pretrain_seed,
            "seed": self.seed,
            "steps": self.steps,
            "pretrained": asdict(self.pretrained),
            "interpolation": [{"alpha": a, **asdict(e)} for a, e in self.interpolation],
            "trajectory": [{"step": k, **asdict(e)} for k, e in self.trajectory],
            "methods": {
                n: {**asdict(e), "family": self.families[n], "note": self.notes.get(n, "")}
                for n, e in self.methods.items()
            },
        }


def ema_decays(cfg: LMConfig, steps: int) -> list[float]:
    r"""Decays whose anchored :math:`w_0 = \beta^T` equal the interior α grid's :math:`1-\alpha`."""
    return [(1 - a) ** (1 / steps) for a in cfg.alphas if 0 < a < 1]


def _riders(cfg: LMConfig, steps: int) -> list[Method]:
    every = max(1, steps // cfg.path_points)
    ms: list[Method] = [EMAMethod(d) for d in ema_decays(cfg, steps)]
    ms += [EMAMethod(d, anchor="debiased") for d in ema_decays(cfg, steps)[::3]]
    ms += [
        SWAMethod(every),
        LAWAMethod(k=5),
        PostHocMethod(0.05, max(1, steps // 8)),
        PostHocMethod(0.20, max(1, steps // 8)),
        BEMAMethod(),
        BEMAMethod(update_every=every, start_step=steps // 4),
    ]
    return ms


def _train(
    model: nn.Module,
    data: Data,
    cfg: LMConfig,
    schedule: str,
    steps: int,
    seed: int,
    methods: list[Method],
    lr: float,
    on_eval: Callable[[int], None] | None = None,
) -> None:
    g = torch.Generator().manual_seed(10_000 + seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = Adam(params, lr=lr)
    for m in methods:
        m.start(model)
    every = max(1, steps // cfg.path_points)
    for step in range(1, steps + 1):
        opt.lr = lr_at(schedule, lr, step, steps)
        opt.zero_grad()
        loss = _loss(model, _batch(data.b_train, cfg, g))
        for m in methods:
            extra = m.penalty(model)
            if extra is not None:
                loss = loss + extra
        torch.autograd.backward(loss)
        opt.step()
        for m in methods:
            m.after_step(model, step)
        if step % every == 0 or step == steps:
            for m in methods:
                m.after_epoch(model, step)
            if on_eval is not None:
                on_eval(step)


def _best(cands: dict[str, BPB]) -> str:
    return min(cands, key=lambda n: cands[n].val_score())


def _lora(
    model: nn.Module, data: Data, cfg: LMConfig, schedule: str, steps: int, seed: int
) -> dict[str, Tensor] | str:
    """LoRA fine-tuning merged back into the weights, or the reason it was skipped."""
    if cfg.lora_rank == 0:
        return "skipped: lora_rank=0"
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return "skipped: peft is not installed (pip install 'emaweights[peft]')"
    base = copy.deepcopy(model)
    lcfg = LoraConfig(
        r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=["qkv", "proj", "fc", "out"]
    )
    peft_model = get_peft_model(base, lcfg)
    _train(peft_model, data, cfg, schedule, steps, seed, [], 3 * cfg.finetune_lr)
    merged = peft_model.merge_and_unload()
    return state_of(merged)


def run_condition(
    data: Data,
    theta0: dict[str, Tensor],
    cfg: LMConfig,
    schedule: str,
    steps: int,
    seed: int,
    pretrain_seed: int,
) -> LMRun:
    """Fine-tune on B from ``theta0`` and evaluate every method (one seed of one condition)."""
    torch.manual_seed(20_000 + seed)
    model = TinyGPT(cfg)
    model.load_state_dict(theta0)
    pre = data.evaluate(model)
    riders = _riders(cfg, steps)
    trajectory: list[tuple[int, BPB]] = [(0, pre)]
    _train(
        model,
        data,
        cfg,
        schedule,
        steps,
        seed,
        riders,
        cfg.finetune_lr,
        on_eval=lambda s: trajectory.append((s, data.evaluate(model))),
    )
    theta_t = state_of(model)
    run = LMRun(
        f"{schedule} T={steps}",
        pretrain_seed,
        seed,
        steps,
        pre,
        [(a, data.evaluate(model, interpolate(theta0, theta_t, a))) for a in cfg.alphas],
        trajectory,
    )

    def record(name: str, family: str, e: BPB, note: str = "") -> None:
        run.methods[name], run.families[name] = e, family
        if note:
            run.notes[name] = note

    record("fine-tuned", "reference", trajectory[-1][1])
    stop = min(trajectory, key=lambda ke: ke[1].val_score())
    record("early stop (step on val)", "early-stop", stop[1], f"step {stop[0]}")
    alpha, interp = min(run.interpolation, key=lambda ae: ae[1].val_score())
    record("interpolation (α on val)", "interpolation", interp, f"alpha {alpha}")
    evals = {m.name: data.evaluate(model, m.result(model)) for m in riders}
    anchored = {n: e for n, e in evals.items() if n.startswith("ema β")}
    pick = _best(anchored)
    record("ema anchored (β on val)", "ema", anchored[pick], pick)
    debiased = {n: e for n, e in evals.items() if n.startswith("ema-debiased")}
    dpick = _best(debiased)
    record("ema debiased (β on val)", "ema-debiased", debiased[dpick], dpick)
    # EMA followed by interpolation: theta0 -> chosen debiased EMA, alpha on val.
    ema_state = next(m for m in riders if m.name == dpick).result(model)
    chain = {a: data.evaluate(model, interpolate(theta0, ema_state, a)) for a in cfg.alphas}
    ca = min(chain, key=lambda a: chain[a].val_score())
    record("ema → interpolation (α on val)", "ema+interp", chain[ca], f"{dpick}, alpha {ca}")
    for m in riders:
        if not m.name.startswith("ema"):
            record(m.name, m.family, evals[m.name])
    l2 = {}
    for lam in cfg.l2sp:
        meth = L2SPMethod(lam)
        model.load_state_dict(theta0)
        _train(model, data, cfg, schedule, steps, seed, [meth], cfg.finetune_lr)
        l2[meth.name] = data.evaluate(model)
    lpick = _best(l2)
    record("l2sp (λ on val)", "l2sp", l2[lpick], lpick)
    model.load_state_dict(theta0)
    lora = _lora(model, data, cfg, schedule, steps, seed)
    if isinstance(lora, str):
        run.notes["lora"] = lora
    else:
        record(f"lora r={cfg.lora_rank}", "lora", data.evaluate(model, lora))
    return run


def conditions(
    cfg: LMConfig, schedules: tuple[str, ...], lengths: tuple[int, ...]
) -> Iterator[tuple[str, int]]:
    """Every (schedule, length) pair."""
    for s in schedules:
        for n in lengths:
            yield s, n
