"""Filter-normalised random directions (Li et al. 2018, §4): the axes of their main plots.

A Gaussian direction d has the shape of θ. Each *filter* of it — the slice of a tensor
along its first dimension: a conv layer's output channel, a linear layer's output
neuron (row), as in Li et al.'s ``loss-landscape`` tool — is rescaled to the norm of the
same filter of the centre θ*:

    d_{i,j} ← d_{i,j} · ‖θ*_{i,j}‖ / ‖d_{i,j}‖

so a step α·d moves every filter by the fraction α of its own size, whatever the layer's
scale (which batch norm makes arbitrary). Then L(θ* + α·d) and L(θ* + α·d₁ + β·d₂)
compare across networks.

Tensors with one dimension or none (biases, batch-norm and layer-norm scales and shifts)
have no filters; :data:`IGNORE` says what their direction is:

- ``biasbn`` (default): zero, so they stay at θ*. This is what Li et al. use for their
  figures (their tool's ``--xignore biasbn``): a bias or a norm layer's scale is not
  scale-invariant the way a filter before batch norm is, so a filter-sized random step
  on it measures nothing the normalisation was built for — and for a norm layer's γ a
  step of α·|γ| in a random direction can flip signs of whole channels at α = 1.
- ``none``: the direction is θ* itself on those tensors (the tool's behaviour without
  ``--xignore``): each scalar is its own filter, moved by α times its value.

Only θ (the trainable parameters) has directions; buffers (batch-norm running
statistics) are θ*'s at every grid point. The Gaussian draws come from one
``torch.Generator`` seeded explicitly, in float64, tensor by tensor in the model's
parameter order, direction after direction; every tensor draws even when it is
ignored, so the weights' directions do not depend on the ignore rule.

Example: a linear layer's rows get the norms of θ*'s rows; its bias is ignored.

    >>> import numpy as np
    >>> theta = np.array([3.0, 4.0, 0.0, 2.0, 7.0, 7.0])  # weight [[3, 4], [0, 2]], bias [7, 7]
    >>> d = filter_normalized_directions(theta, [(2, 2), (2,)], n=1, seed=0)[0]
    >>> float(np.linalg.norm(d[:2])), float(np.linalg.norm(d[2:4])), d[4:].tolist()
    (5.0, 2.0, [0.0, 0.0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from gammatrace.data.loader import stream_seed
from gammatrace.registry import Registry

# What the direction of a tensor without filters (ndim ≤ 1) is, given its θ* values.
IGNORE: Registry[Callable[[np.ndarray], np.ndarray]] = Registry("rule for biases and norm parameters")
IGNORE.register("biasbn")(lambda w: np.zeros_like(w))
IGNORE.register("none")(lambda w: w.copy())

# Its own stream, so a direction's draws never coincide with the evaluation subset's.
_DIRECTION_STREAM = 0xD1_2EC7


def filter_normalize(direction: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``direction`` with each filter (slice along dimension 0) rescaled to the norm of the
    same filter of ``weights``; a filter of ``direction`` that is all zero stays zero.

    Example:
        >>> filter_normalize(np.array([[1.0, 0.0], [0.0, -2.0]]), np.array([[3.0, 4.0], [1.0, 0.0]])).tolist()
        [[5.0, 0.0], [0.0, -1.0]]
    """
    d = direction.reshape(direction.shape[0], -1)
    w_norm = np.linalg.norm(weights.reshape(weights.shape[0], -1), axis=1)
    d_norm = np.linalg.norm(d, axis=1)
    scale = np.divide(w_norm, d_norm, out=np.zeros_like(d_norm), where=d_norm > 0)
    return (d * scale[:, None]).reshape(direction.shape)


def filter_normalized_directions(center: np.ndarray, shapes: Sequence[tuple[int, ...]], n: int = 2,
                                 seed: int = 0, ignore: str = "biasbn") -> np.ndarray:
    """``n`` filter-normalised Gaussian directions around the flat float64 point ``center``
    whose tensors have ``shapes`` (in order): an (n, d) float64 array (see module doc).

    The same ``seed`` gives the same Gaussian draws for every model of the same shapes;
    each is then scaled to its own θ*'s filters.

    Example:
        >>> a = filter_normalized_directions(np.ones(6), [(2, 3)], n=2, seed=1)
        >>> a.shape, bool((a == filter_normalized_directions(np.ones(6), [(2, 3)], n=2, seed=1)).all())
        ((2, 6), True)
    """
    center = np.asarray(center, dtype=np.float64)
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    if center.shape != (sum(sizes),):
        raise ValueError(f"center has {center.size} values, the shapes {sum(sizes)}")
    rule = IGNORE.get(ignore)
    g = torch.Generator().manual_seed(stream_seed(seed, 0, _DIRECTION_STREAM))
    out = np.empty((n, center.size))
    for k in range(n):
        at = 0
        for shape, size in zip(shapes, sizes, strict=True):
            w = center[at:at + size].reshape(shape)
            draw = torch.randn(shape, generator=g, dtype=torch.float64).numpy()
            d = filter_normalize(draw, w) if len(shape) > 1 else rule(w)
            out[k, at:at + size] = d.reshape(-1)
            at += size
    return out
