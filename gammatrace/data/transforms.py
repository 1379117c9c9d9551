"""Deterministic whole-dataset transforms every dataset accepts: ``downscale`` and
``normalize`` (and the task options of :mod:`gammatrace.data.tasks`, applied first). They
run once on the in-memory tensors, so they cost nothing per step and cannot perturb the
trajectory's randomness.

Targets that are images of the same shape as the inputs (denoising) get the same
transform, so "target = clean version of the input" still holds afterwards.

Example:
    >>> from gammatrace.data import apply_options, load_dataset
    >>> ds = apply_options(load_dataset("digits"), downscale=2, normalize="standard")
    >>> tuple(ds.x_train.shape[1:]), round(float(ds.x_train.mean()), 4)
    ((1, 4, 4), 0.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from gammatrace.data.base import DataError, Dataset
from gammatrace.data.tasks import TASK_OPTIONS
from gammatrace.registry import Registry, UnknownNameError

# The options applied last (after n_train / n_test), by apply_options.
SHAPE_OPTIONS = ("downscale", "normalize")
# Every option a dataset accepts besides its own (handled by load_dataset rather than by
# the dataset factories): the task's first, then these.
TRANSFORM_OPTIONS = TASK_OPTIONS + SHAPE_OPTIONS


def _image_like_target(ds: Dataset) -> bool:
    return ds.task == "regression" and ds.y_train.shape[1:] == ds.x_train.shape[1:]


def _map_inputs(ds: Dataset, fn: Callable[[torch.Tensor], torch.Tensor]) -> Dataset:
    """Apply ``fn`` to both splits' inputs and, for image-shaped targets, to the targets."""
    ys = (fn(ds.y_train), fn(ds.y_test)) if _image_like_target(ds) else (ds.y_train, ds.y_test)
    return dataclasses.replace(ds, x_train=fn(ds.x_train), x_test=fn(ds.x_test),
                               y_train=ys[0], y_test=ys[1])


# --------------------------------------------------------------------------- downscale

_POOLS = {1: (F.avg_pool1d, F.adaptive_avg_pool1d), 2: (F.avg_pool2d, F.adaptive_avg_pool2d)}


def downscale_dataset(ds: Dataset, spec: int | Sequence[int]) -> Dataset:
    """Average-pool the spatial dims: ``spec`` an integer factor, or the target size.

    A factor must divide every spatial dim (each output pixel is the mean of one
    factor×factor block). A target size (one int per spatial dim) uses adaptive average
    pooling, which equals block averaging whenever the size divides evenly.

    Example:
        >>> from gammatrace.data import load_dataset
        >>> tuple(downscale_dataset(load_dataset("digits"), [2, 2]).x_train.shape[1:])
        (1, 2, 2)
    """
    spatial = tuple(ds.x_train.shape[2:])
    if len(spatial) not in _POOLS:
        raise DataError(f"downscale applies to (N, C, L) or (N, C, H, W) inputs; {ds.name} has "
                        f"per-sample shape {ds.input_shape}")
    pool, adaptive = _POOLS[len(spatial)]
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1 or any(s % spec for s in spatial):
            raise DataError(f"downscale={spec} must be a positive factor dividing the input size "
                            f"{list(spatial)}; or give a target size such as downscale={[s // 2 for s in spatial]}")
        return _map_inputs(ds, lambda t: pool(t, spec)) if spec > 1 else ds
    size = tuple(spec) if isinstance(spec, Sequence) and not isinstance(spec, str) else None
    if (size is None or len(size) != len(spatial)
            or not all(isinstance(s, int) and 0 < s <= full for s, full in zip(size, spatial, strict=True))):
        raise DataError(f"downscale={spec!r} must be an integer factor or a target size of "
                        f"{len(spatial)} positive ints no larger than the input size {list(spatial)}")
    return _map_inputs(ds, lambda t: adaptive(t, size))


# --------------------------------------------------------------------------- normalize

NORMALIZERS: Registry[Callable[[Dataset], Dataset]] = Registry("normalization")


@NORMALIZERS.register("none")
def _no_normalization(ds: Dataset) -> Dataset:
    return ds


@NORMALIZERS.register("standard")
def _standardize(ds: Dataset) -> Dataset:
    # Statistics come from the train split only (the test split must not leak into the
    # preprocessing), then one per-channel affine map is applied to both splits.
    dims = [0] + list(range(2, ds.x_train.ndim))
    x = ds.x_train.double()
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # a constant channel stays finite
    mean, std = mean[:1].to(ds.x_train.dtype), std[:1].to(ds.x_train.dtype)
    return _map_inputs(ds, lambda t: (t - mean) / std)


def normalize_dataset(ds: Dataset, kind: str = "standard") -> Dataset:
    """Normalize inputs by name: "none", or "standard" (per-channel train mean 0, std 1).

    Example:
        >>> from gammatrace.data import load_dataset
        >>> ds = normalize_dataset(load_dataset("digits"), "standard")
        >>> round(float(ds.x_train.std(unbiased=False)), 3)
        1.0
    """
    try:
        fn = NORMALIZERS.get(kind)
    except UnknownNameError as e:
        raise DataError(f"normalize: {e}") from None
    return fn(ds)


def apply_options(ds: Dataset, downscale: int | Sequence[int] | None = None,
                  normalize: str | None = None) -> Dataset:
    """Apply the shared transform options: first ``downscale``, then ``normalize`` (so the
    statistics describe what the model sees). ``None`` leaves the dataset untouched.

    Example:
        >>> from gammatrace.data import load_dataset
        >>> ds = apply_options(load_dataset("digits"), downscale=2)
        >>> ds.input_shape
        (1, 4, 4)
    """
    if downscale is not None:
        ds = downscale_dataset(ds, downscale)
    if normalize is not None:
        ds = normalize_dataset(ds, normalize)
    return ds

