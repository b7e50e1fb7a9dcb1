"""``emaweights demo`` (default task): the language-model forgetting benchmark end to end."""

from __future__ import annotations

import argparse
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
from emaweights.bench.lm_report import closing_summary, plot, print_tables, save, summarize

__all__ = ["run_lm", "setup"]

SCHEDULES = ("constant", "cosine")


def setup(quick: bool) -> tuple[LMConfig, tuple[int, ...]]:
    """The configuration and the two fine-tuning lengths of the default or ``--quick`` run."""
    if quick:
        return LMConfig(pretrain_steps=100, max_bytes=40_000, eval_windows=8), (20, 30)
    return LMConfig(), (60, 150)


_DATA: dict[str, Data] = {}


def _job(
    cfg: LMConfig, theta0: dict[str, torch.Tensor], schedule: str, steps: int, seed: int, pseed: int
) -> LMRun:
    torch.set_num_threads(1)
    if "d" not in _DATA:  # once per worker process
        _DATA["d"] = Data.of(build_corpus(cfg.max_bytes), cfg)
    return run_condition(_DATA["d"], theta0, cfg, schedule, steps, seed, pseed)


def _pre(cfg: LMConfig, seed: int, cache: Any) -> tuple[dict[str, torch.Tensor], bool]:
    torch.set_num_threads(1)
    return pretrained(build_corpus(cfg.max_bytes), cfg, seed, cache)


def run_lm(args: argparse.Namespace, cores: int) -> int:
    """Run the LM benchmark with the demo's flags; return the exit code."""
    seeds = 2 if args.quick and args.seeds is None else (args.seeds or 3)
    if seeds < 1 or args.pretrain_seeds < 1:
        raise SystemExit(f"emaweights demo: seeds must be >= 1, got {seeds}, {args.pretrain_seeds}")
    cfg, lengths = setup(args.quick)
    start = time.perf_counter()
    corpus = build_corpus(cfg.max_bytes)
    cache = args.cache or cache_dir()
    jobs = [
        (s, n, f, p)
        for s in SCHEDULES
        for n in lengths
        for p in range(args.pretrain_seeds)
        for f in range(seeds)
    ]
    workers = max(1, min(args.workers or cores, len(jobs)))
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        if not args.no_progress:
            bar = tqdm(
                total=args.pretrain_seeds,
                desc="pre-training (prose)",
                unit="model",
                file=sys.stderr,
            )
        pre = [pool.submit(_pre, cfg, p, cache) for p in range(args.pretrain_seeds)]
        theta0, cached = [], []
        for f in pre:
            state, hit = f.result()
            theta0.append(state)
            cached.append(hit)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
            bar = tqdm(total=len(jobs), desc="fine-tuning runs (code)", unit="run", file=sys.stderr)
        futures = [pool.submit(_job, cfg, theta0[p], s, n, f, p) for s, n, f, p in jobs]
        for done in as_completed(futures):
            done.result()
            if bar is not None:
                bar.update(1)
        runs = [f.result() for f in futures]
    if bar is not None:
        bar.close()
    rows = summarize(runs)
    print_tables(rows)
    elapsed = time.perf_counter() - start
    config: dict[str, Any] = {
        **dataclasses.asdict(cfg),
        "lengths": list(lengths),
        "schedules": list(SCHEDULES),
        "seeds": seeds,
        "pretrain_seeds": args.pretrain_seeds,
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
        "notes": sorted({n for r in runs for n in r.notes.values() if n.startswith("skipped")}),
    }
    save(runs, rows, args.out, config)
    written = [args.out / "results.json", args.out / "summary.csv"]
    if not args.no_plot:
        written += plot(runs, rows, args.out)
    for note in config["notes"]:
        print(note)
    print(closing_summary(rows))
    print(
        f"{len(jobs)} fine-tuning runs ({len(SCHEDULES)} schedules x lengths {lengths} x "
        f"{args.pretrain_seeds} pre-training x {seeds} fine-tuning seeds; pre-training "
        f"{'from cache' if all(cached) else 'computed'}) in {elapsed:.1f} s with {workers} "
        f"worker(s); corpus {corpus.digest[:12]} (Python {corpus.python}); wrote "
        + ", ".join(str(p) for p in written)
    )
    return 0
