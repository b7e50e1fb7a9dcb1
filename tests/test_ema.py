"""Tests of the EMA averager against float64 references and closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emaweights import EMA, NonFiniteError, SwapError, Warmup
from tests._models import mlp, train_step


def _run(model: nn.Module, ema: EMA, steps: int, lr: float = 0.1) -> list[dict[str, torch.Tensor]]:
    """Train ``steps`` steps, updating the EMA; return the live params after each step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    history = []
    for i in range(steps):
        train_step(model, opt, seed=i)
        ema.update()
        history.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    return history


def test_matches_closed_form() -> None:
    """After T steps the shadow is sum (1-d) d^(T-t) x_t + d^T x_0 (float64 oracle)."""
    model = mlp()
    x0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ema = EMA(model, 0.8)
    hist = _run(model, ema, 12)
    d, T = 0.8, len(hist)
    for name, x_init in x0.items():
        ref = d**T * x_init + sum(
            (1 - d) * d ** (T - t) * hist[t - 1][name] for t in range(1, T + 1)
        )
        torch.testing.assert_close(ema.shadow[name].double(), ref, rtol=1e-5, atol=1e-6)
    assert ema.init_weight == pytest.approx(d**T)


def test_matches_float64_recursion_with_schedule() -> None:
    """A warm-up schedule gives the float64 recursion step by step."""
    model = mlp()
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    sched = Warmup(0.99)
    ema = EMA(model, sched)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(15):
        train_step(model, opt, seed=i)
        ema.update()
        d = sched(i)
        for n, p in model.named_parameters():
            ref[n] = d * ref[n] + (1 - d) * p.detach().double()
    for n, r in ref.items():
        torch.testing.assert_close(ema.shadow[n].double(), r, rtol=1e-5, atol=1e-6)


