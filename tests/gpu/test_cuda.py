"""CUDA paths of the EMA: numbers against a float64 oracle, offload overlap, no allocation or sync.

Every test here is marked ``gpu`` and skipped cleanly where CUDA is unavailable,
so the CPU suite is unaffected. ``make gpu-check`` runs them on a device.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from emaweights.ema import EMA
from emaweights.flat import flatten_parameters
from emaweights.functional import stochastic_round_

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DECAY = 0.9
STEPS = 6


def _model(dtype: torch.dtype = torch.float32, flat: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 33)).to("cuda", dtype)
    if flat:
        flatten_parameters(m)
    return m


def _train_step(m: nn.Module, gen: torch.Generator) -> None:
    """Move every parameter in place, as an optimizer step does (same storage)."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, device=p.device, generator=gen).to(p.dtype), alpha=0.1)


def _oracle(m: nn.Module, steps: int, gen: torch.Generator, ema: EMA) -> dict[str, torch.Tensor]:
    """Run ``steps`` updates of ``ema``; return the float64 EMA of the same live weights."""
    ref = {n: p.detach().double().clone() for n, p in m.named_parameters()}
    for _ in range(steps):
        _train_step(m, gen)
        ema.update()
        for n, p in m.named_parameters():
            ref[n].mul_(DECAY).add_(p.detach().double(), alpha=1 - DECAY)
    return ref


def _assert_close(avg: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float) -> None:
    for n, r in ref.items():
        got = avg[n].double().to(r.device)
        torch.testing.assert_close(got, r, rtol=rtol, atol=rtol)


CONFIGS: dict[str, Callable[[], tuple[nn.Module, dict[str, object]]]] = {
    "fp32 lists": lambda: (_model(), {}),
    "fp32 flat": lambda: (_model(flat=True), {}),
    "bf16 model, fp32 shadow": lambda: (_model(torch.bfloat16), {"dtype": torch.float32}),
    "bf16 flat, fp32 shadow": lambda: (
        _model(torch.bfloat16, flat=True),
        {"dtype": torch.float32},
    ),
    "bf16 flat, fp32 shadow, compiled": lambda: (
        _model(torch.bfloat16, flat=True),
        {"dtype": torch.float32, "compiled": True},
    ),
}


# compiled=True with foreach=False is refused at construction (they contradict each other).
KERNELS = [(c, f) for c in CONFIGS for f in (True, False) if not ("compiled" in c and not f)]


@pytest.mark.parametrize(("config", "foreach"), KERNELS)
def test_update_matches_float64_oracle(config: str, foreach: bool) -> None:
    """Every kernel path on CUDA gives the float64 EMA of the live weights (fp32 precision)."""
    m, kw = CONFIGS[config]()
    ema = EMA(m, DECAY, foreach=foreach, **kw)  # type: ignore[arg-type]
    gen = torch.Generator("cuda").manual_seed(1)
    ref = _oracle(m, STEPS, gen, ema)
    _assert_close(ema.shadow, ref, rtol=1e-5)  # the fp32 storage (the state dict has model dtype)
    assert all(t.device.type == "cuda" for t in ema.shadow.values())


@pytest.mark.parametrize("overlap", [False, True])
def test_offload_matches_oracle_on_every_read(overlap: bool) -> None:
    """A CPU shadow of a CUDA model, overlapped or not, equals the float64 EMA at every read."""
    m = _model()
    ema = EMA(m, DECAY, device="cpu", overlap=overlap)
    gen = torch.Generator("cuda").manual_seed(2)
    ref = {n: p.detach().double().clone() for n, p in m.named_parameters()}
    for _ in range(STEPS):
        _train_step(m, gen)
        ema.update()
        for n, p in m.named_parameters():
            ref[n].mul_(DECAY).add_(p.detach().double(), alpha=1 - DECAY)
        avg = ema.averaged_state_dict()  # a read completes the pending update
        assert all(t.device.type == "cpu" for t in avg.values())
        _assert_close(avg, ref, rtol=1e-5)


def _twins() -> tuple[nn.Module, nn.Module]:
    return _model(), _model()


def _steps(pairs: list[tuple[nn.Module, EMA]], n: int, seed: int) -> None:
    """``n`` identical training steps and updates for each (model, EMA) pair."""
    for m, ema in pairs:
        gen = torch.Generator("cuda").manual_seed(seed)
        for _ in range(n):
            _train_step(m, gen)
            ema.update()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].cpu(), b[k].cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("read", ["shadow", "averaged_state_dict", "applied", "copy_to"])
def test_offload_overlap_every_read_completes_the_update(read: str) -> None:
    """With overlap the storage lags one update, yet every read equals the synchronous EMA."""
    (m1, m2), (m3, m4) = _twins(), _twins()
    lag, sync = EMA(m1, DECAY, device="cpu", overlap=True), EMA(m2, DECAY, device="cpu")
    _steps([(m1, lag), (m2, sync)], STEPS, seed=3)
    if read == "shadow":
        _same(lag.shadow, sync.shadow)
    elif read == "averaged_state_dict":
        _same(lag.averaged_state_dict(), sync.averaged_state_dict())
    elif read == "applied":
        with lag.applied() as a, sync.applied() as b:
            _same(dict(a.named_parameters()), dict(b.named_parameters()))
    else:
        lag.copy_to(m3)
        sync.copy_to(m4)
        _same(dict(m3.named_parameters()), dict(m4.named_parameters()))


