"""Every fast path of the shadow update gives the numbers of the simple per-tensor path."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

from emaweights import EMA
from emaweights.flat import flatten_parameters
from emaweights.shadow import Shadow
from tests._models import mlp, train_step


def _kinds(ema: EMA) -> list[str]:
    return [g.kernel.kind for g in ema.storage.averaged if g.kernel is not None]


def _float64_ema(
    model: nn.Module, steps: int, decay: float, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Train ``model`` for ``steps`` and keep a float64 EMA of its floating tensors by hand."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracked = {n: t for n, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()}
    avg = {n: t.detach().double().clone() for n, t in tracked.items()}
    for s in range(steps):
        train_step(model, opt, seed=s)
        for n, t in model.state_dict().items():
            if n in avg:
                avg[n].mul_(decay).add_(t.double(), alpha=1 - decay)
    return avg


def _run(model: nn.Module, steps: int, **kw: object) -> EMA:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, 0.9, **kw)  # type: ignore[arg-type]
    for s in range(steps):
        train_step(model, opt, seed=s)
        ema.update()
    return ema


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flat", [False, True])
def test_fast_paths_match_float64(dtype: torch.dtype, flat: bool) -> None:
    """Flat, list and staged (bf16 live, fp32 shadow) paths match a float64 EMA of the same run."""
    base = mlp(dtype, batchnorm=True)
    model = copy.deepcopy(base)
    if flat:
        flatten_parameters(model)
    ema = _run(model, 6)
    expected = {"bf16": "staged", "flat": "flat"}["bf16" if dtype == torch.bfloat16 else "flat"]
    if not flat and dtype == torch.float32:
        expected = "lists"
    assert _kinds(ema) == [expected]
    ref = _float64_ema(copy.deepcopy(base), 6, 0.9, dtype)
    for name, r in ref.items():
        torch.testing.assert_close(ema.shadow[name].double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_paths_match_loop(dtype: torch.dtype) -> None:
    """The default (fast) EMA equals the per-tensor loop (foreach=False) on the same run."""
    base = mlp(dtype, batchnorm=True)
    fast, flat = copy.deepcopy(base), copy.deepcopy(base)
    flatten_parameters(flat)
    loop = _run(copy.deepcopy(base), 5, foreach=False)
    assert _kinds(loop) == ["loop"]
    tol = {"rtol": 0.0, "atol": 0.0} if dtype == torch.float32 else {"rtol": 1e-6, "atol": 1e-6}
    for ema in (_run(fast, 5), _run(flat, 5)):
        for name, t in loop.shadow.items():
            torch.testing.assert_close(ema.shadow[name], t, **tol)


def _move_first_out_of_flat(model: nn.Module) -> None:
    """Re-point the first parameter to its own storage and change it."""
    first = next(model.parameters())
    first.data = first.data.clone()  # no longer inside the flat buffer
    with torch.no_grad():
        first.add_(1.0)


def _loop_reference_after_move(base: nn.Module) -> EMA:
    """The per-tensor EMA of ``base`` over the same two updates, first parameter +1 between."""
    ref = EMA(copy.deepcopy(base), 0.9, foreach=False)
    ref.update()
    with torch.no_grad():
        next(ref.model.parameters()).add_(1.0)
    ref.update()
    return ref


def test_moved_parameter_replans() -> None:
    """A parameter re-pointed after the EMA was built drops the flat path, not the numbers."""
    base = mlp()
    model = copy.deepcopy(base)
    flatten_parameters(model)
    ema = EMA(model, 0.9)
    ema.update()
    assert _kinds(ema) == ["flat"]
    _move_first_out_of_flat(model)
    ema.update()
    assert _kinds(ema) == ["lists"]
    for name, t in _loop_reference_after_move(base).shadow.items():
        torch.testing.assert_close(ema.shadow[name], t, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offload_staging_matches_simple_path(dtype: torch.dtype) -> None:
    """The cross-device path (copy into staging, update there) equals the simple path."""
    base = mlp(dtype)
    model = copy.deepcopy(base)
    ema = EMA(model, 0.9)
    # On a CPU-only machine, emulate a shadow on another device: the staging
    # tensors are what the live weights are copied into before each update.
    for g in ema.storage.averaged:
        g.staging = [torch.empty(v.shape, dtype=g.live_dtype) for v in g.views]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(4):
        train_step(model, opt, seed=s)
        ema.update()
    assert all(
        g.kernel is not None and g.kernel.key == [t.data_ptr() for t in g.staging or []]
        for g in ema.storage.averaged
    )
    ref = _run(copy.deepcopy(base), 4, foreach=False)
    tol = {"rtol": 0.0, "atol": 0.0} if dtype == torch.float32 else {"rtol": 1e-6, "atol": 1e-6}
    for name, t in ref.shadow.items():
        torch.testing.assert_close(ema.shadow[name], t, **tol)


def _emulate_offload(ema: EMA) -> None:
    """On a CPU-only machine, give every group staging tensors, as a cross-device shadow has."""
    for g in ema.storage.averaged:
        g.staging = [torch.empty(v.shape, dtype=g.live_dtype) for v in g.views]


def test_overlap_defers_each_update_by_one_step_and_reads_complete_it() -> None:
    """With overlap, the storage lags one update behind; every read sees the exact average."""
    base = mlp()
    model = copy.deepcopy(base)
    ema = EMA(model, 0.9, overlap=True)
    _emulate_offload(ema)
    ref_model = copy.deepcopy(base)
    ref = EMA(ref_model, 0.9)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref_model))
    lagged = {n: t.clone() for n, t in ref.shadow.items()}
    for s in range(5):
        train_step(model, opt, seed=s)
        ema.update()
        # Storage read without a flush still holds the previous average: the update is pending.
        for g in ema.storage.averaged:
            for e, v in zip(g.entries, g.views, strict=True):
                torch.testing.assert_close(v, lagged[e.name], rtol=0, atol=0)
        train_step(ref_model, ref_opt, seed=s)
        ref.update()
        lagged = {n: t.clone() for n, t in ref.shadow.items()}
    # The weights changed after the last update (another step): the pending copy must not see it.
    train_step(model, opt, seed=99)
    for name, t in ref.shadow.items():
        torch.testing.assert_close(ema.shadow[name], t, rtol=0, atol=0)


def test_overlap_state_swap_and_resume_match_the_synchronous_ema() -> None:
    """A pending update is completed by applied(), state_dict() and copy_to(); resume is exact."""
    base = mlp()
    model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
    ema, ref = EMA(model, 0.8, overlap=True), EMA(ref_model, 0.8)
    _emulate_offload(ema)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref_model))
    for s in range(3):
        for m, o, e in ((model, opt, ema), (ref_model, ref_opt, ref)):
            train_step(m, o, seed=s)
            e.update()
    with ema.applied() as m, ref.applied() as r:
        for (name, p), q in zip(m.named_parameters(), r.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    ema.update(step=4)  # pending again
    ref_model.load_state_dict(model.state_dict())
    ref.update(step=4)
    resumed = EMA(copy.deepcopy(base), 0.8)
    resumed.load_state_dict(ema.state_dict())
    for name, t in ref.shadow.items():
        torch.testing.assert_close(resumed.shadow[name], t, rtol=0, atol=0)
    target = copy.deepcopy(base)
    ema.copy_to(target)
    for (name, p), q in zip(target.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, ref.shadow[name].to(q.dtype), rtol=0, atol=0)


def test_overlap_must_be_bool() -> None:
    """overlap='yes' is refused, naming the value."""
    with pytest.raises(TypeError, match="'yes'"):
        EMA(mlp(), 0.9, overlap="yes")  # type: ignore[arg-type]


def test_stochastic_rounding_ema() -> None:
    """EMA(rounding='stochastic') moves a bf16 shadow like the exact average, in expectation."""
    n, w, steps = 20_000, 1e-3, 30
    model = nn.Linear(n, 1, bias=False).bfloat16()
    with torch.no_grad():
        model.weight.fill_(1.0)
    sr = EMA(model, 1 - w, dtype=torch.bfloat16, rounding="stochastic")
    rn = EMA(model, 1 - w, dtype=torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.5)
    for _ in range(steps):
        sr.update()
        rn.update()
    exact = 1.5 - 0.5 * (1 - w) ** steps
    se = (steps**0.5 * 2**-7) / n**0.5
    assert abs(sr.shadow["weight"].double().mean().item() - exact) < 5 * se
    assert bool((rn.shadow["weight"] == 1.0).all())


def test_rounding_validation() -> None:
    """Stochastic rounding without a bf16 shadow, or an unknown mode, is refused by name."""
    with pytest.raises(ValueError, match="bfloat16"):
        EMA(mlp(), rounding="stochastic")
    with pytest.raises(ValueError, match="'up'"):
        Shadow([], rounding="up")  # type: ignore[arg-type]


def test_flatten_parameters_layout_and_training() -> None:
    """Parameters become one buffer (trainable first), values kept; training still works."""
    base = mlp(batchnorm=True)
    base[0].bias.requires_grad_(False)
    model = copy.deepcopy(base)
    (flat,) = flatten_parameters(model)
    assert flat.numel() == sum(p.numel() for p in model.parameters())
    for p, q in zip(model.parameters(), base.parameters(), strict=True):
        assert torch.equal(p, q)
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert torch.equal(flat[-base[0].bias.numel() :], base[0].bias.detach())  # frozen last
    o1, o2 = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(base.parameters(), lr=0.1)
    train_step(model, o1, seed=0)
    train_step(base, o2, seed=0)
    for p, q in zip(model.parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(TypeError, match="Module"):
        flatten_parameters("model")  # type: ignore[arg-type]


def test_update_allocates_nothing() -> None:
    """After the first call, an update allocates no tensor memory on any fast path."""
    from torch.profiler import ProfilerActivity, profile

    for dtype, flat in [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)]:
        model = mlp(dtype, batchnorm=True)
        if flat:
            flatten_parameters(model)
        ema = EMA(model, 0.9)
        ema.update()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            ema.update()
        allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
        assert allocated == 0, (dtype, flat, allocated)


needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile on the CPU needs a C++ compiler",
)


@needs_cxx
def test_compiled_path_matches_float64_and_staged_path() -> None:
    """compiled=True (bf16 model, flat parameters) matches a float64 EMA and the staged path."""
    base = mlp(torch.bfloat16, batchnorm=True)
    compiled, eager = copy.deepcopy(base), copy.deepcopy(base)
    flatten_parameters(compiled)
    flatten_parameters(eager)
    ema_c = _run(compiled, 6, compiled=True)
    ema_e = _run(eager, 6)
    assert _kinds(ema_c) == ["compiled"] and _kinds(ema_e) == ["staged"]
    ref = _float64_ema(copy.deepcopy(base), 6, 0.9, torch.bfloat16)
    for name, r in ref.items():
        torch.testing.assert_close(ema_c.shadow[name].double(), r, rtol=1e-5, atol=1e-6)
        # one rounding per step may differ (a fused multiply-add): a few ulps after 6 steps
        torch.testing.assert_close(ema_c.shadow[name], ema_e.shadow[name], rtol=1e-6, atol=1e-6)


@needs_cxx
def test_compiled_update_allocates_nothing_and_resumes_exactly() -> None:
    """The compiled update allocates nothing, and a state reloaded into it continues bit for bit."""
    from torch.profiler import ProfilerActivity, profile

    model = mlp(torch.bfloat16, batchnorm=True)
    flatten_parameters(model)
    ema = EMA(model, 0.9, compiled=True)
    ema.update()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ema.update()
    assert sum(max(e.self_cpu_memory_usage, 0) for e in prof.events()) == 0
    state = copy.deepcopy(ema.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    resumed = EMA(model, 0.9, compiled=True)
    resumed.load_state_dict(state)
    for s in range(3):
        train_step(model, opt, seed=s)
        ema.update()
        resumed.update()
    for name, t in ema.shadow.items():
        assert torch.equal(resumed.shadow[name], t), name


def test_compiled_refused_where_it_cannot_run() -> None:
    """compiled=True without flat parameters, with stochastic rounding or foreach=False: why."""
    with pytest.raises(ValueError, match="flatten_parameters"):
        EMA(mlp(torch.bfloat16), 0.9, compiled=True)
    flat = mlp(torch.bfloat16)
    flatten_parameters(flat)
    with pytest.raises(ValueError, match="rounding='nearest', got 'stochastic'"):
        EMA(flat, 0.9, dtype=torch.bfloat16, rounding="stochastic", compiled=True)
    with pytest.raises(ValueError, match="foreach=False"):
        EMA(flat, 0.9, foreach=False, compiled=True)
    with pytest.raises(TypeError, match="'yes'"):
        EMA(flat, 0.9, compiled="yes")  # type: ignore[arg-type]
    fp32 = EMA(mlp(), 0.9, compiled=True)  # same dtype: nothing to compile, eager lists
    fp32.update()
    assert _kinds(fp32) == ["lists"]


@needs_cxx
def test_compiled_falls_back_with_a_warning_when_parameters_move() -> None:
    """A parameter re-pointed out of the flat buffer: compiled=True warns, stages, stays exact."""
    base = mlp(torch.bfloat16)
    model = copy.deepcopy(base)
    flatten_parameters(model)
    ema = EMA(model, 0.9, compiled=True)
    ema.update()
    _move_first_out_of_flat(model)
    with pytest.warns(UserWarning, match="falls back to the eager staged update"):
        ema.update()
    assert _kinds(ema) == ["staged"]
    for name, t in _loop_reference_after_move(base).shadow.items():
        torch.testing.assert_close(ema.shadow[name], t, rtol=1e-6, atol=1e-6)