def test_update_every_keeps_horizon() -> None:
    """With update_every=k the decay per update is d**k (float64 oracle on the seen weights)."""
    model = mlp()
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ema = EMA(model, 0.9, update_every=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(1, 13):
        train_step(model, opt, seed=i)
        ema.update()
        if i % 3 == 0:
            for n, p in model.named_parameters():
                ref[n] = 0.9**3 * ref[n] + (1 - 0.9**3) * p.detach().double()
    assert ema.num_updates == 4
    assert ema.init_weight == pytest.approx(0.9**12)
    for n, r in ref.items():
        torch.testing.assert_close(ema.shadow[n].double(), r, rtol=1e-5, atol=1e-6)


def test_start_step_copies_until_start() -> None:
    """Until start_step the shadow equals the live weights; the average starts there."""
    model = mlp()
    ema = EMA(model, 0.5, start_step=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(1, 4):
        train_step(model, opt, seed=i)
        ema.update()
        for n, p in model.named_parameters():
            assert torch.equal(ema.shadow[n], p.detach())
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    train_step(model, opt, seed=4)
    ema.update()
    for n, p in model.named_parameters():
        torch.testing.assert_close(
            ema.shadow[n].double(), 0.5 * start[n] + 0.5 * p.detach().double()
        )


def test_explicit_step_argument() -> None:
    """update(step=s) counts optimizer steps; skipped steps fold into the decay."""
    model = mlp()
    a, b = EMA(model, 0.9), EMA(model, 0.9, update_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(1, 7):
        train_step(model, opt, seed=i)
        b.update()
        if i % 2 == 0:
            a.update(step=i)
    for n in a.shadow:
        torch.testing.assert_close(a.shadow[n], b.shadow[n])
    with pytest.raises(ValueError, match="got 2"):
        a.update(step=2)


def test_debiased_anchor_matches_closed_form() -> None:
    """anchor='debiased' equals (shadow_T - d^T x0)/(1 - d^T) of the anchored EMA."""
    model = mlp()
    x0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    anchored, debiased = EMA(model, 0.9), EMA(model, 0.9, anchor="debiased")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(8):
        train_step(model, opt, seed=i)
        anchored.update()
        debiased.update()
    w0 = 0.9**8
    for n in x0:
        ref = (anchored.shadow[n].double() - w0 * x0[n]) / (1 - w0)
        torch.testing.assert_close(debiased.shadow[n].double(), ref, rtol=1e-4, atol=1e-5)


def test_bf16_model_fp32_shadow_keeps_updates() -> None:
    """A bf16 model's fp32 shadow follows the float64 average; a bf16 shadow barely moves."""
    model = mlp(torch.bfloat16)
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ema = EMA(model, 0.999)
    frozen = EMA(model, 0.999, dtype=torch.bfloat16)
    start = {n: t.clone() for n, t in frozen.shadow.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for i in range(30):
        train_step(model, opt, seed=i)
        ema.update()
        frozen.update()
        for n, p in model.named_parameters():
            ref[n] = 0.999 * ref[n] + 0.001 * p.detach().double()
    for n, r in ref.items():
        assert ema.shadow[n].dtype == torch.float32
        torch.testing.assert_close(ema.shadow[n].double(), r, rtol=1e-5, atol=1e-6)
    total = sum(r.numel() for r in ref.values())
    changed = sum(int((ref[n] != start[n].double()).sum()) for n in ref) / total
    unmoved = sum(int((frozen.shadow[n] == start[n]).sum()) for n in ref) / total
    # The true average moved almost everywhere; the bf16 shadow stayed put almost everywhere.
    assert changed > 0.99
    assert unmoved > 0.8


def test_buffers_by_kind() -> None:
    """Float buffers are averaged, integer buffers copied (never averaged)."""
    model = mlp(batchnorm=True)
    ema = EMA(model, 0.5)
    rm0 = model[1].running_mean.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, opt, seed=0)
    ema.update()
    bn = model[1]
    torch.testing.assert_close(ema.shadow["1.running_mean"], 0.5 * rm0 + 0.5 * bn.running_mean)
    assert ema.shadow["1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(ema.shadow["1.num_batches_tracked"], bn.num_batches_tracked)
    copied = EMA(model, 0.5, buffers="copy")
    train_step(model, opt, seed=1)
    copied.update()
    assert torch.equal(copied.shadow["1.running_mean"], bn.running_mean)
    assert "1.running_mean" not in EMA(model, buffers="ignore").shadow


def test_selection_options() -> None:
    """Frozen parameters are excluded by default; include_frozen and exclude patterns work."""
    model = mlp()
    model[0].weight.requires_grad_(False)
    assert set(EMA(model).shadow) == {"0.bias", "2.weight", "2.bias"}
    assert "0.weight" in EMA(model, include_frozen=True).shadow
    assert set(EMA(model, exclude=["*.bias"]).shadow) == {"2.weight"}
    with pytest.raises(ValueError, match="no tensor to average"):
        EMA(model, exclude=["*"])


def test_applied_swaps_by_pointer_and_restores() -> None:
    """applied() puts the shadow storage itself into the model and restores the live weights."""
    model = mlp()
    ema = EMA(model, 0.5)
    _run(model, ema, 3)
    live_ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    with ema.applied():
        for n, p in model.named_parameters():
            assert p.data_ptr() == ema.shadow[n].data_ptr()
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == live_ptrs


def test_applied_changes_forward_to_average() -> None:
    """The forward inside applied() equals a model loaded with the averaged state dict."""
    model = mlp(batchnorm=True)
    ema = EMA(model, 0.7)
    _run(model, ema, 4)
    model.eval()
    x = torch.randn(5, 6)
    twin = mlp(batchnorm=True).eval()
    twin.load_state_dict(ema.averaged_state_dict())
    with ema.applied():
        torch.testing.assert_close(model(x), twin(x))


def test_restore_on_exception() -> None:
    """An exception inside applied() leaves the live weights in place."""
    model = mlp()
    ema = EMA(model, 0.5)
    _run(model, ema, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(KeyError), ema.applied():
        raise KeyError("boom")
    assert not ema.is_applied
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_nesting_and_misuse_refused() -> None:
    """Nested apply, restore without apply and update while applied raise SwapError."""
    model = mlp()
    ema = EMA(model)
    with pytest.raises(SwapError, match="restore"):
        ema.restore()
    with ema.applied():
        with pytest.raises(SwapError, match="apply_shadow"), ema.applied():
            pass
        with pytest.raises(SwapError, match="update"):
            ema.update()


def test_optimizer_step_while_applied_refused() -> None:
    """An optimizer step on the averaged weights raises before changing anything."""
    model = mlp()
    ema = EMA(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _run(model, ema, 2)
    avg = {n: t.clone() for n, t in ema.shadow.items()}
    with ema.applied():
        model(torch.randn(2, 6)).sum().backward()
        with pytest.raises(SwapError, match=r"SGD\.step"):
            opt.step()
    for n, t in ema.shadow.items():
        assert torch.equal(t, avg[n])
    train_step(model, opt, seed=9)  # steps work again after restore


def test_in_place_change_while_applied_detected() -> None:
    """An in-place change to the averaged weights while applied is reported on restore."""
    model = mlp()
    ema = EMA(model)
    with pytest.raises(SwapError, match=r"0\.weight"), ema.applied(), torch.no_grad():
        model[0].weight.add_(1.0)
    assert not ema.is_applied


def test_state_dict_round_trip() -> None:
    """A loaded state continues exactly like the original (bitwise)."""
    model = mlp()
    ema = EMA(model, Warmup(0.99), update_every=2)
    _run(model, ema, 5)
    other = EMA(model, Warmup(0.99), update_every=2)
    other.load_state_dict(ema.state_dict())
    assert (other.step, other.num_updates, other.init_weight) == (
        ema.step,
        ema.num_updates,
        ema.init_weight,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(5):
        train_step(model, opt, seed=100 + i)
        ema.update()
        other.update()
    for n in ema.shadow:
        assert torch.equal(ema.shadow[n], other.shadow[n])


def test_state_dict_loads_weights_only(tmp_path: object) -> None:
    """The state dict survives torch.save / torch.load(weights_only=True)."""
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "ema.pt"
    model = mlp()
    ema = EMA(model)
    _run(model, ema, 2)
    torch.save(ema.state_dict(), path)
    other = EMA(model)
    other.load_state_dict(torch.load(path, weights_only=True))
    for n in ema.shadow:
        assert torch.equal(ema.shadow[n], other.shadow[n])


def test_strict_mismatch_lists_names() -> None:
    """Loading another architecture's state lists missing, unexpected and shape mismatches."""
    ema = EMA(mlp())
    state = ema.state_dict()
    shadow = dict(state["shadow"])
    shadow["extra.weight"] = shadow.pop("0.bias")
    with pytest.raises(KeyError, match=r"missing \['0.bias'\], unexpected \['extra.weight'\]"):
        ema.load_state_dict({**state, "shadow": shadow})
    shadow = dict(state["shadow"])
    shadow["2.bias"] = torch.zeros(7)
    before = {n: t.clone() for n, t in ema.shadow.items()}
    with pytest.raises(ValueError, match=r"2.bias: shape \(7,\) != \(3,\)"):
        ema.load_state_dict({**state, "shadow": {**shadow, "0.weight": torch.ones(16, 6)}})
    for n, t in ema.shadow.items():  # nothing written on failure
        assert torch.equal(t, before[n])
    with pytest.raises(ValueError, match="configuration differs"):
        EMA(mlp(), 0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="not an emaweights EMA state"):
        ema.load_state_dict({"weight": torch.zeros(1)})


def test_copy_to_makes_average_permanent() -> None:
    """copy_to writes the averages into the model, own or another."""
    model = mlp()
    ema = EMA(model, 0.5)
    _run(model, ema, 3)
    other = mlp()
    ema.copy_to(other)
    ema.copy_to()
    for n, p in model.named_parameters():
        assert torch.equal(p, ema.shadow[n])
        assert torch.equal(dict(other.named_parameters())[n], ema.shadow[n])


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_bad_update_every(bad: object) -> None:
    """A bad update_every raises, naming the value."""
    with pytest.raises(ValueError, match=repr(bad)):
        EMA(mlp(), update_every=bad)  # type: ignore[arg-type]


def test_model_changed_after_creation_detected() -> None:
    """A model whose dtype changed after the EMA was made is refused on swap, naming the tensor."""
    model = mlp()
    ema = EMA(model)
    model.double()
    with pytest.raises(RuntimeError, match=r"0\.weight: dtype torch.float32 -> torch.float64"):
        ema.apply_shadow()


def test_buffers_swap_as_copies() -> None:
    """A write to a swapped-in buffer that bypasses version counters never reaches the average."""
    model = mlp(batchnorm=True)
    ema = EMA(model, 0.5)
    _run(model, ema, 2)
    before = ema.shadow["1.running_mean"].clone()
    with ema.applied():
        torch.testing.assert_close(model[1].running_mean, before)
        model[1].running_mean.data.fill_(123.0)  # like a collective write: no version bump
    assert torch.equal(ema.shadow["1.running_mean"], before)


def test_finiteness_checks_name_exactly_the_nonfinite_tensors() -> None:
    """Huge finite weights pass every finiteness check; NaN and inf are named, nothing else."""
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1e20)  # a 2-norm would overflow to inf here; the checks must not
    ema = EMA(model, 0.5, nonfinite="raise")
    ema.update()
    with ema.applied():
        pass
    names = list(ema.shadow)
    with torch.no_grad():
        ema.shadow[names[0]].view(-1)[0] = float("nan")
        ema.shadow[names[-1]].view(-1)[-1] = float("-inf")
    with pytest.raises(NonFiniteError, match="NaN or infinity") as info:
        ema.apply_shadow()
    message = str(info.value)
    assert names[0] in message and names[-1] in message
    assert all(n not in message for n in names[1:-1])
