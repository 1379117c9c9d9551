"""Per-step series: the derived columns of the step table (DESIGN §1, §6).

Everything here is a pure function of the RAW columns the probe measures
(``progress``, ``dist_sq``, ``update_sq``, ``grad_dot``, ``grad_sq``, ``grad_dot_wd``,
``grad_sq_wd``, ``loss``, ``loss_ref``, ``lr``), so a stored table can be re-derived with a different D_0² or ℓ_inf
without touching the model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gammatrace.principles._util import check_sorted, col, resolve_d0_sq

RAW_COLUMNS = (
    "step",
    "epoch",
    "lr",
    "loss",
    "loss_ref",
    "progress",
    "dist_sq",
    "update_sq",
    "grad_dot",
    "grad_sq",
    "grad_dot_wd",
    "grad_sq_wd",
)
DERIVED_COLUMNS = ("gamma", "gamma_rp", "gamma_rc", "star", "cos_align", "rsi", "eb", "rsi_wd", "eb_wd", "rsi_eb")
STEP_COLUMNS = RAW_COLUMNS + DERIVED_COLUMNS


def example_steps() -> pd.DataFrame:
    """A tiny, exactly consistent per-step table for examples and smoke tests.

    One parameter, iterates θ = 1.0, 0.6, 0.7, 0.2, 0.0 with θ* = θ_T = 0, the loss
    ℓ(θ; B_k) = θ² + c_k (so ℓ*_k = c_k and the gap is θ_k²), two epochs of two
    steps, and a step that moves *away* from θ* (k = 1).

    Example:
        >>> df = example_steps()
        >>> list(df.columns) == list(RAW_COLUMNS)
        True
        >>> df.progress.round(3).tolist()
        [0.32, -0.065, 0.225, 0.02]
    """
    theta = np.array([1.0, 0.6, 0.7, 0.2, 0.0])
    theta_star = theta[-1]
    offsets = np.array([0.1, 0.0, 0.2, 0.1])
    x = theta[:-1] - theta_star
    delta = theta[:-1] - theta[1:]
    return pd.DataFrame(
        {
            "step": np.arange(4),
            "epoch": np.array([0, 0, 1, 1]),
            "lr": np.array([0.1, 0.1, 0.05, 0.05]),
            "loss": theta[:-1] ** 2 + offsets,
            "loss_ref": theta_star**2 + offsets,
            "progress": x * delta - 0.5 * delta**2,
            "dist_sq": x**2,
            "update_sq": delta**2,
            "grad_dot": x * 2.0 * theta[:-1],
            "grad_sq": (2.0 * theta[:-1]) ** 2,
            # No weight decay: the folded gradient is the raw one.
            "grad_dot_wd": x * 2.0 * theta[:-1],
            "grad_sq_wd": (2.0 * theta[:-1]) ** 2,
        }
    )


def cos_align(df: pd.DataFrame) -> np.ndarray:
    """cos(Δ_k, θ_k − θ*) from the raw columns; NaN where either vector is zero.

    ⟨θ_k − θ*, Δ_k⟩ = P_k + ½‖Δ_k‖² by the definition of P_k, so the cosine needs
    no extra measurement.

    Example:
        >>> cos_align(example_steps()).round(3).tolist()
        [1.0, -1.0, 1.0, 1.0]
    """
    progress = col(df, "progress")
    dist_sq = col(df, "dist_sq")
    update_sq = col(df, "update_sq")
    inner = progress + 0.5 * update_sq
    with np.errstate(divide="ignore", invalid="ignore"):
        # Not clipped to [-1, 1]: a value a few ulps outside is honest round-off,
        # and a value far outside exposes an inconsistent table.
        return np.where(
            (dist_sq > 0) & (update_sq > 0), inner / np.sqrt(dist_sq * update_sq), np.nan
        )


def derive(
    df: pd.DataFrame,
    d0_sq: float | None = None,
    ell_inf: float = 0.0,
    eps: float = 1e-8,
) -> pd.DataFrame:
    """Copy of the step table with ``gamma, gamma_rp, gamma_rc, star, cos_align, rsi, eb, rsi_wd, eb_wd,
    rsi_eb`` added.

    Formulas (DESIGN §1), with gap_k = ℓ_k − ℓ*_k and D_0² = ``d0_sq`` or the first
    row's ``dist_sq``:

    - ``gamma``     = P_k / (η_k D_0² gap_k), NaN where gap_k ≤ eps or η_k ≤ 0
    - ``gamma_rp``  = P_k / (η_k (ℓ_k − ℓ_inf)) / D_0², NaN where ℓ_k − ℓ_inf ≤ eps or η_k ≤ 0
    - ``gamma_rc``  = P_k / (η_k d_k²), NaN where d_k² ≤ 0 or η_k ≤ 0
    - ``star``      = ⟨θ_k − θ*, g_k⟩ − gap_k (star-convex path iff ≥ 0)
    - ``cos_align`` = cos(Δ_k, θ_k − θ*), NaN where either vector is zero
    - ``rsi``       = ⟨g_k, θ_k − θ*⟩ / d_k² (restricted secant inequality constant), NaN where d_k² ≤ 0
    - ``eb``        = ‖g_k‖ / d_k (error bound constant), NaN where d_k² ≤ 0

    - ``rsi_wd``, ``eb_wd`` = the same of g_k + λθ_k (``grad_dot_wd``, ``grad_sq_wd``), NaN where d_k² ≤ 0
    - ``rsi_eb``    = rsi / eb = ⟨g_k, θ_k − θ*⟩ / (‖g_k‖ d_k): "No Wrong Turns"' ratio γ (not DESIGN §1's
      γ), the cosine of g_k and θ_k − θ*; NaN where g_k = 0 or d_k² ≤ 0

    ``rsi`` and ``eb`` are the restricted-secant and error-bound quantities of "No Wrong Turns"
    (ICML 2024; their ``get_norm_dot_prod``: ⟨θ − x*, g⟩, ‖g‖, ‖θ − x*‖ on the flattened
    parameters), from the RAW gradient g_k (``grad_dot``, ``grad_sq``). ``rsi_wd`` and ``eb_wd``
    fold the optimizer's weight decay into it, g_k + λθ_k, as their code does when the optimizer
    has weight decay: the probe measures ``grad_dot_wd`` and ``grad_sq_wd`` with each parameter
    group's own λ (:mod:`gammatrace.probe.decay`): equal to ``rsi``/``eb`` where nothing decays,
    NaN where the decay is decoupled (AdamW: no objective with gradient g + λθ is minimised) and
    in tables recorded before those columns existed.

    Undefined values are NaN, never clipped or dropped: the summaries count them.
    Columns a mode did not record (e.g. ``grad_dot``) make only the quantities that
    need them NaN. Existing derived columns are overwritten. Pass ``d0_sq`` when the
    table is a segment that does not start at θ_0.

    Public API: it is what ``Probe.steps()``, ``Probe.end_epoch()``, ``TwoPass(...).run().steps()``
    and ``gammatrace analyze`` apply to the raw measured columns, so a table kept from any of
    them can be re-derived with another ℓ_inf or D_0², e.g.
    ``derive(probe.raw_steps(), d0_sq=probe.d0_sq, ell_inf=1.0)``.

    Example:
        >>> out = derive(example_steps())
        >>> out.gamma.round(3).tolist()
        [3.2, -1.806, 9.184, 10.0]
        >>> out.star.round(2).tolist()
        [1.0, 0.36, 0.49, 0.04]
        >>> out.rsi.tolist(), out.eb.tolist()  # ℓ = θ² + c_k, θ* = 0: g_k = 2θ_k, RSI = EB = 2
        ([2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0])
        >>> out.rsi_wd.equals(out.rsi), out.rsi_eb.tolist()  # no decay; g_k ∥ θ_k − θ*: ratio 1
        (True, [1.0, 1.0, 1.0, 1.0])
        >>> derive(example_steps(), ell_inf=0.1).gamma_rp.round(3).tolist()  # γ^RP / D_0² above ℓ_inf = 0.1
        [3.2, -2.5, 7.627, 10.0]
    """
    check_sorted(df)
    out = df.copy()
    d0 = resolve_d0_sq(df, d0_sq)
    lr = col(df, "lr")
    loss = col(df, "loss")
    gap = loss - col(df, "loss_ref")
    progress = col(df, "progress")
    dist_sq = col(df, "dist_sq")

    # A non-positive D_0² (θ_0 = θ*) makes every normalized γ meaningless, not infinite.
    d0_ok = bool(d0 > 0)
    lr_ok = lr > 0
    above_inf = loss - ell_inf
    with np.errstate(divide="ignore", invalid="ignore"):
        out["gamma"] = np.where((gap > eps) & lr_ok & d0_ok, progress / (lr * d0 * gap), np.nan)
        out["gamma_rp"] = np.where(
            (above_inf > eps) & lr_ok & d0_ok, progress / (lr * above_inf) / d0, np.nan
        )
        out["gamma_rc"] = np.where((dist_sq > 0) & lr_ok, progress / (lr * dist_sq), np.nan)
    out["star"] = col(df, "grad_dot") - gap
    out["cos_align"] = cos_align(df)
    grad_sq = col(df, "grad_sq")
    with np.errstate(divide="ignore", invalid="ignore"):
        out["rsi"] = np.where(dist_sq > 0, col(df, "grad_dot") / dist_sq, np.nan)
        out["eb"] = np.where(dist_sq > 0, np.sqrt(grad_sq / dist_sq), np.nan)
        out["rsi_wd"] = np.where(dist_sq > 0, col(df, "grad_dot_wd") / dist_sq, np.nan)
        out["eb_wd"] = np.where(dist_sq > 0, np.sqrt(col(df, "grad_sq_wd") / dist_sq), np.nan)
        out["rsi_eb"] = np.where((dist_sq > 0) & (grad_sq > 0), col(df, "grad_dot") / np.sqrt(grad_sq * dist_sq),
                                 np.nan)
    return out


def next_dist_sq(df: pd.DataFrame) -> np.ndarray:
    """d_0², d_1², …, d_T² implied by the progress: d_{k+1}² = d_k² − 2 P_k.

    Length T + 1, anchored at the first row's ``dist_sq``. Because P_k is measured
    from Δ_k (not as a difference of squared distances), comparing this curve with
    the measured ``dist_sq`` column, or with ‖θ_k − θ*‖² on a stored trajectory, is
    the test oracle for the progress measurement. With θ* = θ_T the last entry is
    0 up to round-off.

    Example:
        >>> next_dist_sq(example_steps()).round(3).tolist()
        [1.0, 0.36, 0.49, 0.04, 0.0]
    """
    check_sorted(df)
    if len(df) == 0:
        return np.empty(0, dtype=np.float64)
    d0 = col(df, "dist_sq")[0]
    return np.concatenate([[d0], d0 - 2.0 * np.cumsum(col(df, "progress"))])
