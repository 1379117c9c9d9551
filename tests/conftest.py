"""Shared fixtures: tiny configs that train in about a second on one CPU thread."""

from __future__ import annotations

import os

import pytest
import torch

# Tests use their own dataset cache so they never depend on (or pollute) the user's.
os.environ.setdefault("GAMMATRACE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache-tests"))
torch.set_num_threads(1)


def tiny_config(**overrides) -> dict:
    """A run that takes ~1 s: digits, 96 samples, batch 32, MLP 8x2, 2 epochs."""
    from gammatrace.config import deep_merge

    base = {
        "name": "tiny", "seed": 3, "epochs": 2, "batch_size": 32,
        "data": {"name": "digits", "n_train": 96, "n_test": 64},
        "model": {"name": "mlp", "width": 8, "depth": 2},
        "optim": {"name": "sgd", "lr": 0.2},
    }
    return deep_merge(base, overrides)


@pytest.fixture
def tiny():
    return tiny_config
