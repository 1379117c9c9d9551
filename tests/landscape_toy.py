"""The toy path the checkpoint-file landscape tests share: a module of factories written to a
folder and put on ``sys.path``, and the state_dicts of a plain full-batch SGD loop on its
``net()`` and ``data()`` — what a user's own loop would save."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F


def import_factories(root: Path, name: str, source: str) -> tuple[ModuleType, pytest.MonkeyPatch]:
    """Write ``source`` as ``root/<name>.py``, put ``root`` on sys.path and import it; undo
    the path with the returned MonkeyPatch."""
    (root / f"{name}.py").write_text(source)
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(root))
    return importlib.import_module(name), mp


def sgd_states(mod: ModuleType, lr: float, points: int) -> Iterator[dict[str, torch.Tensor]]:
    """θ_0 … θ_{points−1} (copies of the state_dict) of full-batch SGD with cross entropy."""
    model, (x, y) = mod.net(), mod.data()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(points):
        if step:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        yield {k: v.clone() for k, v in model.state_dict().items()}
