"""Speed of the multi-decay update against separate EMAs.

    PYTHONPATH=src python -m emaweights.bench.multi_speed [--decays 4] [--device cuda]

Prints, per model, the median time of one update of ``n`` decays done as
``n`` separate :class:`~emaweights.EMA` objects (the baseline, measured in the
same run) and as one :class:`~emaweights.multi.MultiEMA`, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from emaweights.bench.speed import _positive
from emaweights.ema import EMA
from emaweights.multi import MultiEMA

__all__ = ["main"]


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "wide MLP (8 x 1024^2, 8.4M)": nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)]),
        "deep thin (200 x 64^2, 0.8M)": nn.Sequential(*[nn.Linear(64, 64) for _ in range(200)]),
    }


def _median_ms(fn: Callable[[], None], repeats: int, cuda: bool = False) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if cuda:  # the host clock only measures the device's work after a synchronize
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    """Print the table; return 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decays", type=_positive("--decays"), default=4)
    parser.add_argument("--repeats", type=_positive("--repeats"), default=30)
    parser.add_argument(
        "--threads", type=_positive("--threads"), default=1, help="torch threads (1: less noise)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (torch.cuda.is_available())")
    torch.set_num_threads(args.threads)
    decays = [1 - 10 ** -(i + 1) for i in range(args.decays)]  # 0.9, 0.99, ...
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(decays)} decays")
    print(f"{'model':<30} {'separate ms':>12} {'MultiEMA ms':>12} {'ratio':>6}")
    for name, model in _models().items():
        model.to(args.device)
        singles = [EMA(model, d) for d in decays]
        multi = MultiEMA(model, decays)

        def separate(emas: list[EMA] = singles) -> None:
            for e in emas:
                e.update()

        t_sep = _median_ms(separate, args.repeats, cuda)
        t_multi = _median_ms(multi.update, args.repeats, cuda)
        print(f"{name:<30} {t_sep:>12.3f} {t_multi:>12.3f} {t_multi / t_sep:>6.2f}")
    print("ratio = time / separate EMAs (below 1: faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
