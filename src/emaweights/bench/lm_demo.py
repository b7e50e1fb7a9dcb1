"""``emaweights demo`` (default task): the language-model forgetting benchmark end to end."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch

from emaweights.bench.lm import (
    Data,
    LMConfig,
    LMRun,
    build_corpus,
    cache_dir,
    pretrained,
    run_condition,
)
from emaweights.bench.lm_report import (
    closing_summary,
    plot,
    print_tables,
    run_line,
    save,
    summarize,
)

__all__ = ["run_lm", "setup"]

SCHEDULES = ("constant", "cosine")


def setup(quick: bool) -> tuple[LMConfig, tuple[int, ...]]:
    """The configuration and the two fine-tuning lengths of the default or ``--quick`` run."""
    if quick:
        return LMConfig(pretrain_steps=100, max_bytes=40_000, eval_windows=8), (20, 30)
    return LMConfig(), (60, 150)


_DATA: dict[LMConfig, Data] = {}  # per process and configuration
_STEPS: list[Any] = []  # the queue pre-training steps are reported on, once per worker


def _init(steps: Any) -> None:
    """Worker initializer: one thread (tiny models; the workers share the cores), the queue."""
    torch.set_num_threads(1)
    _STEPS[:] = [steps]


def _job(
    cfg: LMConfig, theta0: dict[str, torch.Tensor], schedule: str, steps: int, seed: int, pseed: int
) -> LMRun:
    if cfg not in _DATA:  # once per process and configuration
        _DATA[cfg] = Data.of(build_corpus(cfg.max_bytes), cfg)
    return run_condition(_DATA[cfg], theta0, cfg, schedule, steps, seed, pseed)


def _pre(cfg: LMConfig, seed: int, cache: Any) -> tuple[dict[str, torch.Tensor], bool]:
    report = _STEPS[0].put if _STEPS else None
    state, hit = pretrained(build_corpus(cfg.max_bytes), cfg, seed, cache, on_step=report)
    if hit and report is not None:
        report(cfg.pretrain_steps)  # from the cache: the bar still ends full
    return state, hit


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children."""
    try:
        import resource
    except ImportError:  # not on Unix: this process only
        return time.process_time()

    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class _Bar:
    """A tqdm bar, or nothing with ``--no-progress``."""

    def __init__(self, on: bool, total: int, desc: str, unit: str) -> None:
        self.bar = None
        if on:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _serial(
    cfg: LMConfig, jobs: list[tuple[str, int, int, int]], pseeds: int, cache: Any, progress: bool
) -> tuple[list[LMRun], list[bool]]:
    """Everything in this process, on one thread (``--workers 1``): the same numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bar = _Bar(progress, pseeds * cfg.pretrain_steps, "pre-training (prose)", "step")
        corpus = build_corpus(cfg.max_bytes)
        pre = []
        for p in range(pseeds):
            pre.append(pretrained(corpus, cfg, p, cache, on_step=bar.update))
            if pre[-1][1]:
                bar.update(cfg.pretrain_steps)  # from the cache
        bar.close()
        bar = _Bar(progress, len(jobs), "fine-tuning runs (code)", "run")
        runs = []
        for s, n, f, p in jobs:
            runs.append(_job(cfg, pre[p][0], s, n, f, p))
            bar.update(1)
        bar.close()
        return runs, [hit for _, hit in pre]
    finally:
        torch.set_num_threads(threads)


def _pooled(
    cfg: LMConfig,
    jobs: list[tuple[str, int, int, int]],
    pseeds: int,
    cache: Any,
    progress: bool,
    workers: int,
) -> tuple[list[LMRun], list[bool]]:
    """Pre-training, then the fine-tuning runs, over ``workers`` spawned processes."""
    import queue

    ctx = multiprocessing.get_context("spawn")
    steps = ctx.Queue()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(steps,)) as pool:
        bar = _Bar(progress, pseeds * cfg.pretrain_steps, "pre-training (prose)", "step")
        pre = [pool.submit(_pre, cfg, p, cache) for p in range(pseeds)]
        while not all(f.done() for f in pre):
            with contextlib.suppress(queue.Empty):
                bar.update(steps.get(timeout=0.2))
        theta0 = [f.result() for f in pre]
        bar.close()
        bar = _Bar(progress, len(jobs), "fine-tuning runs (code)", "run")
        futures = [pool.submit(_job, cfg, theta0[p][0], s, n, f, p) for s, n, f, p in jobs]
        for done in as_completed(futures):
            done.result()
            bar.update(1)
        bar.close()
        return [f.result() for f in futures], [hit for _, hit in theta0]


def run_lm(args: argparse.Namespace, cores: int) -> int:
    """Run the LM benchmark with the demo's flags; return the exit code."""
    seeds = 2 if args.quick and args.seeds is None else (args.seeds or 3)
    pseeds = args.pretrain_seeds or (1 if args.quick else 2)
    if seeds < 1 or pseeds < 1:
        raise SystemExit(
            f"emaweights demo: --seeds and --pretrain-seeds must be >= 1, got {seeds}, {pseeds}"
        )
    cfg, lengths = setup(args.quick)
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    corpus = build_corpus(cfg.max_bytes)
    cache = args.cache or cache_dir()
    jobs = [
        (s, n, f, p)
        for s in SCHEDULES
        for n in lengths
        for p in range(pseeds)
        for f in range(seeds)
    ]
    workers = max(1, min(args.workers or cores, len(jobs)))
    progress = not args.no_progress
    if workers == 1:
        runs, cached = _serial(cfg, jobs, pseeds, cache, progress)
    else:
        runs, cached = _pooled(cfg, jobs, pseeds, cache, progress, workers)
    rows = summarize(runs)
    print_tables(rows)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    config: dict[str, Any] = {
        **dataclasses.asdict(cfg),
        "lengths": list(lengths),
        "schedules": list(SCHEDULES),
        "seeds": seeds,
        "pretrain_seeds": pseeds,
        "corpus_sha256": corpus.digest,
        "corpus_files": corpus.files,
        "corpus_bytes": {
            k: {s: len(v) for s, v in getattr(corpus, k).items()} for k in ("prose", "code")
        },
        "python": corpus.python,
        "torch": torch.__version__,
        "pretraining_cached": cached,
        "workers": workers,
        "seconds": round(elapsed, 1),
        "cpu_seconds": round(cpu, 1),
        "notes": sorted({n for r in runs for n in r.notes.values() if n.startswith("skipped")}),
    }
    save(runs, rows, args.out, config)
    written = [args.out / "results.json", args.out / "summary.csv"]
    if not args.no_plot:
        written += plot(runs, rows, args.out)
    for note in config["notes"]:
        print(note)
    print(closing_summary(rows))
    print(run_line(config) + "; wrote " + ", ".join(str(p) for p in written))
    return 0
