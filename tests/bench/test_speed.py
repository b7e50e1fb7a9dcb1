"""Tests of the speed benchmark's model shapes and bookkeeping (no timing)."""

from __future__ import annotations

import math

from emaweights.bench import speed


def test_shapes_match_published_parameter_counts() -> None:
    """ResNet-50 and ViT-B/16 shape lists have the architectures' published parameter counts."""
    resnet, _ = speed.resnet50_shapes()
    vit = speed.vit_b16_shapes()
    assert sum(math.prod(s) for _, s in resnet) == 25_557_032
    assert sum(math.prod(s) for _, s in vit) == 86_567_656


def test_summarize_ratios() -> None:
    """Percent of roofline and speed-ups are ratios of the recorded medians."""
    roof = speed.Case("m", "roofline a.add_(b)", 1200, lambda: None, 1, [1.0])
    ours = speed.Case("m", "ours", 1000, lambda: None, 1, [2.0])
    art = speed.Case("m", "article loop", 1000, lambda: None, 1, [8.0])
    anchor = speed.Case("m", "lib", 1000, lambda: None, 1, [4.0])
    rows = {r["method"]: r for r in speed.summarize([roof, ours, art, anchor])}
    assert math.isclose(rows["ours"]["pct_roofline"], 100 * (1000 / 2.0) / (1200 / 1.0))
    assert math.isclose(rows["ours"]["vs_article"], 4.0)
    assert math.isclose(rows["ours"]["vs_best_anchor"], 2.0)
