"""docs/migration.md: each mapping gives the other library's averaged weights.

Every test trains one small float64 model with BatchNorm (SGD with momentum,
fixed batches) and updates the other library's averager and ours, built as
docs/migration.md says, after every optimizer step. Halfway through, our EMA
is saved with ``torch.save``, loaded with ``weights_only=True`` into a new EMA
and training goes on with that one (the resume row). At the end the averaged
weights agree to float64 rounding (the two libraries order the arithmetic
differently), the averaged model's outputs agree, and the average differs
from the live weights (the test could fail). torch's ``AveragedModel`` always
runs; the other libraries' tests are skipped where they are not installed.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from emaweights import EMA, SWA
from emaweights.averager import Averager
from emaweights.bench.anchors import import_anchor, timm_model_ema
from emaweights.export import load_averaged, save_averaged
from emaweights.schedules import Constant, PowerWarmup, Warmup

STEPS, RESUME_AT = 40, 17
TOL = dict(rtol=1e-12, atol=1e-12)
# ema-pytorch computes its decay in a float32 tensor (from its int64 step counter):
# the decays, and so the averages, agree to float32 rounding only.
FP32_DECAY_TOL = dict(rtol=1e-6, atol=1e-8)


def _need(loader: Callable[[], ModuleType]) -> ModuleType:
    """The anchor module, or skip naming why it is missing."""
    try:
        return loader()
    except ImportError as err:
        pytest.skip(f"anchor library not installed: {err}")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))
    model[3].bias.requires_grad_(False)  # one frozen parameter: the libraries differ on those
    return model.double()


def _batches(n: int) -> Iterator[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(16, 5, generator=gen, dtype=torch.float64)
        yield x, torch.randint(0, 3, (16,), generator=gen)


@dataclass
class Anchor:
    """The other library's averager, seen through three calls."""

    update: Callable[[int], None]  # after optimizer step k (1-based)
    averaged: Callable[[], dict[str, Tensor]]  # its averaged tensors, by model state-dict name
    evaluate: Callable[[Tensor], Tensor]  # forward with its averaged weights (eval mode)


def _run(
    make_anchor: Callable[[nn.Module], Anchor], make_ours: Callable[[nn.Module], Averager]
) -> tuple[nn.Module, Anchor, Averager]:
    """Train STEPS steps updating both; ours is saved and reloaded after RESUME_AT."""
    model = _model()
    anchor, ours = make_anchor(model), make_ours(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for k, (x, y) in enumerate(_batches(STEPS), start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        anchor.update(k)
        ours.update()
        if k == RESUME_AT:
            buf = io.BytesIO()
            torch.save(ours.state_dict(), buf)
            buf.seek(0)
            ours = make_ours(model)
            ours.load_state_dict(torch.load(buf, weights_only=True))
    return model, anchor, ours


def _assert_equivalent(
    make_anchor: Callable[[nn.Module], Anchor],
    make_ours: Callable[[nn.Module], Averager],
    tol: dict[str, float] = TOL,
) -> tuple[nn.Module, Anchor, Averager]:
    model, anchor, ours = _run(make_anchor, make_ours)
    theirs, mine = anchor.averaged(), ours.averaged_state_dict()
    assert theirs, "the anchor averaged nothing"
    for name, value in theirs.items():
        torch.testing.assert_close(mine[name], value, **tol, msg=lambda m, n=name: f"{n}: {m}")
    live = dict(model.state_dict())
    assert max((mine[n] - live[n]).abs().max().item() for n in theirs) > 1e-4
    x = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model.eval()
    if isinstance(anchor.evaluate, nn.Module):
        anchor.evaluate.eval()  # its own copy of the model: BatchNorm in eval mode too
    with torch.no_grad():
        expected = anchor.evaluate(x)
        with ours.applied():
            got = model(x)
        called = ours.module(x)  # the averaged model to call, like timm's ema.module
    torch.testing.assert_close(got, expected, **tol)
    torch.testing.assert_close(called, expected, **tol)
    return model, anchor, ours


def _floating(module: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def _by_name(model: nn.Module, tensors: list[Tensor]) -> dict[str, Tensor]:
    return {n: t for (n, _), t in zip(model.named_parameters(), tensors, strict=True)}


# -- torch.optim.swa_utils.AveragedModel (always installed) -------------------


@pytest.mark.parametrize("decay", [0.9, 0.97])
def test_averaged_model_ema_with_buffers(decay: float) -> None:
    """AveragedModel(get_ema_multi_avg_fn(β), use_buffers=True) = EMA(β, start_step=1)."""

    def anchor(model: nn.Module) -> Anchor:
        avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)  # type: ignore[no-untyped-call]
        return Anchor(lambda k: avg.update_parameters(model), lambda: _floating(avg.module), avg)

    _, theirs, ours = _assert_equivalent(
        anchor, lambda m: EMA(m, decay, start_step=1, include_frozen=True)
    )
    # Integer buffers: ours copies num_batches_tracked; AveragedModel averages and truncates it.
    assert ours.averaged_state_dict()["1.num_batches_tracked"] == STEPS
    assert isinstance(theirs.evaluate, nn.Module)
    assert theirs.evaluate.state_dict()["module.1.num_batches_tracked"] < STEPS


def test_averaged_model_without_buffers_then_update_bn() -> None:
    """use_buffers=False (buffers copied) = EMA(buffers="copy"); update_bn then agrees too."""
    decay = 0.9
    holder: list[AveragedModel] = []

    def anchor(model: nn.Module) -> Anchor:
        avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))  # type: ignore[no-untyped-call]
        holder.append(avg)
        return Anchor(lambda k: avg.update_parameters(model), lambda: _floating(avg.module), avg)

    model, _, ours = _assert_equivalent(
        anchor, lambda m: EMA(m, decay, start_step=1, include_frozen=True, buffers="copy")
    )
    loader = [x for x, _ in _batches(5)]
    update_bn(loader, holder[0])
    final = copy.deepcopy(model)  # the recipe: a model holding the average for good
    ours.copy_to(final)
    update_bn(loader, final)
    for name, value in _floating(holder[0].module).items():
        torch.testing.assert_close(final.state_dict()[name], value, **TOL)


