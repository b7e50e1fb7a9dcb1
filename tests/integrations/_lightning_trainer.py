"""A quiet one-CPU Lightning Trainer for the integration tests (import after importorskip)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L


def quiet_trainer(**kwargs: Any) -> Any:
    """``L.Trainer`` on one CPU, deterministic; no logger, bars, checkpoints or sanity steps."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    options.update(kwargs)
    return L.Trainer(**options)
