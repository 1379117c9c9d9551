"""Certificates on every step and Theorem 1 as stated (issue 19, items 5-6).

Every step k bounds γ: with g_k = η_k D_0² (ℓ_k − ℓ*_k), the principle P_k ≥ γ g_k reads
γ ≤ P_k / g_k where g_k > 0, γ ≥ P_k / g_k where g_k < 0, and P_k ≥ 0 where the gap is
within ε of 0. The certificate is the interval of γ > 0 meeting every step; the tests
compare it with a brute-force scan over γ, on hand-made tables and on a real run.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import gammatrace
import gammatrace.principles as pr
from tests.conftest import tiny_config

EPS = 1e-8


def table(rows, d0_sq: float = 1.0, epochs=None) -> pd.DataFrame:
    """A step table from (P_k, η_k, gap_k) triples; ℓ*_k = 1, D_0² = the first dist_sq."""
    p, lr, gap = (np.array(c, dtype=float) for c in zip(*rows, strict=True))
    n = len(p)
    return pd.DataFrame({
        "step": np.arange(n), "epoch": np.zeros(n, int) if epochs is None else np.asarray(epochs),
        "lr": lr, "loss": 1.0 + gap, "loss_ref": np.ones(n), "progress": p,
        "dist_sq": np.r_[d0_sq, np.full(n - 1, 0.5)], "update_sq": np.full(n, 0.01),
    })


def feasible(gamma: float, p, g, zero) -> bool:
    """Does γ satisfy every step? Exact inequalities, with a round-off slack at equality."""
    if not gamma > 0:
        return False
    for pk, gk, zk in zip(p, g, zero, strict=True):
        if zk:
            if pk < 0:
                return False
        elif pk < gamma * gk - 1e-12 * max(abs(pk), abs(gamma * gk)):
            return False
    return True


def brute_force(df: pd.DataFrame, d0_sq: float, eps: float = EPS):
    """(lo, hi, certified) by scanning γ over every step's own bound and a dense grid."""
    p = df["progress"].to_numpy(float)
    gap = (df["loss"] - df["loss_ref"]).to_numpy(float)
    g = df["lr"].to_numpy(float) * d0_sq * gap
    zero = (np.abs(gap) <= eps) | (df["lr"].to_numpy(float) == 0)
    bounds = [pk / gk for pk, gk, zk in zip(p, g, zero, strict=True) if not zk]
    grid = np.r_[bounds, np.geomspace(1e-6, 1e6, 4001)]
    ok = [x for x in grid if feasible(x, p, g, zero)]
    if not ok:
        return math.nan, math.nan, False
    lo = min(ok)
    # The interval is open at 0 when no step bounds γ from below.
    lo = lo if any(not zk and gk < 0 and pk < 0 for pk, gk, zk in zip(p, g, zero, strict=True)) else 0.0
    hi = max(ok) if any(not zk and gk > 0 for gk, zk in zip(g, zero, strict=True)) else math.inf
    return lo, hi, True


# ------------------------------------------------------------------------- hand-made tables


def test_negative_gap_step_demanding_more_is_not_certified():
    # Steps 0-2 allow γ ≤ 0.5, 0.0934, 0.3; steps 3 and 4 have ℓ_k < ℓ*_k and move away
    # from θ* (P_k < 0): they need γ ≥ 0.201 and γ ≥ 0.247 — more than step 1 allows.
    df = table([(0.05, 0.1, 1.0), (0.00934, 0.1, 1.0), (0.03, 0.1, 1.0),
                (-0.00201, 0.1, -0.1), (-0.00247, 0.1, -0.1)])
    c = pr.certify(df, d0_sq=1.0)
    assert not c["certified"]
    assert c["gamma_min"] == pytest.approx(0.0934)  # the old "certified γ_min": min over defined γ_k
    assert (c["gamma_hi"], c["gamma_hi_step"]) == (pytest.approx(0.0934), 1)
    assert (c["gamma_lo"], c["gamma_lo_step"]) == (pytest.approx(0.247), 4)
    assert c["n_undefined"] == 2 and c["n_lower"] == 2 and c["n_conflict"] == 2
    assert c["certificate"] == "no — steps 3, 4 need γ ≥ 0.247 but step 1 allows at most 0.0934"
    s = pr.summarize(df, d0_sq=1.0)
    assert s["gamma_certified"] is False and s["gamma_lo_step"] == 4 and s["gamma_hi_step"] == 1
    assert s["rate_reason"] is not None and math.isnan(s["rate_bound"])
    first = pr.theorem1_checks(df, d0_sq=1.0)[0]
    assert first.verdict == "fails" and "steps 3, 4 need γ ≥ 0.247" in first.numbers


