"""The one claims module: the verdict rule (an exact permutation test of a claimed weak order,
table-driven and against brute-force enumeration), its calibration on synthetic cells where
the truth is known, γ at matched loss, Theorem 1 as verdicts, convergence speed, the exact
null baseline against sampling, and the eligibility of runs — the same for the study report
and the report of plain runs.

Runs here are :func:`example_entry` folders (a run.json, given losses and summary): no
training, so the module runs in seconds.
"""

from __future__ import annotations

import doctest
import itertools
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from gammatrace import principles as P
from gammatrace.errors import UserError
from gammatrace.principles import claims as PC
from gammatrace.principles.claims import (
    ALPHA,
    ClaimError,
    RunPoint,
    check_claim,
    epochs_to_loss,
    min_p_value,
    null_alignment,
    order_statistic,
    order_test,
    parse_order,
)
from gammatrace.reporting import claims as RC
from gammatrace.reporting.claims import (
    check_runs,
    convergence,
    eligible,
    end_point_problem,
    exclusion,
    matched_loss,
    run_point,
    theorem1,
    threshold_of,
)
from gammatrace.reporting.collect import example_entry


def _pts(cells: dict[str, list[float]], excluded=None, conv=None):
    """{cell: [γ of each seed]} -> RunPoints named cell-s<i>; conv: {cell: epochs}."""
    return [RunPoint(f"{cell}-s{i}", cell, float(g), float((conv or {}).get(cell, 10)), (excluded or {}).get(cell))
            for cell, values in cells.items() for i, g in enumerate(values)]


# ------------------------------------------------------------------------- orders
@pytest.mark.parametrize("text, levels", [
    ("relu ≈ leaky_relu > tanh > sigmoid", (("relu", "leaky_relu"), ("tanh",), ("sigmoid",))),
    ("all ~ first > none", (("all", "first"), ("none",))),
    ("a = b", (("a", "b"),)),
    (["adam", "momentum ≈ sgd"], (("adam",), ("momentum", "sgd"))),
    ([["a", "b"], "c"], (("a", "b"), ("c",))),
    (("a", "b", "c"), (("a",), ("b",), ("c",))),
])
def test_parse_order(text, levels):
    assert parse_order(text) == levels
    assert parse_order(PC.order_text(levels)) == levels


@pytest.mark.parametrize("bad, match", [("a > a", "more than once"), ("a > > b", "empty"), (["a", ""], "empty")])
def test_bad_orders_are_user_errors(bad, match):
    with pytest.raises(ClaimError, match=match) as info:
        parse_order(bad)
    assert isinstance(info.value, UserError)


def test_a_claim_needs_two_levels():
    with pytest.raises(ClaimError, match="at least two levels"):
        check_claim("a ≈ b", _pts({"a": [1, 2], "b": [3, 4]}))


# ---------------------------------------------------------------- the exact test
def _brute(groups):
    """P(J ≥ J_obs), P(J ≤ J_obs) over every distinct assignment of the pooled values to the
    levels (multiset permutations of the level labels), counted one by one."""
    values = [v for g in groups for v in g]
    labels = [i for i, g in enumerate(groups) for _ in g]
    j_obs, _ = order_statistic(groups)
    upper = lower = total = 0
    for perm in set(itertools.permutations(labels)):
        j, _ = order_statistic([[v for v, lab in zip(values, perm, strict=True) if lab == i]
                                for i in range(len(groups))])
        total += 1
        upper += j >= j_obs - 1e-12
        lower += j <= j_obs + 1e-12
    return upper / total, lower / total, total