def test_averaged_model_default_is_swa() -> None:
    """AveragedModel(model) (equal weights, buffers copied) = SWA(model, buffers="copy")."""

    def anchor(model: nn.Module) -> Anchor:
        avg = AveragedModel(model)  # type: ignore[no-untyped-call]
        return Anchor(lambda k: avg.update_parameters(model), lambda: _floating(avg.module), avg)

    _assert_equivalent(anchor, lambda m: SWA(m, include_frozen=True, buffers="copy"))


def test_fp32_shadow_where_averaged_model_keeps_the_model_dtype() -> None:
    """For a bf16 model AveragedModel averages in bf16; our shadow is float32."""
    model = _model().to(torch.bfloat16)
    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))  # type: ignore[no-untyped-call]
    ema = EMA(model, 0.999)
    assert {p.dtype for p in avg.module.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in ema.shadow.values() if t.is_floating_point()} == {torch.float32}


# -- timm ModelEmaV3 ------------------------------------------------------------


def _timm_anchor(**kwargs: object) -> Callable[[nn.Module], Anchor]:
    module = _need(timm_model_ema)
    with_step = kwargs.pop("with_step", False)

    def make(model: nn.Module) -> Anchor:
        e = module.ModelEmaV3(model, **kwargs)
        if with_step:
            return Anchor(lambda k: e.update(model, step=k), lambda: _floating(e.module), e.module)
        return Anchor(lambda k: e.update(model), lambda: _floating(e.module), e.module)

    return make


def test_timm_constant() -> None:
    """ModelEmaV3(decay=β) with update(model) = EMA(β, include_frozen=True); ints copied."""
    _, theirs, ours = _assert_equivalent(
        _timm_anchor(decay=0.9), lambda m: EMA(m, 0.9, include_frozen=True)
    )
    assert isinstance(theirs.evaluate, nn.Module)
    count = theirs.evaluate.state_dict()["1.num_batches_tracked"]
    assert count == ours.averaged_state_dict()["1.num_batches_tracked"] == STEPS


def test_timm_exclude_buffers() -> None:
    """ModelEmaV3(exclude_buffers=True) = EMA(buffers="copy")."""
    _assert_equivalent(
        _timm_anchor(decay=0.9, exclude_buffers=True),
        lambda m: EMA(m, 0.9, include_frozen=True, buffers="copy"),
    )


