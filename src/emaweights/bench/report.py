"""Summaries of the forgetting benchmark: terminal table, trade-off plot, JSON and CSV.

Rows per task: the pre-trained and the fine-tuned weights, the choices made on
the validation split (early-stopping epoch, interpolation alpha, EMA decay;
each picked by the best mean of old- and new-task validation accuracy, then
reported on test), and every method. Each metric is a mean ± standard
deviation over seeds of per-seed values.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from emaweights.bench.metrics import delta_a, forgetting, mean_std
from emaweights.bench.runner import Evaluation, RunResult

__all__ = ["Row", "markdown_tables", "plot", "print_table", "save", "summarize"]

METRICS = ("a", "b", "forgetting", "average", "delta_a_interp", "delta_a_early_stop", "w0")


@dataclass(frozen=True)
class Row:
    """One line of the summary: a method (or reference) on one task, over seeds."""

    task: str
    name: str
    family: str
    stats: dict[str, tuple[float, float]]  # metric -> (mean, std)
    counts: dict[str, tuple[int, int]]  # metric -> (seeds where defined, seeds)

    def to_dict(self) -> dict[str, Any]:
        """Flat plain data for JSON and CSV."""
        out: dict[str, Any] = {"task": self.task, "name": self.name, "family": self.family}
        for k, (m, s) in self.stats.items():
            out[f"{k}_mean"], out[f"{k}_std"] = m, s
            out[f"{k}_seeds"] = self.counts[k][0]
        return out


def _metrics(r: RunResult, e: Evaluation, w0: float | None) -> dict[str, float]:
    return {
        "a": e.a_test,
        "b": e.b_test,
        "forgetting": forgetting(r.pretrained.a_test, e.a_test),
        "average": (e.a_test + e.b_test) / 2,
        "delta_a_interp": delta_a(e.point, r.curve()),
        "delta_a_early_stop": delta_a(e.point, r.path()),
        "w0": math.nan if w0 is None else w0,
    }


def _val_score(e: Evaluation) -> float:
    return (e.a_val + e.b_val) / 2


def _choices(r: RunResult) -> dict[str, tuple[str, Evaluation, float | None]]:
    """Reference rows and validation-selected rows for one run: name -> (family, eval, w0)."""
    alpha, interp = max(r.interpolation, key=lambda ae: _val_score(ae[1]))
    _, stop = max(r.trajectory, key=lambda ke: _val_score(ke[1]))
    out: dict[str, tuple[str, Evaluation, float | None]] = {
        "pre-trained": ("reference", r.pretrained, 1.0),
        "fine-tuned (final)": ("reference", r.interpolation[-1][1], 0.0),
        "early stop (epoch on val)": ("selected", stop, None),
        "interpolation (α on val)": ("selected", interp, 1.0 - alpha),
    }
    emas = [n for n, f in r.families.items() if f == "ema"]
    if emas:
        best = max(emas, key=lambda n: _val_score(r.methods[n]))
        out["ema (β on val)"] = ("selected", r.methods[best], r.w0[best])
    return out


def summarize(results: Sequence[RunResult]) -> list[Row]:
    """Aggregate per-seed results into rows (task order, then row order of first seed)."""
    per: dict[tuple[str, str], tuple[str, list[dict[str, float]]]] = {}
    for r in results:
        entries = dict(_choices(r))
        entries.update({n: (r.families[n], e, r.w0[n]) for n, e in r.methods.items()})
        for name, (family, e, w0) in entries.items():
            per.setdefault((r.task, name), (family, []))[1].append(_metrics(r, e, w0))
    return [
        Row(
            task,
            name,
            family,
            {k: mean_std([v[k] for v in vals]) for k in METRICS},
            {k: (sum(not math.isnan(v[k]) for v in vals), len(vals)) for k in METRICS},
        )
        for (task, name), (family, vals) in per.items()
    ]


def _fmt(
    stat: tuple[float, float],
    scale: float = 100.0,
    digits: int = 1,
    count: tuple[int, int] | None = None,
) -> str:
    m, s = stat
    if math.isnan(m):
        return "—"
    text = f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"
    if count is not None and count[0] < count[1]:
        text += f" ({count[0]}/{count[1]})"  # defined for only some seeds
    return text


def print_table(rows: Sequence[Row], print_fn: Callable[[Any], None] | None = None) -> None:
    """Print one table per task (rich if installed, else plain text). Accuracies in %."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is in the bench extra
        _print_plain(rows)
        return
    console = Console(width=160)
    out = print_fn or console.print
    for task in dict.fromkeys(r.task for r in rows):
        table = Table(title=f"{task}: accuracy in %, mean ± std over seeds (test split)")
        for col in (
            "method",
            "w0=β^T",
            "old A",
            "new B",
            "forgetting",
            "avg",
            "ΔA vs interp",
            "ΔA vs early stop",
        ):
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in (r for r in rows if r.task == task):
            s = r.stats
            table.add_row(
                r.name,
                _fmt(s["w0"], 1.0, 3),
                _fmt(s["a"]),
                _fmt(s["b"]),
                _fmt(s["forgetting"]),
                _fmt(s["average"]),
                _fmt(s["delta_a_interp"], count=r.counts["delta_a_interp"]),
                _fmt(s["delta_a_early_stop"], count=r.counts["delta_a_early_stop"]),
            )
        out(table)


