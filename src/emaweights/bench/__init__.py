"""Benchmarks: the forgetting benchmark (a library, not only a script).

Use it on your own model and data::

    from emaweights.bench import Config, TaskPair, Split, run, summarize, print_table
    results = run([my_task], Config(seeds=(0, 1, 2)), make_model=lambda task, cfg: MyNet())
    print_table(summarize(results))

See ``examples/forgetting_custom.py``. Needs the ``bench`` extra.
"""

from emaweights.bench.measure import Distance, Paired, a_star, b_star, paired, verdict
from emaweights.bench.methods import EMAMethod, Method, default_methods
from emaweights.bench.metrics import curve_a_at, delta_a, forgetting, mean_std
from emaweights.bench.report import Row, markdown_tables, plot, print_table, save, summarize
from emaweights.bench.runner import Config, Evaluation, RunResult, run, run_one
from emaweights.bench.tasks import SHIFTS, Split, TaskPair, digits_task, digits_tasks

__all__ = [
    "SHIFTS",
    "Config",
    "Distance",
    "EMAMethod",
    "Evaluation",
    "Method",
    "Paired",
    "Row",
    "RunResult",
    "Split",
    "TaskPair",
    "a_star",
    "b_star",
    "curve_a_at",
    "default_methods",
    "delta_a",
    "digits_task",
    "digits_tasks",
    "forgetting",
    "markdown_tables",
    "mean_std",
    "paired",
    "plot",
    "print_table",
    "run",
    "run_one",
    "save",
    "summarize",
    "verdict",
]
