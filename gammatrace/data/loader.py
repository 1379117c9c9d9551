"""Deterministic, stateless data order.

The order of epoch ``e`` is a pure function of ``(seed, e)``: a run resumed at any
epoch, or a replay segment started on another worker, sees exactly the same batches
without carrying sampler state. Sampling is without replacement, reshuffled every
epoch (DESIGN.md §1).

Example:
    >>> from gammatrace.data.loader import epoch_permutation
    >>> epoch_permutation(5, seed=0, epoch=1).tolist() == epoch_permutation(5, seed=0, epoch=1).tolist()
    True
    >>> sorted(epoch_permutation(5, seed=0, epoch=1).tolist())
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

import torch

# Distinct streams for data order and for per-epoch global RNG seeding, so changing
# one use never shifts the other.
_ORDER_STREAM = 0x5EED_0D0E
_EPOCH_STREAM = 0x5EED_E90C


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed from (seed, epoch, stream) via splitmix64; stateless and portable.

    Example:
        >>> stream_seed(1, 0, 0)
        7070836379803831727
    """
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + stream) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**63 - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch (CPU int64 tensor).

    Example:
        >>> epoch_permutation(5, seed=0, epoch=0).tolist(), epoch_permutation(5, seed=0, epoch=1).tolist()
        ([1, 2, 0, 4, 3], [4, 3, 0, 1, 2])
    """
    g = torch.Generator().manual_seed(stream_seed(seed, epoch, _ORDER_STREAM))
    return torch.randperm(n, generator=g)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False) -> list[torch.Tensor]:
    """Index tensors of the mini-batches of one epoch: :func:`epoch_permutation` cut into
    ``batch_size`` pieces, the last one short unless ``drop_last``.

    Example:
        >>> [b.tolist() for b in epoch_batches(5, 2, seed=0, epoch=0)]
        [[1, 2], [0, 4], [3]]
        >>> [b.tolist() for b in epoch_batches(5, 2, seed=0, epoch=0, drop_last=True)]
        [[1, 2], [0, 4]]
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    perm = epoch_permutation(n, seed, epoch)
    batches = list(perm.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def seed_epoch_rng(seed: int, epoch: int) -> None:
    """Reseed the global torch RNG (dropout, random init of lazily built parts) for epoch e.

    Reseeding statelessly at every epoch boundary makes epoch e's randomness independent
    of how the process got there (fresh, resumed, or a replay worker).

    Example:
        >>> state = torch.get_rng_state()
        >>> seed_epoch_rng(0, 3); a = torch.rand(2)
        >>> seed_epoch_rng(0, 3); torch.equal(a, torch.rand(2))
        True
        >>> torch.set_rng_state(state)
    """
    torch.manual_seed(stream_seed(seed, epoch, _EPOCH_STREAM))