COLUMNS = (
    ("w0 = β^T", "w0"),
    ("old A", "a"),
    ("new B", "b"),
    ("forgetting", "forgetting"),
    ("avg", "average"),
    ("ΔA vs interpolation", "delta_a_interp"),
    ("ΔA vs early-stop path", "delta_a_early_stop"),
)


def markdown_tables(rows: Sequence[Row]) -> str:
    """The summary as one Markdown table per task (accuracies in %), e.g. for a report."""
    parts = []
    for task in dict.fromkeys(r.task for r in rows):
        lines = [
            f"**{task}**",
            "",
            "| method | " + " | ".join(h for h, _ in COLUMNS) + " |",
            "|---" * (len(COLUMNS) + 1) + "|",
        ]
        for r in (r for r in rows if r.task == task):
            cells = [
                _fmt(r.stats[k], 1.0, 3) if k == "w0" else _fmt(r.stats[k], count=r.counts[k])
                for _, k in COLUMNS
            ]
            lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _print_plain(rows: Sequence[Row]) -> None:  # pragma: no cover - fallback
    for r in rows:
        print(r.task, r.name, {k: _fmt(v) for k, v in r.stats.items()})


def plot(results: Sequence[RunResult], rows: Sequence[Row], path: Path) -> None:
    """Draw the trade-off plane (x: new-task accuracy, y: old-task accuracy), a panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in results))
    cols = min(2, len(tasks))
    nrows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 5.5 * nrows), squeeze=False)
    families = sorted({r.family for r in rows} - {"reference", "selected"})
    colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    for ax, task in zip(axes.flat, tasks, strict=False):
        runs = [r for r in results if r.task == task]
        curve = _mean_curve([r.curve() for r in runs])
        path_ = _mean_curve([r.path() for r in runs])
        ax.plot(
            *zip(*[(100 * b, 100 * a) for b, a in curve], strict=True),
            "k-",
            lw=1.5,
            label="interpolation θ0→θT",
        )
        ax.plot(
            *zip(*[(100 * b, 100 * a) for b, a in path_], strict=True),
            "k:",
            lw=1.5,
            marker=".",
            label="fine-tuning path (per epoch)",
        )
        for r in (r for r in rows if r.task == task and r.family in colors):
            (bm, bs), (am, as_) = r.stats["b"], r.stats["a"]
            ax.errorbar(
                100 * bm,
                100 * am,
                xerr=100 * bs,
                yerr=100 * as_,
                fmt="o",
                ms=4,
                color=colors[r.family],
                alpha=0.85,
                capsize=2,
            )
            ax.annotate(
                r.name.split(" ", 1)[-1],
                (100 * bm, 100 * am),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
        for f, c in colors.items():
            ax.plot([], [], "o", color=c, label=f)
        ax.set_title(task)
        ax.set_xlabel("new-task accuracy B (%)")
        ax.set_ylabel("old-task accuracy A (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mean_curve(curves: Sequence[Sequence[tuple[float, float]]]) -> list[tuple[float, float]]:
    n = len(curves)
    return [
        (sum(c[i][0] for c in curves) / n, sum(c[i][1] for c in curves) / n)
        for i in range(len(curves[0]))
    ]


class _Plain(Protocol):
    """A run or a summary row: anything that gives its plain data for JSON and CSV."""

    def to_dict(self) -> dict[str, Any]: ...


def save(
    results: Sequence[_Plain], rows: Sequence[_Plain], out: Path, config: dict[str, Any]
) -> None:
    """Write ``results.json`` (config, per-seed raw numbers, summary) and ``summary.csv``.

    Serves both benchmarks (digits and language model): runs and rows only need ``to_dict``.
    """
    from emaweights.io import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": config,
        "summary": [r.to_dict() for r in rows],
        "runs": [r.to_dict() for r in results],
    }
    with atomic_write(out / "results.json") as f:
        f.write(json.dumps(payload, indent=1, allow_nan=True).encode())
    lines = [r.to_dict() for r in rows]
    with atomic_write(out / "summary.csv") as f:
        import io

        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(lines[0]))
        writer.writeheader()
        writer.writerows(lines)
        f.write(text.getvalue().encode())
