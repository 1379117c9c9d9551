"""Build a dataset by name and apply the options every dataset shares (subset of classes,
the task, subset of samples, then the transforms).

Example:
    >>> ds = load_dataset("digits", n_train=100, classes=[0, 1])
    >>> ds.num_classes, ds.n_train <= 100
    (2, True)
    >>> load_dataset("digits", n_train=100, task="reconstruct").task
    'regression'
"""

from __future__ import annotations

import torch

from gammatrace.data.base import DATASETS, DataError, Dataset
from gammatrace.data.tasks import TASK_OPTIONS, apply_task
from gammatrace.data.transforms import SHAPE_OPTIONS, apply_options


def _take(x: torch.Tensor, y: torch.Tensor, n: int | None, what: str) -> tuple:
    if n is None:
        return x, y
    if n <= 0 or n > len(x):
        raise DataError(f"{what}={n} is out of range: the split has {len(x)} samples")
    return x[:n], y[:n]


def _keep_classes(x: torch.Tensor, y: torch.Tensor, classes: list[int]) -> tuple:
    mask = torch.zeros_like(y, dtype=torch.bool)
    for c in classes:
        mask |= y == c
    x, y = x[mask], y[mask]
    # relabel to 0..len(classes)-1 so the head has exactly len(classes) outputs
    remap = torch.full((int(y.max()) + 1 if len(y) else 1,), -1, dtype=torch.long)
    for new, c in enumerate(classes):
        if c < len(remap):
            remap[c] = new
    return x, remap[y]


def load_dataset(
    name: str,
    n_train: int | None = None,
    n_test: int | None = None,
    classes: list[int] | None = None,
    **options,
) -> Dataset:
    """Build dataset ``name`` and apply the options every dataset shares.

    ``n_train``/``n_test`` keep the first samples of each split (the generators and
    the standard files are already shuffled); ``classes`` keeps a subset of classes
    and relabels them 0..len(classes)-1; ``task``/``noise_std``/``noise_seed`` (see
    :func:`gammatrace.data.tasks.apply_task`) pose the problem after ``classes`` and
    before ``n_train``/``n_test``, so a sample's noise does not depend on how many are
    kept; ``downscale``/``normalize`` (see :func:`gammatrace.data.transforms.apply_options`)
    apply last, so normalization statistics describe the training subset actually used.
    Other keyword options go to the dataset.
    """
    task = {k: options.pop(k) for k in TASK_OPTIONS if k in options}
    transforms = {k: options.pop(k) for k in SHAPE_OPTIONS if k in options}
    ds: Dataset = DATASETS.get(name)(**options)
    if classes is not None:
        if ds.task != "classification":
            raise DataError(f"'classes' applies to classification datasets; {name} is {ds.task}")
        bad = [c for c in classes if not 0 <= c < ds.num_classes]
        if bad or len(set(classes)) != len(classes):
            raise DataError(f"classes={classes} must be distinct labels in 0..{ds.num_classes - 1}")
        ds.x_train, ds.y_train = _keep_classes(ds.x_train, ds.y_train, classes)
        ds.x_test, ds.y_test = _keep_classes(ds.x_test, ds.y_test, classes)
        ds.num_classes = len(classes)
    ds = apply_task(ds, **task)
    ds.x_train, ds.y_train = _take(ds.x_train, ds.y_train, n_train, "n_train")
    ds.x_test, ds.y_test = _take(ds.x_test, ds.y_test, n_test, "n_test")
    ds = apply_options(ds, **transforms)
    ds.x_train, ds.x_test = ds.x_train.contiguous(), ds.x_test.contiguous()
    return ds
