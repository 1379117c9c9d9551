"""Claim statistics: the one verdict rule every report uses, and the null baseline for alignment.

Pure statistics over numbers the reporting layer has already read from the runs (no
torch, no files): a run is a :class:`RunPoint` (its median γ_k, its convergence value,
and why it is excluded, if it is); :func:`check_claim` turns the points of a claim into
orderings, Spearman ρ and a verdict. The same rule serves the study report (a claimed
order of cells) and the report of a plain set of runs (no claimed order: only
ρ(γ, speed) over the runs decides), so a reader never meets two thresholds.

Also here: :func:`epochs_to_loss` (convergence speed from a per-epoch loss curve) and
:func:`null_alignment` (the exact null baseline for cos_align and for the fraction of
steps that move toward θ*).

Example:
    >>> r = check_claim(["a", "b", "c"], [RunPoint("a", "a", 3.0, 10), RunPoint("b", "b", 2.0, 20),
    ...                                   RunPoint("c", "c", 1.0, 30)])
    >>> r.verdict, r.gamma_order, r.rho_claim, r.rho_speed
    ('consistent', ['a', 'b', 'c'], 1.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

# |ρ| at or above this is a rank agreement (or disagreement) worth a verdict; with 3
# cells it allows one swapped pair (ρ = 0.5), with 4 cells ρ ≥ 0.6 means at most one.
RHO_MIN = 0.5
# Fewer comparable cells than this cannot order anything beyond a coin flip.
MIN_CELLS = 3

CONSISTENT = "consistent"
NOT_CONSISTENT = "not consistent"
INCONCLUSIVE = "inconclusive"


def _g(x: float) -> str:
    """A statistic in a verdict's reason: 3 significant digits, — when undefined."""
    return f"{float(x):.3g}" if math.isfinite(x) else "—"


# ------------------------------------------------------------------------ the points
@dataclass(frozen=True)
class RunPoint:
    """One run as the claim check sees it: ``gamma`` (median γ_k), ``conv`` (epochs to
    the target or final loss: lower is faster), and why it is excluded, if it is.

    Example:
        >>> RunPoint("relu-s0", "relu", 0.29, 6).excluded is None
        True
    """

    run: str
    cell: str
    gamma: float
    conv: float
    excluded: str | None = None


@dataclass
class CellStat:
    """A comparable cell: its runs' count, mean γ with min–max, and mean convergence."""

    cell: str
    n: int
    gamma: float
    gamma_lo: float
    gamma_hi: float
    conv: float


@dataclass
class ClaimResult:
    """What :func:`check_claim` found; ``text`` is the verdict with its reason."""

    order: list[str]
    cells: list[CellStat]
    excluded: dict[str, str]
    gamma_order: list[str]
    speed_order: list[str]
    rho_claim: float
    rho_speed: float
    n_runs: int
    verdict: str
    reason: str = ""

    @property
    def text(self) -> str:
        return f"{self.verdict} ({self.reason})" if self.reason else self.verdict


