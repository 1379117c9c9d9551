"""Certificates and averaged γ: the certified interval [γ_lo, γ_hi], per-epoch statistics, γ_eff(K).

The certificate (DESIGN §1). Every step bounds γ. With g_k = η_k · D_0² · gap_k, the
principle P_k ≥ γ g_k reads, split on the sign of g_k (that is, of η_k · gap_k):

- g_k > 0: γ ≤ P_k / g_k (= γ_k) — an upper bound;
- g_k < 0: γ ≥ P_k / g_k — a lower bound, positive only when P_k < 0 (a batch on which
  θ* is worse than θ_k, and a step away from θ*);
- |gap_k| ≤ ε or η_k = 0 (the gap is within round-off of 0): P_k ≥ 0 for every γ, or no
  γ at all. Tolerance: the term γ η_k D_0² gap_k is dropped on these steps, so the
  principle is checked there up to γ η_k D_0² ε (ε the ``eps`` of :func:`derive`,
  default 1e-8 in loss units).

The certificate is the interval of γ > 0 meeting every step outside the ``tail``:
[γ_lo, γ_hi] with γ_lo = the largest lower bound (0, open, when no step bounds γ from
below) and γ_hi = the smallest upper bound (= γ_min, the minimum of the defined γ_k;
+inf when no step has a positive gap). The principle holds on the trajectory — *certified*
— iff the interval is non-empty: γ_hi > 0, γ_lo ≤ γ_hi, no zero-gap step with P_k < 0 and
no unmeasured step (P_k or the gap not finite: its constraint is unknown, so it never lets
a certificate hold). The steps that bind each end are reported. γ^RP (gap ℓ_k − ℓ_inf,
reported as γ^RP / D_0²) and γ^RC (g_k = η_k d_k², zero where d_k² ≤ 0) are certified the
same way. Theorem 1's rate bound takes γ = γ_hi, the largest γ inside the interval.
"""

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

# What each γ divides the progress by (the "gap" whose sign splits the cases), in words.
GAP_WORDS = {"gamma": "ℓ_k − ℓ*_k", "gamma_rp": "ℓ_k − ℓ_inf", "gamma_rc": "d_k²"}
LISTED = 5  # steps named in a certificate sentence before "…"


def _stats(values: np.ndarray) -> dict[str, Any]:
    defined = values[np.isfinite(values)]
    n_def = len(defined)
    return {
        "gamma_min": float(defined.min()) if n_def else math.nan,
        "n_steps": len(values),
        "n_undefined": len(values) - n_def,
        "frac_positive": float(np.mean(defined > 0)) if n_def else math.nan,
        "median": float(np.median(defined)) if n_def else math.nan,
        "mean": float(np.mean(defined)) if n_def else math.nan,
    }


def _steps_text(steps: list[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:LISTED])
    if len(steps) > LISTED:
        shown += f", … ({len(steps)} steps)"
    return ("steps " if len(steps) > 1 else "step ") + shown


def certificate_text(cert: dict[str, Any], gap_words: str = "ℓ_k − ℓ*_k") -> str:
    """The certificate in one sentence, from :func:`certify`'s keys.

    Example:
        >>> from gammatrace.principles import certify, example_steps
        >>> certificate_text(certify(example_steps()))
        'no — step 1 allows no γ > 0 (γ_k = -1.81)'
    """
    lo, hi, lo_step, hi_step = cert["gamma_lo"], cert["gamma_hi"], cert["gamma_lo_step"], cert["gamma_hi_step"]
    if cert["certified"]:
        left = f"[{lo:.3g}" if lo > 0 else "(0"
        span = f"every γ in {left}, {hi:.3g}]" if math.isfinite(hi) else \
            (f"every γ ≥ {lo:.3g}" if lo > 0 else "every γ > 0")
        ends = ([f"lower end: step {lo_step}"] if lo > 0 else []) + \
            ([f"upper end: step {hi_step}"] if math.isfinite(hi) else ["no step has a positive gap"])
        return f"yes — {span} ({'; '.join(ends)})"
    if not cert["n_steps"]:
        return "no — no steps"
    why = []
    if cert.get("reason"):
        why.append(cert["reason"])
    if hi_step is not None and not hi > 0:
        why.append(f"step {hi_step} allows no γ > 0 (γ_k = {hi:.3g})")
    conflict = list(cert.get("conflict_steps") or [])
    need = [s for s in conflict if s not in cert.get("zero_fail_steps", [])]
    if need and hi > 0:
        verb = "needs" if len(need) == 1 else "need"
        why.append(f"{_steps_text(need)} {verb} γ ≥ {lo:.3g} but step {hi_step} allows at most {hi:.3g}")
    zero = list(cert.get("zero_fail_steps") or [])
    if zero:
        verb = "moves" if len(zero) == 1 else "move"
        why.append(f"{_steps_text(zero)} {verb} away from θ* (P_k < 0) where |{gap_words}| ≤ ε: no γ holds there")
    if cert["n_unmeasured"]:
        n = cert["n_unmeasured"]
        why.append(f"{n} step{'s' if n != 1 else ''} unmeasured ({cert.get('unmeasured_words', 'P_k or the gap not finite')})")
    return "no — " + "; ".join(why) if why else "no"


