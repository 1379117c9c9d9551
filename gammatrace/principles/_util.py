"""Small shared helpers for the principles package (not public API)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def col(df: pd.DataFrame, name: str) -> np.ndarray:
    """Float64 copy of ``df[name]``; all-NaN when the measuring mode did not record it.

    Returning NaN instead of raising lets every metric "skip cleanly" (DESIGN §7):
    a table without ``grad_dot`` still yields γ, only ``star`` is undefined.
    """
    if name in df.columns:
        return df[name].to_numpy(dtype=np.float64, na_value=np.nan)
    return np.full(len(df), np.nan, dtype=np.float64)


def as_float_array(values: Any) -> np.ndarray:
    """1-D float64 array from a Series/array/list, with pandas' NA mapped to NaN."""
    if isinstance(values, pd.Series | pd.Index):
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.asarray(values, dtype=np.float64).ravel()


def check_sorted(df: pd.DataFrame) -> None:
    """Raise if the table is not in step order.

    Every cumulative quantity (γ_eff, d_k from P_k, the rate bound) silently becomes
    wrong on a shuffled table, so this is a loud error rather than a quiet sort.
    """
    if "step" in df.columns and not df["step"].is_monotonic_increasing:
        raise ValueError("per-step table must be sorted by 'step'")


def check_tail(tail: int) -> int:
    """Validate a tail length (number of final steps to exclude)."""
    if isinstance(tail, bool) or int(tail) != tail or tail < 0:
        raise ValueError(f"tail must be a non-negative integer, got {tail!r}")
    return int(tail)


def drop_tail(df: pd.DataFrame, tail: int) -> pd.DataFrame:
    """The table without its last ``tail`` rows."""
    tail = check_tail(tail)
    return df.iloc[: max(len(df) - tail, 0)]


def resolve_d0_sq(df: pd.DataFrame, d0_sq: float | None) -> float:
    """D_0² = the given value, else the first row's ``dist_sq`` (NaN for an empty table)."""
    if d0_sq is not None:
        return float(d0_sq)
    if len(df) == 0 or "dist_sq" not in df.columns:
        return math.nan
    return float(col(df, "dist_sq")[0])


def plain(value: Any) -> Any:
    """NumPy/pandas scalar -> plain Python scalar, so summaries are JSON-serializable."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value)
    return value
