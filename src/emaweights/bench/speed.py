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

``--device cuda`` runs the same table on a GPU (timed with CUDA events), adds
the CPU-offload variants (``device="cpu"``, with and without ``overlap``), a
1B-parameter flat model, the time of a ViT-B training step with and without
each EMA, and the targets with pass/fail columns (see :data:`TARGETS`).

Anchors (other libraries) are optional: those not importable are listed as
skipped with the command that installs them (``pip install 'emaweights[bench-anchors]'``
and, for timm's ``ModelEmaV3``, ``pip install --no-deps timm``; see
:mod:`emaweights.bench.anchors`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from emaweights.bench.anchors import import_anchor, timm_model_ema
from emaweights.ema import EMA
from emaweights.flat import flatten_parameters

DECAY = 0.999
Update = Callable[[], None]
MODELS = ("resnet50", "vit_b16", "vit_b16_bf16", "mlp", "flat1b")
DEFAULT_MODELS = "resnet50,vit_b16,vit_b16_bf16,mlp"
DEFAULT_MODELS_CUDA = "resnet50,vit_b16,vit_b16_bf16,flat1b"
OFFLOAD_OVERLAP = "ours (offload, overlap)"
#: (description, row selector, threshold): fp32 and bf16 updates as % of the roofline.
TARGETS = (
    ("fp32 update >= 90% roofline", ("vit_b16", "ours (flat params)"), 90.0),
    (
        "bf16 model, fp32 shadow >= 85% roofline",
        ("vit_b16_bf16", "ours (fp32 shadow, flat, compiled)"),
        85.0,
    ),
)
#: offload with overlap: training step at most this factor of the step without an EMA.
STEP_TARGET = 1.05


# -- models: parameter shapes of the real architectures, no download ----------


class ShapeModel(nn.Module):
    """A module holding parameters (and buffers) of given shapes, in a given order."""

    def __init__(
        self,
        params: list[tuple[str, tuple[int, ...]]],
        buffers: list[tuple[str, tuple[int, ...], torch.dtype]] = (),  # type: ignore[assignment]
        device: str = "cpu",
    ) -> None:
        super().__init__()
        for name, shape in params:
            p = torch.empty(shape, device=device).normal_(0.0, 0.02)
            self.register_parameter(name, nn.Parameter(p))
        for name, shape, dtype in buffers:
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))


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


def build_model(name: str, scale: float = 1.0, device: str = "cpu") -> nn.Module:
    """One of :data:`MODELS` on ``device`` (``scale`` shrinks widths, or flat1b's length)."""

    def scaled(ps: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
        if scale == 1.0:
            return ps
        return [(n, tuple(max(1, int(s * scale)) if s > 16 else s for s in sh)) for n, sh in ps]

    if name == "resnet50":
        params, buffers = resnet50_shapes()
        return ShapeModel(scaled(params), buffers if scale == 1.0 else [], device)
    if name in ("vit_b16", "vit_b16_bf16"):
        model = ShapeModel(scaled(vit_b16_shapes()), device=device)
        return model.bfloat16() if name.endswith("bf16") else model
    if name == "mlp":
        return ShapeModel(tiny_mlp_shapes(), device=device)
    if name == "flat1b":  # one flat buffer, as after flatten_parameters on a 1B model
        return ShapeModel([("flat", (_numel(name, scale),))], device=device)
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")


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
    try:
        model_ema = timm_model_ema()

        def timm_v3(m: nn.Module) -> Update:
            e = model_ema.ModelEmaV3(m, decay=DECAY)
            return lambda: e.update(m)

        made["timm ModelEmaV3"] = timm_v3
    except ImportError as err:
        skipped["timm ModelEmaV3"] = str(err)
    try:
        ema_pytorch_module = import_anchor("ema_pytorch")

        def ema_pytorch(m: nn.Module) -> Update:
            e = ema_pytorch_module.EMA(
                m,
                beta=DECAY,
                update_after_step=0,
                update_every=1,
                use_foreach=True,
                include_online_model=False,
            )
            return e.update  # type: ignore[no-any-return]

        made["ema-pytorch (foreach)"] = ema_pytorch
    except ImportError as err:
        skipped["ema-pytorch"] = str(err)
    try:
        torch_ema_module = import_anchor("torch_ema")

        def torch_ema(m: nn.Module) -> Update:
            e = torch_ema_module.ExponentialMovingAverage(m.parameters(), decay=DECAY)
            return lambda: e.update(m.parameters())

        made["torch_ema"] = torch_ema
    except ImportError as err:
        skipped["torch_ema"] = str(err)
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def averaged_model(m: nn.Module) -> Update:
        e = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(DECAY))  # type: ignore[no-untyped-call]
        e.update_parameters(m)  # the first call copies
        return lambda: e.update_parameters(m)

    made["AveragedModel (multi_avg_fn)"] = averaged_model
    try:
        training_utils = import_anchor("diffusers.training_utils")

        def diffusers_ema(m: nn.Module) -> Update:
            e = training_utils.EMAModel(m.parameters(), decay=DECAY, foreach=True)
            return lambda: e.step(m.parameters())

        made["diffusers EMAModel (foreach)"] = diffusers_ema
    except ImportError as err:
        skipped["diffusers EMAModel"] = str(err)
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


