"""Claims over runs on disk: which runs may enter an ordering, how fast each converged,
the claim check of a set of runs, and the null baseline — one rule for every report.

The statistics live in :mod:`gammatrace.principles.claims` (:func:`check_claim`, the one
verdict rule); this module turns what the runs recorded (:class:`RunEntry`) into its
inputs, so the report of a study and the report of a plain set of runs exclude the same
runs, measure convergence the same way and reach verdicts by the same thresholds.

- eligibility: :func:`exclusion` (why one run cannot enter an ordering), :func:`eligible`,
  :func:`end_point_problem` (the runs end at losses too far apart to compare γ, DESIGN §1);
- convergence speed: :func:`epochs_to`, :func:`convergence`, :func:`threshold_of`;
- the check: :func:`run_point` (a run as the claim check sees it), :func:`check_runs`;
- γ at matched loss: :func:`matched_loss` (each run's median γ_k at 10 levels of the full
  training loss every run reaches; :mod:`gammatrace.principles.matched`);
- Theorem 1 per run: :func:`theorem1` (:func:`~gammatrace.principles.theorem1.theorem1_checks`);
- :func:`null_baseline` (real updates against random directions of the same norm).

Example:
    >>> from gammatrace.reporting.collect import example_entry
    >>> entries = [example_entry("relu", 0.3, [1.0, 0.10]), example_entry("tanh", 0.2, [1.0, 0.11]),
    ...            example_entry("sigmoid", 0.1, [1.0, 0.12]), example_entry("flat", 2.4, [2.3, 2.3], no_progress=True)]
    >>> check = check_runs(entries)
    >>> [e.label for e in check.runs], check.result.text
    (['relu', 'tanh', 'sigmoid'], 'single seed (one run per cell: trend p = 0.17, reversed 1 shown, never a verdict)')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gammatrace import principles as P
from gammatrace.principles.claims import (
    ClaimResult,
    RunPoint,
    check_claim,
    epochs_to_loss,
    null_alignment,
)
from gammatrace.principles.matched import N_LEVELS
from gammatrace.principles.theorem1 import Check
from gammatrace.reporting.collect import RunEntry, final_loss_text, main_epochs, num
from gammatrace.reporting.document import fmt

# Final train losses further apart than this factor end at different points, so γ
# normalized by each run's own θ_T is not comparable across them (DESIGN §1).
LOSS_RATIO_LIMIT = 2.0


# ------------------------------------------------------------------------- eligibility
def target_of(entry: RunEntry) -> float | None:
    """The run's target loss (its stop criterion), None without one.

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> target_of(example_entry(target_loss=0.15)), target_of(example_entry())
        (0.15, None)
    """
    return entry.run.config.target_loss


def _change(drop: float) -> str:
    return f"fell by only {drop:.1%}" if not drop < 0 else f"rose by {-drop:.1%}"


def loss_drop_words(summary: dict) -> str:
    """How far a run's mean batch loss fell, in words, over the epochs (where there are two)
    and over the steps (first vs last tenth): what the "no progress" flag was decided on.

    Example:
        >>> loss_drop_words({"loss_rel_drop": 0.009, "loss_first_epoch": 2.3, "loss_last_epoch": 2.28})
        'the mean batch loss fell by only 0.9% (first epoch 2.3 → last epoch 2.28)'
        >>> loss_drop_words({"loss_rel_drop": None, "loss_rel_drop_steps": -0.01, "loss_first_steps": 2.3,
        ...                  "loss_last_steps": 2.323})
        'the mean batch loss rose by 1.0% (first tenth of the steps 2.3 → last tenth 2.323)'
    """
    epochs, steps = num(summary.get("loss_rel_drop")), num(summary.get("loss_rel_drop_steps"))
    parts = []
    if math.isfinite(epochs):
        parts.append(f"{_change(epochs)} (first epoch {fmt(summary.get('loss_first_epoch'))} → last epoch "
                     f"{fmt(summary.get('loss_last_epoch'))})")
    if math.isfinite(steps):
        parts.append(f"{_change(steps)} (first tenth of the steps "
                     f"{fmt(summary.get('loss_first_steps'))} → last tenth {fmt(summary.get('loss_last_steps'))})")
    if not parts:
        return "the mean batch loss is unknown"
    above = num(summary.get("ell_inf"))
    where = f" above ℓ_inf = {fmt(above)}" if math.isfinite(above) and above != 0 else ""
    return f"the mean batch loss{where} " + " and ".join(parts)


def exclusion(entry: RunEntry) -> str | None:
    """Why a run cannot enter an ordering of γ (None: it can).

    In this order: not analysed (or diverged); flagged no progress (its γ_k are noise);
    missed its target loss (its θ_T is not at the common end point) — except for a claim
    stated over the first epochs (``entry.window``), which the papers state of runs that
    do not converge (paper 002's no-BN ResNets); no defined median γ_k; no final train
    loss (nothing to measure its convergence by).

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> exclusion(example_entry(losses=[2.3, 2.28], no_progress=True))
        'no progress (mean batch loss fell by only 0.9%)'
        >>> exclusion(example_entry(losses=[1.0, 0.4], target_loss=0.15))
        'missed the target loss 0.15 (final train loss 0.4 after 2 epochs)'
        >>> exclusion(example_entry(losses=[1.0, 0.1], target_loss=0.15)) is None
        True
    """
    if not entry.analysed:
        return entry.problem if not entry.diverged else f"diverged at step {entry.diverged_at_step}"
    s = entry.summary
    if entry.no_progress:
        drop = num(s.get("loss_rel_drop"))
        drop = drop if math.isfinite(drop) else num(s.get("loss_rel_drop_steps"))  # one epoch: the steps'
        return f"no progress (mean batch loss {_change(drop)})"
    if entry.window is None and target_of(entry) is not None and entry.run.meta.reached_target is False:
        return (f"missed the target loss {fmt(target_of(entry))} (final train loss {final_loss_text(entry)} "
                f"after {entry.n_epochs} epochs)")
    if not math.isfinite(num(s.get("gamma_median"))):
        return "median γ_k undefined"
    if not math.isfinite(entry.final_train_loss):
        return "final train loss unknown"
    return None


def eligible(entries: Sequence[RunEntry]) -> list[RunEntry]:
    """The runs that may enter an ordering (:func:`exclusion` is None), in their order.

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> [e.label for e in eligible([example_entry("a"), example_entry("b", analysed=False)])]
        ['a']
    """
    return [e for e in entries if exclusion(e) is None]


def loss_spread(entries: Sequence[RunEntry]) -> tuple[float, RunEntry | None, RunEntry | None]:
    """Ratio of the largest to the smallest final train loss, and the two runs (NaN, None, None
    for fewer than two runs).

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> ratio, lo, hi = loss_spread([example_entry("a", losses=[1, 0.2]), example_entry("b", losses=[1, 0.7])])
        >>> round(ratio, 3), lo.label, hi.label
        (3.5, 'a', 'b')
    """
    if len(entries) < 2:
        return math.nan, None, None
    lo = min(entries, key=lambda e: e.final_train_loss)
    hi = max(entries, key=lambda e: e.final_train_loss)
    ratio = hi.final_train_loss / lo.final_train_loss if lo.final_train_loss > 0 else math.inf
    return ratio, lo, hi


def end_point_problem(entries: Sequence[RunEntry]) -> str | None:
    """Why the eligible ones among ``entries`` cannot be compared by γ, or None.

    γ normalized by a run's own θ_T is comparable only across runs that end at
    comparable losses (DESIGN §1): their final train losses must lie within
    :data:`LOSS_RATIO_LIMIT` of each other.

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> end_point_problem([example_entry("a", losses=[1, 0.2]), example_entry("b", losses=[1, 0.7])])
        'final train losses differ by 3.5×, more than 2×'
    """
    ratio, _, _ = loss_spread(eligible(entries))
    if ratio > LOSS_RATIO_LIMIT:
        return f"final train losses differ by {ratio:.3g}×, more than {LOSS_RATIO_LIMIT:g}×"
    return None


# ------------------------------------------------------------------- convergence speed
def epochs_to(entry: RunEntry, threshold: float | None) -> int | None:
    """Epochs until the full training loss first was ≤ ``threshold`` (None: never / unknown).

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> epochs_to(example_entry(losses=[1.0, 0.5, 0.12, 0.08]), 0.15)
        3
    """
    ep = main_epochs(entry)
    if threshold is None or not len(ep) or "train_loss" not in ep:
        return None
    return epochs_to_loss(ep["epoch"].to_numpy(), ep["train_loss"].to_numpy(float), threshold)


def _common_target(entries: Sequence[RunEntry]) -> float | None:
    targets = {target_of(e) for e in entries}
    return next(iter(targets)) if len(targets) == 1 and None not in targets else None


@dataclass(frozen=True)
class Convergence:
    """Each run's convergence value (lower = faster), aligned with the runs it was
    computed for: epochs to the common ``target`` loss (inf: never reached), or, without
    a common target, the final train loss."""

    values: list[float]
    target: float | None

    @property
    def by_epochs(self) -> bool:
        return self.target is not None

    @property
    def text(self) -> str:
        if self.by_epochs:
            return f"epochs to the target loss {fmt(self.target)} (fewest first)"
        return "final train loss (lowest first)"


def convergence(entries: Sequence[RunEntry]) -> Convergence:
    """How fast each run converged: with a common target loss, epochs to reach it
    (training stops there); otherwise the final train loss.

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> conv = convergence([example_entry(losses=[1.0, 0.1], target_loss=0.15),
        ...                     example_entry(losses=[1.0, 0.5, 0.14], target_loss=0.15)])
        >>> conv.values, conv.text
        ([2.0, 3.0], 'epochs to the target loss 0.15 (fewest first)')
    """
    t = _common_target(entries)
    if t is None:
        return Convergence([e.final_train_loss for e in entries], None)
    reached = [epochs_to(e, t) for e in entries]
    return Convergence([float(n) if n is not None else math.inf for n in reached], t)


def threshold_of(entries: Sequence[RunEntry]) -> tuple[float | None, str]:
    """The loss threshold of "epochs to reach it" for a set of runs, and how it was chosen.

    The runs' common target loss; without one, the largest final train loss among the
    runs that may enter an ordering, so each of them reaches it.

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> threshold_of([example_entry("a", losses=[1, 0.2]), example_entry("b", losses=[1, 0.3])])
        (0.3, '0.3, the highest final train loss among the runs that trained (no common target loss)')
    """
    t = _common_target(entries)
    if t is not None:
        return t, f"the target loss {fmt(t)}"
    finals = [e.final_train_loss for e in eligible(entries)]
    finals = [f for f in finals if math.isfinite(f)]
    if not finals:
        return None, "no threshold (no run trained)"
    t = max(finals)
    return t, f"{fmt(t)}, the highest final train loss among the runs that trained (no common target loss)"


# ------------------------------------------------------------------------------ checks
def run_point(entry: RunEntry | None, conv: float, *, run: str, cell: str, trained: RunEntry | None = None,
              reference: str = "", gamma: float | None = None) -> RunPoint:
    """A run as the claim check sees it: its median γ_k under ``entry``'s reference, its
    convergence value, and why it is excluded.

    ``trained`` is the run's θ_T entry when ``entry`` is another reference's analysis of
    the same run: the flags that exclude a run come from its training, so they are the
    same for every reference; ``entry`` None or unanalysed excludes the run for that
    reference only.

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> run_point(example_entry("relu", 0.29), 6.0, run="relu-s0", cell="relu")
        RunPoint(run='relu-s0', cell='relu', gamma=0.29, conv=6.0, excluded=None, seed=None)
        >>> run_point(None, 6.0, run="relu-s0", cell="relu", trained=example_entry("relu"),
        ...           reference="continuation").excluded
        'no continuation analysis'
    """
    flags = trained if trained is not None else entry
    why = exclusion(flags) if flags is not None else "no run"
    if why is None and (entry is None or not entry.analysed):
        why = f"no {reference} analysis" + (f" ({entry.problem})" if entry is not None and entry.problem else "")
    if gamma is None:
        gamma = num(entry.summary.get("gamma_median")) if entry is not None and entry.analysed else math.nan
    if why is None and not math.isfinite(gamma):
        why = "median γ_k undefined"
    return RunPoint(run, cell, gamma, conv, why)


@dataclass
class RunsCheck:
    """"Faster convergence ⇔ larger median γ_k" over a set of runs: the runs that
    entered (in their order), their convergence, the order tested and the verdict."""

    runs: list[RunEntry]
    conv: Convergence
    order: tuple[tuple[str, ...], ...]
    result: ClaimResult | None


def check_runs(entries: Sequence[RunEntry]) -> RunsCheck:
    """Check "runs that converge faster have a larger median γ_k" over runs with no
    claimed order, by the one rule (:func:`~gammatrace.principles.claims.check_claim`).

    The eligible runs (:func:`exclusion`) each form a cell of their own; the others are
    left out (the caller lists them). The claimed order is the runs by convergence,
    fastest first, runs that converged equally fast tied. Each run is one seed, so the
    verdict is "single seed" (the trend's p-value shown), inconclusive when the runs end at
    losses too far apart (:func:`end_point_problem`) or converged all alike; ``result``
    is None with fewer than two runs.

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> runs = [example_entry("a", 0.3, [1, 0.10]), example_entry("b", 0.2, [1, 0.11]),
        ...         example_entry("c", 0.4, [1, 0.12]), example_entry("d", 0.1, [1, 0.13])]
        >>> check = check_runs(runs)
        >>> check.order, check.result.verdict, round(check.result.trend.p_value, 3)
        ((('a',), ('b',), ('c',), ('d',)), 'single seed', 0.375)
    """
    runs = eligible(entries)
    conv = convergence(runs)
    levels: dict[float, list[str]] = {}
    for e, c in sorted(zip(runs, conv.values, strict=True), key=lambda ec: ec[1]):
        levels.setdefault(c, []).append(e.label)
    order = tuple(tuple(v) for v in levels.values())
    if len(runs) < 2:
        return RunsCheck(runs, conv, order, None)
    points = [run_point(e, c, run=e.label, cell=e.label) for e, c in zip(runs, conv.values, strict=True)]
    if len(order) < 2:
        result = check_claim(((runs[0].label,), tuple(e.label for e in runs[1:])), points)
        result.verdict, result.reason = "inconclusive", "every run converged alike: no order to test"
        return RunsCheck(runs, conv, order, result)
    return RunsCheck(runs, conv, order, check_claim(order, points, incomparable=end_point_problem(runs)))


# ---------------------------------------------------------------------- matched loss
@dataclass
class MatchedLoss:
    """γ at matched loss for a set of runs (one reference): the levels of the full
    training loss every run reaches (``edges`` bound their bins), and per run (by label)
    its median γ_k at each level, its interpolated step losses, and its one number, the
    median over the levels. ``problem`` says why nothing could be matched."""

    edges: np.ndarray
    levels: np.ndarray
    per_level: dict[str, np.ndarray]
    value: dict[str, float]
    problem: str | None = None


def _step_losses(entry: RunEntry) -> np.ndarray:
    ep = main_epochs(entry)
    st = entry.steps
    if not len(ep) or "train_loss" not in ep or not len(st) or "epoch" not in st:
        return np.empty(0)
    losses = np.full(int(ep["epoch"].max()) + 1, np.nan)
    losses[ep["epoch"].to_numpy(int)] = ep["train_loss"].to_numpy(float)
    return P.step_loss(st["epoch"].to_numpy(int), losses)


def matched_loss(entries: Sequence[RunEntry], n: int = N_LEVELS) -> MatchedLoss:
    """Each run's median γ_k at ``n`` log-spaced levels of the full training loss over
    the range every run reaches (:mod:`gammatrace.principles.matched`): a step's loss is
    interpolated between the epochs' full losses, a level's γ is the median γ_k of the
    steps in its bin, and a run's γ at matched loss is the median over the levels.

    Example:
        >>> import pandas as pd
        >>> from gammatrace.reporting.collect import example_entry
        >>> e = example_entry("relu", losses=[2.0, 1.0, 0.5])
        >>> e.steps = pd.DataFrame({"epoch": [0, 1, 1, 2, 2], "gamma": [9.0, 1.0, 2.0, 3.0, 4.0]})
        >>> m = matched_loss([e], n=2)
        >>> m.levels.round(3).tolist(), m.per_level["relu"].tolist(), m.value["relu"]
        ([0.917, 1.542], [3.5, 1.5], 2.5)
    """
    usable = [e for e in entries if e.analysed and "gamma" in e.steps]
    losses = {e.label: _step_losses(e) for e in usable}
    ranges = []
    for e in usable:
        x = losses[e.label]
        x = x[np.isfinite(x)]
        ranges.append((float(x.min()), float(x.max())) if len(x) else (math.nan, math.nan))
    edges, levels = P.matched_levels(ranges, n) if usable else (np.empty(0), np.empty(0))
    if not len(levels):
        why = "no analysed run" if not usable else "the runs' training losses share no range"
        return MatchedLoss(edges, levels, {}, {e.label: math.nan for e in usable}, why)
    per_level = {e.label: P.gamma_at_levels(losses[e.label], e.steps["gamma"].to_numpy(float), edges)
                 for e in usable}
    return MatchedLoss(edges, levels, per_level, {k: P.matched_gamma(v) for k, v in per_level.items()})


# ------------------------------------------------------------------------- Theorem 1
def theorem1(entry: RunEntry) -> list[Check]:
    """Theorem 1 for one analysed run as verdicts with their numbers
    (:func:`~gammatrace.principles.theorem1.theorem1_checks` over its step table less the
    analysis' tail, and its per-sample summary); empty for a run without an analysis.

    Example:
        >>> import pandas as pd
        >>> from gammatrace.reporting.collect import example_entry
        >>> e = example_entry("relu")
        >>> e.steps = e.steps.assign(lr=0.1, loss=[1.0, 0.8, 0.5], loss_ref=0.0)
        >>> [(c.item, c.verdict) for c in theorem1(e)][1]  # item 1 per step: step 1 moves away from θ*
        ('‖θ_{k+1} − θ*‖ ≤ ‖θ_k − θ*‖ for every k', 'fails')
    """
    if not entry.analysed or not len(entry.steps):
        return []
    s = entry.summary
    samples = ({"frac_improved": num(s.get("sample_frac_improved")), "n_revisited": s.get("sample_n_revisited")}
               if s.get("sample_n_revisited") else None)
    steps = entry.steps.sort_values("step") if "step" in entry.steps else entry.steps
    # Over the steps the summary is over (its tail left out), like every table of the report.
    return P.theorem1_checks(steps, samples, d0_sq=num(s.get("d0_sq")) if math.isfinite(num(s.get("d0_sq")))
                             else None, tail=int(s.get("tail") or 0) if entry.window is None else 0)  # a window has none


# ------------------------------------------------------------------------ null baseline
def null_baseline(entry: RunEntry) -> dict[str, float]:
    """Alignment of a run's real updates against random directions of the same norm.

    :func:`~gammatrace.principles.claims.null_alignment` over the run's step table and
    parameter count: ``cos_mean``, ``cos_null_sd``, ``cos_null_sd_mean``, ``cos_z``,
    ``frac_progress`` (measured fraction P_k > 0) and ``frac_progress_null`` (its exact
    expectation for random directions); NaN where the run lacks the columns.

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> b = null_baseline(example_entry(n_params=100))
        >>> round(b["frac_progress"], 3), b["frac_progress_null"] < 0.5
        (0.667, True)
    """
    st = entry.steps
    if not len(st) or not {"dist_sq", "update_sq", "progress", "cos_align"} <= set(st.columns):
        return null_alignment(0, [], [], [], [])
    return null_alignment(entry.run.meta.n_params or 0, st["cos_align"].to_numpy(float),
                          st["dist_sq"].to_numpy(float), st["update_sq"].to_numpy(float),
                          st["progress"].to_numpy(float))