@pytest.mark.parametrize("groups", [
    [[3.0, 2.5], [2.0, 1.0], [0.5]],
    [[1.0, 4.0, 2.0], [3.0, 0.5, 2.5]],
    [[2.0, 2.0], [2.0, 1.0], [1.0, 3.0]],  # tied values: the exact distribution with ties
    [[1.0, 1.0, 1.0], [1.0, 1.0]],  # all tied: J is constant, p = 1 both ways
    [[5.0], [4.0], [3.0], [2.0], [1.0]],
    [[0.3, 0.1, 0.2, 0.25], [0.05, 0.15, 0.12]],
])
def test_exact_p_values_equal_brute_force_enumeration(groups):
    t = order_test(groups)
    upper, lower, total = _brute(groups)
    assert t.n_arrangements == total
    assert t.p_value == pytest.approx(upper, abs=1e-12) and t.p_reversed == pytest.approx(lower, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_exact_p_values_random_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, size=int(rng.integers(2, 4)))
    groups = [rng.integers(0, 4, size=n).astype(float).tolist() for n in sizes]  # small integers: many ties
    t = order_test(groups)
    upper, lower, total = _brute(groups)
    assert (t.p_value, t.p_reversed, t.n_arrangements) == (pytest.approx(upper), pytest.approx(lower), total)


def test_smallest_p_values_and_the_two_cell_rule():
    # Two cells of 3 seeds: 20 arrangements, p ≥ 0.05, never < α: hence 4 seeds for two cells.
    assert min_p_value([3, 3]) == 0.05 and min_p_value([4, 4]) == pytest.approx(1 / 70)
    perfect3 = check_claim("a > b", _pts({"a": [3, 4, 5], "b": [0, 1, 2]}))
    assert perfect3.p_value == 0.05 and perfect3.verdict == "inconclusive"
    assert "p cannot go below 0.05: add seeds" in perfect3.reason
    perfect4 = check_claim("a > b", _pts({"a": [3, 4, 5, 6], "b": [0, 1, 2, -1]}))
    assert perfect4.verdict == "consistent" and perfect4.p_value == pytest.approx(1 / 70)


# --------------------------------------------------------------------- verdict rule
@pytest.mark.parametrize("order, cells, excluded, incomparable, verdict, reason", [
    ("a > b > c", {"a": [3, 3.1, 3.2], "b": [2, 2.1, 2.2], "c": [1, 1.1, 1.2]}, None, None, "consistent",
     "p = 0.0006 < α = 0.05"),
    ("a > b > c", {"a": [1, 1.1, 1.2], "b": [2, 2.1, 2.2], "c": [3, 3.1, 3.2]}, None, None, "not consistent",
     "the reversed order is significant: reversed p = 0.0006 < α = 0.05"),
    # ≈ asserts nothing between a and b: b above a costs nothing.
    ("a ≈ b > c", {"a": [2, 2.1, 2.2], "b": [9, 9.1, 9.2], "c": [1, 1.1, 1.2]}, None, None, "consistent",
     "p = 0.012"),
    ("a > b > c", {"a": [2, 2.1, 2.2], "b": [9, 9.1, 9.2], "c": [1, 1.1, 1.2]}, None, None, "inconclusive",
     "the seeds' spread does not separate the claimed order"),
    ("a > b > c", {"a": [3, 2, 1], "b": [2.5, 1.5, 0.8], "c": [2.8, 1.2, 0.9]}, None, None, "inconclusive",
     "≥ α = 0.05"),
    ("a > b > c", {"a": [3], "b": [2], "c": [1]}, None, None, "single seed", "one run per cell"),
    ("a > b > c", {"a": [3, 3.1], "b": [2], "c": [1, 1.1]}, None, None, "single seed", "one run per cell"),
    ("a > b > c", {"a": [3, 3.1], "b": [2, 2.1], "c": [1, 1.1]}, {"b": "no progress"}, None, "inconclusive",
     "cells excluded: b"),
    ("a > b > c", {"a": [3, 3.1], "b": [2, 2.1]}, None, None, "inconclusive", "cells excluded: c"),
    ("a > b", {"c": [1, 2]}, None, None, "inconclusive", "cells excluded: a, b"),
    ("a > b > c", {"a": [3, 3.1], "b": [2, 2.1], "c": [1, 1.1]}, None, "final train losses differ by 3×",
     "inconclusive", "final train losses differ by 3×"),
])
def test_verdict_rule(order, cells, excluded, incomparable, verdict, reason):
    result = check_claim(order, _pts(cells, excluded), incomparable=incomparable)
    assert result.verdict == verdict, result.text
    assert reason in result.reason, result.text


