"""Summaries of the language-model benchmark: the paired measure per condition and method.

Distances are in milli-bits per byte (mbpb), positive = the curve cannot reach
the method's point (see :mod:`emaweights.bench.measure`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emaweights.bench.lm import LMRun
from emaweights.bench.measure import Paired, combined_verdict, delta_a, delta_b, paired
from emaweights.bench.report import fmt_paired, save  # shared with the digits benchmark

__all__ = [
    "LMRow",
    "closing_summary",
    "markdown",
    "plot",
    "print_tables",
    "run_line",
    "save",
    "summarize",
]

MBPB = 1000.0


@dataclass(frozen=True)
class LMRow:
    """One method in one condition, over the (pre-training, fine-tuning) seeds."""

    condition: str
    name: str
    family: str
    a: tuple[float, ...]  # per-seed test bits per byte on A
    b: tuple[float, ...]
    interp_a: Paired  # ΔA at equal B vs interpolation (bits per byte)
    interp_b: Paired
    path_a: Paired
    path_b: Paired

    @property
    def verdict(self) -> str:
        """Against the interpolation curve (:func:`~emaweights.bench.measure.combined_verdict`)."""
        return combined_verdict(self.interp_a, self.interp_b)

    def to_dict(self) -> dict[str, Any]:
        """Flat data for JSON and CSV (distances in bits per byte)."""
        out: dict[str, Any] = {
            "condition": self.condition,
            "name": self.name,
            "family": self.family,
        }
        out["a_bpb_mean"], out["b_bpb_mean"] = _mean(self.a), _mean(self.b)
        for key in ("interp_a", "interp_b", "path_a", "path_b"):
            p: Paired = getattr(self, key)
            out |= {f"{key}_mean": p.mean, f"{key}_se": p.se, f"{key}_t": p.t}
            out |= {f"{key}_k": p.k, f"{key}_n": p.n, f"{key}_verdict": p.verdict}
        out["verdict"] = self.verdict
        return out


def _mean(v: Sequence[float]) -> float:
    return sum(v) / len(v)


def summarize(runs: Sequence[LMRun]) -> list[LMRow]:
    """Rows per condition and method, paired over seeds."""
    rows = []
    for cond in dict.fromkeys(r.condition for r in runs):
        rs = [r for r in runs if r.condition == cond]
        for name in rs[0].methods:
            pts = [r.methods[name] for r in rs]
            rows.append(
                LMRow(
                    cond,
                    name,
                    rs[0].families[name],
                    tuple(e.a_test for e in pts),
                    tuple(e.b_test for e in pts),
                    paired([delta_a(e.point(), r.curve()) for e, r in zip(pts, rs, strict=True)]),
                    paired([delta_b(e.point(), r.curve()) for e, r in zip(pts, rs, strict=True)]),
                    paired([delta_a(e.point(), r.path()) for e, r in zip(pts, rs, strict=True)]),
                    paired([delta_b(e.point(), r.path()) for e, r in zip(pts, rs, strict=True)]),
                )
            )
    return rows


def fmt(p: Paired) -> str:
    """``mean ± SE (t, k/n)`` in mbpb, ``mean (n=1)`` for one seed, or the range label."""
    return fmt_paired(p, MBPB)


HEAD = ("method", "A bpb", "B bpb", "ΔA@B interp", "ΔB@A interp", "ΔA@B path", "verdict")


def _cells(r: LMRow) -> list[str]:
    return [
        r.name,
        f"{_mean(r.a):.3f}",
        f"{_mean(r.b):.3f}",
        fmt(r.interp_a),
        fmt(r.interp_b),
        fmt(r.path_a),
        r.verdict,
    ]


def print_tables(rows: Sequence[LMRow], print_fn: Callable[[Any], None] | None = None) -> None:
    """One rich table per condition."""
    from rich.console import Console
    from rich.table import Table

    out = print_fn or Console(width=170).print
    for cond in dict.fromkeys(r.condition for r in rows):
        n = next(r.interp_a.n for r in rows if r.condition == cond)
        table = Table(
            title=f"lm {cond}: test bits per byte; Δ in mbpb, paired mean ± SE over {n} seeds "
            "(positive: beyond the curve)"
        )
        for col in HEAD:
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in (r for r in rows if r.condition == cond):
            table.add_row(*_cells(r))
        out(table)


def markdown(rows: Sequence[LMRow]) -> str:
    """The tables as Markdown (for docs/benchmark.md)."""
    parts = []
    for cond in dict.fromkeys(r.condition for r in rows):
        lines = [f"**lm {cond}**", "", "| " + " | ".join(HEAD) + " |", "|---" * len(HEAD) + "|"]
        lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows if r.condition == cond]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def closing_summary(rows: Sequence[LMRow]) -> str:
    """What the numbers carry, per condition: which methods are above / below the curve."""
    lines = ["Against the interpolation curve θ0→θT (|t| ≥ 2 and a sign majority over seeds):"]
    for cond in dict.fromkeys(r.condition for r in rows):
        rs = [r for r in rows if r.condition == cond and r.family != "reference"]
        above = [r.name for r in rs if r.verdict == "above"]
        below = [r.name for r in rs if r.verdict == "below"]
        lines.append(
            f"  {cond}: above: {'; '.join(above) or 'none'}. below: {'; '.join(below) or 'none'}. "
            f"within noise: {sum(r.verdict in ('within noise', 'mixed') for r in rs)} of {len(rs)}"
        )
    return "\n".join(lines)


def run_line(config: dict[str, Any]) -> str:
    """What was run and how long it took, from a results.json ``config`` (printed and quoted)."""
    n = len(config["schedules"]) * len(config["lengths"])
    n *= config["pretrain_seeds"] * config["seeds"]
    cached = "from the cache" if all(config["pretraining_cached"]) else "computed in the run"
    return (
        f"{n} fine-tuning runs ({' and '.join(config['schedules'])} schedules x T = "
        f"{', '.join(map(str, config['lengths']))} steps x {config['pretrain_seeds']} "
        f"pre-training x {config['seeds']} fine-tuning seeds; pre-training {cached}) in "
        f"{config['seconds']:.1f} s wall, {config['cpu_seconds']:.1f} s CPU (user + system, "
        f"workers included) with {config['workers']} worker(s); corpus sha256 "
        f"{config['corpus_sha256'][:12]} ({config['corpus_files']} files, Python "
        f"{config['python']}, torch {config['torch']})"
    )


def plot(runs: Sequence[LMRun], rows: Sequence[LMRow], out: Path) -> list[Path]:
    """One trade-off plot per condition: mean curve and path, methods with paired-SE bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for cond in dict.fromkeys(r.condition for r in runs):
        rs = [r for r in runs if r.condition == cond]
        fig, ax = plt.subplots(figsize=(8, 6))
        for key, style, label in (
            ("interpolation", "k-", "interpolation θ0→θT"),
            ("trajectory", "k:", "fine-tuning path"),
        ):
            seqs = [getattr(r, key) for r in rs]
            m = len(seqs[0])
            xs = [sum(s[i][1].b_test for s in seqs) / len(seqs) for i in range(m)]
            ys = [sum(s[i][1].a_test for s in seqs) / len(seqs) for i in range(m)]
            ax.plot(xs, ys, style, marker=".", lw=1.2, label=label)
        for r in (r for r in rows if r.condition == cond):
            # bars: paired SE of the distances to the curve, drawn at the mean point
            xe = 0.0 if math.isnan(r.interp_b.se) else r.interp_b.se
            ye = 0.0 if math.isnan(r.interp_a.se) else r.interp_a.se
            ax.errorbar(_mean(r.b), _mean(r.a), xerr=xe, yerr=ye, fmt="o", ms=4, capsize=2)
            ax.annotate(
                r.name,
                (_mean(r.b), _mean(r.a)),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xlabel("new task B (code): test bits per byte (lower is better)")
        ax.set_ylabel("old task A (prose): test bits per byte (lower is better)")
        ax.set_title(f"lm {cond} (bars: paired SE of ΔB@A, ΔA@B)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"tradeoff-lm-{cond.replace(' ', '-').replace('=', '')}.png"
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def load_runs(path: Path) -> list[LMRun]:
    """The per-seed runs of a ``results.json`` written by :func:`save`."""
    from emaweights.bench.lm import BPB

    def bpb(x: dict[str, Any]) -> BPB:
        return BPB(x["a_val"], x["b_val"], x["a_test"], x["b_test"])

    runs = []
    for r in json.loads(path.read_text())["runs"]:
        run = LMRun(
            r["condition"],
            r["pretrain_seed"],
            r["seed"],
            r["steps"],
            bpb(r["pretrained"]),
            [(i["alpha"], bpb(i)) for i in r["interpolation"]],
            [(i["step"], bpb(i)) for i in r["trajectory"]],
        )
        for name, m in r["methods"].items():
            run.methods[name], run.families[name] = bpb(m), m["family"]
        runs.append(run)
    return runs