@pytest.mark.parametrize("after", [0, 4])
def test_timm_update_after_step(after: int) -> None:
    """update(model, step=k) with update_after_step=u = EMA(β, start_step=u + 1)."""
    _assert_equivalent(
        _timm_anchor(decay=0.9, update_after_step=after, with_step=True),
        lambda m: EMA(m, 0.9, start_step=after + 1, include_frozen=True),
    )


@pytest.mark.parametrize(("after", "min_decay"), [(0, 0.0), (3, 0.4)])
def test_timm_warmup(after: int, min_decay: float) -> None:
    """use_warmup=True = PowerWarmup(warmup_gamma, warmup_power, min_decay, decay, offset=1)."""
    _assert_equivalent(
        _timm_anchor(
            decay=0.95,
            min_decay=min_decay,
            update_after_step=after,
            use_warmup=True,
            warmup_gamma=2.0,
            warmup_power=0.75,
            with_step=True,
        ),
        lambda m: EMA(
            m,
            PowerWarmup(inv_gamma=2.0, power=0.75, min_decay=min_decay, max_decay=0.95, offset=1),
            start_step=after + 1,
            include_frozen=True,
        ),
    )


# -- ema-pytorch ------------------------------------------------------------------


@pytest.mark.parametrize(("after", "min_value"), [(0, 0.0), (5, 0.3)])
def test_ema_pytorch(after: int, min_value: float) -> None:
    """ema_pytorch.EMA(beta, update_after_step=u, update_every=1, ...) = PowerWarmup(offset=1)."""
    ema_pytorch = pytest.importorskip("ema_pytorch", reason="ema-pytorch is not installed")

    def anchor(model: nn.Module) -> Anchor:
        e = ema_pytorch.EMA(
            model,
            beta=0.95,
            update_after_step=after,
            update_every=1,
            inv_gamma=2.0,
            power=0.75,
            min_value=min_value,
        )
        holder.append(e)
        return Anchor(lambda k: e.update(), lambda: _floating(e.ema_model), e.ema_model)

    holder: list[Any] = []
    _, _, ours = _assert_equivalent(
        anchor,
        lambda m: EMA(
            m,
            PowerWarmup(inv_gamma=2.0, power=0.75, min_decay=min_value, max_decay=0.95, offset=1),
            start_step=after + 1,
            include_frozen=True,
        ),
        tol=FP32_DECAY_TOL,
    )
    # Integer buffers: ema-pytorch never copies them (its copy keeps the value at
    # construction); ours copies them.
    assert holder[0].ema_model.state_dict()["1.num_batches_tracked"] == 0
    assert ours.averaged_state_dict()["1.num_batches_tracked"] == STEPS


# -- torch_ema ----------------------------------------------------------------------


@pytest.mark.parametrize("num_updates", [True, False])
def test_torch_ema(num_updates: bool) -> None:
    """ExponentialMovingAverage(params, β) = EMA(Warmup(β, offset=1) or β, buffers="ignore")."""
    torch_ema = pytest.importorskip("torch_ema", reason="torch_ema is not installed")

    def anchor(model: nn.Module) -> Anchor:
        e = torch_ema.ExponentialMovingAverage(
            model.parameters(), decay=0.95, use_num_updates=num_updates
        )

        def evaluate(x: Tensor) -> Tensor:
            with e.average_parameters():
                return model(x)

        holder.append(e)
        return Anchor(lambda k: e.update(), lambda: _by_name(model, e.shadow_params), evaluate)

    holder: list[Any] = []
    schedule = Warmup(0.95, offset=1) if num_updates else Constant(0.95)
    model, _, ours = _assert_equivalent(
        anchor, lambda m: EMA(m, schedule, buffers="ignore", include_frozen=True)
    )
    x = torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad():
        holder[0].store()  # the seed-style pair: store/copy_to/restore = apply_shadow/restore
        holder[0].copy_to()
        expected = model(x)
        holder[0].restore()
        ours.apply_shadow()
        got = model(x)
        ours.restore()
    torch.testing.assert_close(got, expected, **TOL)
    theirs_final, ours_final = copy.deepcopy(model), copy.deepcopy(model)
    holder[0].copy_to(theirs_final.parameters())  # copy_to for good
    ours.copy_to(ours_final)
    for (name, a), b in zip(ours_final.named_parameters(), theirs_final.parameters(), strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=name)


