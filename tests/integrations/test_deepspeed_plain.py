"""The DeepSpeed helpers need no DeepSpeed, and leave unpartitioned tensors as they are."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from emaweights import EMA
from emaweights.integrations.deepspeed import (
    gathered_shadow,
    gathered_state_dict,
    load_gathered_state_dict,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_adapter_imports_without_loading_deepspeed() -> None:
    """Importing the adapter does not import DeepSpeed (ZeRO-3 is recognized by attributes)."""
    code = (
        "import sys, emaweights.integrations.deepspeed; "
        "print([m for m in sys.modules if m.split('.')[0] == 'deepspeed'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_gathered_state_of_an_unpartitioned_model_round_trips() -> None:
    """Without ZeRO-3 the gathered shadow is a copy of the shadow, and it loads back exactly."""
    model = _model()
    ema = EMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    full = gathered_shadow(ema)
    assert full.keys() == ema.shadow.keys()
    for name, t in ema.shadow.items():
        assert torch.equal(full[name], t)
        assert full[name].data_ptr() != t.data_ptr()
    state = gathered_state_dict(ema)
    other = EMA(_model(), 0.5)
    load_gathered_state_dict(other, state)
    for name, t in ema.shadow.items():
        assert torch.equal(other.shadow[name], t)


def test_load_gathered_refuses_a_state_without_shadow() -> None:
    """A state whose 'shadow' is not a mapping is refused with the type named."""
    ema = EMA(_model(), 0.5)
    with pytest.raises(ValueError, match="list"):
        load_gathered_state_dict(ema, {**ema.state_dict(), "shadow": []})
