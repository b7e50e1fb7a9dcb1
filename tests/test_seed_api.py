"""The seed article's API works as written and gives the article's numbers, without its defects."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from emaweights import EMA, SwapError
from tests._models import mlp, train_step


class ArticleEMA:
    """A literal port of the seed article's class: the oracle for its numbers."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = model
        self.decay = decay
        self.shadow: dict[str, Any] = {}
        self.backup: dict[str, Any] = {}

    def register(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                self.shadow[name] = param.data.clone()

    def update(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                assert name in self.shadow
                new_average = (1.0 - self.decay) * param.data + self.decay * self.shadow[name]
                self.shadow[name] = new_average.clone()

    def apply_shadow(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                assert name in self.shadow
                self.backup[name] = param.data
                param.data = self.shadow[name]

    def restore(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                assert name in self.backup
                param.data = self.backup[name]
        self.backup = {}


def test_seed_usage_gives_article_numbers() -> None:
    """The article's usage, verbatim, gives the article class's shadow and eval outputs."""
    model = mlp()
    ema = EMA(model, 0.999)
    ema.register()
    article = ArticleEMA(model, 0.999)
    article.register()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for i in range(25):
        train_step(model, opt, seed=i)
        ema.update()
        article.update()
    for name, value in article.shadow.items():
        torch.testing.assert_close(ema.shadow[name], value, rtol=1e-6, atol=1e-7)
    x = torch.randn(4, 6)
    live_out = model(x)
    article.apply_shadow()
    expected = model(x)
    article.restore()
    ema.apply_shadow()
    got = model(x)
    ema.restore()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(x), live_out, rtol=0, atol=0)


def test_double_apply_shadow_keeps_live_weights() -> None:
    """Where the article loses the live weights on a second apply_shadow, ours refuses."""
    model = mlp()
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = EMA(model, 0.5)
    train_step(model, opt, seed=0)
    ema.update()
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.apply_shadow()
    with pytest.raises(SwapError, match=r"apply_shadow\(\) called while"):
        ema.apply_shadow()
    ema.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])

    article = ArticleEMA(model, 0.5)
    article.register()
    train_step(model, opt, seed=1)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    article.update()
    article.apply_shadow()
    article.apply_shadow()  # the article's defect: the backup now holds the shadow
    article.restore()
    lost = any(not torch.equal(p, live[n]) for n, p in model.named_parameters())
    assert lost


def test_article_bf16_shadow_loses_updates() -> None:
    """The article's bf16 shadow drifts from the true average; ours (fp32) tracks it."""
    model = mlp(torch.bfloat16)
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ours, article = EMA(model, 0.999), ArticleEMA(model, 0.999)
    article.register()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for i in range(40):
        train_step(model, opt, seed=i)
        ours.update()
        article.update()
        for n, p in model.named_parameters():
            ref[n] = 0.999 * ref[n] + 0.001 * p.detach().double()
    err_ours = max((ours.shadow[n].double() - r).abs().max().item() for n, r in ref.items())
    err_article = max((article.shadow[n].double() - r).abs().max().item() for n, r in ref.items())
    assert err_ours < 1e-5
    assert err_article > 100 * err_ours
