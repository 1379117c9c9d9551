"""The one claims module: the verdict rule (table-driven), Spearman ρ against a brute-force
rank correlation, convergence speed, the exact null baseline against sampling, and the
eligibility of runs — the same for the study report and the report of plain runs.

Runs here are :func:`example_entry` folders (a run.json, given losses and summary): no
training, so the module runs in seconds.
"""

from __future__ import annotations

import doctest
import itertools
import math

import numpy as np
import pandas as pd
import pytest

from gammatrace.principles import claims as PC
from gammatrace.principles.claims import (
    RunPoint,
    check_claim,
    epochs_to_loss,
    null_alignment,
    spearman,
)
from gammatrace.reporting import claims as RC
from gammatrace.reporting.claims import (
    check_runs,
    convergence,
    eligible,
    end_point_problem,
    exclusion,
    run_point,
    threshold_of,
)
from gammatrace.reporting.collect import example_entry


def _pts(values, excluded=None):
    """(cell, γ, conv) triples -> RunPoints; a cell's runs are its seeds."""
    return [RunPoint(f"{cell}-{i}", cell, gamma, conv, (excluded or {}).get(cell))
            for i, (cell, gamma, conv) in enumerate(values)]


# ----------------------------------------------------------------------- verdict rule
@pytest.mark.parametrize("order, values, excluded, incomparable, verdict, reason", [
    # A claimed order of cells: both ρ must reach 0.5.
    ("abc", [("a", 3, 10), ("b", 2, 20), ("c", 1, 30)], None, None, "consistent",
     "ρ(claimed order, γ) = 1, ρ(γ, speed) = 1"),
    # One swapped pair of three cells: ρ = 0.5 exactly, at the threshold.
    ("abc", [("a", 3, 10), ("b", 1, 30), ("c", 2, 20)], None, None, "consistent",
     "ρ(claimed order, γ) = 0.5, ρ(γ, speed) = 1"),
    ("abc", [("a", 1, 10), ("b", 2, 20), ("c", 3, 30)], None, None, "not consistent", "ρ(claimed order, γ) = -1"),
    # γ as claimed, but the largest γ converges slowest: one ρ ≤ −0.5 is enough.
    ("abc", [("a", 3, 30), ("b", 2, 20), ("c", 1, 10)], None, None, "not consistent",
     "ρ(claimed order, γ) = 1, ρ(γ, speed) = -1"),
    # γ as claimed, speed unrelated: ρ(γ, speed) = 0.4 < 0.5.
    ("abcd", [("a", 4, 20), ("b", 3, 30), ("c", 2, 10), ("d", 1, 40)], None, None, "inconclusive",
     "weak rank correlation (|ρ| < 0.5): ρ(claimed order, γ) = 1, ρ(γ, speed) = 0.4"),
    ("abc", [("a", 3, 10), ("b", 2, 20), ("c", 1, 30)], {"b": "no progress"}, None, "inconclusive",
     "cells excluded: b"),
    ("abc", [("a", 3, 10), ("b", 2, 20)], None, None, "inconclusive", "cells excluded: c"),
    ("ab", [("a", 3, 10), ("b", 2, 20)], None, None, "inconclusive", "fewer than 3 comparable cells (2)"),
    ("abc", [("a", 3, 10), ("b", 2, 20), ("c", 1, 30)], None, "final train losses differ by 3×", "inconclusive",
     "final train losses differ by 3×"),
    ("abc", [("a", 3, 10), ("b", 3, 20), ("c", 3, 30)], None, None, "inconclusive", "undefined"),
    ("abc", [("a", 3, 10), ("a", 1.9, 11), ("b", 2, 20), ("b", 2.1, 21), ("c", 0.5, 30), ("c", 0.6, 31)], None, None,
     "inconclusive", "seed spread overlaps: a [1.9, 3] vs b [2, 2.1]"),
    # No claimed order: every run is a cell and only ρ(γ, speed) over the runs decides.
    (None, [("a", 3, 10), ("b", 2, 20), ("c", 1, 30)], None, None, "consistent", "ρ(γ, speed) = 1"),
    (None, [("a", 1, 10), ("b", 2, 20), ("c", 3, 30)], None, None, "not consistent", "ρ(γ, speed) = -1"),
    (None, [("a", 3, 10), ("b", 2, 20), ("c", 4, 30), ("d", 1, 40)], None, None, "inconclusive",
     "weak rank correlation (|ρ| < 0.5): ρ(γ, speed) = 0.4"),
    (None, [("a", 3, 10), ("b", 2, 20)], None, None, "inconclusive", "fewer than 3 comparable runs (2)"),
    (None, [("a", 3, 10), ("b", 2, 20), ("c", 1, 30)], {"c": "diverged"}, None, "inconclusive",
     "runs excluded: c-2"),
    (None, [("a", 3, 10), ("b", 2, 20), ("c", 1, 30)], None, "ends apart", "inconclusive", "ends apart"),
    (None, [("a", 3, 10), ("b", 2, 10), ("c", 1, 10)], None, None, "inconclusive", "undefined"),
])
def test_verdict_rule(order, values, excluded, incomparable, verdict, reason):
    result = check_claim(list(order) if order else None, _pts(values, excluded), incomparable=incomparable)
    assert result.verdict == verdict, result.text
    assert reason in result.reason, result.text


