"""Checks of the consequences Theorem 1 predicts from the γ-optimization principle.

1. monotone distance to θ* (:func:`monotone_distance`, per epoch :func:`epoch_distance`),
2. per-sample loss convergence (:func:`per_sample_convergence`),
3. the O(1/(γK)) rate of the loss gap (:func:`rate_bound`),

and the theorem as stated, as verdicts with their numbers (:func:`theorem1_checks`): the
premise (the principle with one γ > 0 on every step: the certified interval of
:func:`~gammatrace.principles.certificates.certify` is non-empty), item 1 per step
(‖θ_{k+1} − θ*‖ ≤ ‖θ_k − θ*‖ for all k, paper 002's words; the per-epoch reading beside
it), items 2 and 3, each with its premise evaluated on every step.

Example:
    >>> from gammatrace.principles import example_steps
    >>> [(c.item, c.verdict) for c in theorem1_checks(example_steps())]  # doctest: +NORMALIZE_WHITESPACE
    [('the principle with one γ > 0 on every step (the premise)', 'fails'),
     ('‖θ_{k+1} − θ*‖ ≤ ‖θ_k − θ*‖ for every k', 'fails'),
     ('per-sample losses converge', 'not measured'), ('O(1/γK) rate bound with γ = γ_min', 'not applicable')]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from gammatrace.principles._util import check_sorted, col, drop_tail, resolve_d0_sq
from gammatrace.principles.certificates import certify, rate_gamma
from gammatrace.principles.series import derive


def monotone_distance(df: pd.DataFrame, d0_sq: float | None = None) -> dict[str, Any]:
    """Theorem 1 item 1: does d_k = ‖θ_k − θ*‖ decrease at every step?

    d_{k+1} > d_k ⇔ P_k < 0, so increases are counted from the sign of the measured
    progress. Their size d_{k+1} − d_k = −2 P_k / (d_k + d_{k+1}) is computed in that
    form (not as a difference of square roots, which cancels for small steps), with
    d_k from ``dist_sq`` and d_{k+1}² = d_k² − 2 P_k.

    Returns ``n_steps``, ``n_increase``, ``frac_increase``, ``max_increase`` and
    ``sum_increase`` (both in units of D_0; 0 when d never increases), and
    ``curve``: the array d_k / D_0 for k = 0 … T.

    Example:
        >>> from gammatrace.principles import example_steps, monotone_distance
        >>> m = monotone_distance(example_steps())
        >>> m["n_increase"], round(m["max_increase"], 3)
        (1, 0.1)
        >>> m["curve"].round(2).tolist()
        [1.0, 0.6, 0.7, 0.2, 0.0]
    """
    check_sorted(df)
    d0 = math.sqrt(resolve_d0_sq(df, d0_sq)) if len(df) else math.nan
    progress = col(df, "progress")
    dist_sq = col(df, "dist_sq")
    # Round-off can push d_T² (θ* = θ_T) a hair below zero; it is a distance of 0.
    dist = np.sqrt(np.maximum(dist_sq, 0.0))
    dist_next = np.sqrt(np.maximum(dist_sq - 2.0 * progress, 0.0))
    total = dist + dist_next
    with np.errstate(divide="ignore", invalid="ignore"):
        increase = np.where(total > 0, -2.0 * progress / total, 0.0)
    up = progress < 0
    n = len(df)
    return {
        "n_steps": n,
        "n_increase": int(up.sum()),
        "frac_increase": float(up.mean()) if n else math.nan,
        "max_increase": float(increase[up].max() / d0) if up.any() else 0.0,
        "sum_increase": float(increase[up].sum() / d0),
        "curve": np.concatenate([dist, dist_next[-1:]]) / d0,
    }


def per_sample_convergence(samples_df: pd.DataFrame) -> tuple[dict[str, Any], pd.DataFrame]:
    """Theorem 1 item 2: do the per-sample losses converge over the sample's visits?

    ``samples_df`` has one row per (visit of a sample): columns ``step``, ``epoch``,
    ``index`` (the sample's dataset index), ``loss`` (its unreduced loss at θ_k) and
    optionally ``loss_ref`` (its loss at θ*). The per-sample gap is
    ``loss − loss_ref``, or ``loss`` alone when ``loss_ref`` is absent.

    Returns ``(summary, by_epoch)``:

    - ``summary``: ``n_samples``; ``n_revisited`` (samples with ≥ 2 visits);
      ``frac_improved`` (among revisited samples, the fraction whose gap at the last
      visit is ≤ the gap at the first — a sample seen once cannot show convergence,
      so it is not counted); ``max_last_gap`` and ``mean_last_gap`` (gap at each
      sample's last visit); ``uses_loss_ref``.
    - ``by_epoch``: DataFrame indexed by the visit's epoch with ``mean_gap``,
      ``max_gap`` and ``n_visits``.

    Example:
        >>> import pandas as pd
        >>> from gammatrace.principles import per_sample_convergence
        >>> s = pd.DataFrame({"step": [0, 0, 1, 1], "epoch": [0, 0, 1, 1],
        ...                   "index": [0, 1, 1, 0], "loss": [2.0, 1.0, 0.5, 2.5]})
        >>> summary, by_epoch = per_sample_convergence(s)
        >>> summary["frac_improved"], summary["max_last_gap"]
        (0.5, 2.5)
        >>> by_epoch["max_gap"].tolist()
        [2.0, 2.5]
    """
    uses_ref = "loss_ref" in samples_df.columns
    gap = col(samples_df, "loss")
    if uses_ref:
        gap = gap - col(samples_df, "loss_ref")
    frame = pd.DataFrame(
        {
            "step": samples_df["step"].to_numpy(),
            "epoch": samples_df["epoch"].to_numpy(),
            "index": samples_df["index"].to_numpy(),
            "gap": gap,
        }
    )
    # A stable sort keeps the input order among equal steps, so "first"/"last" visit
    # are well defined even if a sample appeared twice in one step.
    frame = frame.sort_values(["index", "step"], kind="stable")
    per_sample = frame.groupby("index", sort=True)["gap"]
    first, last, visits = per_sample.first(), per_sample.last(), per_sample.size()
    revisited = visits >= 2
    by_epoch_groups = frame.groupby("epoch", sort=True)["gap"]
    by_epoch = pd.DataFrame(
        {
            "mean_gap": by_epoch_groups.mean(),
            "max_gap": by_epoch_groups.max(),
            "n_visits": by_epoch_groups.size().astype(np.int64),
        }
    )
    by_epoch.index.name = "epoch"
    n_rev = int(revisited.sum())
    improved = (last[revisited] <= first[revisited]).to_numpy()
    summary = {
        "n_samples": len(visits),
        "n_revisited": n_rev,
        "frac_improved": float(improved.mean()) if n_rev else math.nan,
        "max_last_gap": float(last.max()) if len(last) else math.nan,
        "mean_last_gap": float(last.mean()) if len(last) else math.nan,
        "uses_loss_ref": uses_ref,
    }
    return summary, by_epoch


def rate_bound(
    df: pd.DataFrame,
    gamma: float | None = None,
    boundaries: Any = None,
    d0_sq: float | None = None,
) -> dict[str, Any]:
    """Theorem 1 item 3: the rate of the loss gap at epoch boundaries, and its tightness.

    Derivation. If the principle holds with γ on every step k < K,
    P_k ≥ γ η_k D_0² gap_k. Summing and telescoping,
    γ D_0² Σ_{k<K} η_k gap_k ≤ Σ_{k<K} P_k = ½(d_0² − d_K²) ≤ ½ d_0², hence

        actual(K) = Σ_{k<K} η_k gap_k / Σ_{k<K} η_k ≤ d_0² / (2 γ D_0² Σ_{k<K} η_k) = bound(K),

    which for constant η and D_0 = d_0 is (1/K) Σ gap_k ≤ 1/(2ηγK). (d_0² / D_0² is 1
    unless ``d0_sq`` normalizes a segment that does not start at θ_0.)

    ``boundaries`` are step counts K (1 … T); default: the row position where each
    new epoch starts, plus T. ``gamma`` defaults to γ_hi (= γ_min), the largest γ of the
    certified interval of :func:`certify`, and to NaN when the interval is empty; if it is
    not > 0 (or is +inf) there is no bound: ``bound``/``tightness`` are NaN and
    ``reason`` says why. The bound presumes the principle on *every* step,
    including those whose γ_k is undefined (gap ≤ ε), so the table also counts
    ``premise_violations`` up to K (steps with P_k < γ η_k D_0² gap_k); with none,
    ``holds`` must be True.

    Returns ``{"gamma", "reason", "table"}`` where ``table`` has columns
    ``K, sum_lr, actual, bound, tightness (= actual / bound), holds,
    premise_violations``.

    Example:
        >>> from gammatrace.principles import example_steps, rate_bound
        >>> r = rate_bound(example_steps())
        >>> r["reason"] is not None, bool(r["table"]["bound"].isna().all())
        (True, True)
        >>> rate_bound(example_steps(), gamma=0.5)["table"][["K", "holds"]]
           K  holds
        0  2   True
        1  4   True
    """
    check_sorted(df)
    n = len(df)
    d0 = resolve_d0_sq(df, d0_sq)
    start_sq = col(df, "dist_sq")[0] if n else math.nan
    lr = col(df, "lr")
    gap = col(df, "loss") - col(df, "loss_ref")
    progress = col(df, "progress")

    if boundaries is None:
        epochs = df["epoch"].to_numpy()
        starts = np.flatnonzero(epochs[1:] != epochs[:-1]) + 1
        ks = np.unique(np.concatenate([starts, [n]])) if n else np.empty(0, np.int64)
    else:
        ks = np.asarray(boundaries, dtype=np.int64).ravel()
        if ks.size and (ks.min() < 1 or ks.max() > n):
            raise ValueError(f"boundaries must lie in [1, {n}], got {ks.tolist()}")

    if gamma is None:
        cert = certify(df, d0_sq=d0)
        gamma = rate_gamma(cert["certified"], cert["gamma_hi"])
    gamma = float(gamma)
    reason = None
    if not gamma > 0:
        reason = (
            f"gamma={gamma!r} is not > 0: the principle is not certified on these steps, "
            "so Theorem 1 gives no rate bound"
        )
    elif math.isinf(gamma):
        reason = "gamma=inf: no step bounds γ from above (no positive gap), so the bound is 0 in the limit"

    sum_lr = np.cumsum(lr)[ks - 1]
    actual = np.cumsum(lr * gap)[ks - 1] / sum_lr
    if reason is None:
        bound = start_sq / (2.0 * gamma * d0 * sum_lr)
        rhs = gamma * lr * d0 * gap
        # Relative slack: at the step attaining γ_min, P_k and γ η_k D_0² gap_k are
        # equal up to the rounding of the division that produced γ_k.
        tol = 1e-9 * np.maximum(np.abs(progress), np.abs(rhs))
        violated = progress < rhs - tol
        violations = pd.array(np.cumsum(violated)[ks - 1], dtype="Int64")
        holds = pd.array(actual <= bound, dtype="boolean")
    else:
        bound = np.full(len(ks), np.nan)
        violations = pd.array([pd.NA] * len(ks), dtype="Int64")
        holds = pd.array([pd.NA] * len(ks), dtype="boolean")
    with np.errstate(divide="ignore", invalid="ignore"):
        tightness = actual / bound
    table = pd.DataFrame(
        {
            "K": ks,
            "sum_lr": sum_lr,
            "actual": actual,
            "bound": bound,
            "tightness": tightness,
            "holds": holds,
            "premise_violations": violations,
        }
    )
    return {"gamma": gamma, "reason": reason, "table": table}


# ------------------------------------------------------------------- Theorem 1 verdicts
FRACTION_REQUIRED = 0.95  # "on ≥ 95 % of steps / samples": the share a verdict needs
HOLDS, FAILS, NOT_APPLICABLE, NOT_MEASURED = "holds", "fails", "not applicable", "not measured"


def epoch_distance(df: pd.DataFrame, d0_sq: float | None = None) -> dict[str, Any]:
    """Theorem 1 item 1 per epoch: d/D_0 at every epoch boundary and how often it rose.

    ``curve`` holds d_k / D_0 at the first step of each epoch and after the last step
    (from :func:`monotone_distance`); ``n_epochs``; ``n_increase`` counts epochs that
    end farther from θ* than they started; ``max_increase`` the largest such rise (in
    D_0; 0 without one).

    Example:
        >>> from gammatrace.principles import example_steps
        >>> e = epoch_distance(example_steps())
        >>> e["curve"].round(2).tolist(), e["n_increase"]
        ([1.0, 0.7, 0.0], 0)
    """
    check_sorted(df)
    if not len(df):
        return {"curve": np.empty(0), "n_epochs": 0, "n_increase": 0, "max_increase": 0.0}
    curve = monotone_distance(df, d0_sq=d0_sq)["curve"]
    epochs = df["epoch"].to_numpy()
    starts = np.flatnonzero(np.r_[True, epochs[1:] != epochs[:-1]])
    at = curve[np.r_[starts, len(df)]]
    rise = np.diff(at)
    return {"curve": at, "n_epochs": len(starts), "n_increase": int((rise > 0).sum()),
            "max_increase": float(rise.max()) if (rise > 0).any() else 0.0}


@dataclass(frozen=True)
class Check:
    """One item of Theorem 1 for one run: ``verdict`` (holds, fails, not applicable, not
    measured), the ``numbers`` it rests on, in words, and for a consequence its
    ``premise`` evaluated on every step (empty for the premise's own row)."""

    item: str
    verdict: str
    numbers: str
    premise: str = ""

    @property
    def text(self) -> str:
        """``verdict: numbers`` and, for a consequence, ``— premise …``: one report cell."""
        return f"{self.verdict}: {self.numbers}" + (f" — premise: {self.premise}" if self.premise else "")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if math.isfinite(x) else "—"


def _steps(steps: Any) -> str:
    steps = [int(s) for s in steps]
    shown = ", ".join(str(s) for s in steps[:5]) + (", …" if len(steps) > 5 else "")
    return ("steps " if len(steps) > 1 else "step ") + shown


PREMISE = "the principle with one γ > 0 on every step (the premise)"
ITEM1 = "‖θ_{k+1} − θ*‖ ≤ ‖θ_k − θ*‖ for every k"
ITEM2 = "per-sample losses converge"
ITEM3 = "O(1/γK) rate bound with γ = γ_min"


def theorem1_checks(df: pd.DataFrame, samples: Mapping[str, Any] | None = None,
                    d0_sq: float | None = None, tail: int = 0, eps: float = 1e-8) -> list[Check]:
    """Theorem 1 of paper 002 for one run as four verdicts, each with its numbers.

    The theorem: *if the optimization process satisfies the principle* (Definition 1: eq. (2)
    for one γ > 0 and all k) *then* 1. ‖θ_{k+1} − θ*‖ ≤ ‖θ_k − θ*‖ for all k; 2. each
    sample's loss converges to its minimum; 3. the accumulated loss converges at
    O(1/(2ηγK)). ``df``: the run's step table (raw columns; the derived ones are
    recomputed); the last ``tail`` steps are left out of every row. ``samples``: the
    per-sample summary of :func:`per_sample_convergence` (keys ``frac_improved``,
    ``n_revisited``), None when the run did not record per-sample losses. Rows:

    0. *the premise*, evaluated on every step: holds iff the certified interval of
       :func:`certify` is non-empty (the sentence names the steps binding each end, or
       those in conflict); the fraction of defined γ_k > 0 is shown beside, as a number,
       not a verdict;
    1. *item 1 as stated, per step*: holds iff d_k never rises (P_k ≥ 0 on every step);
       the rising steps are named, and the per-epoch reading (what the papers' figures
       can show: does an epoch end farther from θ* than it started,
       :func:`epoch_distance`) is given beside;
    2. *per-sample losses converge*: holds when the gap at a sample's last visit is ≤ the
       gap at its first for ≥ 95 % of the samples visited twice or more;
    3. *the O(1/γK) rate bound* at every epoch boundary (:func:`rate_bound`) with γ = γ_hi
       (= γ_min), the largest γ of the certified interval: not applicable when the
       interval is empty (no bound is implied).

    Each consequence carries its premise evaluated on every step (``Check.premise``): for
    items 1 and 2 the principle and that θ* minimizes every batch's loss (ℓ_k ≥ ℓ*_k —
    problem (P)'s global minimizer; where ℓ_k < ℓ*_k the principle allows P_k < 0), for
    item 3 the principle alone. A consequence that holds without its premise is shown as
    such: the theorem neither predicts nor explains it.

    Example:
        >>> from gammatrace.principles import example_steps
        >>> checks = theorem1_checks(example_steps(), {"frac_improved": 0.99, "n_revisited": 200})
        >>> checks[0].numbers
        'on every step: no — step 1 allows no γ > 0 (γ_k = -1.81); γ_k > 0 on 75.0% of 4 defined steps'
        >>> checks[1].verdict, checks[1].numbers
        ('fails', "d_k rises at 1 of 4 steps (step 1; largest rise 0.1 D_0); per epoch (what the papers' \
figures show): 0 of 2 epochs end farther from θ*")
        >>> checks[1].premise
        'principle on every step: no; ℓ_k ≥ ℓ*_k on every step: yes'
        >>> checks[2].verdict, checks[2].numbers
        ('holds', 'last visit ≤ first visit for 99.0% of 200 revisited samples')
    """
    check_sorted(df)
    steps = drop_tail(df, tail)
    d0 = resolve_d0_sq(df, d0_sq)
    steps = derive(steps, d0_sq=d0, eps=eps)
    cert = certify(steps, d0_sq=d0, eps=eps)
    out = []
    frac, gmin, n_def = cert["frac_positive"], cert["gamma_min"], cert["n_steps"] - cert["n_undefined"]
    principle = "yes" if cert["certified"] else "no"
    out.append(Check(PREMISE, NOT_MEASURED if not len(steps) else (HOLDS if cert["certified"] else FAILS),
                     f"on every step: {cert['certificate']}; γ_k > 0 on {_pct(frac)} of {n_def} defined steps"
                     + (f"; {cert['n_undefined']} undefined" if cert["n_undefined"] else "")))

    gap = col(steps, "loss") - col(steps, "loss_ref")
    below = gap < -eps
    step_ids = steps["step"].to_numpy() if "step" in steps.columns else np.arange(len(steps))
    minimizer = "yes" if not below.any() else \
        f"no ({int(below.sum())} of {len(steps)} steps with ℓ_k − ℓ*_k < −ε: {_steps(step_ids[below])})"
    premise_12 = f"principle on every step: {principle}; ℓ_k ≥ ℓ*_k on every step: {minimizer}"

    dist = epoch_distance(steps, d0_sq=d0)
    if len(steps):
        mono = monotone_distance(steps, d0_sq=d0)
        up = step_ids[col(steps, "progress") < 0]
        where = f" ({_steps(up)}; largest rise {mono['max_increase']:.3g} D_0)" if len(up) else ""
        out.append(Check(ITEM1, HOLDS if mono["n_increase"] == 0 else FAILS,
                         f"d_k rises at {mono['n_increase']} of {mono['n_steps']} steps{where}; per epoch "
                         f"(what the papers' figures show): {dist['n_increase']} of {dist['n_epochs']} epochs "
                         "end farther from θ*", premise_12))
    else:
        out.append(Check(ITEM1, NOT_MEASURED, "no steps"))

    frac_s = float(samples.get("frac_improved", math.nan)) if samples else math.nan
    n_rev = int(samples.get("n_revisited") or 0) if samples else 0
    if not samples or not n_rev or not math.isfinite(frac_s):
        out.append(Check(ITEM2, NOT_MEASURED,
                         "no per-sample losses recorded (analysis.per_sample) or no sample visited twice",
                         premise_12 if len(steps) else ""))
    else:
        out.append(Check(ITEM2, HOLDS if frac_s >= FRACTION_REQUIRED else FAILS,
                         f"last visit ≤ first visit for {_pct(frac_s)} of {n_rev} revisited samples", premise_12))

    gamma = rate_gamma(cert["certified"], cert["gamma_hi"])
    premise_3 = f"principle on every step: {principle}"
    if not len(steps):
        out.append(Check(ITEM3, NOT_MEASURED, "no steps"))
    elif not gmin > 0:
        out.append(Check(ITEM3, NOT_APPLICABLE, f"γ_min = {gmin:.3g} ≤ 0: the theorem implies no rate", premise_3))
    elif not cert["certified"]:
        out.append(Check(ITEM3, NOT_APPLICABLE, f"γ_min = {gmin:.3g}, but no γ > 0 meets every step: "
                         "the theorem implies no rate", premise_3))
    elif not math.isfinite(gamma):
        out.append(Check(ITEM3, NOT_APPLICABLE, "no step bounds γ from above: the bound is 0 in the limit",
                         premise_3))
    else:
        table = rate_bound(steps, gamma=gamma, d0_sq=d0)["table"]
        held = int(table["holds"].fillna(False).sum())
        out.append(Check(ITEM3, HOLDS if held == len(table) else FAILS,
                         f"holds at {held} of {len(table)} epoch boundaries; actual / bound at the last: "
                         f"{float(table['tightness'].iloc[-1]):.3g} (γ = γ_hi = {gamma:.3g})", premise_3))
    return out