def test_verdict_text_carries_the_p_values_and_speed_is_beside():
    cells = {"a": [3, 3.1, 3.2], "b": [2, 2.1, 2.2], "c": [1, 1.1, 1.2]}
    r = check_claim("a > b > c", _pts(cells, conv={"a": 30, "b": 20, "c": 10}))  # the largest γ converges slowest
    assert r.verdict == "consistent" and r.text == "consistent (p = 0.0006 < α = 0.05)"
    assert r.speed.p_reversed == pytest.approx(1 / 1680) and r.speed_order == ["c", "b", "a"]  # beside, not in it
    assert r.gamma_order == ["a", "b", "c"] and [c.n for c in r.cells] == [3, 3, 3] and r.n_runs == 9
    assert r.p_text == "p = 0.0006, reversed p = 1"


def test_tied_level_values_do_not_matter():
    # Swapping values between the tied cells leaves J and p unchanged; a strict order would not.
    one = check_claim("a ≈ b > c", _pts({"a": [5, 6, 7], "b": [2, 3, 4], "c": [0, 1, 1.5]}))
    two = check_claim("a ≈ b > c", _pts({"a": [2, 3, 4], "b": [5, 6, 7], "c": [0, 1, 1.5]}))
    assert one.test == two.test and one.verdict == "consistent"
    assert check_claim("a > b > c", _pts({"a": [2, 3, 4], "b": [5, 6, 7], "c": [0, 1, 1.5]})).verdict != "consistent"


def test_rule_constants():
    assert ALPHA == 0.05 and PC.TIE == "≈" and RC.LOSS_RATIO_LIMIT == 2.0


# ------------------------------------------------------------ calibration (synthetic)
REPLICATES = 200


def _replicates(means, sd, seeds, order, seed=0):
    """Verdict counts over REPLICATES seeded synthetic studies: cell i's seeds ~ N(means[i], sd)."""
    rng = np.random.default_rng(seed)
    names = [c for lv in parse_order(order) for c in lv]
    counts: Counter = Counter()
    for _ in range(REPLICATES):
        cells = {c: rng.normal(m, sd, size=seeds).tolist() for c, m in zip(names, means, strict=True)}
        counts[check_claim(order, _pts(cells)).verdict] += 1
    return counts


@pytest.mark.parametrize("order, seeds", [
    ("a > b > c", 3), ("a ≈ b > c", 3), ("a > b > c > d", 3), ("a > b", 4), ("a > b ≈ c", 5),
])
def test_calibration_equal_cells_rarely_consistent(order, seeds):
    n = len([c for lv in parse_order(order) for c in lv])
    counts = _replicates([1.0] * n, 0.3, seeds, order)
    print(order, seeds, dict(counts))
    assert counts["consistent"] / REPLICATES <= ALPHA + 0.02, counts
    assert counts["not consistent"] / REPLICATES <= ALPHA + 0.02, counts


def test_calibration_true_order_beyond_noise_is_consistent():
    counts = _replicates([3.0, 2.0, 1.0], 0.1, 3, "a > b > c", seed=1)
    assert counts["consistent"] == REPLICATES, counts
    counts = _replicates([2.0, 2.0, 1.0], 0.1, 3, "a ≈ b > c", seed=2)  # ties honoured
    assert counts["consistent"] == REPLICATES, counts
    counts = _replicates([2.0, 1.0], 0.1, 4, "a > b", seed=3)  # two cells, 4 seeds
    assert counts["consistent"] == REPLICATES, counts


def test_calibration_reversed_order_is_not_consistent():
    counts = _replicates([1.0, 2.0, 3.0], 0.1, 3, "a > b > c", seed=4)
    assert counts["not consistent"] == REPLICATES, counts


