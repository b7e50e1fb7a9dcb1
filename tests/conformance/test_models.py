"""The battery on real model shapes: a tiny GPT-2, channels_last CNNs, adapters, compile, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from emaweights._naming import unwrap
from tests.conformance.models import (
    BY_NAME,
    MODELS,
    Model,
    adapter_net,
    conv_net,
    gpt2,
    process_group,
    train_step,
)
from tests.conformance.registry import AVERAGERS, Case, copy_files, use_scratch
from tests.conformance.registry import BY_NAME as BY_NAME_AVG

ROOT = Path(__file__).resolve().parents[2]
cases = pytest.mark.parametrize("case", AVERAGERS, ids=[c.name for c in AVERAGERS])
models = pytest.mark.parametrize("shape", MODELS, ids=[m.name for m in MODELS])
WRAPPERS = ("module.", "_orig_mod.")


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    """A single-process gloo group for the DDP-wrapped model shapes."""
    with process_group(tmp_path):
        yield


def _run(case: Case, model: nn.Module, steps: int = 3, first: int = 1, **options: Any) -> Any:
    averager = case.make(model, **options)
    for step in range(first, first + steps):
        train_step(model, step)
        averager.update()
    return averager


def _live(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}


def _storages(averager: Any) -> set[int]:
    """Data pointers of every average the averager holds (MultiEMA: all of them)."""
    members = [averager[i] for i in range(len(averager))] if hasattr(averager, "emas") else []
    shadows = [m.shadow for m in members] or [averager.shadow]
    return {t.untyped_storage().data_ptr() for s in shadows for t in s.values()}


# -- swap and restore ---------------------------------------------------------


@cases
@models
def test_swap_and_restore_under_grad_modes_on_real_models(
    case: Case, shape: Model, request: pytest.FixtureRequest
) -> None:
    """applied() under inference_mode and no_grad: the average inside, live weights back after."""
    if shape.distributed:
        request.getfixturevalue("group")
    model = shape.make(0)
    averager = _run(case, model)
    live = _live(model)
    flags = {n: p.requires_grad for n, p in unwrap(model).named_parameters()}
    expected = averager.averaged_state_dict()
    x = shape.batch(0)
    for mode in (torch.inference_mode, torch.no_grad):
        with mode(), averager.applied() as m:
            inside = unwrap(m).state_dict()
            for name, value in expected.items():
                assert torch.equal(inside[name], value), (mode.__name__, name)
            m.eval()
            shape.output(m, x)
        for name, value in unwrap(model).state_dict().items():
            assert torch.equal(value, live[name]), (mode.__name__, name)
            assert not value.is_inference(), (mode.__name__, name)
    params = dict(unwrap(model).named_parameters())
    assert {n: p.requires_grad for n, p in params.items()} == flags
    assert not {p.untyped_storage().data_ptr() for p in params.values()} & _storages(averager)
    for name, p in params.items():
        if p.dim() == 4:  # the live model keeps the user's memory format
            assert p.is_contiguous(memory_format=torch.channels_last), name
    model.train()
    shape.output(model, x).float().sum().backward()  # live weights train on
    assert all(p.grad is not None for p in params.values() if p.requires_grad)


# -- tied weights: GPT-2 --------------------------------------------------------


@cases
def test_gpt2_tied_head_exports_the_average_under_both_names(case: Case) -> None:
    """GPT-2: lm_head.weight and wte.weight both export the average; copy_to keeps the tie."""
    model = gpt2(0)
    averager = _run(case, model)
    out = averager.averaged_state_dict()
    wte = "transformer.wte.weight"
    assert torch.equal(out["lm_head.weight"], out[wte])
    assert not torch.equal(out[wte], model.transformer.wte.weight.detach())
    with torch.no_grad(), averager.applied() as m:
        assert m.lm_head.weight is m.transformer.wte.weight
        assert torch.equal(m.transformer.wte.weight, out[wte])
        expected_logits = m(_tokens()).logits
    fresh = gpt2(1)
    averager.copy_to(fresh)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, out[name]), name
    with torch.no_grad():
        assert torch.equal(fresh(_tokens()).logits, expected_logits)


def _tokens() -> torch.Tensor:
    return BY_NAME["gpt2"].batch(3)


@cases
def test_gpt2_save_pretrained_averaged_reloads_tied(case: Case, tmp_path: Path) -> None:
    """save_pretrained_averaged writes a GPT-2 that from_pretrained loads tied, on the average."""
    transformers = pytest.importorskip("transformers")
    from emaweights.integrations.transformers import save_pretrained_averaged

    model = gpt2(0)
    averager = _run(case, model)
    save_pretrained_averaged(averager, tmp_path / "avg")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "avg")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for name, value in averager.averaged_state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert torch.equal(model.transformer.wte.weight, model.lm_head.weight)  # live untouched


# -- wrapper-free names --------------------------------------------------------


@cases
def test_plain_compiled_and_ddp_agree_on_names_and_values(case: Case, group: None) -> None:
    """The same CNN plain, compiled and in DDP: identical export keys and bitwise values."""
    runs = {
        name: _run(case, BY_NAME[name].make(0)) for name in ("channels_last", "compiled", "ddp")
    }
    plain = runs.pop("channels_last")
    reference = plain.averaged_state_dict()
    assert sorted(reference) == sorted(conv_net(0).state_dict())
    for name, averager in runs.items():
        out = averager.averaged_state_dict()
        assert list(out) == list(reference), name
        assert not any(k.startswith(WRAPPERS) or "._orig_mod." in k for k in out), name
        for key, value in reference.items():
            assert torch.equal(out[key], value), (name, key)
        # a state saved from the wrapped run resumes the plain one (DDP training, plain eval)
        other = case.like(averager, conv_net(0))
        other.load_state_dict(averager.state_dict())
        for key, value in reference.items():
            assert torch.equal(other.averaged_state_dict()[key], value), (name, key)
        # and copy_to() fills a model wrapped the other way
        target = conv_net(5)
        wrapped = BY_NAME["compiled" if name == "ddp" else "ddp"].make(5)
        for into, inner in ((target, target), (wrapped, unwrap(wrapped))):
            averager.copy_to(into)
            for key, value in inner.state_dict().items():
                assert torch.equal(value, reference[key]), (name, key)


def test_compiled_forward_inside_applied_sees_the_average() -> None:
    """A compiled model run inside applied() computes with the average, then with live weights."""
    case = BY_NAME_AVG["EMA"]
    model = BY_NAME["compiled"].make(0)
    averager = _run(case, model)
    plain = conv_net(5)
    averager.copy_to(plain)
    x = BY_NAME["compiled"].batch(0)
    model.eval()
    plain.eval()
    with torch.no_grad():
        live_out = model(x)
        with averager.applied() as m:
            avg_out = m(x)
        torch.testing.assert_close(avg_out, plain(x))
        assert torch.equal(model(x), live_out)


# -- channels_last --------------------------------------------------------------


@cases
def test_applied_keeps_channels_last_and_a_compiled_graph(case: Case) -> None:
    """Inside applied() a channels_last CNN keeps its memory format; compile reuses its graph."""
    torch._dynamo.reset()  # a fresh compile cache: count only this test's graphs
    graphs: list[int] = []

    def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Any:
        graphs.append(1)
        return gm.forward

    model = conv_net(0).eval()
    compiled_model = torch.compile(model, backend=backend)
    averager = _run(case, model)
    x = BY_NAME["channels_last"].batch(0)
    with torch.no_grad():
        compiled_model(x)
        with averager.applied():
            cl = torch.channels_last
            layouts = [
                p.is_contiguous(memory_format=cl) for p in model.parameters() if p.dim() == 4
            ]
            compiled_model(x)
    assert layouts and all(layouts)
    assert len(graphs) == 1


def _float64_rule(name: str, points: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The documented rule in float64 over ``points`` (points[0]: the weights at creation)."""
    start, rest = points[0], points[1:]
    if name == "SWA":
        return {k: torch.stack([p[k] for p in rest]).mean(0) for k in start}
    decay = 0.9
    ema = dict(start)
    for p in rest:
        ema = {k: decay * ema[k] + (1 - decay) * p[k] for k in ema}
    if name == "EMA-debiased":
        prod = decay ** len(rest)
        ema = {k: (ema[k] - prod * start[k]) / (1 - prod) for k in ema}
    return ema


