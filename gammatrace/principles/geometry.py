"""Path geometry: how straight the trajectory is and how well each step points at θ*."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from gammatrace.principles._util import col
from gammatrace.principles.series import cos_align


def path_geometry(df: pd.DataFrame, displacement: float | None = None) -> dict[str, Any]:
    """Path length over displacement, and the alignment of the steps with θ* − θ_k.

    ``path_length`` = Σ_k ‖Δ_k‖ (from ``update_sq``); ``path_ratio`` =
    path_length / ``displacement`` where ``displacement`` = ‖θ_0 − θ_T‖ is supplied
    by the caller (the step table alone cannot give it unless θ* = θ_T, where it is
    D_0); 1 means a straight path, NaN when no displacement is given.
    ``cos_mean``, ``cos_median``, ``cos_frac_positive`` summarize
    cos(Δ_k, θ_k − θ*) = cos(−Δ_k, θ* − θ_k) over the steps where it is defined;
    ``cos_n_undefined`` counts the others. Compare the cosines with
    :func:`null_cos_scale` to see whether they exceed chance.

    Example:
        >>> from gammatrace.principles import example_steps, path_geometry
        >>> g = path_geometry(example_steps(), displacement=1.0)
        >>> round(g["path_ratio"], 3), g["cos_frac_positive"]
        (1.2, 0.75)
    """
    path_length = float(np.sum(np.sqrt(col(df, "update_sq"))))
    if displacement is not None and displacement > 0:
        path_ratio = path_length / float(displacement)
    else:
        path_ratio = math.nan
    # Prefer recomputing from the raw columns (always consistent with them); fall back
    # to a stored column for tables that only kept the derived values.
    raw = {"progress", "dist_sq", "update_sq"} <= set(df.columns)
    cosines = cos_align(df) if raw or "cos_align" not in df.columns else col(df, "cos_align")
    defined = cosines[np.isfinite(cosines)]
    n_def = len(defined)
    return {
        "path_length": path_length,
        "displacement": math.nan if displacement is None else float(displacement),
        "path_ratio": path_ratio,
        "cos_mean": float(defined.mean()) if n_def else math.nan,
        "cos_median": float(np.median(defined)) if n_def else math.nan,
        "cos_frac_positive": float(np.mean(defined > 0)) if n_def else math.nan,
        "cos_n_undefined": len(cosines) - n_def,
    }


def null_cos_scale(n_params: int) -> float:
    """Null baseline: std. dev. 1/√n of cos(v, u) for fixed v and u uniform on S^{n−1}.

    By symmetry E[cos] = 0 and Σ_i E[u_i²] = 1 gives E[cos²] = 1/n exactly. A mean
    cos_align within a few multiples of this is what an update unrelated to θ* − θ_k
    would show.

    Example:
        >>> from gammatrace.principles import null_cos_scale
        >>> null_cos_scale(10_000)
        0.01
    """
    if isinstance(n_params, bool) or int(n_params) != n_params or n_params < 1:
        raise ValueError(f"n_params must be a positive integer, got {n_params!r}")
    return 1.0 / math.sqrt(n_params)