def test_no_claimed_order_counts_each_run_and_ignores_cell_names():
    # Two runs of one cell are two runs when no order is claimed: no seed averaging.
    pts = [RunPoint("x", "same", 3.0, 10), RunPoint("y", "same", 2.0, 20), RunPoint("z", "other", 1.0, 30)]
    r = check_claim(None, pts)
    assert r.order == ["x", "y", "z"] and r.n_runs == 3 and math.isnan(r.rho_claim)
    assert r.gamma_order == r.speed_order == ["x", "y", "z"] and r.verdict == "consistent"


def test_thresholds_are_the_rule_constants():
    assert PC.RHO_MIN == 0.5 and PC.MIN_CELLS == 3 and RC.LOSS_RATIO_LIMIT == 2.0


# --------------------------------------------------------------------------- Spearman
def _brute_spearman(a, b):
    """Pearson correlation of mid-ranks, ranks counted pair by pair (ties share the mean)."""
    def ranks(x):
        return [1 + sum(y < v for y in x) + (sum(y == v for y in x) - 1) / 2 for v in x]

    ra, rb = np.array(ranks(a)), np.array(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra**2).sum() * (rb**2).sum()))


@pytest.mark.parametrize("seed", range(8))
def test_spearman_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 12))
    a = rng.integers(0, 5, n).tolist()  # small integers: ties on purpose
    b = (rng.normal(size=n) + 0.5 * np.asarray(a)).round(1).tolist()
    if len(set(a)) < 2 or len(set(b)) < 2:
        a[0], b[0] = a[0] + 10, b[0] + 10
    assert spearman(a, b) == pytest.approx(_brute_spearman(a, b), abs=1e-12)


def test_spearman_without_ties_is_the_textbook_formula():
    for perm in itertools.permutations(range(5)):
        d2 = sum((i - p) ** 2 for i, p in enumerate(perm))
        assert spearman(list(range(5)), list(perm)) == pytest.approx(1 - 6 * d2 / (5 * (25 - 1)), abs=1e-12)


def test_spearman_undefined_and_mismatched():
    assert math.isnan(spearman([1.0], [2.0])) and math.isnan(spearman([1, 2, 3], [4, 4, 4]))
    with pytest.raises(ValueError, match="one length"):
        spearman([1, 2, 3], [1, 2])


# ---------------------------------------------------------------- convergence, null
@pytest.mark.parametrize("losses, threshold, expected", [
    ([2.3, 0.9, 0.4, 0.2], 0.5, 3),
    ([2.3, 0.9, 0.4, 0.2], 0.4, 3),  # ≤: reaching the threshold counts
    ([2.3, 0.9], 0.5, None),
    ([0.1], 0.5, 1),
    ([], 0.5, None),
    ([2.3, 0.1], None, None),
])
def test_epochs_to_loss(losses, threshold, expected):
    assert epochs_to_loss(list(range(len(losses))), losses, threshold) == expected


def test_exact_null_fraction_matches_sampling():
    # Random directions of the step's norm in R^n, sampled: the fraction that decreases
    # the distance to θ* equals the exact Beta-law value.
    rng = np.random.default_rng(0)
    n, rows = 40, []
    v = rng.normal(size=n)
    for upd in (0.05, 0.3, 1.0, 20.0):  # the last one can never move toward θ* (‖Δ‖ > 2d)
        u = rng.normal(size=(20000, n))
        u *= upd / np.linalg.norm(u, axis=1, keepdims=True)
        progress = u @ v - 0.5 * upd**2  # P = <θ_k − θ*, Δ> − ½‖Δ‖², with θ_k − θ* = v
        rows.append((float(v @ v), upd**2, float((progress > 0).mean())))
    dist_sq, update_sq, sampled = (np.array(c) for c in zip(*rows, strict=True))
    exact = null_alignment(n, np.zeros(len(rows)), dist_sq, update_sq, np.ones(len(rows)))
    assert abs(exact["frac_progress_null"] - sampled.mean()) < 0.01, (exact, sampled)
    assert exact["cos_null_sd"] == 1 / math.sqrt(n) and exact["frac_progress"] == 1.0


def test_null_alignment_without_steps_or_size_is_undefined():
    for b in (null_alignment(0, [0.5], [1.0], [0.01], [1.0]), null_alignment(10, [], [], [], [])):
        assert all(math.isnan(x) for x in b.values())