def test_offload_overlap_resume_equals_synchronous() -> None:
    """Save mid-run with overlap, load into a fresh overlap EMA, go on: equals the sync run."""
    (m1, m2), (m3, _) = _twins(), _twins()
    lag, sync = EMA(m1, DECAY, device="cpu", overlap=True), EMA(m2, DECAY, device="cpu")
    _steps([(m1, lag), (m2, sync)], 3, seed=4)
    state = lag.state_dict()
    m3.load_state_dict(m1.state_dict())
    resumed = EMA(m3, DECAY, device="cpu", overlap=True)
    resumed.load_state_dict(state)
    _steps([(m3, resumed), (m2, sync)], 3, seed=5)
    _same(resumed.averaged_state_dict(), sync.averaged_state_dict())
    assert resumed.num_updates == sync.num_updates


# -- stochastic rounding --------------------------------------------------------


def test_stochastic_round_generator_on_cuda_is_reproducible_and_unbiased() -> None:
    """A CUDA generator makes the rounding reproducible per seed, and its mean is the fp32 value."""
    x = torch.full((1 << 20,), 1.0 + 2.0**-10, device="cuda")  # between two bf16 numbers

    def rounded(seed: int) -> torch.Tensor:
        y = x.clone()
        noise = torch.empty(y.shape, dtype=torch.int32, device="cuda")
        stochastic_round_(y, noise, torch.Generator("cuda").manual_seed(seed))
        return y

    a, b, c = rounded(0), rounded(0), rounded(1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert torch.equal(a.bfloat16().float(), a)  # every value is bf16-representable
    step = 2.0**-7  # bf16 spacing at 1.0
    sd = step / 2 / (a.numel() ** 0.5)
    assert abs(a.double().mean().item() - x[0].item()) < 6 * sd


def test_stochastic_bf16_shadow_on_cuda_follows_float64_oracle() -> None:
    """A stochastically rounded bf16 shadow tracks the float64 EMA where nearest freezes."""
    torch.manual_seed(0)
    lin = nn.Linear(1024, 1024, bias=False).cuda()
    with torch.no_grad():
        lin.weight.fill_(1.0)
    kw = {"dtype": torch.bfloat16}
    sto = EMA(lin, 0.999, rounding="stochastic", **kw)  # type: ignore[arg-type]
    near = EMA(lin, 0.999, **kw)  # type: ignore[arg-type]
    with torch.no_grad():
        lin.weight.fill_(1.5)
    ref = 1.0
    for _ in range(200):
        sto.update()
        near.update()
        ref = 0.999 * ref + 0.001 * 1.5
    got = sto.averaged_state_dict()["weight"].double().mean().item()
    assert abs(got - ref) < 0.1 * (ref - 1.0)
    assert near.averaged_state_dict()["weight"].double().mean().item() < got


# -- per-update cost: no allocation, no host sync, CUDA-graph capture -----------

SAME_DEVICE = list(CONFIGS)


def _warm(config: str) -> tuple[nn.Module, EMA]:
    m, kw = CONFIGS[config]()
    ema = EMA(m, DECAY, **kw)  # type: ignore[arg-type]
    for _ in range(3):  # lazily built state and the compile happen here
        ema.update()
    torch.cuda.synchronize()
    return m, ema


def _allocations() -> int:
    return int(torch.cuda.memory_stats().get("allocation.all.allocated", 0))


@pytest.mark.parametrize("config", SAME_DEVICE)
def test_update_allocates_no_cuda_memory(config: str) -> None:
    """After warm-up, update() makes no CUDA allocation (the allocator's counter stays put)."""
    _, ema = _warm(config)
    before = _allocations()
    for _ in range(10):
        ema.update()
    torch.cuda.synchronize()
    assert _allocations() == before


def test_offload_overlap_update_allocates_no_cuda_memory() -> None:
    """After warm-up, an overlapped offload update makes no CUDA allocation either."""
    ema = EMA(_model(), DECAY, device="cpu", overlap=True)
    for _ in range(3):
        ema.update()
    torch.cuda.synchronize()
    before = _allocations()
    for _ in range(10):
        ema.update()
    torch.cuda.synchronize()
    assert _allocations() == before


@pytest.mark.parametrize("config", SAME_DEVICE)
def test_update_does_not_sync_the_host(config: str) -> None:
    """update() with the default nonfinite='check' makes no host-device synchronization."""
    _, ema = _warm(config)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            ema.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# Capturable: a constant decay, the shadow on the model's device, nonfinite="check",
# rounding="nearest", eager kernels. A replay reruns the captured kernels only: it
# does not advance num_updates/step (host counters), so a schedule cannot be captured.
CAPTURABLE = ["fp32 lists", "fp32 flat", "bf16 model, fp32 shadow", "bf16 flat, fp32 shadow"]


@pytest.mark.parametrize("config", CAPTURABLE)
def test_update_replays_in_a_cuda_graph(config: str) -> None:
    """update() captured in a CUDA graph and replayed gives the float64 EMA of the live weights."""
    m, kw = CONFIGS[config]()
    ema = EMA(m, DECAY, **kw)  # type: ignore[arg-type]
    ref = {n: p.detach().double().clone() for n, p in m.named_parameters()}
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            ema.update()
            for n, p in m.named_parameters():
                ref[n].mul_(DECAY).add_(p.detach().double(), alpha=1 - DECAY)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema.update()
    ref_at_capture = {n: r.clone() for n, r in ref.items()}  # capture runs nothing
    gen = torch.Generator("cuda").manual_seed(6)
    for _ in range(STEPS):
        _train_step(m, gen)
        graph.replay()
        for n, p in m.named_parameters():
            ref_at_capture[n].mul_(DECAY).add_(p.detach().double(), alpha=1 - DECAY)
    torch.cuda.synchronize()
    _assert_close(ema.averaged_state_dict(), ref_at_capture, rtol=1e-5)
