"""Real model shapes for the battery: the models users hand the averagers, built offline.

Each :class:`Model` makes a fresh, seeded instance and an example input, so a test can
build the same model twice (plain and wrapped, or live and resumed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

VOCAB = 50


def gpt2(seed: int = 0) -> nn.Module:
    """A 1-layer GPT-2 language model from a config: ``lm_head.weight`` is ``wte.weight``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model: nn.Module = transformers.GPT2LMHeadModel(config)
    return model


def conv_net(seed: int = 0, channels_last: bool = True) -> nn.Module:
    """A small CNN with BatchNorm2d, in channels_last memory format unless told otherwise."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    return model.to(memory_format=torch.channels_last) if channels_last else model


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update (the LoRA shape)."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def adapter_net(seed: int = 0) -> nn.Module:
    """A frozen backbone (Linear, LayerNorm) with LoRA adapters and a trainable head."""
    torch.manual_seed(seed)
    norm = nn.LayerNorm(16).requires_grad_(False)
    return nn.Sequential(
        LoRALinear(nn.Linear(8, 16)), norm, nn.ReLU(), LoRALinear(nn.Linear(16, 8)), nn.Linear(8, 3)
    )


def compiled(seed: int = 0) -> nn.Module:
    """The channels_last CNN under ``torch.compile`` (eager backend: wrapper, no codegen)."""
    compiled_model: nn.Module = torch.compile(conv_net(seed), backend="eager")  # type: ignore[assignment]
    return compiled_model


def ddp(seed: int = 0) -> nn.Module:
    """The channels_last CNN in DistributedDataParallel (needs :func:`process_group`)."""
    return nn.parallel.DistributedDataParallel(conv_net(seed))


@contextlib.contextmanager
def process_group(folder: Path) -> Iterator[None]:
    """A single-process gloo group (world size 1) with a file rendezvous in ``folder``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))


def _images(seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    return x.to(memory_format=torch.channels_last)


def _features(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Model:
    """One model shape: a seeded factory, an example batch and how to get its output."""

    name: str
    make: Callable[[int], nn.Module]
    batch: Callable[[int], torch.Tensor]
    distributed: bool = False

    def output(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's output tensor (a Hugging Face model returns logits in a record)."""
        out: Any = model(x)
        return out.logits if hasattr(out, "logits") else out


MODELS = [
    Model("gpt2", gpt2, _tokens),
    Model("channels_last", conv_net, _images),
    Model("adapter", adapter_net, _features),
    Model("compiled", compiled, _images),
    Model("ddp", ddp, _images, distributed=True),
]

BY_NAME = {m.name: m for m in MODELS}


@torch.no_grad()
def train_step(model: nn.Module, step: int) -> None:
    """A deterministic optimizer-step stand-in that, like an optimizer, moves trainable tensors."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for i, p in enumerate(trainable):
        p.add_(torch.sin(torch.arange(p.numel(), dtype=p.dtype) + step + i).view(p.shape) * 0.1)


def averagers(fast: Collection[str]) -> Any:
    """Parametrize over the registry; averagers not in ``fast`` run only with ``-m slow``."""
    from tests.conformance.registry import AVERAGERS

    params = [
        pytest.param(c, id=c.name, marks=() if c.name in fast else pytest.mark.slow)
        for c in AVERAGERS
    ]
    return pytest.mark.parametrize("case", params)