def _interval(progress: np.ndarray, g: np.ndarray, zero: np.ndarray, steps: np.ndarray) -> dict[str, Any]:
    """[γ_lo, γ_hi] of γ > 0 with P_k ≥ γ g_k on every step (``zero``: g_k taken as 0)."""
    measured = np.isfinite(progress) & np.isfinite(g)
    zero = zero & measured
    upper = measured & ~zero & (g > 0)
    lower = measured & ~zero & (g < 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.where(upper | lower, progress / g, np.nan)
    hi, hi_step = math.inf, None
    if upper.any():
        i = int(np.flatnonzero(upper)[np.argmin(bound[upper])])
        hi, hi_step = float(bound[i]), int(steps[i])
    lo, lo_step = 0.0, None
    binding = lower & (bound > 0)  # P_k < 0 on a negative gap: γ must be at least P_k / g_k
    if binding.any():
        i = int(np.flatnonzero(binding)[np.argmax(bound[binding])])
        lo, lo_step = float(bound[i]), int(steps[i])
    zero_fail = zero & (progress < 0)
    n_unmeasured = int((~measured).sum())
    certified = bool(len(progress) and hi > 0 and lo <= hi and not zero_fail.any() and not n_unmeasured)
    # The steps that no γ ≤ γ_hi satisfies, and the zero-gap steps that no γ satisfies.
    above = binding & (bound > hi) if hi > 0 else np.zeros_like(binding)
    return {
        "gamma_lo": lo, "gamma_lo_step": lo_step, "gamma_hi": hi, "gamma_hi_step": hi_step,
        "certified": certified,
        "n_lower": int(binding.sum()), "n_zero_gap": int(zero.sum()),
        "n_conflict": int(above.sum() + zero_fail.sum()), "n_unmeasured": n_unmeasured,
        "conflict_steps": sorted(int(s) for s in steps[above | zero_fail]),
        "zero_fail_steps": sorted(int(s) for s in steps[zero_fail]),
    }


LIST_KEYS = ("conflict_steps", "zero_fail_steps")  # certify()'s step lists (the sentence names them)


def rate_gamma(certified: Any, gamma_hi: Any) -> float:
    """The γ Theorem 1's rate bound takes: γ_hi (the largest γ of the certified interval,
    the tightest bound) when certified; NaN — no bound — otherwise (None counts as NaN).

    Example:
        >>> rate_gamma(True, 0.09), rate_gamma(False, 0.09)
        (0.09, nan)
    """
    return float(gamma_hi) if certified and gamma_hi is not None else math.nan


def certify(
    gamma: Any,
    tail: int = 0,
    column: str = "gamma",
    d0_sq: float | None = None,
    ell_inf: float = 0.0,
    eps: float = 1e-8,
) -> dict[str, Any]:
    """The certificate of a step table (or, weaker, of a per-step γ series).

    ``gamma`` is the step table (the raw columns ``progress, lr, loss, loss_ref, dist_sq``;
    ``column`` picks ``"gamma"``, ``"gamma_rp"`` — with ``ell_inf`` — or ``"gamma_rc"``) or a
    series of γ_k alone. Keys:

    - ``gamma_lo``, ``gamma_hi``: the certified interval (module docstring); ``gamma_lo`` is
      0 (open) without a lower bound, ``gamma_hi`` +inf without an upper bound;
      ``gamma_lo_step``, ``gamma_hi_step``: the steps (the ``step`` column) binding each end,
      None where no step binds;
    - ``certified``: the interval is non-empty; ``certificate``: it in one sentence;
    - ``n_lower`` (steps bounding γ from below), ``n_zero_gap`` (|gap| ≤ ε or η_k = 0),
      ``n_conflict`` (steps whose bound lies beyond the other end, plus zero-gap steps with
      P_k < 0), ``n_unmeasured``;
    - the γ_k statistics: ``gamma_min`` (min over defined γ_k, = γ_hi of a table; NaN if none
      is defined), ``n_steps``, ``n_undefined`` (NaN/inf γ_k: counted, never dropped — and
      never what makes a certificate hold), ``frac_positive``, ``median``, ``mean``.

    From a γ series alone a step with undefined γ_k may be a lower bound or a step that no γ
    satisfies: it is counted as unmeasured, so such a series is never certified — pass the
    table. ``tail`` excludes the last ``tail`` steps, where with θ* = θ_T the loss gap and
    d_k vanish and γ_k is dominated by noise. ``d0_sq``, ``ell_inf`` and ``eps`` are
    :func:`derive`'s.

    Example:
        >>> from gammatrace.principles import certify, example_steps
        >>> c = certify(example_steps())
        >>> c["certified"], round(c["gamma_min"], 3), c["gamma_hi_step"]
        (False, -1.806, 1)
        >>> certify(example_steps(), tail=3)["certificate"]
        'yes — every γ in (0, 3.2] (upper end: step 0)'
        >>> c = certify([0.5, float("nan"), 0.2, -1.0], tail=1)  # a series: the NaN is unknown
        >>> c["gamma_min"], c["n_undefined"], c["certified"]
        (0.2, 1, False)
    """
    tail = check_tail(tail)
    if isinstance(gamma, pd.DataFrame):
        return _certify_table(gamma, tail, column, d0_sq, ell_inf, eps)
    values = as_float_array(gamma)
    values = values[: max(len(values) - tail, 0)]
    stats = _stats(values)
    finite = np.isfinite(values)
    steps = np.arange(len(values))
    cert = _interval(np.where(finite, values, np.nan), np.ones(len(values)), np.zeros(len(values), bool), steps)
    cert["unmeasured_words"] = "γ_k undefined: its constraint is unknown from γ_k alone"
    out = {**stats, **cert}
    out["certificate"] = certificate_text(out, GAP_WORDS.get(column, "the gap"))
    return {k: v for k, v in out.items() if k not in ("unmeasured_words",)}


def _certify_table(df: pd.DataFrame, tail: int, column: str, d0_sq: float | None,
                   ell_inf: float, eps: float) -> dict[str, Any]:
    if column not in GAP_WORDS:
        raise ValueError(f"column must be one of {sorted(GAP_WORDS)}, got {column!r}")
    check_sorted(df)
    d0 = resolve_d0_sq(df, d0_sq)
    derived = derive(df, d0_sq=d0, ell_inf=ell_inf, eps=eps)
    body = drop_tail(derived, tail)
    stats = _stats(col(body, column))
    lr = col(body, "lr")
    if column == "gamma":
        gap = col(body, "loss") - col(body, "loss_ref")
        g, zero = lr * d0 * gap, (np.abs(gap) <= eps) | (lr == 0)
    elif column == "gamma_rp":
        gap = col(body, "loss") - ell_inf
        g, zero = lr * d0 * gap, (np.abs(gap) <= eps) | (lr == 0)
    else:
        gap = col(body, "dist_sq")
        g, zero = lr * gap, (gap <= 0) | (lr == 0)
    steps = body["step"].to_numpy() if "step" in body.columns else np.arange(len(body))
    progress = col(body, "progress")
    reason = None
    if not d0 > 0 and column != "gamma_rc":
        # θ_0 = θ*: every normalized γ is meaningless; nothing is certified.
        progress = np.full(len(body), np.nan)
        reason = f"D_0² = {d0:.3g}: no normalized γ"
    cert = _interval(progress, g, zero, steps)
    if reason:
        cert["n_unmeasured"] = 0
    out = {**stats, **cert, "reason": reason}
    out["certificate"] = certificate_text(out, GAP_WORDS[column])
    return {k: v for k, v in out.items() if k != "reason"}


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
