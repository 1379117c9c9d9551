"""What a run asks of a dataset: its own targets (``task: labels``, the default), or
``task: reconstruct`` — regression of the clean image from the image plus optional
Gaussian noise. Any image dataset (``digits``, ``mnist``, ``cifar10``, ``cifar100``, …)
becomes an image-to-image problem for the U-Net this way, the data section naming the
real images: ``{name: cifar10, data_dir: /cifar, task: reconstruct, noise_std: 0.1}``.

The papers train their U-Net on CIFAR-10/100 and say only "MSE loss"; reconstruction of
the image is the reading that needs nothing the papers do not give (and with
``noise_std`` 0 the loss's infimum is 0, as the regularity principle's
over-parameterized setting assumes).

The noise is drawn once, for the whole split, from its own ``torch.Generator`` seeded by
:func:`~gammatrace.data.loader.stream_seed` of (``noise_seed``, split, a stream of its own):
never the global RNG, train and test from different streams, and fixed per sample — the
same in every epoch, and a sample's noise does not depend on ``n_train`` / ``n_test``
(the task is applied before those keep the first samples). Unclipped: the input may leave
[0, 1]. The labels are dropped: the dataset is a regression with ``num_classes`` = the
image's channels (the U-Net's output channels).

Example:
    >>> from gammatrace.data import load_dataset
    >>> ds = load_dataset("digits", task="reconstruct", noise_std=0.1, n_train=100)
    >>> ds.task, tuple(ds.x_train.shape), tuple(ds.y_train.shape), ds.num_classes
    ('regression', (100, 1, 8, 8), (100, 1, 8, 8), 1)
    >>> clean = load_dataset("digits", n_train=100).x_train
    >>> torch.equal(ds.y_train, clean), round(float((ds.x_train - clean).std()), 1)
    (True, 0.1)
    >>> load_dataset("digits", noise_std=0.1)
    Traceback (most recent call last):
    ...
    gammatrace.data.base.DataError: digits: noise_std applies with task: reconstruct, not with task: labels (the dataset's own targets)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gammatrace.data.base import DataError, Dataset
from gammatrace.data.loader import stream_seed
from gammatrace.registry import Registry, UnknownNameError

# The data-section options handled here (before the dataset keeps its first n_train samples).
TASK_OPTIONS = ("task", "noise_std", "noise_seed")
DEFAULT_TASK = "labels"
# Its own stream (the "epoch" slot of stream_seed carries the split): distinct from the
# synthetic datasets' noise, so a reconstruction of synthetic images gets fresh noise.
_NOISE_STREAM = 0x5EED_2EC0
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class Task:
    """One way of posing a dataset: ``pose(ds, noise_std, noise_seed) -> Dataset``;
    ``noisy``: whether it takes the noise options."""

    pose: Callable[[Dataset, float, int], Dataset]
    noisy: bool
    doc: str

    def __call__(self, ds: Dataset, noise_std: float, noise_seed: int) -> Dataset:
        return self.pose(ds, noise_std, noise_seed)


TASKS: Registry[Task] = Registry("data task")


def _labels(ds: Dataset, noise_std: float, noise_seed: int) -> Dataset:
    return ds


def split_noise(shape: tuple[int, ...], noise_std: float, noise_seed: int, split: str,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The noise added to one split's inputs: N(0, noise_std²) per value, a pure function
    of the arguments (its own generator; train and test from different streams).

    Example:
        >>> a = split_noise((2, 1, 4, 4), 0.5, noise_seed=3, split="train")
        >>> torch.equal(a, split_noise((2, 1, 4, 4), 0.5, noise_seed=3, split="train"))
        True
        >>> torch.equal(a, split_noise((2, 1, 4, 4), 0.5, noise_seed=3, split="test"))
        False
    """
    g = torch.Generator().manual_seed(stream_seed(noise_seed, _SPLITS.index(split), _NOISE_STREAM))
    return noise_std * torch.randn(shape, generator=g, dtype=dtype)


def reconstruct(ds: Dataset, noise_std: float = 0.0, noise_seed: int = 0) -> Dataset:
    """``ds`` as image reconstruction: target the clean input, input the input plus
    Gaussian noise of std ``noise_std`` (:func:`split_noise`; none when 0, the input is
    then the target itself, one tensor).

    Example:
        >>> from gammatrace.data import load_dataset
        >>> ds = reconstruct(load_dataset("digits", n_train=10, n_test=5))
        >>> ds.name, ds.task, ds.num_classes, ds.x_train is ds.y_train
        ('digits-reconstruct', 'regression', 1, True)
    """
    if ds.x_train.ndim < 3 or not ds.x_train.is_floating_point():
        raise DataError(f"{ds.name}: task reconstruct needs float images (N, C, L) or (N, C, H, W); "
                        f"its inputs are {ds.x_train.dtype} of per-sample shape {ds.input_shape}")
    noisy = []
    for split, clean in zip(_SPLITS, (ds.x_train, ds.x_test), strict=True):
        noisy.append(clean + split_noise(tuple(clean.shape), noise_std, noise_seed, split, clean.dtype)
                     if noise_std > 0 else clean)
    return dataclasses.replace(ds, name=f"{ds.name}-reconstruct", x_train=noisy[0], y_train=ds.x_train,
                               x_test=noisy[1], y_test=ds.x_test, task="regression",
                               num_classes=int(ds.x_train.shape[1]))


TASKS.register("labels")(Task(_labels, noisy=False, doc="the dataset's own targets"))
TASKS.register("reconstruct")(Task(reconstruct, noisy=True, doc="the clean image from the (noised) image"))


def apply_task(ds: Dataset, task: Any = None, noise_std: Any = None, noise_seed: Any = None) -> Dataset:
    """Pose ``ds`` as ``task`` (None: ``labels``, the dataset unchanged), validating the
    options with one-line errors.

    Example:
        >>> from gammatrace.data import load_dataset
        >>> apply_task(load_dataset("digits"), "reconstruct").task
        'regression'
        >>> apply_task(load_dataset("digits"), "reconstruct", noise_std=-1)
        Traceback (most recent call last):
        ...
        gammatrace.data.base.DataError: digits: noise_std must be a finite number >= 0, got -1
    """
    name = DEFAULT_TASK if task is None else task
    try:
        spec: Task = TASKS.get(name)
    except UnknownNameError as e:
        raise DataError(f"{ds.name}: task: {e}") from None
    given = [k for k, v in (("noise_std", noise_std), ("noise_seed", noise_seed)) if v is not None]
    if given and not spec.noisy:
        raise DataError(f"{ds.name}: {' and '.join(given)} applies with task: reconstruct, not with "
                        f"task: {name} ({spec.doc})")
    std = 0.0 if noise_std is None else noise_std
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise DataError(f"{ds.name}: noise_std must be a finite number >= 0, got {noise_std!r:.60}")
    seed = 0 if noise_seed is None else noise_seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise DataError(f"{ds.name}: noise_seed must be an integer in 0..2**63-1, got {noise_seed!r:.60}")
    return spec(ds, float(std), seed)
