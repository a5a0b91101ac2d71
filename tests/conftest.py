"""Tiny random models and synthetic data shared by the unit tests."""

from __future__ import annotations

import pytest
import torch

from cofi import CofiConfig, CofiForSequenceClassification

VOCAB = 50


def tiny_config(**overrides) -> CofiConfig:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=2,
    )
    settings.update(overrides)
    return CofiConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> CofiForSequenceClassification:
    torch.manual_seed(seed)
    return CofiForSequenceClassification(tiny_config(**overrides))


def synthetic_task(n: int, seed: int) -> list[dict]:
    """A learnable binary task: the label says whether the first token is below VOCAB/2."""
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=generator))
        ids = torch.randint(2, VOCAB, (length,), generator=generator).tolist()
        data.append({"input_ids": ids, "label": int(ids[0] < VOCAB // 2)})
    return data


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def task() -> tuple[list[dict], list[dict]]:
    return synthetic_task(96, seed=1), synthetic_task(48, seed=2)
