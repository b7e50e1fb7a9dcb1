"""Tests of the closed-form post-hoc solve, reconstruction at every step, CLI == Python."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from emaweights import EMA
from emaweights.cli import main as cli_main
from emaweights.post_hoc import (
    PostHocEMA,
    _inner,
    _write_snapshot,
    power_profile,
    profile_error,
    reconstruct,
    sigma_rel_to_gamma,
    solve_weights,
)
from emaweights.post_hoc_cli import default_out
from emaweights.schedules import PowerFunction
from tests._models import mlp, train_step

safetensors_torch = pytest.importorskip("safetensors.torch")

G05, G10 = sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)


def _discrete_solve(snapshots: list[tuple[float, int]], gamma: float, n: int) -> torch.Tensor:
    """The T x S least squares over the exact discrete profiles (oracle; memory grows with T)."""
    length = max([n, *(m for _, m in snapshots)])
    basis = torch.stack([power_profile(g, m, length) for g, m in snapshots], dim=1)
    target = power_profile(gamma, n, length)
    out: torch.Tensor = torch.linalg.lstsq(basis, target[:, None], driver="gelsd").solution[:, 0]
    return out


def _discrete_residual(
    x: torch.Tensor, snapshots: list[tuple[float, int]], g: float, n: int
) -> float:
    length = max([n, *(m for _, m in snapshots)])
    basis = torch.stack([power_profile(gs, m, length) for gs, m in snapshots], dim=1)
    target = power_profile(g, n, length)
    return float((basis @ x - target).norm() / target.norm())


@pytest.mark.parametrize(("g_a", "n_a", "g_b", "n_b"), [(G05, 40, G10, 100), (2.0, 7, 0.5, 3)])
def test_inner_product_matches_quadrature(g_a: float, n_a: int, g_b: float, n_b: int) -> None:
    """The closed-form inner product of two power profiles equals its numerical integral."""
    t = torch.linspace(0, max(n_a, n_b), 400_001, dtype=torch.float64)

    def p(g: float, n: int) -> torch.Tensor:
        return torch.where(t <= n, (g + 1) * t**g / n ** (g + 1), torch.zeros_like(t))

    quad = torch.trapezoid(p(g_a, n_a) * p(g_b, n_b), t)
    f64 = torch.float64
    closed = _inner(*(torch.tensor(float(v), dtype=f64) for v in (g_a, n_a, g_b, n_b)))
    assert float(closed) == pytest.approx(float(quad), rel=1e-4)


def test_solve_is_scale_free_and_never_allocates_per_update() -> None:
    """Multiplying every update count by 10**6 (3e9 updates) leaves the coefficients unchanged."""
    base = [(g, 50 * k) for k in range(1, 61) for g in (G05, G10)]
    small = solve_weights(base, sigma_rel_to_gamma(0.07), 3000)
    huge = solve_weights([(g, n * 10**6) for g, n in base], sigma_rel_to_gamma(0.07), 3 * 10**9)
    torch.testing.assert_close(huge, small, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sigma_rel", [0.03, 0.07, 0.15])
def test_solve_fits_discrete_profiles_as_well_as_discrete_solve(sigma_rel: float) -> None:
    """On a long run the closed-form fit of the discrete weights is within 2 % of the best."""
    snaps = [(g, 200 * k) for k in range(1, 11) for g in (G05, G10)]
    gamma = sigma_rel_to_gamma(sigma_rel)
    best = _discrete_residual(_discrete_solve(snaps, gamma, 2000), snaps, gamma, 2000)
    ours = _discrete_residual(solve_weights(snaps, gamma, 2000), snaps, gamma, 2000)
    assert ours <= 1.02 * best + 1e-12


def test_tracked_target_is_one_snapshot() -> None:
    """A target equal to a snapshot's profile gets that snapshot alone, with zero profile error."""
    snaps = [(g, 100 * k) for k in range(1, 21) for g in (G05, G10)]
    x = solve_weights(snaps, G10, 1300)
    expected = torch.zeros(len(snaps), dtype=torch.float64)
    expected[snaps.index((G10, 1300))] = 1.0
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-9)
    assert profile_error(snaps, G10, 1300, x) < 1e-6


