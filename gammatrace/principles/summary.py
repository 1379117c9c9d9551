"""One flat, JSON-serializable dict of a run's trajectory numbers."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from gammatrace.principles._util import check_tail, col, drop_tail, plain, resolve_d0_sq
from gammatrace.principles.certificates import LIST_KEYS, certify, gamma_eff, rate_gamma
from gammatrace.principles.geometry import path_geometry
from gammatrace.principles.series import derive
from gammatrace.principles.theorem1 import monotone_distance, rate_bound


def _shows_progress(first: float, last: float, ell_inf: float, min_rel_drop: float) -> bool:
    # Measured above ℓ_inf so the criterion means "the excess loss fell by at least
    # min_rel_drop"; with the default ℓ_inf = 0 it is last ≤ (1 − drop) · first.
    return bool(last - ell_inf <= (1.0 - min_rel_drop) * (first - ell_inf))


def _rel_drop(first: float, last: float, ell_inf: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(1.0 - (np.float64(last) - ell_inf) / (np.float64(first) - ell_inf))


def _loss_drop(body: pd.DataFrame, ell_inf: float, min_rel_drop: float) -> dict[str, Any]:
    """How far the batch loss fell, over the steps and over the epochs, and the "does not
    train" flag: set only when neither shows a fall of ``min_rel_drop``."""
    loss = col(body, "loss")
    nan = {"loss_first_steps": math.nan, "loss_last_steps": math.nan, "loss_rel_drop_steps": math.nan,
           "loss_first_epoch": math.nan, "loss_last_epoch": math.nan, "loss_rel_drop": math.nan}
    finite = np.isfinite(loss)
    if len(body) == 0 or not finite.any():
        return {**nan, "no_progress": None}
    # The steps: the first and the last tenth of the steps with a finite loss (one step at least).
    values = loss[finite]
    tenth = max(1, math.ceil(len(values) / 10))
    first_s, last_s = float(values[:tenth].mean()), float(values[-tenth:].mean())
    out = {**nan, "loss_first_steps": first_s, "loss_last_steps": last_s,
           "loss_rel_drop_steps": _rel_drop(first_s, last_s, ell_inf)}
    progress = _shows_progress(first_s, last_s, ell_inf, min_rel_drop)
    # The epochs, where there are two (one epoch compared with itself says nothing).
    means = pd.Series(loss).groupby(body["epoch"].to_numpy(), sort=True).mean()
    out["loss_first_epoch"], out["loss_last_epoch"] = float(means.iloc[0]), float(means.iloc[-1])
    if len(means) > 1:
        first_e, last_e = out["loss_first_epoch"], out["loss_last_epoch"]
        out["loss_rel_drop"] = _rel_drop(first_e, last_e, ell_inf)
        progress = progress or _shows_progress(first_e, last_e, ell_inf, min_rel_drop)
    out["no_progress"] = not progress
    return out


