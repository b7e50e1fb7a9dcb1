"""Speed benchmark of the EMA update against the roofline and every installed anchor.

Run::

    python -m emaweights.bench.speed            # default run, a few minutes on 2 cores
    python -m emaweights.bench.speed --quick    # smaller and fewer rounds
    emaweights bench-speed --json speed.json

All timings come from one process with interleaved rounds (every method runs
once per round, in a rotating order) and are reported as medians, so that a
noisy, shared machine penalizes every method alike. The roofline is
``a.add_(b)`` over flat fp32 buffers of the same element count: it reads two
tensors and writes one, 12 bytes per element, like an fp32 EMA update.

Anchors (other libraries) are optional: those not importable are listed as
skipped with the extra that installs them (``pip install emaweights[bench-anchors]``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from emaweights.ema import EMA
from emaweights.flat import flatten_parameters

DECAY = 0.999
Update = Callable[[], None]


# -- models: parameter shapes of the real architectures, no download ----------


class ShapeModel(nn.Module):
    """A module holding parameters (and buffers) of given shapes, in a given order."""

    def __init__(
        self,
        params: list[tuple[str, tuple[int, ...]]],
        buffers: list[tuple[str, tuple[int, ...], torch.dtype]] = (),  # type: ignore[assignment]
    ) -> None:
        super().__init__()
        for name, shape in params:
            self.register_parameter(name, nn.Parameter(torch.randn(shape) * 0.02))
        for name, shape, dtype in buffers:
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))


def resnet50_shapes() -> tuple[list[tuple[str, tuple[int, ...]]], list[Any]]:
    """Parameters and BatchNorm buffers of torchvision's ResNet-50 (25.6 M parameters)."""
    params: list[tuple[str, tuple[int, ...]]] = []
    buffers: list[Any] = []

    def conv_bn(name: str, out: int, inp: int, k: int) -> None:
        params.append((f"{name}_conv", (out, inp, k, k)))
        params.extend([(f"{name}_bn_weight", (out,)), (f"{name}_bn_bias", (out,))])
        buffers.extend([(f"{name}_bn_mean", (out,), torch.float32)])
        buffers.extend([(f"{name}_bn_var", (out,), torch.float32)])
        buffers.extend([(f"{name}_bn_count", (), torch.int64)])

    conv_bn("stem", 64, 3, 7)
    inp = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
        for b in range(blocks):
            n = f"layer{stage + 1}_{b}"
            conv_bn(f"{n}_a", width, inp, 1)
            conv_bn(f"{n}_b", width, width, 3)
            conv_bn(f"{n}_c", width * 4, width, 1)
            if b == 0:
                conv_bn(f"{n}_down", width * 4, inp, 1)
            inp = width * 4
    params.extend([("fc_weight", (1000, 2048)), ("fc_bias", (1000,))])
    return params, buffers