def test_negative_gap_step_within_the_interval_is_certified_with_both_ends():
    df = table([(0.05, 0.1, 1.0), (0.00934, 0.1, 1.0), (-0.0005, 0.1, -0.1), (0.002, 0.1, -0.1)])
    c = pr.certify(df, d0_sq=1.0)
    assert c["certified"]
    assert (c["gamma_lo"], c["gamma_lo_step"]) == (pytest.approx(0.05), 2)
    assert (c["gamma_hi"], c["gamma_hi_step"]) == (pytest.approx(0.0934), 1)
    assert c["certificate"] == "yes — every γ in [0.05, 0.0934] (lower end: step 2; upper end: step 1)"
    s = pr.summarize(df, d0_sq=1.0)
    assert s["gamma_certified"] and s["rate_reason"] is None
    assert pr.rate_bound(df, d0_sq=1.0)["gamma"] == pytest.approx(0.0934)  # a γ inside the interval


def test_zero_gap_steps():
    # |gap| ≤ ε: no bound on γ, but a step away from θ* there defeats every γ.
    ok = table([(0.05, 0.1, 1.0), (0.0, 0.1, 0.0), (0.01, 0.1, 0.5 * EPS), (0.02, 0.1, -0.5 * EPS)])
    c = pr.certify(ok, d0_sq=1.0)
    assert c["certified"] and c["n_zero_gap"] == 3 and c["gamma_hi"] == pytest.approx(0.5)
    assert c["certificate"] == "yes — every γ in (0, 0.5] (upper end: step 0)"
    bad = table([(0.05, 0.1, 1.0), (-1e-6, 0.1, 0.5 * EPS)])
    c = pr.certify(bad, d0_sq=1.0)
    assert not c["certified"] and c["n_conflict"] == 1
    assert "step 1 moves away from θ* (P_k < 0) where |ℓ_k − ℓ*_k| ≤ ε" in c["certificate"]
    # η_k = 0 makes g_k = 0 too; a positive-gap step with P_k < 0 allows no γ > 0.
    c = pr.certify(table([(0.0, 0.0, 1.0), (-0.01, 0.1, 1.0)]), d0_sq=1.0)
    assert not c["certified"] and c["gamma_hi_step"] == 1
    assert c["certificate"].startswith("no — step 1 allows no γ > 0")
    # No step bounds γ from above: every γ ≥ γ_lo.
    c = pr.certify(table([(-0.01, 0.1, -1.0), (0.0, 0.1, 0.0)]), d0_sq=1.0)
    assert c["certified"] and c["gamma_hi"] == math.inf and c["gamma_lo"] == pytest.approx(0.1)


def test_unmeasured_steps_never_certify():
    df = table([(0.05, 0.1, 1.0), (0.05, 0.1, 1.0)])
    df.loc[1, "loss_ref"] = np.nan
    c = pr.certify(df, d0_sq=1.0)
    assert not c["certified"] and c["n_unmeasured"] == 1 and "1 step unmeasured" in c["certificate"]
    # From γ_k alone an undefined step's constraint is unknown: no certificate.
    c = pr.certify([1.0, np.nan, 2.0])
    assert not c["certified"] and c["gamma_min"] == 1.0 and c["n_undefined"] == 1