@cases
def test_channels_last_equals_contiguous_and_float64(case: Case) -> None:
    """channels_last weights average bitwise like a contiguous copy and like float64 (EMA/SWA)."""
    cl, flat = conv_net(0), conv_net(0, channels_last=False)
    points = [{k: v.double() for k, v in flat.state_dict().items()}]
    a_cl, a_flat = case.make(cl), case.make(flat)
    for step in range(1, 4):
        train_step(cl, step)
        train_step(flat, step)
        a_cl.update()
        a_flat.update()
        points.append({k: v.double() for k, v in flat.state_dict().items()})
    # Stochastic rounding meets its noise in memory order, which differs between the two
    # layouts: there each update may round an element the other way (one step per update).
    exact = "stochastic" not in case.name
    for index, ref in enumerate(_exports(a_flat)):  # MultiEMA: every average
        for key, value in ref.items():
            got = _exports(a_cl)[index][key]
            if exact or not value.is_floating_point():
                assert torch.equal(got, value), (index, key)
            else:
                eps = torch.finfo(a_cl.storage.dtype).eps  # the shadow precision, not the export
                band = 4 * eps * value.float().abs().max() + 1e-6  # a few ulps of the tensor
                assert ((got.float() - value.float()).abs() <= band).all(), (index, key)
    out = a_cl.averaged_state_dict()
    if case.name in ("EMA", "EMA-debiased", "SWA"):
        oracle = _float64_rule(case.name, points)
        for key, value in oracle.items():
            if value.is_floating_point():
                torch.testing.assert_close(out[key].double(), value, rtol=1e-6, atol=1e-7)