def test_calibration_overlapping_spread_is_inconclusive():
    # Means ordered as claimed, but a spread ten times the gaps: the seeds cannot tell.
    counts = _replicates([1.1, 1.05, 1.0], 0.5, 3, "a > b > c", seed=5)
    print(dict(counts))
    assert counts["inconclusive"] / REPLICATES >= 0.8, counts
    assert counts["not consistent"] / REPLICATES <= ALPHA + 0.02, counts


def test_calibration_one_seed_is_single_seed():
    counts = _replicates([5.0, 3.0, 1.0, -1.0], 0.01, 1, "a > b > c > d", seed=6)
    assert counts == Counter({"single seed": REPLICATES})


# ------------------------------------------------------------------ matched loss
def test_matched_loss_removes_what_the_loss_curve_says():
    # Two cells share one law γ_k = f(ℓ_k) and differ only in how fast the loss falls: the
    # slow cell spends more steps at low loss, so its median γ_k is smaller — consistent by
    # median γ_k — but at matched loss the cells are alike: inconclusive.
    rng = np.random.default_rng(0)

    def run(slow, jitter):
        # Both fall from 2 to 0.15; the slow one crawls through the low losses (30 epochs below 0.5).
        head = np.geomspace(2.0, 0.5, 5 if slow else 6)
        tail = np.geomspace(0.5, 0.15, 31 if slow else 6)[1:]
        epoch_losses = np.concatenate([head, tail]) * (1 + jitter)
        epochs = np.repeat(np.arange(len(epoch_losses)), 10)
        loss = P.step_loss(epochs, epoch_losses)
        gamma = np.sqrt(loss) * rng.lognormal(0, 0.02, len(loss))  # NaN in the first epoch, as measured
        return loss, gamma, (float(np.nanmin(loss)), float(np.nanmax(loss)))

    runs = {f"{cell}-s{i}": (cell, *run(cell == "slow", 0.01 * i)) for cell in ("fast", "slow") for i in range(4)}
    median = [RunPoint(name, cell, float(np.nanmedian(g)), 0) for name, (cell, _, g, _) in runs.items()]
    assert check_claim("fast > slow", median).verdict == "consistent"
    edges, levels = P.matched_levels([r[3] for r in runs.values()])
    assert len(levels) == 10
    matched = [RunPoint(name, cell, P.matched_gamma(P.gamma_at_levels(loss, g, edges)), 0)
               for name, (cell, loss, g, _) in runs.items()]
    assert check_claim("fast > slow", matched).verdict == "inconclusive"


def test_matched_loss_on_run_entries():
    def entry(label, losses, gamma):
        e = example_entry(label, losses=losses)
        e.steps = pd.DataFrame({"epoch": np.repeat(np.arange(len(losses)), 2), "gamma": gamma})
        return e

    a = entry("a", [2.0, 1.0, 0.5, 0.25], [9, 9, 1, 2, 3, 4, 5, 6])
    b = entry("b", [2.0, 1.5, 1.0, 0.6], [9, 9, 1, 1, 1, 1, 1, 1])
    m = matched_loss([a, b], n=2)
    # Each epoch's first step sits at the previous epoch's loss, its second halfway (in log): a's
    # steps reach down to √(0.5·0.25) = 0.354, b's to √(1·0.6) = 0.775; both start at 2.
    assert m.edges[0] == pytest.approx(math.sqrt(1.0 * 0.6)) and m.edges[-1] == pytest.approx(2.0)
    assert set(m.per_level) == {"a", "b"} and m.problem is None
    far = entry("far", [5.0, 4.0, 3.0], [1] * 6)  # never as low as the others start
    assert matched_loss([a, far]).problem == "the runs' training losses share no range"


# ---------------------------------------------------------------------- Theorem 1
def _trajectory(theta, epochs, lr=0.1):
    """A consistent 1-D step table along ``theta`` (θ* = θ_T = theta[-1]), loss θ² + 0.1."""
    theta = np.asarray(theta, dtype=float)
    x, delta = theta[:-1] - theta[-1], theta[:-1] - theta[1:]
    return pd.DataFrame({"step": np.arange(len(x)), "epoch": np.asarray(epochs), "lr": lr,
                         "loss": theta[:-1] ** 2 + 0.1, "loss_ref": theta[-1] ** 2 + 0.1,
                         "progress": x * delta - 0.5 * delta**2, "dist_sq": x**2, "update_sq": delta**2})