def random_table(seed: int) -> tuple[pd.DataFrame, float]:
    """Mixed gap signs, zero gaps (0 and within ε), an occasional η_k = 0, mostly the
    principle's shape P_k = γ_k η_k D_0² gap_k with γ_k in [0.02, 0.3], some P_k flipped < 0."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 12))
    gap = rng.normal(size=n) * rng.choice([1.0, 1e-3], size=n)
    gap[rng.uniform(size=n) < 0.15] = 0.0
    gap[rng.uniform(size=n) < 0.1] = 0.5 * EPS * rng.choice([-1, 1])
    lr = rng.uniform(0.01, 0.2, size=n)
    lr[rng.uniform(size=n) < 0.05] = 0.0
    d0 = float(rng.uniform(0.5, 3.0))
    p = rng.uniform(0.02, 0.3, size=n) * lr * d0 * gap
    flip = rng.uniform(size=n) < 0.2
    p[flip] = -np.abs(p[flip]) - 1e-4 * rng.uniform()
    return table(list(zip(p, lr, gap, strict=True)), d0_sq=d0), d0


SEEDS = range(60)


@pytest.mark.parametrize("seed", SEEDS)
def test_interval_equals_brute_force_scan(seed):
    df, d0 = random_table(seed)
    c = pr.certify(df, d0_sq=d0)
    lo, hi, ok = brute_force(df, d0)
    assert c["certified"] == ok, (c, lo, hi)
    if ok:
        assert c["gamma_lo"] == pytest.approx(lo, rel=1e-12, abs=0)
        assert c["gamma_hi"] == pytest.approx(hi, rel=1e-12)


def test_brute_force_cases_cover_every_branch():
    """The random tables reach: certified with and without a lower end, and not certified."""
    seen = set()
    for seed in SEEDS:
        df, d0 = random_table(seed)
        c = pr.certify(df, d0_sq=d0)
        seen.add((c["certified"], c["gamma_lo"] > 0, c["n_zero_gap"] > 0))
    assert {(True, True), (True, False), (False, True), (False, False)} <= {x[:2] for x in seen}, seen
    assert any(x[2] and x[0] for x in seen)


def test_rp_and_rc_certificates():
    df = table([(0.05, 0.1, 1.0), (0.01, 0.1, 0.5), (-0.001, 0.1, -0.5)])
    # γ^RP with ℓ_inf = 1.5: ℓ_k − ℓ_inf = 0.5, 0.0, −1.0.
    c = pr.certify(df, column="gamma_rp", d0_sq=2.0, ell_inf=1.5)
    assert c["n_zero_gap"] == 1 and c["gamma_hi"] == pytest.approx(0.05 / (0.1 * 2.0 * 0.5))
    assert c["gamma_lo"] == pytest.approx(-0.001 / (0.1 * 2.0 * -1.0)) and c["certified"]
    rc = pr.certify(df, column="gamma_rc")
    d = df["dist_sq"].to_numpy()
    assert rc["gamma_hi"] == pytest.approx(min(-0.001 / (0.1 * d[2]), 0.01 / (0.1 * d[1]), 0.05 / 0.1))
    assert not rc["certified"]  # P_2 < 0 with d_2² > 0
    s = pr.summarize(df, d0_sq=2.0, ell_inf=1.5)
    for key in ("gamma_rp_lo", "gamma_rp_hi", "gamma_rp_certified", "gamma_rc_hi", "gamma_rc_certified",
                "gamma_rc_min", "gamma_lo", "gamma_hi", "gamma_lo_step", "gamma_hi_step", "gamma_certificate"):
        assert key in s, key
    assert s["gamma_rp_certified"] is True and s["gamma_rc_certified"] is False


# ------------------------------------------------------------------------------- Theorem 1


def test_theorem1_item1_is_per_step():
    # θ: 1.0 → 0.6 → 0.7 → 0.2 → 0: one step rises inside epoch 0 while no epoch ends farther.
    df = pr.example_steps()
    checks = pr.theorem1_checks(df)
    item1 = checks[1]
    assert item1.item == "‖θ_{k+1} − θ*‖ ≤ ‖θ_k − θ*‖ for every k"
    assert item1.verdict == "fails"
    assert item1.numbers.startswith("d_k rises at 1 of 4 steps (step 1")
    assert "per epoch (what the papers' figures show): 0 of 2 epochs end farther from θ*" in item1.numbers
    # the premise of every item is evaluated on every step
    assert all(c.premise for c in checks[1:]), checks
    assert checks[1].premise.startswith("principle on every step: no")


# ------------------------------------------------------------------------------- a real run


def test_real_run_certificate_equals_brute_force(tmp_path):
    # θ* = θ_T: near the end some batch has ℓ_k < ℓ*_k and the step moves away from θ*;
    # that step needs a larger γ than the positive-gap steps allow.
    run = gammatrace.train(tiny_config(seed=5, epochs=10, optim={"lr": 0.5}), tmp_path / "r", progress=False)
    steps, s = run.steps(), run.summary()
    d0 = s["d0_sq"]
    gap = (steps["loss"] - steps["loss_ref"]).to_numpy()
    lower = (gap < -EPS) & (steps["progress"].to_numpy() < 0)
    assert lower.any(), "the run no longer has a negative-gap, negative-progress step"
    defined = steps["gamma"].to_numpy()[np.isfinite(steps["gamma"].to_numpy())]
    assert defined.min() > 0  # the old rule (min over defined γ_k > 0) said "certified"
    lo, hi, ok = brute_force(steps, d0)
    assert not ok and s["gamma_certified"] is False
    lo_need = max(steps["progress"][lower] / (steps["lr"][lower] * d0 * gap[lower]))
    assert s["gamma_lo"] == pytest.approx(lo_need, rel=1e-12)
    assert s["gamma_hi"] == pytest.approx(defined.min(), rel=1e-12) == s["gamma_min"]
    assert s["gamma_lo_step"] == int(steps["step"][lower].iloc[np.argmax(
        steps["progress"][lower] / (steps["lr"][lower] * d0 * gap[lower]))])
    assert f"step {s['gamma_lo_step']} needs γ ≥" in s["gamma_certificate"] and s["rate_reason"] is not None
    checks = pr.theorem1_checks(steps, d0_sq=d0)
    assert checks[0].verdict == "fails"
    assert checks[1].verdict == "fails"  # a rising step: item 1 must not read "holds"
    assert s["dist_n_increase"] >= 1