def _exports(averager: Any) -> list[dict[str, torch.Tensor]]:
    if hasattr(averager, "emas"):
        return [averager.averaged_state_dict(i) for i in range(len(averager))]
    return [averager.averaged_state_dict()]


@pytest.mark.parametrize("kind", ["EMA", "MultiEMA"])
@pytest.mark.parametrize(
    "options",
    [{"foreach": False}, {"dtype": torch.float32}, {"dtype": torch.float32, "foreach": False}],
    ids=["per-tensor", "fp32-of-bf16", "fp32-of-bf16-per-tensor"],
)
def test_channels_last_kernel_paths_equal_contiguous(kind: str, options: dict[str, Any]) -> None:
    """Every kernel path (per-tensor, cast through fp32) averages channels_last like contiguous."""
    dtype = torch.bfloat16 if "dtype" in options else torch.float32
    runs = []
    for channels_last in (True, False):
        model = conv_net(0, channels_last=channels_last).to(dtype)
        averager = _run(BY_NAME_AVG[kind], model, **options)
        runs.append(_exports(averager))
        with torch.no_grad(), averager.applied() as m:
            layout = m[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert layout == channels_last
    for index, ref in enumerate(runs[1]):
        for key, value in ref.items():
            assert torch.equal(runs[0][index][key], value), (index, key)


def test_stochastic_rounding_is_honoured_on_channels_last() -> None:
    """rounding="stochastic" rounds channels_last weights as it rounds the same memory in NHWC."""
    from emaweights import EMA

    w = torch.randn(4, 3, 2, 2).to(torch.bfloat16)
    cl = nn.ParameterList([nn.Parameter(w.contiguous(memory_format=torch.channels_last))])
    nhwc = nn.ParameterList([nn.Parameter(w.permute(0, 2, 3, 1).contiguous())])
    nearest = nn.ParameterList([nn.Parameter(w.contiguous(memory_format=torch.channels_last))])
    opts = {"dtype": torch.bfloat16, "seed": 0}  # one noise stream for each run
    runs = [
        (cl, EMA(cl, 0.99, rounding="stochastic", **opts), lambda d: d),
        (nhwc, EMA(nhwc, 0.99, rounding="stochastic", **opts), lambda d: d.permute(0, 2, 3, 1)),
        (nearest, EMA(nearest, 0.99, dtype=torch.bfloat16), lambda d: d),
    ]
    for step in range(1, 6):
        delta = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(step)) * 0.1
        for model, ema, layout in runs:
            with torch.no_grad():
                model[0].add_(layout(delta).to(torch.bfloat16))
            ema.update()
    got, same_memory, rounded = (e.shadow["0"] for _, e, _ in runs)
    assert torch.equal(got.permute(0, 2, 3, 1), same_memory)
    assert not torch.equal(got, rounded)  # stochastic, not round-to-nearest