def _ours_offload(m: nn.Module) -> Update:
    return EMA(m, DECAY, device="cpu").update


def _ours_offload_overlap(m: nn.Module) -> Update:
    return EMA(m, DECAY, device="cpu", overlap=True).update


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
    with (
        _quiet_native_output(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def cuda_allocations(fn: Update) -> int:
    """CUDA allocations made by one call of ``fn`` (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.memory_stats().get("allocation.all.allocated", 0) - before)


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Silence file descriptors 1 and 2: the profiler's native code prints "USDT:" lines there."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


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
    device: str = "cpu"

    def run(self) -> None:
        """Time ``reps`` calls; record the mean per call (CUDA events on a GPU)."""
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            torch.cuda.synchronize()
            start.record()
            for _ in range(self.reps):
                self.fn()
            end.record()
            end.synchronize()  # the host waits for the device, so the time includes its work
            self.times.append(start.elapsed_time(end) / 1e3 / self.reps)
            return
        t0 = time.perf_counter()
        for _ in range(self.reps):
            self.fn()
        self.times.append((time.perf_counter() - t0) / self.reps)

    @property
    def median(self) -> float:
        """Median seconds per call over the rounds."""
        return statistics.median(self.times)


def _roofline(numel: int, device: str = "cpu") -> Update:
    a, b = torch.randn(numel, device=device), torch.randn(numel, device=device)

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
        ours.storage.swap_out(ours.storage.swap_in())

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
    models: list[str], scale: float, reps: int, anchors: bool, device: str = "cpu"
) -> tuple[list[Case], dict[str, str]]:
    """Every (model, method) pair to time; the skipped anchors with reasons."""
    makers, skipped = _anchor_factories() if anchors else ({}, {})
    cases: list[Case] = []
    for name in models:
        n = _numel(name, scale)
        r = reps * 20 if name == "mlp" else reps
        if name == "mlp":
            methods: dict[str, Callable[[nn.Module], Update]] = {
                "bare _foreach_lerp_": _bare_foreach,
                "ours": _ours,
                "ours (flat params)": _ours_flat,
            }
        elif name == "flat1b":  # one tensor: ours and the roofline only (anchors add copies)
            methods = {"ours": _ours}
            if device == "cuda":
                methods[OFFLOAD_OVERLAP] = _ours_offload_overlap
        elif name.endswith("bf16"):
            methods = {"ours (fp32 shadow)": _ours, "ours (fp32 shadow, flat params)": _ours_flat}
            if (
                device == "cuda" or _has_cxx()
            ):  # the first update compiles (seconds), during the warm-up call
                methods["ours (fp32 shadow, flat, compiled)"] = _ours_flat_compiled
            else:
                skipped["ours compiled=True"] = "no C++ compiler for torch.compile on the CPU"
        else:
            methods = {"ours": _ours, "ours (flat params)": _ours_flat, "article loop": _article}
            if device == "cuda":
                methods["ours (offload)"] = _ours_offload
                methods[OFFLOAD_OVERLAP] = _ours_offload_overlap
            methods.update(makers)
        live_bytes = 2 if name.endswith("bf16") else 4
        nbytes = n * (live_bytes + 8)  # read live, read + write fp32 shadow
        cases.append(
            Case(name, "roofline a.add_(b)", n * 12, _roofline(n, device), r, device=device)
        )
        for method, make in methods.items():
            fn = make(build_model(name, scale, device))
            cases.append(Case(name, method, nbytes, fn, r, device=device))
    return cases, skipped


def _numel(name: str, scale: float) -> int:
    """Parameter count of ``build_model(name, scale)`` (without building a 1B model)."""
    if name == "flat1b":
        return max(1, int(1_000_000_000 * scale))
    return sum(p.numel() for p in build_model(name, scale).parameters())


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
        allocs = "-" if alloc is None else _size(alloc)
        if "cuda_allocs" in r:  # the CUDA allocator counts allocations, not bytes
            allocs = str(r["cuda_allocs"])
        print(
            f"{r['model']:<13}{r['method']:<36}{f(r['median_ms'], '.3f'):>9}"
            f"{f(r['gb_s'], '.1f'):>7}{f(r['pct_roofline'], '.0f'):>7}"
            f"{f(r['vs_article'], '.1f'):>7}{f(r['vs_best_anchor'], '.2f'):>7}"
            f"{f(r['vs_bare_foreach'], '.2f'):>7}{allocs:>11}"
        )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} TiB"


# -- a real training step (GPU) --------------------------------------------------


class _Block(nn.Module):
    """A pre-norm transformer encoder block of ViT-B size (the fallback without torchvision)."""

    def __init__(self, d: int = 768, heads: int = 12, mlp: int = 3072) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention then MLP, each with a residual."""
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))  # type: ignore[no-any-return]


