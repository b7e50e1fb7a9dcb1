"""Names are canonical: the same EMA works bare, under DataParallel/DDP and torch.compile."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

from emaweights import EMA
from emaweights._naming import canonical_name, collect
from tests._models import mlp, train_step


def test_canonical_name_drops_wrapper_components_only() -> None:
    """Wrapper components go; a user module called 'module' stays."""
    assert canonical_name("enc._orig_mod.layer.weight") == "enc.layer.weight"
    assert canonical_name("module.weight") == "module.weight"
    assert canonical_name("a._checkpoint_wrapped_module.b") == "a.b"


def test_data_parallel_and_compile_names() -> None:
    """EMAs of the bare, DataParallel-wrapped and compiled model have the same names."""
    model = mlp()
    names = set(EMA(model).shadow)
    assert set(EMA(nn.DataParallel(model)).shadow) == names
    assert set(EMA(torch.compile(model)).shadow) == names
    inner = nn.Sequential(torch.compile(mlp()))
    assert {e.name for e in collect(inner)} == {"0." + n for n in names}


def test_state_moves_between_wrapped_and_bare() -> None:
    """A state saved from an EMA of a wrapped model loads into one of the bare model."""
    model = mlp()
    wrapped = EMA(nn.DataParallel(model), 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, opt, seed=0)
    wrapped.update()
    bare = EMA(model, 0.5)
    bare.load_state_dict(wrapped.state_dict())
    for n in bare.shadow:
        assert torch.equal(bare.shadow[n], wrapped.shadow[n])


def test_ema_made_before_ddp_works_after() -> None:
    """An EMA made on the bare model keeps averaging after DDP wrapping (world size 1, gloo)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(d, 'rdv')}", rank=0, world_size=1
        )
        try:
            model = mlp()
            ema = EMA(model, 0.5)
            ddp = nn.parallel.DistributedDataParallel(model)
            after = EMA(ddp, 0.5)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            train_step(ddp, opt, seed=0)
            ema.update()
            after.update()
            assert set(after.shadow) == set(ema.shadow)
            for n, p in model.named_parameters():
                assert not torch.equal(ema.shadow[n], p)  # it averaged, not copied
                torch.testing.assert_close(after.shadow[n], ema.shadow[n], rtol=0, atol=0)
        finally:
            dist.destroy_process_group()


def test_tied_weights_tracked_once() -> None:
    """A weight shared by two modules is averaged once, under its first name."""
    a = nn.Linear(4, 4)
    model = nn.Sequential(a, nn.ReLU(), a)
    assert [e.name for e in collect(model)] == ["0.weight", "0.bias"]
