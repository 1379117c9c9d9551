"""Shared fixtures: tiny configs that train in about a second on one CPU thread."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

# Tests use their own dataset cache so they never depend on (or pollute) the user's.
os.environ.setdefault("GAMMATRACE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache-tests"))
torch.set_num_threads(1)


def tree_hashes(root, *, links: bool = True) -> dict[str, str]:
    """SHA-256 of every file below ``root`` by relative path (``links=False``: skip symlinks),
    to show a command changed nothing."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and (links or not p.is_symlink())}


def one_error_line(capsys) -> str:
    """The command's stderr: exactly one non-empty line, a gammatrace error."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("gammatrace: error: ")
    return err[0]


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