def test_theorem1_verdicts_hold_on_a_monotone_path():
    checks = P.theorem1_checks(_trajectory([1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.1, 0.05, 0.0], [0] * 4 + [1] * 4),
                               {"frac_improved": 0.97, "n_revisited": 100})
    assert [c.verdict for c in checks] == ["holds"] * 4, checks
    assert checks[0].numbers.startswith("γ_k > 0 on 100.0% of 8 defined steps; on every step: yes")
    assert checks[3].numbers.startswith("holds at 2 of 2 epoch boundaries")


def test_theorem1_verdicts_fail_where_the_path_turns_back():
    # Epoch 1 ends farther from θ* than it started (0.4 → 0.6); 2 of 6 steps move away.
    steps = _trajectory([1.0, 0.7, 0.4, 0.5, 0.6, 0.3, 0.0], [0, 0, 1, 1, 2, 2])
    checks = P.theorem1_checks(steps, {"frac_improved": 0.5, "n_revisited": 10})
    assert [c.verdict for c in checks] == ["fails", "fails", "fails", "not applicable"], checks
    assert checks[1].numbers.startswith("1 of 3 epochs end farther from θ*")
    assert "per step: 2 of 6 steps increase d_k" in checks[1].numbers
    assert checks[3].numbers.startswith("γ_min = ") and "implies no rate" in checks[3].numbers
    epoch = P.epoch_distance(steps)
    assert epoch["n_increase"] == 1 and epoch["curve"].round(3).tolist() == [1.0, 0.4, 0.6, 0.0]


def test_theorem1_of_a_run_without_per_sample_losses():
    e = example_entry("relu")
    e.steps = e.steps.assign(lr=0.1, loss=[1.0, 0.8, 0.5], loss_ref=0.0)
    by_item = {c.item: c for c in theorem1(e)}
    assert by_item["per-sample losses converge"].verdict == "not measured"
    assert theorem1(example_entry("x", analysed=False)) == []


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


def test_check_runs_is_the_study_rule_with_speed_as_the_claim():
    def runs(gammas, losses=(0.10, 0.11, 0.12, 0.13)):
        return [example_entry(n, g, [1.0, x]) for n, g, x in zip("abcd", gammas, losses, strict=False)]

    check = check_runs(runs([0.4, 0.3, 0.2, 0.1]))
    # One run per cell: never a verdict, only the p-value of "faster ⇒ larger γ".
    assert check.order == (("a",), ("b",), ("c",), ("d",)) and check.result.verdict == "single seed"
    assert check.result.p_value == pytest.approx(1 / 24)
    assert check_runs(runs([0.1, 0.2, 0.3, 0.4])).result.p_reversed == pytest.approx(1 / 24)
    apart = check_runs(runs([0.4, 0.3, 0.2], losses=(0.1, 0.2, 0.35))).result
    assert apart.text == "inconclusive (final train losses differ by 3.5×, more than 2×)"
    stuck = example_entry("stuck", 2.4, [2.3, 2.29], no_progress=True)
    check = check_runs([*runs([0.4, 0.3, 0.2]), stuck])
    assert [e.label for e in check.runs] == ["a", "b", "c"]
    # Runs converging equally fast are tied in the claimed order.
    same = [example_entry(n, g, [1.0, 0.1], target_loss=0.15) for n, g in (("x", 0.3), ("y", 0.2), ("z", 0.1))]
    assert check_runs(same).result.reason == "every run converged alike: no order to test"
    assert check_runs(runs([0.4])).result is None


def test_docstring_examples():
    from gammatrace.reporting import collect
    from gammatrace.store import study

    for module in (PC, RC, collect, study, P.matched, P.theorem1):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
