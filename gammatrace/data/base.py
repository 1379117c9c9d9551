"""The in-memory dataset type and the dataset registry.

Example:
    >>> import torch
    >>> ds = Dataset("toy", torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(2, 3),
    ...              torch.zeros(2, dtype=torch.long), "classification", 2)
    >>> ds.input_shape, ds.n_train
    ((3,), 4)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gammatrace.errors import UserError
from gammatrace.registry import Registry


class DatasetFactory(Protocol):
    """``factory(**its_own_options) -> Dataset`` (the data section's switches)."""

    def __call__(self, **options: Any) -> Dataset: ...


DATASETS: Registry[DatasetFactory] = Registry("dataset")


class DataError(UserError, ValueError):
    """A dataset could not be built or read (missing folder, bad format, bad option)."""


@dataclass
class Dataset:
    """Train/test tensors in memory plus what a model and a loss need to know.

    ``task`` is ``"classification"`` (integer targets, ``num_classes`` classes) or
    ``"regression"`` (float targets of ``target_shape``; ``num_classes`` is then the
    number of output channels).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])
