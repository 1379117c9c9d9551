"""Per-sample random augmentation (horizontal flip, padded random crop) whose randomness
is a pure function of (seed, epoch, sample index).

Off by default: the theory assumes the network can interpolate a fixed training set,
and augmentation changes the objective every epoch. When it is on, replay still has
to be bitwise (DESIGN.md §2), so the draws come from a counter-based hash of the
sample's dataset index — not from the global RNG and not from a generator advanced
through the batch — and a sample is augmented identically whatever batch it is in,
in whatever order, on whichever worker.

Example:
    >>> import torch
    >>> x = torch.rand(4, 3, 8, 8)
    >>> out = augment_batch(x, torch.tensor([10, 11, 12, 13]), seed=0, epoch=3)
    >>> out.shape == x.shape
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from gammatrace.data.base import DataError
from gammatrace.data.loader import stream_seed
from gammatrace.registry import Registry

_AUGMENT_STREAM = 0x5EED_A06E
_GOLDEN = 0x9E3779B97F4A7C15
# Fixed draw numbers: switching flips off must not change the crops a sample gets.
_DRAW_FLIP, _DRAW_ROW, _DRAW_COL = 0, 1, 2


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (numpy uint64 arrays wrap mod 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _uniform_ints(indices: np.ndarray, seed: int, epoch: int, draw: int, high: int) -> torch.Tensor:
    """Draw ``draw`` of each sample: an int in [0, high), a pure function of its arguments."""
    key = np.uint64(stream_seed(seed, epoch, _AUGMENT_STREAM))
    per_sample = _mix64(key + (indices + np.uint64(1)) * np.uint64(_GOLDEN))
    # The per-draw offset is reduced in Python: numpy warns on uint64 *scalar* overflow.
    bits = _mix64(per_sample + np.uint64((draw + 1) * _GOLDEN % 2**64)) >> np.uint64(11)  # 53 bits
    return torch.from_numpy((bits % np.uint64(high)).astype(np.int64))


def _as_indices(indices: torch.Tensor | Sequence[int]) -> np.ndarray:
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
    if idx.ndim != 1 or (idx < 0).any():
        raise DataError(f"augment: indices must be a 1-D list of non-negative dataset indices, "
                        f"got shape {idx.shape}")
    return idx.astype(np.uint64)


def augment_params(indices: torch.Tensor | Sequence[int], seed: int, epoch: int,
                   crop_pad: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's (flip, row offset, col offset) for this epoch, offsets in [0, 2·crop_pad].

    Example:
        >>> flip, dy, dx = augment_params([0, 1, 2], seed=0, epoch=0, crop_pad=4)
        >>> bool(((dy >= 0) & (dy <= 8)).all()), flip.dtype
        (True, torch.bool)
    """
    idx = _as_indices(indices)
    span = 2 * crop_pad + 1
    return (_uniform_ints(idx, seed, epoch, _DRAW_FLIP, 2).bool(),
            _uniform_ints(idx, seed, epoch, _DRAW_ROW, span),
            _uniform_ints(idx, seed, epoch, _DRAW_COL, span))


def augment_batch(x: torch.Tensor, indices: torch.Tensor | Sequence[int], seed: int, epoch: int,
                  flip: bool = True, crop_pad: int = 4) -> torch.Tensor:
    """Random horizontal flip and zero-padded random crop of an image batch (N, C, H, W).

    ``indices`` are the samples' positions in the dataset (not in the batch). Sample i's
    output is ``pad(x_i)[:, dy:dy+H, dx:dx+W]``, mirrored left-right if its flip bit is
    set, with (flip, dy, dx) from :func:`augment_params`. The global RNG is not used.

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> a = augment_batch(x, [7], seed=1, epoch=0, crop_pad=1)
        >>> torch.equal(a, augment_batch(x, torch.tensor([7]), seed=1, epoch=0, crop_pad=1))
        True
    """
    if x.ndim != 4:
        raise DataError(f"augment: flip/crop apply to image batches (N, C, H, W); got shape {tuple(x.shape)}")
    if crop_pad < 0:
        raise DataError(f"augment: crop_pad must be >= 0, got {crop_pad}")
    if not flip and crop_pad == 0:
        return x
    n, _, h, w = x.shape
    if len(indices) != n:
        raise DataError(f"augment: got {len(indices)} indices for a batch of {n} samples")
    flips, dy, dx = augment_params(indices, seed, epoch, crop_pad)
    if not flip:
        flips = torch.zeros_like(flips)
    if crop_pad == 0:
        dy, dx = torch.zeros_like(dy), torch.zeros_like(dx)
    flips, dy, dx = flips.to(x.device), dy.to(x.device), dx.to(x.device)
    padded = F.pad(x, (crop_pad,) * 4) if crop_pad else x
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = dy[:, None] + ar_h  # (n, h)
    # A flip reads the crop's columns right to left.
    cols = dx[:, None] + torch.where(flips[:, None], ar_w.flip(0), ar_w)  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around a slice put the channel dim last: (n, h, w, c).
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class Augment:
    """A named augmentation setting; calling it augments one batch.

    Example:
        >>> aug = AUGMENTATIONS.get("flip_crop")()
        >>> aug.active, AUGMENTATIONS.get("none")().active
        (True, False)
    """

    flip: bool = False
    crop_pad: int = 0

    @property
    def active(self) -> bool:
        return self.flip or self.crop_pad > 0

    def __call__(self, x: torch.Tensor, indices, seed: int, epoch: int) -> torch.Tensor:
        return augment_batch(x, indices, seed, epoch, flip=self.flip, crop_pad=self.crop_pad)


class AugmentFactory(Protocol):
    """``factory() -> Augment``: a named augmentation setting."""

    def __call__(self) -> Augment: ...


AUGMENTATIONS: Registry[AugmentFactory] = Registry("augmentation")
AUGMENTATIONS.register("none")(lambda: Augment())
AUGMENTATIONS.register("flip")(lambda: Augment(flip=True))
AUGMENTATIONS.register("crop")(lambda crop_pad=4: Augment(crop_pad=crop_pad))
# The standard CIFAR recipe (pad 4, random 32×32 crop, random horizontal flip).
AUGMENTATIONS.register("flip_crop")(lambda crop_pad=4: Augment(flip=True, crop_pad=crop_pad))