def summarize(
    df: pd.DataFrame,
    tail: int = 0,
    ell_inf: float = 0.0,
    displacement: float | None = None,
    min_rel_drop: float = 0.1,
    d0_sq: float | None = None,
    eps: float = 1e-8,
) -> dict[str, Any]:
    """Run-level summary of a step table as one flat dict of plain Python scalars.

    The derived columns are recomputed (:func:`derive` with ``d0_sq``, ``ell_inf``,
    ``eps``), then the last ``tail`` steps are excluded from every number except the
    path ratio, whose ``displacement`` (‖θ_0 − θ_T‖, supplied by the caller) spans
    the whole run. Keys:

    - ``gamma_*``: :func:`certify` of the table for γ_k — the certified interval
      ``gamma_lo``, ``gamma_hi`` (+inf stored as null: no step bounds γ from above),
      the steps binding them ``gamma_lo_step``, ``gamma_hi_step``, ``gamma_certified``
      (the interval is non-empty), ``gamma_certificate`` (it in one sentence, naming the
      conflicting steps), ``gamma_n_lower``, ``gamma_n_zero_gap``, ``gamma_n_conflict``,
      ``gamma_n_unmeasured``; and the γ_k statistics ``gamma_min`` (= ``gamma_hi``),
      ``gamma_n_steps``, ``gamma_n_undefined``, ``gamma_frac_positive``,
      ``gamma_median``, ``gamma_mean``. ``gamma_rp_*`` the same for γ^RP_k / D_0²,
      ``gamma_rc_*`` for γ^RC_k
    - ``star_min``, ``star_frac_nonneg``, ``star_n_undefined``
    - ``gamma_eff``: γ_eff(K) at K = T − tail
    - ``dist_n_increase``, ``dist_frac_increase``, ``dist_max_increase``,
      ``dist_sum_increase`` (:func:`monotone_distance`)
    - ``rate_actual``, ``rate_bound``, ``rate_tightness``, ``rate_holds``,
      ``rate_premise_violations``, ``rate_reason`` at the final boundary, with
      γ = gamma_hi, the largest γ of the certified interval; not evaluated (NaN, with the
      reason) when the interval is empty (:func:`rate_bound`)
    - ``path_length``, ``path_ratio`` (NaN without ``displacement``),
      ``cos_align_mean``, ``cos_align_frac_positive``
    - ``loss_first_steps``, ``loss_last_steps``, ``loss_rel_drop_steps``: the mean batch
      loss of the first and of the last tenth of the steps (one step at least) and its
      relative drop above ℓ_inf, 1 − (last − ℓ_inf) / (first − ℓ_inf);
      ``loss_first_epoch``, ``loss_last_epoch``, ``loss_rel_drop``: the same for the mean
      batch loss of the first and the last epoch (``loss_rel_drop`` NaN with one epoch);
      ``no_progress``: the run "does not train" — neither drop reaches ``min_rel_drop``
      (a loop without epochs is judged by its steps; a run whose loss fell by more than
      ``min_rel_drop`` either way is never flagged).
    - ``n_steps_total``, ``tail``, ``n_steps``, ``d0_sq``

    What the numbers cannot say (DESIGN §1): with θ* = θ_T the progress telescopes
    to ½D_0², so ``gamma_eff`` = 1 / (2 Σ η_k gap_k) is a function of the losses
    alone — "larger γ ⇔ faster convergence" is an identity for it, not evidence.
    Base claims on what the losses do not determine (γ_min, median, fraction
    positive, distance increases, layer shares, a continuation reference, the null
    cosine). A ``no_progress`` run has a tiny D_0 and near-zero gaps: its γ_k are
    noise and it must be kept out of orderings, with this flag as the reason.

    Public API: the summary ``gammatrace analyze`` writes, and ``TwoPass(...).run().summary()``
    returns, for any step table — a Probe's in your own loop too:
    ``summarize(probe.raw_steps(), tail=10, d0_sq=probe.d0_sq)``.

    Example:
        >>> from gammatrace.principles import example_steps, summarize
        >>> s = summarize(example_steps(), displacement=1.0)
        >>> s["gamma_certified"], s["dist_n_increase"], round(s["gamma_eff"], 3)
        (False, 1, 3.077)
        >>> s["no_progress"], round(s["loss_rel_drop"], 3)
        (False, 0.432)
        >>> summarize(example_steps(), tail=1)["n_steps"]  # the last step left out
        3
    """
    tail = check_tail(tail)
    full = derive(df, d0_sq=d0_sq, ell_inf=ell_inf, eps=eps)
    d0 = resolve_d0_sq(df, d0_sq)
    body = drop_tail(full, tail)
    out: dict[str, Any] = {"n_steps_total": len(full), "tail": tail, "n_steps": len(body)}
    out["d0_sq"] = d0

    for name in ("gamma", "gamma_rp", "gamma_rc"):
        stats = certify(df, tail=tail, column=name, d0_sq=d0, ell_inf=ell_inf, eps=eps)
        # certify() says "gamma_min", "gamma_lo"; the prefix already names the series. The
        # step lists are in the sentence ("…_certificate"): the summary stays flat scalars.
        out.update({f"{name}_{key.removeprefix('gamma_')}": v for key, v in stats.items()
                    if key not in LIST_KEYS})

    star = col(body, "star")
    star_def = star[np.isfinite(star)]
    out["star_min"] = float(star_def.min()) if len(star_def) else math.nan
    out["star_frac_nonneg"] = float(np.mean(star_def >= 0)) if len(star_def) else math.nan
    out["star_n_undefined"] = len(star) - len(star_def)

    out["gamma_eff"] = gamma_eff(body, d0_sq=d0) if len(body) else math.nan

    mono = monotone_distance(body, d0_sq=d0)
    for key in ("n_increase", "frac_increase", "max_increase", "sum_increase"):
        out[f"dist_{key}"] = mono[key]

    rate_keys = ("actual", "bound", "tightness", "holds", "premise_violations")
    if len(body):
        rate = rate_bound(body, gamma=rate_gamma(out["gamma_certified"], out["gamma_hi"]),
                          boundaries=[len(body)], d0_sq=d0)
        last = rate["table"].iloc[-1]
        out.update({f"rate_{key}": last[key] for key in rate_keys})
        out["rate_reason"] = rate["reason"]
    else:
        out.update({f"rate_{key}": math.nan for key in rate_keys})
        out["rate_reason"] = "no steps left after excluding the tail"

    whole = path_geometry(full, displacement)
    out["path_length"] = whole["path_length"]
    out["path_ratio"] = whole["path_ratio"]
    cos = path_geometry(body)
    out["cos_align_mean"] = cos["cos_mean"]
    out["cos_align_frac_positive"] = cos["cos_frac_positive"]

    out.update(_loss_drop(body, ell_inf, min_rel_drop))
    return {key: plain(value) for key, value in out.items()}