class _ViT(nn.Module):
    """ViT-B/16 at 224 px built from blocks (86.6 M parameters; no download)."""

    def __init__(self, depth: int = 12, d: int = 768) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 16, 16)
        self.pos = nn.Parameter(torch.zeros(1, 196, d))
        self.blocks = nn.Sequential(*(_Block(d) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patchify, encode, mean-pool, classify."""
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))  # type: ignore[no-any-return]


def vit_b_model(device: str) -> tuple[nn.Module, str]:
    """The torchvision ViT-B/16 (random init) where importable, else the built-in block stack."""
    try:
        from torchvision.models import vit_b_16  # type: ignore[import-not-found,unused-ignore]

        return vit_b_16(weights=None).to(device), "torchvision vit_b_16"
    except ImportError:
        return _ViT().to(device), "built-in ViT-B/16 blocks"


def train_step_cases(device: str, batch: int, reps: int, anchors: bool) -> tuple[list[Case], str]:
    """One ViT-B training step (bf16 autocast forward/backward, SGD) alone and with each EMA."""
    makers: dict[str, Callable[[nn.Module], Update]] = {
        "ours": _ours,
        "ours (offload)": _ours_offload,
        OFFLOAD_OVERLAP: _ours_offload_overlap,
    }
    if anchors:
        makers.update(_anchor_factories()[0])
    model, source = vit_b_model(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        opt.zero_grad(set_to_none=False)

    def with_ema(update: Update) -> Update:
        def both() -> None:
            step()
            update()

        return both

    cases = [Case("train step", "no EMA", 0, step, reps, device=device)]
    for name, make in makers.items():
        cases.append(Case("train step", f"+ {name}", 0, with_ema(make(model)), reps, device=device))
    return cases, source


# -- targets --------------------------------------------------------------------


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets of the GPU run with measured value and pass/fail (missing rows: ``None``)."""
    by_key = {(r["model"], r["method"]): r for r in rows}
    out: list[dict[str, Any]] = []
    for text, key, threshold in TARGETS:
        row = by_key.get(key)
        value = None if row is None else float(row["pct_roofline"])
        passed = None if value is None else value >= threshold
        out.append({"target": text, "value": value, "unit": "% roofline", "pass": passed})
    base = by_key.get(("train step", "no EMA"))
    lagged = by_key.get(("train step", f"+ {OFFLOAD_OVERLAP}"))
    ratio = None if base is None or lagged is None else lagged["median_ms"] / base["median_ms"]
    out.append(
        {
            "target": f"offload+overlap step <= {STEP_TARGET:.2f} x step without EMA",
            "value": ratio,
            "unit": "x step",
            "pass": None if ratio is None else ratio <= STEP_TARGET,
        }
    )
    for model in sorted({r["model"] for r in rows if r["model"] != "train step"}):
        ours = [r for r in rows if r["model"] == model and r["method"].startswith("ours")]
        best = next((r for r in rows if r["model"] == model and r.get("best_anchor")), None)
        if not ours or best is None:
            continue
        fastest = min(r["median_ms"] for r in ours)
        anchor_ms = next(
            r["median_ms"]
            for r in rows
            if r["model"] == model and r["method"] == best["best_anchor"]
        )
        out.append(
            {
                "target": f"{model}: ours ahead of every anchor",
                "value": anchor_ms / fastest,
                "unit": "x best anchor",
                "pass": fastest < anchor_ms,
            }
        )
    return out


def print_targets(targets: list[dict[str, Any]]) -> None:
    """Print the targets with their measured value and a pass/fail column."""
    print(f"{'target':<52}{'measured':>12}  {'unit':<14}{'result':>7}")
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        result = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        print(f"{t['target']:<52}{value:>12}  {t['unit']:<14}{result:>7}")


# -- command line ---------------------------------------------------------------


class UsageError(ValueError):
    """A bad command-line value (the message names it)."""


def _positive(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be at least 1, got {value}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and validate the arguments; a bad value exits with a usage error naming it."""
    ap = argparse.ArgumentParser(prog="emaweights bench-speed", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer rounds")
    ap.add_argument(
        "--rounds",
        type=_positive("--rounds"),
        default=None,
        help="interleaved rounds (default 9, quick 3)",
    )
    ap.add_argument(
        "--reps",
        type=_positive("--reps"),
        default=None,
        help="calls per timing (default 3, quick 2)",
    )
    ap.add_argument(
        "--models",
        default=None,
        help=f"comma-separated of {', '.join(MODELS)} (default cpu: {DEFAULT_MODELS}; "
        f"cuda: {DEFAULT_MODELS_CUDA})",
    )
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run")
    ap.add_argument("--no-anchors", action="store_true", help="skip other libraries")
    ap.add_argument("--no-train-step", action="store_true", help="cuda: skip the ViT-B step")
    ap.add_argument("--batch", type=_positive("--batch"), default=64, help="cuda: step batch")
    ap.add_argument(
        "--threads", type=_positive("--threads"), default=None, help="torch.set_num_threads"
    )
    ap.add_argument("--json", default=None, help="write results to this JSON file")
    args = ap.parse_args(argv)
    try:
        validate(args)
    except UsageError as e:
        ap.error(str(e))
    return args


def validate(args: argparse.Namespace) -> None:
    """Resolve the model list and refuse values no run can honour (raises :class:`UsageError`)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (torch.cuda.is_available())")
    text = args.models or (DEFAULT_MODELS_CUDA if args.device == "cuda" else DEFAULT_MODELS)
    args.models = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        raise UsageError(
            f"--models: unknown {', '.join(map(repr, unknown)) or repr(text)}; "
            f"valid: {', '.join(MODELS)}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table (and on a GPU the targets); write JSON if asked."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    scale = 0.25 if args.quick else 1.0
    rounds = args.rounds or (3 if args.quick else 9)
    reps = args.reps or (2 if args.quick else 3)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for m in args.models:  # one model at a time: every copy of ViT-B costs ~350 MB per method
        cases, skipped = build_cases([m], scale, reps, not args.no_anchors, args.device)
        if m in ("resnet50", "vit_b16"):
            cases += [] if cuda else _swap_cases(m, scale, reps)
        _record_allocations(cases, cuda)
        measure(cases, rounds)
        rows += summarize(cases)
        del cases
        if cuda:
            torch.cuda.empty_cache()
    step_source = None
    if cuda and not args.no_train_step:
        cases, step_source = train_step_cases(args.device, args.batch, reps, not args.no_anchors)
        measure(cases, rounds)
        rows += summarize(cases)
        del cases
    where = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}: {where}")
    print(f"{rounds} interleaved rounds x {reps} calls; medians; scale {scale}")
    print_table(rows)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    targets = check_targets(rows) if cuda else []
    if targets:
        print(f"\ntraining step: {step_source}, batch {args.batch}, bf16 autocast, SGD")
        print_targets(targets)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "rows": rows,
                    "skipped": skipped,
                    "targets": targets,
                    "device": args.device,
                    "device_name": where,
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


def _record_allocations(cases: list[Case], cuda: bool) -> None:
    """Per-update allocations of every method (profiler bytes on CPU, allocator count on CUDA)."""
    for c in cases:
        if c.method.startswith(("roofline", "swap", "bare")):
            continue
        if cuda:
            c.extra["cuda_allocs"] = cuda_allocations(c.fn)
        else:
            c.extra["alloc_bytes"] = allocated_bytes(c.fn)


if __name__ == "__main__":
    raise SystemExit(main())
