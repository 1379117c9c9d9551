"""Certificates and averaged γ: γ_min, per-epoch statistics, γ_eff(K)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from gammatrace.principles._util import (
    as_float_array,
    check_sorted,
    check_tail,
    col,
    drop_tail,
    resolve_d0_sq,
)
from gammatrace.principles.series import DERIVED_COLUMNS, derive


def certify(gamma: Any, tail: int = 0) -> dict[str, Any]:
    """Certificate statistics of a per-step γ series (γ, γ^RP or γ^RC alike).

    Returns ``gamma_min`` (min over defined steps: the principle holds on the whole
    trajectory with it; NaN if none is defined), ``certified`` (γ_min > 0),
    ``n_steps``, ``n_undefined`` (NaN/inf entries: counted, never silently dropped),
    ``frac_positive`` (among defined), ``median`` and ``mean`` (over defined).
    ``tail`` excludes the last ``tail`` steps, where with θ* = θ_T the loss gap and
    d_k vanish and γ_k is dominated by noise.

    Example:
        >>> from gammatrace.principles import certify
        >>> c = certify([0.5, float("nan"), 0.2, -1.0], tail=1)
        >>> c["gamma_min"], c["n_undefined"], c["certified"]
        (0.2, 1, True)
    """
    tail = check_tail(tail)
    values = as_float_array(gamma)
    values = values[: max(len(values) - tail, 0)]
    defined = values[np.isfinite(values)]
    n_def = len(defined)
    gamma_min = float(defined.min()) if n_def else math.nan
    return {
        "gamma_min": gamma_min,
        "certified": bool(gamma_min > 0),
        "n_steps": len(values),
        "n_undefined": len(values) - n_def,
        "frac_positive": float(np.mean(defined > 0)) if n_def else math.nan,
        "median": float(np.median(defined)) if n_def else math.nan,
        "mean": float(np.mean(defined)) if n_def else math.nan,
    }


def per_epoch(df: pd.DataFrame, column: str = "gamma", tail: int = 0) -> pd.DataFrame:
    """Per-epoch ``min, median, mean, frac_positive, n_undefined, n_steps`` of a column.

    Indexed by epoch (the papers plot per-epoch curves). Non-finite values count as
    undefined. If ``column`` is a derived column the table does not carry yet, it is
    derived with the defaults of :func:`derive` first; a missing raw column gives
    all-undefined epochs rather than an error.

    Example:
        >>> from gammatrace.principles import example_steps, per_epoch
        >>> per_epoch(example_steps(), "gamma")[["min", "n_steps"]].round(3)
                 min  n_steps
        epoch
        0     -1.806        2
        1      9.184        2
    """
    check_sorted(df)
    if column not in df.columns and column in DERIVED_COLUMNS:
        df = derive(df)
    df = drop_tail(df, tail)
    values = col(df, column)
    defined = np.isfinite(values)
    values = np.where(defined, values, np.nan)
    frame = pd.DataFrame(
        {
            "epoch": df["epoch"].to_numpy(),
            "value": values,
            "positive": (values > 0).astype(np.float64),
            "defined": defined.astype(np.int64),
        }
    )
    groups = frame.groupby("epoch", sort=True)
    n_defined = groups["defined"].sum()
    n_steps = groups.size()
    out = pd.DataFrame(
        {
            "min": groups["value"].min(),
            "median": groups["value"].median(),
            "mean": groups["value"].mean(),
            # 0/0 -> NaN for an epoch without a single defined value, as intended.
            "frac_positive": groups["positive"].sum() / n_defined.replace(0, np.nan),
            "n_undefined": (n_steps - n_defined).astype(np.int64),
            "n_steps": n_steps.astype(np.int64),
        }
    )
    out.index.name = "epoch"
    return out


def gamma_eff_curve(df: pd.DataFrame, d0_sq: float | None = None) -> pd.Series:
    """γ_eff(K) for every K = 1 … T, indexed by K.

    γ_eff(K) = (d_0² − d_K²) / (2 D_0² Σ_{k<K} η_k (ℓ_k − ℓ*_k)), the γ for which the
    *averaged* principle (what Theorem 1's proof telescopes) holds with equality.
    The numerator is taken as 2 Σ_{k<K} P_k (equal by telescoping) so it does not
    cancel catastrophically when d_K ≈ d_0. Steps with a non-positive gap are
    included: the average runs over all steps. NaN where Σ η_k gap_k ≤ 0.

    Caution (DESIGN §1): with θ* = θ_T, γ_eff(T) = 1 / (2 Σ η_k gap_k) is a function
    of the losses alone; it is not evidence for a principle.

    Example:
        >>> from gammatrace.principles import example_steps, gamma_eff_curve
        >>> gamma_eff_curve(example_steps()).round(3).tolist()
        [3.2, 1.875, 2.991, 3.077]
    """
    check_sorted(df)
    d0 = resolve_d0_sq(df, d0_sq)
    numer = 2.0 * np.cumsum(col(df, "progress"))
    weighted_gap = np.cumsum(col(df, "lr") * (col(df, "loss") - col(df, "loss_ref")))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(
            (weighted_gap > 0) & bool(d0 > 0), numer / (2.0 * d0 * weighted_gap), np.nan
        )
    return pd.Series(values, index=pd.RangeIndex(1, len(df) + 1, name="K"), name="gamma_eff")


def gamma_eff(df: pd.DataFrame, K: int | None = None, d0_sq: float | None = None) -> float:
    """γ_eff(K) (see :func:`gamma_eff_curve`); ``K`` defaults to T = len(df).

    Example:
        >>> from gammatrace.principles import example_steps, gamma_eff
        >>> round(gamma_eff(example_steps()), 4)
        3.0769
        >>> round(gamma_eff(example_steps(), K=1), 4)
        3.2
    """
    n = len(df)
    K = n if K is None else int(K)
    if not 0 <= K <= n:
        raise ValueError(f"K must be in [0, {n}], got {K}")
    if K == 0:
        return math.nan
    return float(gamma_eff_curve(df.iloc[:K], d0_sq=resolve_d0_sq(df, d0_sq)).iloc[-1])