# -- diffusers EMAModel ----------------------------------------------------------------


def _diffusers_anchor(**kwargs: object) -> Callable[[nn.Module], Anchor]:
    training_utils = _need(lambda: import_anchor("diffusers.training_utils"))

    def make(model: nn.Module) -> Anchor:
        e = training_utils.EMAModel(model.parameters(), **kwargs)

        def evaluate(x: Tensor) -> Tensor:
            e.store(model.parameters())
            e.copy_to(model.parameters())
            try:
                return model(x)
            finally:
                e.restore(model.parameters())

        return Anchor(
            lambda k: e.step(model.parameters()),
            lambda: _by_name(model, e.shadow_params),
            evaluate,
        )

    return make


@pytest.mark.parametrize("after", [0, 3])
def test_diffusers_default_warmup(after: int, tmp_path: Path) -> None:
    """EMAModel(decay, update_after_step=u) = Warmup(decay, offset=1), start_step=u + 1."""
    _, anchor, ours = _assert_equivalent(
        _diffusers_anchor(decay=0.95, update_after_step=after),
        lambda m: EMA(m, Warmup(0.95, offset=1), start_step=after + 1, buffers="ignore"),
    )
    pytest.importorskip("safetensors", reason="safetensors is not installed")
    save_averaged(ours, tmp_path / "ema.safetensors")  # the save_pretrained row
    saved = load_averaged(tmp_path / "ema.safetensors")
    for name, value in anchor.averaged().items():
        torch.testing.assert_close(saved[name], value, **TOL)


@pytest.mark.parametrize(("after", "min_decay"), [(0, 0.0), (3, 0.5)])
def test_diffusers_ema_warmup(after: int, min_decay: float) -> None:
    """use_ema_warmup=True = PowerWarmup(inv_gamma, power, min_decay, decay, offset=1)."""
    _assert_equivalent(
        _diffusers_anchor(
            decay=0.95,
            min_decay=min_decay,
            update_after_step=after,
            use_ema_warmup=True,
            inv_gamma=2.0,
            power=0.75,
            foreach=True,
        ),
        lambda m: EMA(
            m,
            PowerWarmup(inv_gamma=2.0, power=0.75, min_decay=min_decay, max_decay=0.95, offset=1),
            start_step=after + 1,
            buffers="ignore",
        ),
    )


# -- the mapping is tight enough to see an off-by-one ------------------------------------


def test_an_off_by_one_warmup_is_detected() -> None:
    """Warmup without offset (our count from 0) is not diffusers' count: the check fails."""
    with pytest.raises(AssertionError):
        _assert_equivalent(
            lambda model: _averaged_model_warmup(model, offset=1),
            lambda m: EMA(m, Warmup(0.95), start_step=1, include_frozen=True),
        )


def _averaged_model_warmup(model: nn.Module, offset: int) -> Anchor:
    """AveragedModel with an avg_fn computing diffusers' warm-up (always installed)."""
    schedule = Warmup(0.95, offset=offset)

    def avg_fn(avg: Tensor, live: Tensor, n: Tensor) -> Tensor:
        decay = schedule(int(n) - 1)  # n = 1 at the first averaging call (after the copy)
        return decay * avg + (1 - decay) * live

    avg = AveragedModel(model, avg_fn=avg_fn, use_buffers=True)  # type: ignore[no-untyped-call]
    return Anchor(lambda k: avg.update_parameters(model), lambda: _floating(avg.module), avg)


def test_the_oracle_anchor_matches_with_the_right_offset() -> None:
    """The same hand-made anchor agrees with Warmup(offset=1): the failure above is the offset."""
    _assert_equivalent(
        lambda model: _averaged_model_warmup(model, offset=1),
        lambda m: EMA(m, Warmup(0.95, offset=1), start_step=1, include_frozen=True),
    )


def test_every_test_the_page_cites_exists() -> None:
    """Each test named in docs/migration.md is a test of this module."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "migration.md").read_text("utf-8")
    cited = set(re.findall(r"`(test_\w+)`", page))
    assert len(cited) >= 10
    assert cited <= {name for name in globals() if name.startswith("test_")}