def vit_b16_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Parameters of ViT-B/16 at 224 px with a 1000-class head (86.6 M parameters)."""
    d, mlp = 768, 3072
    p: list[tuple[str, tuple[int, ...]]] = [
        ("patch_weight", (d, 3, 16, 16)),
        ("patch_bias", (d,)),
        ("cls_token", (1, 1, d)),
        ("pos_embed", (1, 197, d)),
    ]
    for i in range(12):
        p += [
            (f"b{i}_norm1_weight", (d,)),
            (f"b{i}_norm1_bias", (d,)),
            (f"b{i}_qkv_weight", (3 * d, d)),
            (f"b{i}_qkv_bias", (3 * d,)),
            (f"b{i}_proj_weight", (d, d)),
            (f"b{i}_proj_bias", (d,)),
            (f"b{i}_norm2_weight", (d,)),
            (f"b{i}_norm2_bias", (d,)),
            (f"b{i}_fc1_weight", (mlp, d)),
            (f"b{i}_fc1_bias", (mlp,)),
            (f"b{i}_fc2_weight", (d, mlp)),
            (f"b{i}_fc2_bias", (d,)),
        ]
    p += [("norm_weight", (d,)), ("norm_bias", (d,)), ("head_weight", (1000, d))]
    p += [("head_bias", (1000,))]
    return p


def tiny_mlp_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """A 3-layer MLP (32 -> 64 -> 64 -> 10): per-call overhead dominates."""
    return [
        ("fc1_weight", (64, 32)),
        ("fc1_bias", (64,)),
        ("fc2_weight", (64, 64)),
        ("fc2_bias", (64,)),
        ("fc3_weight", (10, 64)),
        ("fc3_bias", (10,)),
    ]


def build_model(name: str, scale: float = 1.0) -> nn.Module:
    """One of ``resnet50``, ``vit_b16``, ``vit_b16_bf16``, ``mlp`` (``scale`` shrinks widths)."""

    def scaled(ps: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
        if scale == 1.0:
            return ps
        return [(n, tuple(max(1, int(s * scale)) if s > 16 else s for s in sh)) for n, sh in ps]

    if name == "resnet50":
        params, buffers = resnet50_shapes()
        return ShapeModel(scaled(params), buffers if scale == 1.0 else [])
    if name in ("vit_b16", "vit_b16_bf16"):
        model = ShapeModel(scaled(vit_b16_shapes()))
        return model.bfloat16() if name.endswith("bf16") else model
    if name == "mlp":
        return ShapeModel(tiny_mlp_shapes())
    raise ValueError(f"unknown model {name!r}")


# -- methods ------------------------------------------------------------------


class ArticleEMA:
    """The seed article's loop: a new tensor per parameter per update."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.shadow = {n: p.data.clone() for n, p in model.named_parameters() if p.requires_grad}

    def update(self) -> None:
        """Average every trainable parameter, allocating new tensors as the article does."""
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                new = (1.0 - self.decay) * param.data + self.decay * self.shadow[name]
                self.shadow[name] = new.clone()


def _anchor_factories() -> tuple[dict[str, Callable[[nn.Module], Update]], dict[str, str]]:
    """Installed anchors as ``name -> make(model) -> update()``, and skipped ones with reasons."""
    made: dict[str, Callable[[nn.Module], Update]] = {}
    skipped: dict[str, str] = {}
    hint = "pip install 'emaweights[bench-anchors]'"
    try:
        from timm.utils.model_ema import ModelEmaV3

        def timm_v3(m: nn.Module) -> Update:
            e = ModelEmaV3(m, decay=DECAY)
            return lambda: e.update(m)

        made["timm ModelEmaV3"] = timm_v3
    except ImportError:
        skipped["timm ModelEmaV3"] = f"timm not importable ({hint})"
    try:
        from ema_pytorch import EMA as EmaPytorch

        def ema_pytorch(m: nn.Module) -> Update:
            e = EmaPytorch(
                m,
                beta=DECAY,
                update_after_step=0,
                update_every=1,
                use_foreach=True,
                include_online_model=False,
            )
            return e.update  # type: ignore[no-any-return]

        made["ema-pytorch (foreach)"] = ema_pytorch
    except ImportError:
        skipped["ema-pytorch"] = f"ema_pytorch not importable ({hint})"
    try:
        from torch_ema import ExponentialMovingAverage

        def torch_ema(m: nn.Module) -> Update:
            e = ExponentialMovingAverage(m.parameters(), decay=DECAY)
            return lambda: e.update(m.parameters())

        made["torch_ema"] = torch_ema
    except ImportError:
        skipped["torch_ema"] = f"torch_ema not importable ({hint})"
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def averaged_model(m: nn.Module) -> Update:
        e = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(DECAY))  # type: ignore[no-untyped-call]
        e.update_parameters(m)  # the first call copies
        return lambda: e.update_parameters(m)

    made["AveragedModel (multi_avg_fn)"] = averaged_model
    try:
        from diffusers.training_utils import EMAModel

        def diffusers_ema(m: nn.Module) -> Update:
            e = EMAModel(m.parameters(), decay=DECAY, foreach=True)
            return lambda: e.step(m.parameters())

        made["diffusers EMAModel (foreach)"] = diffusers_ema
    except ImportError:
        skipped["diffusers EMAModel"] = f"diffusers not importable ({hint})"
    return made, skipped


def _ours(m: nn.Module) -> Update:
    e = EMA(m, DECAY)
    return e.update


def _ours_flat(m: nn.Module) -> Update:
    flatten_parameters(m)
    e = EMA(m, DECAY)
    return e.update


def _ours_flat_compiled(m: nn.Module) -> Update:
    flatten_parameters(m)
    e = EMA(m, DECAY, compiled=True)
    return e.update


