"""The gradient-norm series ‖g_k‖ and the epoch where gradients collapse.

Paper 002 (§4, batch norm on CIFAR-10) reports that "vanishing gradient occurs after
around 25 epochs in the trainings of resnets without any BN layer" and plots those curves
only "up to the epoch when gradient vanishes". The probe records ‖g_k‖² of the raw
mini-batch gradient at every step (``grad_sq``, both passes), so the series is exact;
this module summarises it per epoch and finds the collapse.

A **collapse** is an epoch whose median ‖g_k‖ has fallen to ``ratio`` (default 10⁻³) of
the largest epoch median so far *while the loss is still high*: its mean mini-batch loss
is at least ``loss_fraction`` (default 10%) of the first epoch's. The loss condition is
what tells a vanishing gradient from convergence, where gradients shrink too — but with
the loss (for cross-entropy ‖g‖ falls roughly like the loss itself, so a 1000-fold drop of
‖g‖ at a loss still at 10% of its start is not convergence). Both thresholds are ours:
the paper gives none.

Example:
    >>> import pandas as pd
    >>> steps = pd.DataFrame({"step": range(6), "epoch": [0, 0, 1, 1, 2, 2],
    ...                       "loss": [2.3, 2.2, 2.0, 2.0, 2.0, 2.0],
    ...                       "grad_sq": [4.0, 1.0, 1e-4, 1e-4, 1e-8, 1e-8]})
    >>> grad_norm_per_epoch(steps)["median"].tolist()
    [1.5, 0.01, 0.0001]
    >>> gradient_collapse(steps)   # epoch 2: median 1e-4 ≤ 1e-3 × 1.5 with the loss at 87% of epoch 0's
    2
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from gammatrace.principles._util import check_sorted, col

COLLAPSE_RATIO = 1e-3
COLLAPSE_LOSS_FRACTION = 0.1


def grad_norm_per_epoch(df: pd.DataFrame) -> pd.DataFrame:
    """Per epoch: ``median``, ``min``, ``max``, ``q25``, ``q75`` of ‖g_k‖ = √grad_sq over its
    steps with a finite value, and ``n_steps``; indexed by epoch. A table without
    ``grad_sq`` (a mode that did not record it) gives NaN statistics.

    Example:
        >>> import pandas as pd
        >>> t = grad_norm_per_epoch(pd.DataFrame({"step": [0, 1, 2], "epoch": [0, 0, 1], "grad_sq": [9.0, 1.0, 4.0]}))
        >>> t[["median", "min", "max", "n_steps"]].values.tolist()
        [[2.0, 1.0, 3.0, 2.0], [2.0, 2.0, 2.0, 1.0]]
    """
    check_sorted(df)
    norm = np.sqrt(col(df, "grad_sq"))
    frame = pd.DataFrame({"epoch": col(df, "epoch").astype(np.int64) if len(df) else np.empty(0, np.int64),
                          "norm": np.where(np.isfinite(norm), norm, np.nan)})
    grouped = frame.groupby("epoch")["norm"]
    out = pd.DataFrame({"median": grouped.median(), "min": grouped.min(), "max": grouped.max(),
                        "q25": grouped.quantile(0.25), "q75": grouped.quantile(0.75),
                        "n_steps": grouped.size().astype(float)})
    out.index.name = "epoch"
    return out


def gradient_collapse(df: pd.DataFrame, ratio: float = COLLAPSE_RATIO,
                      loss_fraction: float = COLLAPSE_LOSS_FRACTION) -> int | None:
    """The first epoch where the gradients collapsed (see the module), or None.

    Example:
        >>> import pandas as pd
        >>> converged = pd.DataFrame({"step": range(3), "epoch": [0, 1, 2], "loss": [2.0, 0.1, 1e-4],
        ...                           "grad_sq": [1.0, 1e-2, 1e-8]})
        >>> print(gradient_collapse(converged))   # ‖g‖ fell 10⁴-fold, but so did the loss
        None
    """
    if not 0 < ratio < 1 or not 0 <= loss_fraction < 1:
        raise ValueError(f"need 0 < ratio < 1 and 0 <= loss_fraction < 1, got {ratio}, {loss_fraction}")
    norms = grad_norm_per_epoch(df)["median"]
    if not len(norms):
        return None
    loss = pd.Series(col(df, "loss")).groupby(col(df, "epoch")).mean()
    first_loss = float(loss.iloc[0])
    peak = -math.inf
    for epoch, value in norms.items():
        if not math.isfinite(value):
            continue
        if peak > 0 and value <= ratio * peak and float(loss.loc[epoch]) >= loss_fraction * first_loss:
            return int(epoch)
        peak = max(peak, value)
    return None