def test_stochastic_rounding_follows_a_model_turned_channels_last() -> None:
    """A model turned channels_last after the EMA was made keeps its rounding, noise unchanged.

    The shadow stays contiguous; the live weights are staged by slices in the shadow's
    order, so the noise meets the same elements as in a run that never changed layout.
    """
    from emaweights import EMA

    runs = []
    for turn in (True, False):
        model = conv_net(0, channels_last=False).to(torch.bfloat16)
        ema = EMA(model, 0.5, dtype=torch.bfloat16, rounding="stochastic", seed=3)
        train_step(model, 1)
        ema.update()
        if turn:
            model.to(memory_format=torch.channels_last)
        for step in (2, 3):
            train_step(model, step)
            ema.update()
        runs.append(ema.shadow)
    turned, plain = runs
    assert all(torch.equal(turned[k], plain[k]) for k in plain)


def test_stochastic_rounding_refuses_a_model_turned_contiguous_under_it() -> None:
    """A channels_last model turned contiguous after the EMA was made: refused, named."""
    from emaweights import EMA

    model = conv_net(0, channels_last=True).to(torch.bfloat16)
    ema = EMA(model, 0.5, dtype=torch.bfloat16, rounding="stochastic")
    train_step(model, 1)
    ema.update()
    model.to(memory_format=torch.contiguous_format)
    train_step(model, 2)
    with pytest.raises(ValueError, match=r"rounding='stochastic'.*layout"):
        ema.update()


# -- frozen backbone ------------------------------------------------------------


@cases
def test_frozen_backbone_is_not_averaged_and_exported_unchanged(case: Case) -> None:
    """Adapters: only trainable tensors are averaged; frozen ones export their live value."""
    model = adapter_net(0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    averager = _run(case, model)
    shadow = averager[0].shadow if hasattr(averager, "emas") else averager.shadow
    assert set(shadow) == trainable
    out = averager.averaged_state_dict()
    for name, value in frozen.items():
        assert torch.equal(out[name], value), name
        assert torch.equal(dict(model.named_parameters())[name], value), name
    for name in trainable:
        assert torch.equal(out[name], shadow[name]), name


# -- resume in a new process: GPT-2 ------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every averager on GPT-2: saved at step 3, resumed to step 6 in one fresh interpreter."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("gpt2_resume")
    expected = {}
    for case in AVERAGERS:
        model = gpt2(0)
        use_scratch(folder / case.name / "run")  # files the uninterrupted run writes
        averager = _run(case, model)
        (folder / case.name).mkdir(exist_ok=True)
        torch.save(
            {"model": model.state_dict(), "averager": averager.state_dict()},
            folder / case.name / "at3.pt",
        )
        copy_files(folder / case.name / "run", folder / case.name)  # the worker's, at step 3
        for step in range(4, 7):
            train_step(model, step)
            averager.update()
        expected[case.name] = averager.averaged_state_dict()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    names = ",".join(c.name for c in AVERAGERS)
    command = [sys.executable, "-m", "tests.conformance._resume_worker", names, str(folder), "gpt2"]
    subprocess.run(command, check=True, cwd=ROOT, env=env, timeout=300)
    return {"folder": folder, "expected": expected}


@pytest.mark.slow  # one fresh interpreter for all (~12 s); test_protocol resumes the BN model
@cases
def test_gpt2_resume_in_a_new_process_is_bitwise(case: Case, gpt2_resumed: dict[str, Any]) -> None:
    """GPT-2 state saved at step 3 and resumed elsewhere equals the uninterrupted run, tie kept."""
    expected = gpt2_resumed["expected"][case.name]
    resumed = torch.load(gpt2_resumed["folder"] / case.name / "resumed.pt", weights_only=True)
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
    assert torch.equal(resumed["lm_head.weight"], resumed["transformer.wte.weight"])
