"""Summaries of the forgetting benchmark: terminal table, trade-off plot, JSON and CSV.

Rows per task: the pre-trained and the fine-tuned weights, the choices made on
the validation split (early-stopping epoch, interpolation alpha, EMA decay;
each picked by the best mean of old- and new-task validation accuracy, then
reported on test), and every method. Accuracies are a mean ± standard
deviation over seeds; the distances to the interpolation curve and to the
early-stopping path are paired over seeds (mean ± paired SE, t, sign count;
see :mod:`emaweights.bench.measure`), with a verdict.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from emaweights.bench.measure import Paired, combined_verdict, delta_a, delta_b, paired
from emaweights.bench.metrics import forgetting, mean_std
from emaweights.bench.runner import Evaluation, RunResult

__all__ = [
    "Row",
    "closing_summary",
    "fmt_paired",
    "load_results",
    "markdown_tables",
    "plot",
    "print_table",
    "save",
    "summarize",
]

METRICS = ("a", "b", "forgetting", "average", "w0")
DISTANCES = ("interp_a", "interp_b", "path_a")
"""Paired distances per row: ΔA@B and ΔB@A to the interpolation curve, ΔA@B to the path."""


@dataclass(frozen=True)
class Row:
    """One line of the summary: a method (or reference) on one task, over seeds."""

    task: str
    name: str
    family: str
    stats: dict[str, tuple[float, float]]  # metric -> (mean, std)
    counts: dict[str, tuple[int, int]]  # metric -> (seeds where defined, seeds)
    distances: dict[str, Paired] = field(default_factory=dict)  # see DISTANCES

    @property
    def verdict(self) -> str:
        """Against the interpolation curve (:func:`~emaweights.bench.measure.combined_verdict`)."""
        if "interp_a" not in self.distances:
            return "within noise"
        return combined_verdict(self.distances["interp_a"], self.distances["interp_b"])

    def to_dict(self) -> dict[str, Any]:
        """Flat plain data for JSON and CSV."""
        out: dict[str, Any] = {"task": self.task, "name": self.name, "family": self.family}
        for k, (m, s) in self.stats.items():
            out[f"{k}_mean"], out[f"{k}_std"] = m, s
            out[f"{k}_seeds"] = self.counts[k][0]
        for key, p in self.distances.items():
            out |= {f"{key}_mean": p.mean, f"{key}_se": p.se, f"{key}_t": p.t}
            out |= {f"{key}_k": p.k, f"{key}_n": p.n, f"{key}_verdict": p.verdict}
        out["verdict"] = self.verdict
        return out


def _hidden(r: RunResult) -> set[str]:
    return {n for n, f in r.families.items() if f == "ema-grid"}


def _metrics(r: RunResult, e: Evaluation, w0: float | None) -> dict[str, float]:
    return {
        "a": e.a_test,
        "b": e.b_test,
        "forgetting": forgetting(r.pretrained.a_test, e.a_test),
        "average": (e.a_test + e.b_test) / 2,
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
    for family, label in (("ema", "ema (β on val)"), ("ema-grid", "ema (w0 grid, β on val)")):
        emas = [n for n, f in r.families.items() if f == family]
        if emas:
            best = max(emas, key=lambda n: _val_score(r.methods[n]))
            out[label] = ("selected", r.methods[best], r.w0[best])
    return out


def summarize(results: Sequence[RunResult]) -> list[Row]:
    """Aggregate per-seed results into rows (task order, then row order of first seed)."""
    per: dict[tuple[str, str], tuple[str, list[tuple[RunResult, Evaluation, float | None]]]] = {}
    for r in results:
        entries = dict(_choices(r))
        entries.update(
            {n: (r.families[n], e, r.w0[n]) for n, e in r.methods.items() if n not in _hidden(r)}
        )
        for name, (family, e, w0) in entries.items():
            per.setdefault((r.task, name), (family, []))[1].append((r, e, w0))
    rows = []
    for (task, name), (family, seeds) in per.items():
        vals = [_metrics(r, e, w0) for r, e, w0 in seeds]
        rows.append(
            Row(
                task,
                name,
                family,
                {k: mean_std([v[k] for v in vals]) for k in METRICS},
                {k: (sum(not math.isnan(v[k]) for v in vals), len(vals)) for k in METRICS},
                {
                    "interp_a": paired([delta_a(e.point, r.curve()) for r, e, _ in seeds]),
                    "interp_b": paired([delta_b(e.point, r.curve()) for r, e, _ in seeds]),
                    "path_a": paired([delta_a(e.point, r.path()) for r, e, _ in seeds]),
                },
            )
        )
    return rows


def fmt_paired(p: Paired, scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± SE (t, k/n)`` scaled, ``mean (n=1)`` for one seed, or the range label."""
    if math.isinf(p.mean):
        return f"dominates ({p.k}/{p.n})"
    if math.isnan(p.mean):
        return f"mixed range ({p.k}/{p.n} > 0)"
    tag = " dominated" if all(p.labels) and p.labels[0] == "dominated" else ""
    if p.n == 1:  # no spread to show: a "± 0.0" would claim one
        return f"{p.mean * scale:+.{digits}f} (n=1){tag}"
    se = "—" if math.isnan(p.se) else f"{p.se * scale:.{digits}f}"
    t = "—" if math.isnan(p.t) else f"{p.t:+.1f}"
    return f"{p.mean * scale:+.{digits}f} ± {se} (t {t}, {p.k}/{p.n}){tag}"