# ------------------------------------------------------------------------ statistics
def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties share their mean rank); NaN when a side is constant.

    Example:
        >>> round(spearman([1, 2, 3, 4], [10, 30, 20, 40]), 6), spearman([1, 2], [5, 5])
        (0.8, nan)
    """
    if len(a) != len(b):
        raise ValueError(f"spearman needs two sequences of one length, got {len(a)} and {len(b)}")
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan  # a constant ranks nothing
    # scipy is costly to import and only a rank correlation needs it
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def check_claim(order: Sequence[str] | None, points: Sequence[RunPoint], *,
                incomparable: str | None = None) -> ClaimResult:
    """Check a claim "cells in ``order`` have decreasing γ and decreasing speed".

    Per cell: γ = mean over its runs (seeds) of the median γ_k, with the min–max;
    convergence = mean of ``conv``. ρ_claim = Spearman between the claimed order and
    the cells' γ; ρ_speed = Spearman between γ and speed (−conv) across the runs.
    ``order=None`` states no order of cells, only "larger γ ⇔ faster convergence" over
    the runs: every point is its own cell (named by its run), ρ_claim is NaN and only
    ρ_speed decides. ``incomparable`` is a reason the runs' γ cannot be compared (their
    end losses differ, DESIGN §1). Verdict, in this order:

    - inconclusive: a cell of the claim has an excluded run or no run ("cells
      excluded"), fewer than 3 comparable cells, ``incomparable`` given, a ρ undefined
      (constant values), or — with several seeds — the γ ranges of two cells adjacent
      in the claim overlap;
    - consistent: ρ_claim ≥ 0.5 and ρ_speed ≥ 0.5;
    - not consistent: ρ_claim ≤ −0.5 or ρ_speed ≤ −0.5;
    - inconclusive otherwise (weak rank correlation).

    Example:
        >>> pts = [RunPoint("a", "a", 1.0, 10), RunPoint("b", "b", 2.0, 20), RunPoint("c", "c", 3.0, 30)]
        >>> check_claim(["a", "b", "c"], pts).text
        'not consistent (ρ(claimed order, γ) = -1, ρ(γ, speed) = -1)'
        >>> check_claim(None, pts).text
        'not consistent (ρ(γ, speed) = -1)'
    """
    claimed = order is not None
    if not claimed:
        # No claimed order: the runs themselves are the cells, in the caller's order.
        points = [RunPoint(p.run, p.run, p.gamma, p.conv, p.excluded) for p in points]
        order = list(dict.fromkeys(p.cell for p in points))
    unit = "cells" if claimed else "runs"
    excluded: dict[str, str] = {}
    stats: list[CellStat] = []
    for cell in order:
        pts = [p for p in points if p.cell == cell]
        bad = [p for p in pts if p.excluded]
        if not pts:
            excluded[cell] = "no run"
            continue
        if bad:
            excluded[cell] = "; ".join(f"{p.run}: {p.excluded}" for p in bad)
            continue
        g = [p.gamma for p in pts]
        stats.append(CellStat(cell, len(pts), float(np.mean(g)), min(g), max(g), float(np.mean([p.conv for p in pts]))))
    comparable = [s.cell for s in stats]
    by = {s.cell: s for s in stats}
    gamma_order = sorted(comparable, key=lambda c: -by[c].gamma)
    speed_order = sorted(comparable, key=lambda c: by[c].conv)
    runs = [p for p in points if p.cell in by]
    rho_claim = spearman([-order.index(c) for c in comparable], [by[c].gamma for c in comparable]) if claimed \
        else math.nan
    rho_speed = spearman([p.gamma for p in runs], [-p.conv for p in runs])
    result = ClaimResult(list(order), stats, excluded, gamma_order, speed_order, rho_claim, rho_speed, len(runs),
                         INCONCLUSIVE)
    rhos = (f"ρ(claimed order, γ) = {_g(rho_claim)}, " if claimed else "") + f"ρ(γ, speed) = {_g(rho_speed)}"
    decisive = [rho_claim, rho_speed] if claimed else [rho_speed]
    overlaps = [f"{a.cell} [{_g(a.gamma_lo)}, {_g(a.gamma_hi)}] vs {b.cell} [{_g(b.gamma_lo)}, {_g(b.gamma_hi)}]"
                for a, b in pairwise(stats)
                if max(a.n, b.n) > 1 and a.gamma_lo <= b.gamma_hi and b.gamma_lo <= a.gamma_hi]
    if excluded:
        result.reason = f"{unit} excluded: " + ", ".join(sorted(excluded))
    elif len(comparable) < MIN_CELLS:
        result.reason = f"fewer than {MIN_CELLS} comparable {unit} ({len(comparable)})"
    elif incomparable:
        result.reason = incomparable
    elif not all(math.isfinite(r) for r in decisive):
        result.reason = f"a rank correlation is undefined (constant values): {rhos}"
    elif overlaps:
        result.reason = "seed spread overlaps: " + "; ".join(overlaps)
    elif all(r >= RHO_MIN for r in decisive):
        result.verdict, result.reason = CONSISTENT, rhos
    elif any(r <= -RHO_MIN for r in decisive):
        result.verdict, result.reason = NOT_CONSISTENT, rhos
    else:
        result.reason = f"weak rank correlation (|ρ| < {RHO_MIN:g}): {rhos}"
    return result


def epochs_to_loss(epochs: Sequence[int], losses: Sequence[float], threshold: float | None) -> int | None:
    """Epochs until the loss first was ≤ ``threshold``: the first such epoch index + 1.

    None when it never was, or without a threshold. ``epochs`` are 0-based indices.

    Example:
        >>> epochs_to_loss([0, 1, 2, 3], [2.3, 0.9, 0.4, 0.2], 0.5), epochs_to_loss([0], [2.3], 0.5)
        (3, None)
    """
    if threshold is None or not len(losses):
        return None
    hit = np.flatnonzero(np.asarray(losses, dtype=np.float64) <= threshold)
    return int(np.asarray(epochs)[hit[0]]) + 1 if len(hit) else None


# ----------------------------------------------------------------------- null baseline
def null_alignment(n_params: int, cos_align: Any, dist_sq: Any, update_sq: Any, progress: Any) -> dict[str, float]:
    """Alignment of the real updates against random directions of the same norm.

    A direction u uniform on the sphere in R^n has cos(u, v) with (1 + cos)/2 ~
    Beta((n−1)/2, (n−1)/2) for any fixed v: mean 0, standard deviation ≈ 1/√n. A
    random step of the real step's length ‖Δ_k‖ from θ_k moves *toward* θ* (P_k > 0)
    exactly when cos > ‖Δ_k‖ / (2 d_k), so the expected fraction of steps with
    P_k > 0 under the null is computed exactly from each step's ``dist_sq`` and
    ``update_sq`` (no sampling). Returns ``cos_mean``, ``cos_null_sd`` (1/√n, one
    step), ``cos_null_sd_mean`` (1/√(nT), the mean over T independent steps),
    ``cos_z`` (mean / that), ``frac_progress`` (measured fraction P_k > 0) and
    ``frac_progress_null`` (its expectation for random directions); NaN without steps.

    Example:
        >>> b = null_alignment(100, [0.5, 0.4], [1.0, 0.8], [0.01, 0.01], [0.04, 0.03])
        >>> b["frac_progress"], round(b["frac_progress_null"], 3), round(b["cos_z"], 1)
        (1.0, 0.3, 6.4)
    """
    cos = np.asarray(cos_align, dtype=np.float64)
    cos = cos[np.isfinite(cos)]
    dist = np.sqrt(np.maximum(np.asarray(dist_sq, dtype=np.float64), 0.0))
    upd = np.sqrt(np.maximum(np.asarray(update_sq, dtype=np.float64), 0.0))
    out = dict.fromkeys(("cos_mean", "cos_null_sd", "cos_null_sd_mean", "cos_z", "frac_progress",
                         "frac_progress_null"), math.nan)
    if not n_params or not len(dist):
        return out
    # scipy is costly to import and only the exact null fraction needs the Beta law
    from scipy.stats import beta

    n = int(n_params)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(dist > 0, upd / (2.0 * dist), np.inf)
    a = (n - 1) / 2.0
    p = np.where(c < 1.0, beta.sf((1.0 + np.minimum(c, 1.0)) / 2.0, a, a), 0.0)
    out.update(cos_mean=float(cos.mean()) if len(cos) else math.nan, cos_null_sd=1.0 / math.sqrt(n),
               cos_null_sd_mean=1.0 / math.sqrt(n * max(len(cos), 1)),
               frac_progress=float((np.asarray(progress, dtype=np.float64) > 0).mean()),
               frac_progress_null=float(p.mean()))
    out["cos_z"] = out["cos_mean"] / out["cos_null_sd_mean"]
    return out
