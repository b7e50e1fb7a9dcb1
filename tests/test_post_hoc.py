"""Tests of post-hoc EMA: profiles, sigma_rel <-> gamma, reconstruction vs tracked EMAs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from emaweights import EMA
from emaweights.cli import main as cli_main
from emaweights.post_hoc import (
    PostHocEMA,
    gamma_to_sigma_rel,
    load_manifest,
    power_profile,
    reconstruct,
    sigma_rel_to_gamma,
)
from emaweights.schedules import PowerFunction
from tests._models import mlp, train_step

safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.mark.parametrize("gamma", [0.0, 1.5, 6.94, 16.97])
def test_sigma_rel_matches_numerical_profile_std(gamma: float) -> None:
    """gamma_to_sigma_rel equals the std of the density (g+1) t^g on [0, 1], by quadrature."""
    t = torch.linspace(0, 1, 20_001, dtype=torch.float64)
    p = (gamma + 1) * t**gamma
    mean = torch.trapezoid(p * t, t)
    var = torch.trapezoid(p * (t - mean) ** 2, t)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(math.sqrt(var), rel=1e-6)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.10, 0.25])
def test_sigma_rel_gamma_round_trip(sigma_rel: float) -> None:
    """sigma_rel_to_gamma inverts gamma_to_sigma_rel (paper: 0.10 <-> 6.94, 0.05 <-> 16.97)."""
    assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)


def test_bad_sigma_rel() -> None:
    """sigma_rel outside (0, 1/sqrt(12)] is refused with the value in the message."""
    with pytest.raises(ValueError, match=r"0\.5"):
        sigma_rel_to_gamma(0.5)


@pytest.mark.parametrize("update_every", [1, 3])
def test_power_profile_matches_tracked_ema(update_every: int) -> None:
    """power_profile gives the weight a PowerFunction EMA puts on each iterate (float64)."""
    gamma, steps = 2.5, 30
    model = torch.nn.Linear(1, 1, bias=False).double()
    ema = EMA(model, PowerFunction(gamma), update_every=update_every, dtype=torch.float64)
    iterates = []
    for s in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(float(s) ** 1.3)
        ema.update()
        if s % update_every == 0:
            iterates.append(float(s) ** 1.3)
    w = power_profile(gamma, ema.num_updates)
    expected = (w * torch.tensor(iterates, dtype=torch.float64)).sum()
    assert ema.num_updates == len(iterates)
    assert float(ema.shadow["weight"]) == pytest.approx(float(expected), rel=1e-12)


def _train(tmp_path: Path, steps: int, update_every: int, snapshot_every: int, extra: list[float]):
    torch.manual_seed(0)
    model = mlp()
    tracker = PostHocEMA(
        model,
        tmp_path,
        sigma_rels=(0.05, 0.10),
        snapshot_every=snapshot_every,
        update_every=update_every,
        dtype=torch.float32,
    )
    direct = [
        EMA(
            model,
            PowerFunction(sigma_rel_to_gamma(s)),
            update_every=update_every,
            dtype=torch.float64,
        )
        for s in extra
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for s in range(1, steps + 1):
        train_step(model, opt, seed=s)
        tracker.update()
        for d in direct:
            d.update()
    return tracker, direct


@pytest.mark.parametrize(("update_every", "snapshot_every"), [(1, 9), (3, 12), (2, 6)])
def test_reconstruct_tracked_profile_exactly(
    tmp_path: Path, update_every: int, snapshot_every: int
) -> None:
    """Reconstructing a tracked sigma_rel at a snapshot step gives a direct float64 EMA of it."""
    _, direct = _train(tmp_path, 36, update_every, snapshot_every, extra=[0.05])
    out = reconstruct(tmp_path, 0.05)
    for name, t in direct[0].shadow.items():
        torch.testing.assert_close(out[name].double(), t, rtol=1e-5, atol=1e-6)


def test_reconstruct_untracked_profile_close(tmp_path: Path) -> None:
    """An untracked sigma_rel between the tracked ones comes close to a direct EMA of it."""
    # 80 updates: the continuous-profile fit matches the discrete weights to O(1/n).
    tracker, direct = _train(tmp_path, 160, 2, 16, extra=[0.07])
    out = reconstruct(tmp_path, 0.07)
    err = max(float((out[n].double() - t).abs().max()) for n, t in direct[0].shadow.items())
    spread = max(
        float(
            (tracker.multi[0].shadow[n].double() - tracker.multi[1].shadow[n].double()).abs().max()
        )
        for n in direct[0].shadow
    )
    assert err < 0.05 * spread


def test_manifest_holds_metadata(tmp_path: Path) -> None:
    """The manifest records step, gamma, update count of each snapshot; files are fp32."""
    _train(tmp_path, 24, 2, 8, extra=[])
    m = load_manifest(tmp_path)
    assert [s["step"] for s in m["snapshots"]] == [8, 8, 16, 16, 24, 24]
    assert [s["num_updates"] for s in m["snapshots"]] == [4, 4, 8, 8, 12, 12]
    assert m["snapshot_every"] == 8 and m["update_every"] == 2
    t = safetensors_torch.load_file(str(tmp_path / m["snapshots"][0]["file"]))
    assert all(v.dtype == torch.float32 for v in t.values())


def test_cli_writes_reconstruction(tmp_path: Path) -> None:
    """`emaweights posthoc DIR --sigma-rel S --out F` writes what reconstruct() returns."""
    _train(tmp_path, 16, 1, 8, extra=[])
    out_file = tmp_path / "w.safetensors"
    assert cli_main(["posthoc", str(tmp_path), "--sigma-rel", "0.08", "--out", str(out_file)]) == 0
    written = safetensors_torch.load_file(str(out_file))
    expected = reconstruct(tmp_path, 0.08)
    for name, t in expected.items():
        torch.testing.assert_close(written[name], t)
    assert cli_main(["posthoc", str(tmp_path / "nope"), "--sigma-rel", "0.08", "--out", "x"]) == 2