def _fmt(
    stat: tuple[float, float],
    scale: float = 100.0,
    digits: int = 1,
    count: tuple[int, int] | None = None,
) -> str:
    m, s = stat
    if math.isnan(m):
        return "—"
    if count is not None and count[1] == 1:  # one seed: no standard deviation to show
        return f"{m * scale:.{digits}f} (n=1)"
    text = f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"
    if count is not None and count[0] < count[1]:
        text += f" ({count[0]}/{count[1]})"  # defined for only some seeds
    return text


COLUMNS = (
    ("w0 = β^T", "w0"),
    ("old A", "a"),
    ("new B", "b"),
    ("forgetting", "forgetting"),
    ("avg", "average"),
)
PAIRED_COLUMNS = (
    ("ΔA@B interp", "interp_a"),
    ("ΔB@A interp", "interp_b"),
    ("ΔA@B path", "path_a"),
)


def _cells(r: Row) -> list[str]:
    cells = [
        _fmt(r.stats[k], 1.0, 3, r.counts[k]) if k == "w0" else _fmt(r.stats[k], count=r.counts[k])
        for _, k in COLUMNS
    ]
    cells += [fmt_paired(r.distances[k]) if k in r.distances else "—" for _, k in PAIRED_COLUMNS]
    return [r.name, *cells, r.verdict]


HEAD = ("method", *(h for h, _ in COLUMNS), *(h for h, _ in PAIRED_COLUMNS), "verdict")


def print_table(rows: Sequence[Row], print_fn: Callable[[Any], None] | None = None) -> None:
    """Print one table per task (rich if installed, else plain text). Accuracies in %."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is in the bench extra
        _print_plain(rows)
        return
    console = Console(width=220)
    out = print_fn or console.print
    for task in dict.fromkeys(r.task for r in rows):
        n = next(r.counts["a"][1] for r in rows if r.task == task)
        table = Table(
            title=f"{task}: test accuracy in % (mean ± std over {n} seeds); Δ in points, "
            "paired mean ± SE (t, seeds > 0) (positive: beyond the curve)"
        )
        for col in HEAD:
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in (r for r in rows if r.task == task):
            table.add_row(*_cells(r))
        out(table)


def markdown_tables(rows: Sequence[Row]) -> str:
    """The summary as one Markdown table per task (accuracies in %), e.g. for a report."""
    parts = []
    for task in dict.fromkeys(r.task for r in rows):
        lines = [f"**{task}**", "", "| " + " | ".join(HEAD) + " |", "|---" * len(HEAD) + "|"]
        lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows if r.task == task]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def closing_summary(rows: Sequence[Row]) -> str:
    """Per task: which methods are above / below the interpolation curve (the verdicts)."""
    lines = ["Against the interpolation curve θ0→θT (|t| ≥ 2 and a sign majority over seeds):"]
    for task in dict.fromkeys(r.task for r in rows):
        rs = [r for r in rows if r.task == task and r.family != "reference"]
        above = [r.name for r in rs if r.verdict == "above"]
        below = [r.name for r in rs if r.verdict == "below"]
        lines.append(
            f"  {task}: above: {'; '.join(above) or 'none'}. below: {'; '.join(below) or 'none'}. "
            f"within noise: {sum(r.verdict in ('within noise', 'mixed') for r in rs)} of {len(rs)}"
        )
    return "\n".join(lines)


def _print_plain(rows: Sequence[Row]) -> None:  # pragma: no cover - fallback
    for r in rows:
        print(r.task, r.name, {k: _fmt(v) for k, v in r.stats.items()})


def plot(results: Sequence[RunResult], rows: Sequence[Row], path: Path) -> None:
    """Draw the trade-off plane (x: new-task accuracy, y: old-task accuracy), a panel per task.

    Each method is drawn at its mean point with paired-SE bars of its distances to the curve.
    """
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
            bm, am = r.stats["b"][0], r.stats["a"][0]
            # bars: paired SE of the distances to the curve (ΔB@A across, ΔA@B up)
            xe, ye = (_finite(r.distances[k].se) if k in r.distances else 0.0 for k in DIST_XY)
            ax.errorbar(
                100 * bm,
                100 * am,
                xerr=100 * xe,
                yerr=100 * ye,
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


DIST_XY = ("interp_b", "interp_a")


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 0.0


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


def load_results(path: Path) -> list[RunResult]:
    """The per-seed runs of a digits ``results.json`` written by :func:`save`."""

    def ev(x: dict[str, Any]) -> Evaluation:
        return Evaluation(x["a_val"], x["b_val"], x["a_test"], x["b_test"])

    out = []
    for r in json.loads(path.read_text())["runs"]:
        res = RunResult(
            r["task"],
            r["seed"],
            r["steps"],
            ev(r["pretrained"]),
            [(i["alpha"], ev(i)) for i in r["interpolation"]],
            [(i["epoch"], ev(i)) for i in r["trajectory"]],
        )
        for name, m in r["methods"].items():
            res.methods[name], res.families[name], res.w0[name] = ev(m), m["family"], m["w0"]
        out.append(res)
    return out