def _run(directory: Path, steps: int, update_every: int, snapshot_every: int, extra: float):
    """Train with a PostHocEMA and a direct float64 power EMA; record it and the iterates."""
    torch.manual_seed(0)
    model = mlp()
    tracker = PostHocEMA(model, directory, snapshot_every=snapshot_every, update_every=update_every)
    profile = PowerFunction(sigma_rel_to_gamma(extra))
    direct = EMA(model, profile, update_every=update_every, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    at_snapshot, iterates = {}, []
    for s in range(1, steps + 1):
        train_step(model, opt, seed=s)
        tracker.update()
        direct.update()
        if s % update_every == 0:  # the iterate this update averaged
            live = dict(model.named_parameters())
            iterates.append({k: live[k].detach().double().clone() for k in direct.shadow})
        if s % snapshot_every == 0:
            at_snapshot[s] = {k: v.clone() for k, v in direct.shadow.items()}
    return at_snapshot, iterates


@pytest.mark.parametrize("update_every", [1, 3])
def test_reconstruct_at_every_snapshot_step_matches_direct_ema(
    tmp_path: Path, update_every: int
) -> None:
    """At every snapshot step, a tracked sigma_rel equals a direct float64 power EMA to rounding."""
    at_snapshot, _ = _run(tmp_path, 72, update_every, 12, extra=0.10)
    for step, expected in at_snapshot.items():
        out = reconstruct(tmp_path, 0.10, step=step)
        for name, t in expected.items():
            torch.testing.assert_close(out[name].double(), t, rtol=1e-5, atol=1e-6)


def test_untracked_error_within_profile_bound(tmp_path: Path) -> None:
    """|reconstruction - direct EMA| <= profile error * ||p*|| * sqrt(sum_m theta_m^2) + eps."""
    sigma = 0.07
    at_snapshot, iterates = _run(tmp_path, 96, 2, 16, extra=sigma)
    gamma = sigma_rel_to_gamma(sigma)
    for step in (48, 96):
        n = step // 2
        snaps = [(g, 8 * k) for k in range(1, step // 16 + 1) for g in (G05, G10)]
        x = solve_weights(snaps, gamma, n)
        target_norm = (gamma + 1) / math.sqrt((2 * gamma + 1) * n)
        bound = profile_error(snaps, gamma, n, x) * target_norm
        out = reconstruct(tmp_path, sigma, step=step)
        for name, expected in at_snapshot[step].items():
            energy = torch.stack([it[name] for it in iterates[:n]]).pow(2).sum(0).sqrt()
            slack = 1e-6 * float(x.abs().sum()) * (1 + energy.max())
            assert bool(((out[name].double() - expected).abs() <= bound * energy + slack).all())


def _snapshots(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = mlp()
    tracker = PostHocEMA(model, tmp_path / "snaps", snapshot_every=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for s in range(1, 25):
        train_step(model, opt, seed=s)
        tracker.update()
    return tmp_path / "snaps"


@pytest.mark.parametrize("step", [0, 7, 12, 25, 1000])
def test_non_snapshot_step_refused(tmp_path: Path, step: int) -> None:
    """A step before, between or after the snapshots (at 8, 16, 24) is refused, naming the step."""
    folder = _snapshots(tmp_path)
    with pytest.raises(ValueError, match=f"step {step} is not a snapshot step.*8, 16, 24"):
        reconstruct(folder, 0.07, step=step)


@pytest.mark.parametrize("step", [None, 8, 16, 24, 12])
@pytest.mark.parametrize("sigma_rel", [0.05, 0.08])
def test_cli_agrees_with_python(
    tmp_path: Path, step: int | None, sigma_rel: float, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI writes exactly reconstruct()'s weights, and refuses (exit 2) what it refuses."""
    folder = _snapshots(tmp_path)
    out = tmp_path / "w.safetensors"
    argv = ["posthoc", str(folder), "--sigma-rel", str(sigma_rel), "--out", str(out)]
    argv += [] if step is None else ["--step", str(step)]
    try:
        expected = reconstruct(folder, sigma_rel, step=step)
    except ValueError as err:
        assert cli_main(argv) == 2
        assert str(err) in capsys.readouterr().err
        assert not out.exists()
        return
    assert cli_main(argv) == 0
    written = safetensors_torch.load_file(str(out))
    assert written.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(written[name], t)


def test_cli_default_out_is_readme_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's `emaweights posthoc DIR ...` line runs and writes the file it names."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    found = re.search(r"`emaweights posthoc DIR ([^`]*)`\s+writes `([^`]*)`", readme)
    assert found is not None
    args, named = found.group(1).split(), found.group(2).replace("<N>", "24")
    assert named == default_out(float(args[args.index("--sigma-rel") + 1]), 24)
    folder = _snapshots(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["posthoc", str(folder), *args]) == 0
    written = safetensors_torch.load_file(str(tmp_path / named))
    for name, t in reconstruct(folder, 0.05).items():
        assert torch.equal(written[name], t)


def test_cli_out_creates_parents_and_refuses_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out missing/dir/x creates the folders; --out naming a folder exits 2 with a message."""
    folder = _snapshots(tmp_path)
    nested = tmp_path / "missing" / "dir" / "x.safetensors"
    assert cli_main(["posthoc", str(folder), "--sigma-rel", "0.05", "--out", str(nested)]) == 0
    assert nested.is_file()
    (tmp_path / "adir").mkdir()
    argv = ["posthoc", str(folder), "--sigma-rel", "0.05", "--out", str(tmp_path / "adir")]
    assert cli_main(argv) == 2
    assert "adir" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "pickled"])
def test_cli_damaged_snapshot_is_a_clear_error(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated or pickled snapshot file exits 2 with a message naming it, no traceback."""
    folder = _snapshots(tmp_path)
    victim = folder / "000002.safetensors"
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:100])
    else:
        torch.save({"w": torch.zeros(2)}, victim)
    out = tmp_path / "w.safetensors"
    assert cli_main(["posthoc", str(folder), "--sigma-rel", "0.05", "--out", str(out)]) == 2
    assert "000002.safetensors" in capsys.readouterr().err


def test_write_snapshot_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot write that fails before the rename leaves the previous file whole, no temp."""
    path = tmp_path / "000000.safetensors"
    _write_snapshot(path, {"w": torch.ones(3)}, {"step": "1"})
    before = path.read_bytes()

    def fail(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        _write_snapshot(path, {"w": torch.zeros(3)}, {"step": "2"})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.safetensors"]
