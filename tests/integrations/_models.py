"""Tiny Hugging Face models built from configs (no download)."""

from __future__ import annotations

from typing import Any

import torch


def tiny_bert(seed: int = 0) -> Any:
    """A 1-layer BERT classifier built from a config, without dropout (deterministic)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)