def _has_cxx() -> bool:
    """Whether torch.compile can build CPU kernels here (it needs a C++ compiler)."""
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


# -- measurement ----------------------------------------------------------------


def allocated_bytes(fn: Update) -> int:
    """Bytes of tensor memory allocated by one call of ``fn`` (after one warm-up call).

    Uses the PyTorch profiler's memory events: the sum of the positive *self*
    allocations of every operator, so a temporary freed inside the call counts.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


@dataclass
class Case:
    """One timed method on one model."""

    model: str
    method: str
    nbytes: int  # bytes moved per call (for GB/s)
    fn: Update
    reps: int
    times: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def run(self) -> None:
        """Time ``reps`` calls; record the mean per call."""
        t0 = time.perf_counter()
        for _ in range(self.reps):
            self.fn()
        self.times.append((time.perf_counter() - t0) / self.reps)

    @property
    def median(self) -> float:
        """Median seconds per call over the rounds."""
        return statistics.median(self.times)


def _roofline(numel: int) -> Update:
    a, b = torch.randn(numel), torch.randn(numel)

    def roof() -> None:
        a.add_(b, alpha=1e-9)

    return roof


def _bare_foreach(m: nn.Module) -> Update:
    live = [p.detach() for p in m.parameters()]
    shadow = [t.clone() for t in live]
    return lambda: torch._foreach_lerp_(shadow, live, 1.0 - DECAY)


def _swap_cases(model_name: str, scale: float, reps: int) -> list[Case]:
    m = build_model(model_name, scale)
    ours = EMA(m, DECAY)

    def pointer_swap() -> None:
        with ours.applied():
            pass

    def pointer_only() -> None:  # the swap itself, without applied()'s non-finite check
        ours._shadow.swap_out(ours._shadow.swap_in())

    backup = [p.detach().clone() for p in m.parameters()]
    shadow = [p.detach().clone() for p in m.parameters()]
    live = [p.detach() for p in m.parameters()]

    def copy_swap() -> None:  # store, copy the shadow in, restore: what copy-based EMAs do
        torch._foreach_copy_(backup, live)
        torch._foreach_copy_(live, shadow)
        torch._foreach_copy_(live, backup)

    return [
        Case(model_name, "swap: ours applied() (+finite check)", 0, pointer_swap, reps),
        Case(model_name, "swap: ours swap_in/out (pointer)", 0, pointer_only, reps),
        Case(model_name, "swap: copy (store/copy_to/restore)", 0, copy_swap, reps),
    ]


def build_cases(
    models: list[str], scale: float, reps: int, anchors: bool
) -> tuple[list[Case], dict[str, str]]:
    """Every (model, method) pair to time; the skipped anchors with reasons."""
    makers, skipped = _anchor_factories() if anchors else ({}, {})
    cases: list[Case] = []
    for name in models:
        n = sum(p.numel() for p in build_model(name, scale).parameters())
        r = reps * 20 if name == "mlp" else reps
        if name == "mlp":
            methods: dict[str, Callable[[nn.Module], Update]] = {
                "bare _foreach_lerp_": _bare_foreach,
                "ours": _ours,
                "ours (flat params)": _ours_flat,
            }
        elif name.endswith("bf16"):
            methods = {"ours (fp32 shadow)": _ours, "ours (fp32 shadow, flat params)": _ours_flat}
            if _has_cxx():  # the first update compiles (seconds), during the warm-up call
                methods["ours (fp32 shadow, flat, compiled)"] = _ours_flat_compiled
            else:
                skipped["ours compiled=True"] = "no C++ compiler for torch.compile on the CPU"
        else:
            methods = {"ours": _ours, "ours (flat params)": _ours_flat, "article loop": _article}
            methods.update(makers)
        live_bytes = 2 if name.endswith("bf16") else 4
        nbytes = n * (live_bytes + 8)  # read live, read + write fp32 shadow
        cases.append(Case(name, "roofline a.add_(b)", n * 12, _roofline(n), r))
        for method, make in methods.items():
            fn = make(build_model(name, scale))
            cases.append(Case(name, method, nbytes, fn, r))
    return cases, skipped


def _article(m: nn.Module) -> Update:
    return ArticleEMA(m, DECAY).update


def measure(cases: list[Case], rounds: int) -> None:
    """Run every case once per round, rotating the order between rounds."""
    for c in cases:
        c.fn()  # warm-up (first-touch of lazily allocated state)
    for r in range(rounds):
        k = r % len(cases)
        for c in cases[k:] + cases[:k]:
            c.run()


# -- report ---------------------------------------------------------------------


def summarize(cases: list[Case]) -> list[dict[str, Any]]:
    """One row per case with time, GB/s, % of roofline and speed-ups."""
    rows: list[dict[str, Any]] = []
    by_model: dict[str, list[Case]] = {}
    for c in cases:
        by_model.setdefault(c.model, []).append(c)
    for model, cs in by_model.items():
        roof = next((c for c in cs if c.method.startswith("roofline")), None)
        roof_gbs = roof.nbytes / roof.median / 1e9 if roof else math.nan
        article = next((c for c in cs if c.method == "article loop"), None)
        anchors = [
            c
            for c in cs
            if not c.method.startswith(("ours", "roofline", "article", "swap", "bare"))
        ]
        best = min(anchors, key=lambda c: c.median) if anchors else None
        bare = next((c for c in cs if c.method.startswith("bare")), None)
        for c in cs:
            gbs = c.nbytes / c.median / 1e9 if c.nbytes else math.nan
            rows.append(
                {
                    "model": model,
                    "method": c.method,
                    "median_ms": c.median * 1e3,
                    "gb_s": gbs,
                    "pct_roofline": 100 * gbs / roof_gbs if c.nbytes else math.nan,
                    "vs_article": article.median / c.median if article and c.nbytes else math.nan,
                    "vs_best_anchor": best.median / c.median if best and c.nbytes else math.nan,
                    "vs_bare_foreach": c.median / bare.median if bare else math.nan,
                    "best_anchor": best.method if best else None,
                    **c.extra,
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print ``rows`` as a fixed-width table."""

    def f(x: Any, spec: str) -> str:
        return "-" if isinstance(x, float) and math.isnan(x) else format(x, spec)

    head = f"{'model':<13}{'method':<36}{'ms':>9}{'GB/s':>7}{'%roof':>7}{'xart':>7}"
    head += f"{'xbest':>7}{'xbare':>7}{'alloc/upd':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        alloc = r.get("alloc_bytes")
        print(
            f"{r['model']:<13}{r['method']:<36}{f(r['median_ms'], '.3f'):>9}"
            f"{f(r['gb_s'], '.1f'):>7}{f(r['pct_roofline'], '.0f'):>7}"
            f"{f(r['vs_article'], '.1f'):>7}{f(r['vs_best_anchor'], '.2f'):>7}"
            f"{f(r['vs_bare_foreach'], '.2f'):>7}{'-' if alloc is None else _size(alloc):>11}"
        )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} TiB"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write JSON if asked."""
    ap = argparse.ArgumentParser(prog="emaweights bench-speed", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer rounds")
    ap.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default 9, quick 3)"
    )
    ap.add_argument("--reps", type=int, default=None, help="calls per timing (default 3, quick 2)")
    ap.add_argument(
        "--models",
        default="resnet50,vit_b16,vit_b16_bf16,mlp",
        help="comma-separated: resnet50, vit_b16, vit_b16_bf16, mlp",
    )
    ap.add_argument("--no-anchors", action="store_true", help="skip other libraries")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", default=None, help="write results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    scale = 0.25 if args.quick else 1.0
    rounds = args.rounds or (3 if args.quick else 9)
    reps = args.reps or (2 if args.quick else 3)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        build_model(m, 0.01) if m != "mlp" else None  # validate names early
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for m in models:  # one model at a time: every copy of ViT-B costs ~350 MB per method
        cases, skipped = build_cases([m], scale, reps, not args.no_anchors)
        if m in ("resnet50", "vit_b16"):
            cases += _swap_cases(m, scale, reps)
        for c in cases:
            if not c.method.startswith(("roofline", "swap", "bare")):
                c.extra["alloc_bytes"] = allocated_bytes(c.fn)
        measure(cases, rounds)
        rows += summarize(cases)
        del cases
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}")
    print(f"{rounds} interleaved rounds x {reps} calls; medians; scale {scale}")
    print_table(rows)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "rows": rows,
                    "skipped": skipped,
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "rounds": rounds,
                    "reps": reps,
                    "scale": scale,
                },
                fh,
                indent=1,
                default=str,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
