"""Datasets (embedded generators and local-folder readers) and deterministic loaders.

Every dataset is a registry entry returning an in-memory :class:`Dataset`; nothing is
ever downloaded. Inputs are channels-first float32 tensors ((N, C, L) or (N, C, H, W)).

Example:
    >>> from gammatrace.data import load_dataset
    >>> ds = load_dataset("digits", n_train=100, n_test=50)
    >>> tuple(ds.x_train.shape), ds.num_classes
    ((100, 1, 8, 8), 10)
"""

from __future__ import annotations

from gammatrace.data.augment import AUGMENTATIONS, Augment, augment_batch, augment_params
from gammatrace.data.base import DATASETS, DataError, Dataset
from gammatrace.data.load import load_dataset
from gammatrace.data.loader import epoch_batches, epoch_permutation
from gammatrace.data.tasks import TASK_OPTIONS, TASKS, apply_task
from gammatrace.data.transforms import TRANSFORM_OPTIONS, apply_options

# Importing the modules registers their datasets.
from gammatrace.data import embedded, local, synthetic  # noqa: E402,F401  isort: skip

__all__ = [
    "AUGMENTATIONS", "Augment", "DATASETS", "DataError", "Dataset", "TASKS", "TASK_OPTIONS", "TRANSFORM_OPTIONS",
    "apply_options", "apply_task", "augment_batch", "augment_params", "epoch_batches", "epoch_permutation",
    "load_dataset",
]
