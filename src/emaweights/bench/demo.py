"""``emaweights demo``: the forgetting benchmark, with tables, plots and JSON.

Run: ``emaweights demo --out emaweights-out`` (or ``make demo``) for the language-model
task (:mod:`emaweights.bench.lm_demo`); ``--task digits`` for the MLP smoke test on
load_digits; ``--quick`` for a short check. Everything is deterministic for the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from emaweights.bench.report import closing_summary, plot, print_table, save, summarize
from emaweights.bench.runner import Config, run
from emaweights.bench.tasks import SHIFTS, digits_tasks


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="emaweights demo",
        description="The forgetting benchmark: pre-train on task A, fine-tune on task B, and "
        "measure old/new-task scores of EMA variants and other methods against weight "
        "interpolation (default: a tiny language model; --task digits: an MLP on load_digits).",
    )
    p.add_argument(
        "--task",
        choices=("lm", "digits"),
        default="lm",
        help="lm (default): tiny byte-level transformer, prose then code from the standard "
        "library; digits: the fast MLP smoke test on load_digits",
    )
    p.add_argument("--out", type=Path, default=Path("emaweights-out"), help="output folder")
    p.add_argument(
        "--pretrain-seeds",
        type=int,
        default=None,
        help="lm: pre-training seeds (default 2; 1 with --quick)",
    )
    p.add_argument("--cache", type=Path, default=None, help="lm: pre-training cache folder")
    p.add_argument(
        "--seeds", type=int, default=None, help="fine-tuning seeds (default: lm 3, digits 5)"
    )
    p.add_argument(
        "--shifts", nargs="+", choices=SHIFTS, default=list(SHIFTS), help="digits: the shifts"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short check (lm: 1 pre-training x 2 fine-tuning seeds, shorter training; "
        "digits: 2 seeds, 2 shifts, shorter training)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes to run the fine-tuning runs in (default: one per CPU core, at most 8); "
        "the numbers do not depend on it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def config_for(args: argparse.Namespace) -> tuple[Config, tuple[str, ...]]:
    """The benchmark configuration and shifts selected by the command-line flags."""
    if args.seeds is None:
        args.seeds = 5
    if args.seeds < 1:
        raise SystemExit(f"emaweights demo: --seeds must be >= 1, got {args.seeds}")
    if args.workers is not None and args.workers < 1:
        raise SystemExit(f"emaweights demo: --workers must be >= 1, got {args.workers}")
    if args.quick:
        cfg = Config(seeds=tuple(range(min(args.seeds, 2))), pretrain_epochs=15, finetune_epochs=5)
        return cfg, tuple(args.shifts[:2])
    return Config(seeds=tuple(range(args.seeds))), tuple(args.shifts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the exit code."""
    args = _parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise SystemExit(f"emaweights demo: --workers must be >= 1, got {args.workers}")
    if args.task == "lm":
        from emaweights.bench.lm_demo import run_lm

        threads = torch.get_num_threads()
        try:
            return run_lm(args, _cores())
        finally:
            torch.set_num_threads(threads)
    cfg, shifts = config_for(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads cost more than they give
    try:
        return _run(args, cfg, shifts)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests)


def _cores() -> int:
    """CPU cores this process may use (its affinity where the OS tells), at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _run(args: argparse.Namespace, cfg: Config, shifts: tuple[str, ...]) -> int:
    # each seed draws its own train/val/test split (and pre-trains on it)
    tasks = functools.partial(digits_tasks, shifts)
    total = len(shifts) * len(cfg.seeds)
    start = time.perf_counter()
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="fine-tuning runs", unit="run", file=sys.stderr)

    def advance(label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label)
            bar.update(1)

    workers = min(args.workers or _cores(), total)
    results = run(tasks, cfg, progress=advance, workers=workers)
    if bar is not None:
        bar.close()
    rows = summarize(results)
    print_table(rows)
    steps = {r.task: r.steps for r in results}  # T: fine-tuning steps per task
    config = {
        **dataclasses.asdict(cfg),
        "shifts": list(shifts),
        "steps": steps,
        "split": "stratified 60/20/20, drawn from each seed",
    }
    save(results, rows, args.out, config)
    written = [args.out / "results.json", args.out / "summary.csv"]
    if not args.no_plot:
        plot(results, rows, args.out / "tradeoff.png")
        written.append(args.out / "tradeoff.png")
    elapsed = time.perf_counter() - start
    print(closing_summary(rows))
    per_task = ", ".join(f"{t} {n}" for t, n in steps.items())
    print(
        f"{total} runs ({len(shifts)} shifts x {len(cfg.seeds)} seeds; fine-tuning steps T: "
        f"{per_task}) in {elapsed:.1f} s with {workers} worker(s); wrote "
        + ", ".join(str(p) for p in written)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