# ------------------------------------------------------------------------ eligibility
def _without_final_loss():
    e = example_entry("nofinal")
    e.summary["train_loss"] = None
    e.epochs = pd.DataFrame()
    return e


def _without_median():
    e = example_entry("nomedian")
    e.summary["gamma_median"] = None  # JSON stores NaN as null
    return e


@pytest.mark.parametrize("make, expected", [
    (lambda: example_entry("ok"), None),
    (lambda: example_entry("ok", losses=[1.0, 0.1], target_loss=0.15), None),
    (lambda: example_entry("np", losses=[2.3, 2.28], no_progress=True),
     "no progress (mean batch loss fell by only 0.9%)"),
    (lambda: example_entry("miss", losses=[1.0, 0.4], target_loss=0.15),
     "missed the target loss 0.15 (final train loss 0.4 after 2 epochs)"),
    (lambda: example_entry("na", analysed=False), "no analysis yet"),
    (_without_median, "median γ_k undefined"),
    (_without_final_loss, "final train loss unknown"),
])
def test_exclusion(make, expected):
    assert exclusion(make()) == expected


def test_run_point_takes_flags_from_training_and_gamma_from_its_reference():
    trained = example_entry("relu", 0.3)
    cont = example_entry("relu", 0.25)
    assert run_point(cont, 6.0, run="r", cell="c", trained=trained) == RunPoint("r", "c", 0.25, 6.0)
    flat = example_entry("flat", 2.4, [2.3, 2.29], no_progress=True)
    p = run_point(cont, 6.0, run="r", cell="c", trained=flat)
    assert p.gamma == 0.25 and p.excluded.startswith("no progress")
    p = run_point(example_entry("x", analysed=False), 6.0, run="r", cell="c", trained=trained,
                  reference="continuation")
    assert p.excluded == "no continuation analysis (no analysis yet)" and math.isnan(p.gamma)
    assert run_point(None, 1.0, run="r", cell="c").excluded == "no run"


def test_convergence_epochs_to_common_target_else_final_loss():
    fast = example_entry("fast", losses=[1.0, 0.1], target_loss=0.15)
    slow = example_entry("slow", losses=[1.0, 0.5, 0.3, 0.14], target_loss=0.15)
    miss = example_entry("miss", losses=[1.0, 0.5], target_loss=0.15)
    conv = convergence([fast, slow, miss])
    assert conv.by_epochs and conv.values == [2.0, 4.0, math.inf]
    assert threshold_of([fast, slow]) == (0.15, "the target loss 0.15")
    other = example_entry("other", losses=[1.0, 0.2], target_loss=0.25)
    conv = convergence([fast, other])
    assert not conv.by_epochs and conv.values == [0.1, 0.2] and conv.text == "final train loss (lowest first)"


def test_end_points_compare_only_eligible_runs():
    a, b = example_entry("a", losses=[1.0, 0.2]), example_entry("b", losses=[1.0, 0.3])
    far = example_entry("far", losses=[1.0, 0.7])
    assert end_point_problem([a, b]) is None
    assert end_point_problem([a, b, far]) == "final train losses differ by 3.5×, more than 2×"
    stuck = example_entry("stuck", losses=[2.3, 2.29], no_progress=True)  # excluded: its loss does not count
    assert end_point_problem([a, b, stuck]) is None and eligible([a, stuck, b]) == [a, b]


def test_check_runs_is_the_study_rule_without_a_claimed_order():
    def runs(gammas, losses=(0.10, 0.11, 0.12, 0.13)):
        return [example_entry(n, g, [1.0, x]) for n, g, x in zip("abcd", gammas, losses, strict=False)]

    assert check_runs(runs([0.4, 0.3, 0.2, 0.1])).result.text == "consistent (ρ(γ, speed) = 1)"
    assert check_runs(runs([0.1, 0.2, 0.3, 0.4])).result.verdict == "not consistent"
    # ρ = 0.4: "consistent" for the single-run report before the rule was shared, now weak.
    weak = check_runs(runs([0.3, 0.2, 0.4, 0.1])).result
    assert weak.rho_speed == pytest.approx(0.4) and weak.verdict == "inconclusive"
    apart = check_runs(runs([0.4, 0.3, 0.2], losses=(0.1, 0.2, 0.35))).result
    assert apart.text == "inconclusive (final train losses differ by 3.5×, more than 2×)"
    stuck = example_entry("stuck", 2.4, [2.3, 2.29], no_progress=True)
    check = check_runs([*runs([0.4, 0.3, 0.2]), stuck])
    assert [e.label for e in check.runs] == ["a", "b", "c"] and check.result.verdict == "consistent"


def test_docstring_examples():
    from gammatrace.reporting import collect
    from gammatrace.store import study

    for module in (PC, RC, collect, study):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
