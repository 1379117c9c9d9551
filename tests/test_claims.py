"""The one claims module: the verdict rule (every strict relation of a claimed weak order by an
exact one-sided test, paired by seed, intersection–union; the counterexamples of issue 19;
each test against brute-force enumeration; the J-T trend beside), its calibration on synthetic cells where
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
    """{cell: [γ of each seed]} -> RunPoints named cell-s<i>, seed i (paired across cells);
    conv: {cell: epochs}."""
    return [RunPoint(f"{cell}-s{i}", cell, float(g), float((conv or {}).get(cell, 10)), (excluded or {}).get(cell), i)
            for cell, values in cells.items() for i, g in enumerate(values)]


def _unpaired(cells: dict[str, list[float]]):
    """As :func:`_pts`, without seeds: the cells are tested unpaired (Mann–Whitney)."""
    return [RunPoint(f"{cell}-s{i}", cell, float(g), 10.0) for cell, values in cells.items()
            for i, g in enumerate(values)]


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
    # ... unless it carries an equivalence margin: then the tie is its verdict.
    assert check_claim("a ≈ b", _pts({"a": [1, 2], "b": [3, 4]}), equivalent_within=0.5).verdict == "inconclusive"


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


def test_smallest_p_values_and_unreachable_verdicts():
    # Paired by seed, a relation's p is at least 2^-n: 4 seeds cannot reach p < 0.05, 5 can.
    assert min_p_value([3, 3]) == 0.05 and min_p_value([4, 4]) == pytest.approx(1 / 70)
    perfect4 = check_claim("a > b", _pts({"a": [3, 4, 5, 6], "b": [0, 1, 2, -1]}))
    assert perfect4.p_value == 1 / 16 and perfect4.verdict == "inconclusive"
    assert "with these seeds 'consistent' cannot be reached (a > b: smallest p 0.062 ≥ α = 0.05)" in perfect4.reason
    perfect5 = check_claim("a > b", _pts({"a": [3, 4, 5, 6, 7], "b": [0, 1, 2, -1, 0]}))
    assert perfect5.verdict == "consistent" and perfect5.p_value == 1 / 32 and perfect5.design == "paired"
    assert "cannot be reached" not in perfect5.text
    # 6 seeds, 5 relations: consistent reachable, "not consistent" not (2^-6 ≥ 0.05 / 5).
    six = check_claim("a ≈ b > c > d", _pts({c: [4 - k] * 6 for k, c in enumerate("abcd")}))
    assert six.verdict == "consistent" and "'not consistent' cannot be reached" in six.reason
    # Unpaired (no seeds): the exact Mann–Whitney test, smallest p 1 / C(m+n, m).
    un = check_claim("a > b", _unpaired({"a": [3, 4, 5, 6], "b": [0, 1, 2, -1]}))
    assert un.design == "unpaired" and un.p_value == pytest.approx(1 / 70) and un.verdict == "consistent"


# ------------------------------------------------- the counterexamples of issue 19
ACT = "relu ≈ leaky_relu > tanh > sigmoid"


def _separated(order_by_value, seeds, step=1.0, jitter=0.01):
    """Every seed ranks the cells as ``order_by_value`` (largest first), fully separated."""
    names = [c for lv in parse_order(order_by_value) for c in lv]
    return _pts({c: [step * (len(names) - k) + jitter * i for i in range(seeds)] for k, c in enumerate(names)})


@pytest.mark.parametrize("data", ["relu > leaky_relu > sigmoid > tanh", "relu > tanh > leaky_relu > sigmoid"])
@pytest.mark.parametrize("seeds", [3, 6, 7, 12])
def test_an_order_contradicted_in_every_seed_is_never_consistent(data, seeds):
    # The J-T rule read both "consistent" (p = 0.024 at 3 seeds, 0.0013 at 6).
    r = check_claim(ACT, _separated(data, seeds))
    assert r.verdict != "consistent", r.text
    bad = "tanh > sigmoid" if data.endswith("tanh") else "leaky_relu > tanh"
    reversed_p = next(t.p_reversed for t in r.relations if f"{t.above} > {t.below}" == bad)
    assert reversed_p == 0.5 ** seeds  # reversed in every seed
    # Reversed in every seed of 7+: significant under Holm over the 5 relations.
    assert r.verdict == ("not consistent" if 0.5 ** seeds < 0.05 / 5 else "inconclusive"), r.text
    assert bad in r.text


def test_real_matched_loss_counterexample_is_not_consistent():
    # tanh > relu ≈ leaky_relu > sigmoid in every seed (0 of the ReLU-type/tanh pairs go the claimed way).
    r = check_claim(ACT, _separated("tanh > relu ≈ leaky_relu > sigmoid", 7))
    assert r.verdict == "not consistent" and "tanh > relu (reversed p = 0.0078" in r.reason, r.text
    assert r.trend is not None  # the trend is beside, never the verdict


@pytest.mark.parametrize("order", [ACT, "all ≈ first > none", "a > b > c", "adam > momentum ≈ sgd"])
def test_fully_reversed_reads_not_consistent_and_true_order_consistent_at_default_seeds(order):
    from gammatrace.experiments.presets import claim, seeds_for

    n = seeds_for([claim("t", order)])
    levels = parse_order(order)
    backwards = " > ".join(" ≈ ".join(lv) for lv in reversed(levels))
    assert check_claim(order, _separated(order, n)).verdict == "consistent"
    rev = check_claim(order, _separated(backwards, n))
    assert rev.verdict == "not consistent", rev.text
    # Every relation is named with its p in the verdict text.
    for t in rev.relations:
        assert f"{t.above} > {t.below}: p = " in rev.text


def test_a_tie_is_reported_not_tested():
    r = check_claim("a ≈ b > c", _pts({"a": [2.0, 2.1, 2.2, 2.3, 2.4, 2.5], "b": [2.05, 2.0, 2.3, 2.2, 2.45, 2.4],
                                        "c": [0, 0.1, 0.2, 0.3, 0.4, 0.5]}))
    assert r.verdict == "consistent" and [(t.a, t.b) for t in r.ties] == [("a", "b")]
    t = r.ties[0]
    assert t.text.startswith("a ≈ b: median per-seed difference") and t.text.endswith("no order asserted, not tested")
    assert t.ci == pytest.approx((-0.1, 0.1)) and t.level == pytest.approx(1 - 2 / 64)  # d_(1), d_(6) of 6 seeds
    assert r.tie_verdict is None


def test_equivalence_margin_gives_the_tie_its_own_verdict():
    cells = {"a": [2.0 + 0.01 * i for i in range(7)], "b": [2.0 + 0.01 * i + 0.005 * (-1) ** i for i in range(7)],
             "c": [0.0 + 0.01 * i for i in range(7)]}
    near = check_claim("a ≈ b > c", _pts(cells), equivalent_within=0.05)
    assert near.verdict == "consistent" and near.tie_verdict == "consistent", near.text
    assert "ties within ±0.05: consistent" in near.text
    far = check_claim("a ≈ b > c", _pts({**cells, "b": [x + 1 for x in cells["a"]]}), equivalent_within=0.05)
    assert far.tie_verdict == "not consistent", far.text
    one = check_claim("a ≈ b", _pts({"a": cells["a"], "b": cells["b"]}), equivalent_within=0.05)
    assert one.verdict == "consistent" and not one.relations


@pytest.mark.parametrize("seed", range(6))
def test_tie_confidence_interval_covers_at_its_level(seed):
    # The sign-test interval for the median difference covers the true median at ≥ its level.
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(300):
        d = rng.standard_t(3, size=7) + 0.3
        a = [RunPoint(f"a{i}", "a", float(x), 0, seed=i) for i, x in enumerate(d)]
        b = [RunPoint(f"b{i}", "b", 0.0, 0, seed=i) for i in range(7)]
        t = PC.tie_report("a", "b", a, b)
        hits += t.ci[0] <= 0.3 <= t.ci[1]
    assert hits / 300 >= t.level - 3 * math.sqrt(t.level * (1 - t.level) / 300)


def test_speed_is_its_own_verdict_of_the_stated_speed_order():
    cells = {"adam": [3.0] * 6, "momentum": [1.0] * 6, "sgd": [1.1] * 6}
    conv = {"adam": 5, "momentum": 50, "sgd": 100}
    r = check_claim("adam > momentum ≈ sgd", _pts(cells, conv=conv), speed="adam > momentum > sgd")
    assert r.verdict == "consistent" and r.speed.verdict == "consistent", r.speed.text
    slow = check_claim("adam > momentum ≈ sgd", _pts(cells, conv={**conv, "adam": 200}), speed="adam > momentum > sgd")
    assert slow.verdict == "consistent" and slow.speed.verdict == "not consistent"
    # Equal epochs are zero differences: they count against "faster".
    same = check_claim("adam > momentum ≈ sgd", _pts(cells, conv={**conv, "sgd": 50}), speed="adam > momentum > sgd")
    assert same.speed.verdict == "inconclusive" and "momentum > sgd: p = 1" in same.speed.text
    assert check_claim("adam > momentum ≈ sgd", _pts(cells, conv=conv)).speed is None


# ------------------------------------------------------ relation p-values vs brute force
def _brute_sign(diffs):
    """P(S ≥ S_obs) and the reversed, S = #{d > 0}, over all 2^n equally likely outcomes of
    the null's boundary: each seed's difference above or not (a zero is not above)."""
    n = len(diffs)
    k = sum(d > 0 for d in diffs)
    m = sum(d < 0 for d in diffs)
    outcomes = list(itertools.product([0, 1], repeat=n))
    return (sum(sum(o) >= k for o in outcomes) / len(outcomes), sum(sum(o) >= m for o in outcomes) / len(outcomes))


@pytest.mark.parametrize("diffs", [
    [0.2, 0.1, 0.3, 0.05, 0.4], [0.2, -0.1, 0.3, 0.05, 0.4, 0.1], [0.0, 0.1, 0.2, 0.3, 0.1],
    [-1.0, -2.0, -0.5, -0.1, -3.0, -1.0, -2.0], [0.0, 0.0, 0.0], [1.0, -1.0, 1.0, -1.0, 0.0, 1.0, 1.0, 1.0],
])
def test_sign_test_equals_brute_force_enumeration(diffs):
    a = [RunPoint(f"a{i}", "a", d, 0, seed=i) for i, d in enumerate(diffs)]
    b = [RunPoint(f"b{i}", "b", 0.0, 0, seed=i) for i in range(len(diffs))]
    t = PC.relation_test("a", "b", a, b)
    assert t.design == "paired"
    assert (t.p_value, t.p_reversed) == pytest.approx(_brute_sign(diffs), abs=1e-12)


@pytest.mark.parametrize("x, y", [
    ([3.0, 2.5, 2.0], [1.0, 0.5]), ([1.0, 4.0, 2.0], [3.0, 0.5, 2.5]), ([2.0, 2.0, 1.0], [2.0, 1.0, 3.0]),
    ([1.0, 1.0], [1.0, 1.0, 1.0]), ([0.3, 0.1, 0.2, 0.25], [0.05, 0.15, 0.12]), ([5.0, 6.0, 7.0, 8.0], [1.0] * 4),
])
def test_mann_whitney_equals_brute_force_enumeration(x, y):
    a = [RunPoint(f"a{i}", "a", v, 0) for i, v in enumerate(x)]
    b = [RunPoint(f"b{i}", "b", v, 0) for i, v in enumerate(y)]
    t = PC.relation_test("a", "b", a, b)
    upper, lower, total = _brute([x, y])
    assert t.design == "unpaired" and t.p_min == pytest.approx(1 / total)
    assert (t.p_value, t.p_reversed) == (pytest.approx(upper, abs=1e-12), pytest.approx(lower, abs=1e-12))


# --------------------------------------------------------------------- verdict rule
@pytest.mark.parametrize("order, cells, excluded, incomparable, verdict, reason", [
    ("a > b > c", {"a": [3, 3.1, 3.2, 3.3, 3.4, 3.5], "b": [2, 2.1, 2.2, 2.3, 2.4, 2.5],
                   "c": [1, 1.1, 1.2, 1.3, 1.4, 1.5]}, None, None, "consistent",
     "every relation p < α = 0.05: a > b: p = 0.016; a > c: p = 0.016; b > c: p = 0.016"),
    ("a > b > c", {"a": [1, 1.1, 1.2, 1.3, 1.4, 1.5], "b": [2, 2.1, 2.2, 2.3, 2.4, 2.5],
                   "c": [3, 3.1, 3.2, 3.3, 3.4, 3.5]}, None, None, "not consistent",
     "reversed under Holm over 3 relations: b > a (reversed p = 0.016, Holm 0.047)"),
    # ≈ asserts nothing between a and b: b above a costs nothing.
    ("a ≈ b > c", {"a": [2, 2.1, 2.2, 2.3, 2.4], "b": [9, 9.1, 9.2, 9.3, 9.4], "c": [1, 1.1, 1.2, 1.3, 1.4]}, None,
     None, "consistent", "a > c: p = 0.031; b > c: p = 0.031"),
    ("a > b > c", {"a": [2, 2.1, 2.2, 2.3, 2.4], "b": [9, 9.1, 9.2, 9.3, 9.4], "c": [1, 1.1, 1.2, 1.3, 1.4]}, None,
     None, "inconclusive", "not separated (p ≥ α = 0.05): a > b: p = 1; separated: a > c: p = 0.031"),
    ("a > b > c", {"a": [3, 2, 1], "b": [2.5, 1.5, 0.8], "c": [2.8, 1.2, 0.9]}, None, None, "inconclusive",
     "cannot be reached"),
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


def test_verdict_text_carries_the_p_values_and_the_trend_is_beside():
    cells = {"a": [3, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6], "b": [2, 2.1, 2.2, 2.3, 2.4, 2.5, 2.6],
             "c": [1, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]}
    r = check_claim("a > b > c", _pts(cells, conv={"a": 30, "b": 20, "c": 10}))  # the largest γ converges slowest
    assert r.text == "consistent (every relation p < α = 0.05: a > b: p = 0.0078; a > c: p = 0.0078; b > c: p = 0.0078)"
    assert r.speed is None and r.speed_order == ["c", "b", "a"]  # no stated speed order: listed, not tested
    assert r.gamma_order == ["a", "b", "c"] and [c.n for c in r.cells] == [7, 7, 7] and r.n_runs == 21
    assert r.p_text == "p = 0.0078, reversed p = 1" and r.trend.statistic == 147


def test_tied_level_values_do_not_matter():
    # Swapping values between the tied cells leaves the verdict and the set of p-values unchanged.
    one = check_claim("a ≈ b > c", _pts({"a": [5, 6, 7, 8, 9], "b": [2, 3, 4, 3, 2], "c": [0, 1, 1.5, 1, 0]}))
    two = check_claim("a ≈ b > c", _pts({"a": [2, 3, 4, 3, 2], "b": [5, 6, 7, 8, 9], "c": [0, 1, 1.5, 1, 0]}))
    assert one.verdict == two.verdict == "consistent" and one.trend == two.trend
    assert sorted(t.p_value for t in one.relations) == sorted(t.p_value for t in two.relations)
    strict = check_claim("a > b > c", _pts({"a": [2, 3, 4, 3, 2], "b": [5, 6, 7, 8, 9], "c": [0, 1, 1.5, 1, 0]}))
    assert strict.verdict == "not consistent" or strict.verdict == "inconclusive"


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
    ("a > b > c", 6), ("a ≈ b > c", 6), ("a > b > c > d", 7), ("a > b", 5), ("a > b ≈ c", 6), ("a > b > c", 12),
])
def test_calibration_equal_cells_rarely_consistent(order, seeds):
    n = len([c for lv in parse_order(order) for c in lv])
    counts = _replicates([1.0] * n, 0.3, seeds, order)
    print(order, seeds, dict(counts))
    assert counts["consistent"] / REPLICATES <= ALPHA + 0.02, counts
    assert counts["not consistent"] / REPLICATES <= ALPHA + 0.02, counts


def test_calibration_true_order_beyond_noise_is_consistent():
    counts = _replicates([3.0, 2.0, 1.0], 0.1, 6, "a > b > c", seed=1)
    assert counts["consistent"] == REPLICATES, counts
    counts = _replicates([2.0, 2.0, 1.0], 0.1, 6, "a ≈ b > c", seed=2)  # ties honoured
    assert counts["consistent"] == REPLICATES, counts
    counts = _replicates([2.0, 1.0], 0.1, 5, "a > b", seed=3)  # two cells, 5 seeds
    assert counts["consistent"] == REPLICATES, counts


def test_calibration_reversed_order_is_not_consistent():
    counts = _replicates([1.0, 2.0, 3.0], 0.1, 6, "a > b > c", seed=4)
    assert counts["not consistent"] == REPLICATES, counts


def test_calibration_overlapping_spread_is_inconclusive():
    # Means ordered as claimed, but a spread ten times the gaps: the seeds cannot tell.
    counts = _replicates([1.1, 1.05, 1.0], 0.5, 6, "a > b > c", seed=5)
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
    assert checks[0].numbers.startswith("on every step: yes — every γ in (0, ")
    assert checks[0].numbers.endswith("; γ_k > 0 on 100.0% of 8 defined steps")
    assert checks[1].numbers.startswith("d_k rises at 0 of 8 steps; per epoch")
    assert checks[3].numbers.startswith("holds at 2 of 2 epoch boundaries")


def test_theorem1_verdicts_fail_where_the_path_turns_back():
    # Epoch 1 ends farther from θ* than it started (0.4 → 0.6); 2 of 6 steps move away.
    steps = _trajectory([1.0, 0.7, 0.4, 0.5, 0.6, 0.3, 0.0], [0, 0, 1, 1, 2, 2])
    checks = P.theorem1_checks(steps, {"frac_improved": 0.5, "n_revisited": 10})
    assert [c.verdict for c in checks] == ["fails", "fails", "fails", "not applicable"], checks
    # Item 1 is per step, as the theorem states it; the per-epoch reading is beside it.
    assert checks[1].numbers.startswith("d_k rises at 2 of 6 steps (steps 2, 3;")
    assert "per epoch (what the papers' figures show): 1 of 3 epochs end farther from θ*" in checks[1].numbers
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
    # The trend (J-T over the four runs) is what one run per cell can show, labelled as a trend.
    assert check.result.trend.p_value == pytest.approx(1 / 24) and "trend p = 0.042" in check.result.text
    assert check_runs(runs([0.1, 0.2, 0.3, 0.4])).result.trend.p_reversed == pytest.approx(1 / 24)
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


def test_equivalence_margin_and_speed_order_round_trip(tmp_path):
    from gammatrace.experiments.study import study_from_yaml
    from gammatrace.store.study import Claim, StudyMeta

    path = tmp_path / "opt.yaml"
    path.write_text("base: {data: {name: digits}, model: {name: mlp, width: 8}}\n"
                    "groups: {g1: {}, g2: {}}\n"
                    "variants: {adam: {optim: {name: adam}}, momentum: {optim: {name: momentum}}, "
                    "sgd: {optim: {name: sgd}}}\n"
                    "claims: [{text: Adam first, order: adam > momentum ≈ sgd, equivalent_within: 0.05, "
                    "speed: adam > momentum > sgd}]\n")
    study = study_from_yaml(path)
    c = study.claims[0]
    assert c.equivalent_within == 0.05 and c.speed == (("g1-adam",), ("g1-momentum",), ("g1-sgd",))
    meta = study.meta(seeds=2)
    meta.write(tmp_path)
    back = StudyMeta.load(StudyMeta.path(tmp_path))
    assert back.claims == meta.claims and back.claims[0].speed == c.speed
    assert Claim("t", "a ≈ b", equivalent_within=0.1).order == (("a", "b"),)
    with pytest.raises(Exception, match="greater than 0"):
        Claim("t", "a ≈ b", equivalent_within=0)
