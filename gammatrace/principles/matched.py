"""γ at matched training loss: compare cells where their losses are equal, not at equal epochs.

With θ* = θ_T the gap-weighted average of γ_k is 1 / (2 Σ_k η_k (ℓ_k − ℓ*_k)), a function
of the losses alone (DESIGN §1), so "larger γ ⇔ faster convergence" holds by construction
for it. Comparing cells at the same *level of the full training loss* removes what the
loss curve already says: a difference in γ that survives at matched loss is the part of
a claim the loss curve does not contain. No paper shows this; the report does.

- :func:`step_loss`: each step's full training loss, interpolated (linearly in log) between
  the full losses measured after consecutive epochs (steps of the first epoch have no
  measurement before them: NaN);
- :func:`matched_levels`: 10 log-spaced levels over the loss range every run reaches
  (bins between log-spaced edges; a level is its bin's geometric centre);
- :func:`gamma_at_levels`: a run's median γ_k over the steps in each level's bin;
- :func:`matched_gamma`: one number per run (the median over the levels of those
  medians), the statistic the claim test takes at matched loss.

Example:
    >>> import numpy as np
    >>> epochs = np.repeat([0, 1, 2], 4)
    >>> loss = step_loss(epochs, [2.0, 1.0, 0.25])
    >>> loss[4:].round(3).tolist()
    [2.0, 1.682, 1.414, 1.189, 1.0, 0.707, 0.5, 0.354]
    >>> edges, levels = matched_levels([(0.25, 2.0), (0.5, 1.5)], n=2)
    >>> edges.round(3).tolist(), levels.round(3).tolist()
    ([0.5, 0.866, 1.5], [0.658, 1.14])
    >>> gamma_at_levels(loss, np.arange(12.0), edges).tolist()  # steps 9, 10 and 6, 7, 8
    [9.5, 7.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

N_LEVELS = 10  # log-spaced levels of the full training loss


def step_loss(step_epochs: Any, epoch_losses: Sequence[float]) -> np.ndarray:
    """Each step's full training loss, interpolated between epoch measurements.

    ``step_epochs``: the epoch of each step, in step order (0-based; the steps of one
    epoch are contiguous). ``epoch_losses[e]``: the full training loss measured after
    epoch e. Step j of the n_e steps of epoch e ≥ 1 starts at the fraction j / n_e of
    the way from the loss after epoch e − 1 to the loss after epoch e, interpolated
    linearly in log(loss) (losses fall roughly geometrically). Epoch 0 has no
    measurement before it, and a non-positive or missing loss none at all: NaN.

    Example:
        >>> step_loss([0, 0, 1, 1], [1.0, 0.25]).tolist()
        [nan, nan, 1.0, 0.5]
    """
    epochs = np.asarray(step_epochs, dtype=np.int64)
    losses = np.asarray(epoch_losses, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(losses > 0, np.log(np.where(losses > 0, losses, 1.0)), np.nan)
    out = np.full(len(epochs), np.nan)
    if not len(epochs):
        return out
    starts = np.flatnonzero(np.r_[True, epochs[1:] != epochs[:-1]])
    ends = np.r_[starts[1:], len(epochs)]
    for start, end in zip(starts, ends, strict=True):
        e = int(epochs[start])
        if e < 1 or e >= len(logs):
            continue
        t = np.arange(end - start) / (end - start)
        out[start:end] = np.exp((1.0 - t) * logs[e - 1] + t * logs[e])
    return out


def matched_levels(ranges: Sequence[tuple[float, float]], n: int = N_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """(edges, levels) of ``n`` log-spaced levels over the range every run reaches.

    ``ranges``: each run's (lowest, highest) interpolated loss. The common range is
    [max of the lows, min of the highs]; its ``n + 1`` log-spaced edges bound the
    levels' bins, and each level is its bin's geometric centre. Empty arrays when the
    runs share no range (one run never got as low as another started).

    Example:
        >>> edges, levels = matched_levels([(0.1, 2.0), (0.2, 1.0)], n=1)
        >>> edges.round(3).tolist(), levels.round(3).tolist()
        ([0.2, 1.0], [0.447])
        >>> matched_levels([(0.1, 0.2), (0.5, 1.0)])[0].size
        0
    """
    finite = [(lo, hi) for lo, hi in ranges if math.isfinite(lo) and math.isfinite(hi) and lo > 0]
    if not finite or len(finite) < len(ranges):
        return np.empty(0), np.empty(0)
    lo = max(r[0] for r in finite)
    hi = min(r[1] for r in finite)
    if not lo < hi:
        return np.empty(0), np.empty(0)
    edges = np.geomspace(lo, hi, n + 1)
    return edges, np.sqrt(edges[:-1] * edges[1:])


def gamma_at_levels(loss: Any, gamma: Any, edges: Any) -> np.ndarray:
    """Median of the defined γ_k over the steps whose interpolated loss lies in each
    level's bin [edge_i, edge_{i+1}) (the last bin closed); NaN for a bin without one.

    Example:
        >>> gamma_at_levels([2.0, 1.5, 1.0, 0.5], [1.0, 3.0, 5.0, float("nan")], [0.5, 1.0, 2.0]).tolist()
        [nan, 3.0]
    """
    loss = np.asarray(loss, dtype=np.float64)
    gamma = np.asarray(gamma, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    out = np.full(max(len(edges) - 1, 0), np.nan)
    for i in range(len(out)):
        upper = loss <= edges[i + 1] if i == len(out) - 1 else loss < edges[i + 1]
        g = gamma[(loss >= edges[i]) & upper & np.isfinite(gamma)]
        if len(g):
            out[i] = float(np.median(g))
    return out


def matched_gamma(per_level: Any) -> float:
    """A run's γ at matched loss: the median over the levels of its per-level medians
    (NaN when no level has a step).

    Example:
        >>> matched_gamma([0.2, float("nan"), 0.4, 0.3])
        0.3
    """
    values = np.asarray(per_level, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else math.nan
