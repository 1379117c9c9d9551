"""gammatrace.principles against brute force on tiny stored trajectories.

Every check stores the float64 iterates θ_0 … θ_T, computes the raw columns the way
the probe would (from Δ_k), and compares each derived number with the slow obvious
computation: explicit loops over the iterates and explicit norms.
"""

from __future__ import annotations

import ast
import json
import math
import pathlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

import gammatrace.principles as pr

EPS = 1e-8
# (name, slice of θ) — three "tensors" in two modules, for the per-layer checks.
TENSORS = (("enc.weight", slice(0, 3)), ("enc.bias", slice(3, 4)), ("head.weight", slice(4, 7)))


@dataclass
class Run:
    theta: np.ndarray  # (T + 1, d) stored iterates
    theta_star: np.ndarray
    grads: np.ndarray  # (T, d)
    lr: np.ndarray
    epoch: np.ndarray
    loss: np.ndarray
    loss_ref: np.ndarray
    df: pd.DataFrame
    tensors: pd.DataFrame  # long (step, tensor) table

    @property
    def T(self) -> int:
        return len(self.lr)


# A coupled weight decay λ folded into g_k for the *_wd columns (g_k + λθ_k).
WD = 0.1


def build_tables(theta, theta_star, grads, lr, epoch, loss, loss_ref) -> tuple:
    """Raw columns as the probe measures them: from Δ_k, float64, one step at a time."""
    rows, tensor_rows = [], []
    for k in range(len(lr)):
        x = theta[k] - theta_star
        delta = theta[k] - theta[k + 1]
        rows.append(
            {
                "step": k,
                "epoch": int(epoch[k]),
                "lr": lr[k],
                "loss": loss[k],
                "loss_ref": loss_ref[k],
                "progress": x @ delta - 0.5 * (delta @ delta),
                "dist_sq": x @ x,
                "update_sq": delta @ delta,
                "grad_dot": x @ grads[k],
                "grad_sq": grads[k] @ grads[k],
                "grad_dot_wd": x @ (grads[k] + WD * theta[k]),
                "grad_sq_wd": (grads[k] + WD * theta[k]) @ (grads[k] + WD * theta[k]),
            }
        )
        for name, sl in TENSORS:
            p = x[sl] @ delta[sl] - 0.5 * (delta[sl] @ delta[sl])
            tensor_rows.append({"step": k, "epoch": int(epoch[k]), "tensor": name, "progress": p})
    return pd.DataFrame(rows), pd.DataFrame(tensor_rows)


def make_run(seed: int = 0, reference: str = "last", bad_gaps: bool = True) -> Run:
    """d = 7, T = 30, 3 epochs: a noisy walk drifting toward a target, step-schedule lr.

    ``reference`` "last" takes θ* = θ_T, "other" a point near the target.
    ``bad_gaps`` plants gaps = 0, < 0 and in (0, ε] so undefined γ_k get counted;
    otherwise every gap is made positive.
    """
    rng = np.random.default_rng(seed)
    d, T = 7, 30
    epoch = np.repeat(np.arange(3), T // 3)
    # Step schedule with per-step jitter: η changes every step.
    lr = np.array([0.15, 0.08, 0.04])[epoch] * (1.0 + 0.5 * rng.uniform(size=T))
    target = rng.normal(size=d)
    theta = np.empty((T + 1, d))
    theta[0] = target + 2.0 * rng.normal(size=d)
    for k in range(T):
        # SGD-like: the noise scales with η, so the walk settles as the lr decays.
        noise = 0.5 * lr[k] * rng.normal(size=d)
        theta[k + 1] = theta[k] + lr[k] * (target - theta[k]) + noise
    theta_star = theta[-1].copy() if reference == "last" else target + 0.05 * rng.normal(size=d)
    grads = (theta[:-1] - target) + 0.3 * rng.normal(size=(T, d))
    batch = 0.05 * rng.normal(size=T)
    loss = 0.5 + 0.5 * np.sum((theta[:-1] - target) ** 2, axis=1) + batch
    loss_ref = 0.5 + 0.5 * np.sum((theta_star - target) ** 2) + batch
    if bad_gaps:
        loss_ref[3] = loss[3]  # gap 0
        loss_ref[7] = loss[7] + 0.2  # gap < 0
        loss_ref[12] = loss[12] - 0.5 * EPS  # 0 < gap ≤ ε
    else:
        loss_ref = loss - (np.abs(loss - loss_ref) + 0.01)
    df, tensors = build_tables(theta, theta_star, grads, lr, epoch, loss, loss_ref)
    return Run(theta, theta_star, grads, lr, epoch, loss, loss_ref, df, tensors)


def make_principle_run(gamma_true: float, seed: int = 0) -> Run:
    """A trajectory on which the γ-principle holds with ``gamma_true`` by construction.

    Each step contracts toward θ* plus an orthogonal wobble, so P_k > 0; the loss gap
    is then chosen as P_k / (γ_k η_k D_0²) with γ_k ≥ gamma_true. θ* is never reached.
    """
    rng = np.random.default_rng(seed)
    d, T = 7, 30
    epoch = np.repeat(np.arange(3), T // 3)
    lr = np.array([0.2, 0.1, 0.05])[epoch] * (1.0 + 0.5 * rng.uniform(size=T))
    theta_star = rng.normal(size=d)
    theta = np.empty((T + 1, d))
    theta[0] = theta_star + 3.0 * rng.normal(size=d)
    d0_sq = np.sum((theta[0] - theta_star) ** 2)
    gaps = np.empty(T)
    for k in range(T):
        x = theta[k] - theta_star
        c = rng.uniform(0.05, 0.3)
        wobble = rng.normal(size=d)
        wobble -= (wobble @ x) / (x @ x) * x
        wobble *= 0.2 * c * np.linalg.norm(x) / np.linalg.norm(wobble)
        delta = c * x + wobble
        theta[k + 1] = theta[k] - delta
        p = x @ delta - 0.5 * (delta @ delta)
        gaps[k] = p / (gamma_true * (1.0 + rng.exponential()) * lr[k] * d0_sq)
    loss_ref = 0.1 + rng.uniform(size=T)
    loss = loss_ref + gaps
    grads = rng.normal(size=(T, d))
    df, tensors = build_tables(theta, theta_star, grads, lr, epoch, loss, loss_ref)
    return Run(theta, theta_star, grads, lr, epoch, loss, loss_ref, df, tensors)


def dist_sq_bf(run: Run, k: int) -> float:
    """‖θ_k − θ*‖² by an explicit loop over coordinates."""
    return sum((a - b) ** 2 for a, b in zip(run.theta[k], run.theta_star, strict=True))


def close(actual, expected, rtol=1e-9, atol=1e-12):
    np.testing.assert_allclose(
        np.asarray(actual, dtype=float), np.asarray(expected, dtype=float), rtol, atol, True
    )


def stats_bf(values) -> dict:
    """certify() the slow way."""
    defined = [v for v in values if math.isfinite(v)]
    n = len(defined)
    srt = sorted(defined)
    med = math.nan if n == 0 else (srt[n // 2] if n % 2 else 0.5 * (srt[n // 2 - 1] + srt[n // 2]))
    return {
        "gamma_min": min(defined) if n else math.nan,
        "n_steps": len(values),
        "n_undefined": len(values) - n,
        "frac_positive": sum(v > 0 for v in defined) / n if n else math.nan,
        "median": med,
        "mean": sum(defined) / n if n else math.nan,
    }


# ----------------------------------------------------------------------------- series


@pytest.mark.parametrize("reference", ["last", "other"])
def test_progress_identity_with_next_dist_sq(reference):
    run = make_run(1, reference)
    expected = [dist_sq_bf(run, k) for k in range(run.T + 1)]
    got = pr.next_dist_sq(run.df)
    assert got.shape == (run.T + 1,)
    close(got, expected, rtol=1e-12, atol=1e-12 * expected[0])
    if reference == "last":
        assert abs(got[-1]) <= 1e-12 * expected[0]
        close(run.df.progress.sum(), 0.5 * expected[0], rtol=1e-12)


@pytest.mark.parametrize(
    "reference, d0_sq, ell_inf_quantile",
    [("last", None, None), ("other", None, None), ("other", 2.5, 0.2), ("last", None, 0.5)],
)
def test_derive_matches_bruteforce(reference, d0_sq, ell_inf_quantile):
    run = make_run(2, reference)
    ell_inf = 0.0 if ell_inf_quantile is None else float(np.quantile(run.loss, ell_inf_quantile))
    out = pr.derive(run.df, d0_sq=d0_sq, ell_inf=ell_inf, eps=EPS)
    D0 = dist_sq_bf(run, 0) if d0_sq is None else d0_sq
    expected = {c: [] for c in pr.DERIVED_COLUMNS}
    for k in range(run.T):
        x = run.theta[k] - run.theta_star
        delta = run.theta[k] - run.theta[k + 1]
        # Progress the "other" way: half the drop of the explicit squared distance.
        p = 0.5 * (dist_sq_bf(run, k) - dist_sq_bf(run, k + 1))
        gap = run.loss[k] - run.loss_ref[k]
        above = run.loss[k] - ell_inf
        eta = run.lr[k]
        expected["gamma"].append(p / (eta * D0 * gap) if gap > EPS else math.nan)
        expected["gamma_rp"].append(p / (eta * above) / D0 if above > EPS else math.nan)
        expected["gamma_rc"].append(p / (eta * dist_sq_bf(run, k)))
        expected["star"].append(float(np.dot(x, run.grads[k])) - gap)
        expected["cos_align"].append(np.dot(delta, x) / (np.linalg.norm(delta) * np.linalg.norm(x)))
        # "No Wrong Turns" (get_norm_dot_prod): ⟨θ − x*, g⟩, ‖g‖, ‖θ − x*‖ on the flat parameters.
        dist = math.sqrt(sum(a * a for a in x))
        expected["rsi"].append(sum(a * b for a, b in zip(x, run.grads[k], strict=True)) / dist**2)
        expected["eb"].append(math.sqrt(sum(b * b for b in run.grads[k])) / dist)
        expected["rsi_eb"].append(expected["rsi"][-1] / expected["eb"][-1])
        folded = [b + WD * t for b, t in zip(run.grads[k], run.theta[k], strict=True)]
        expected["rsi_wd"].append(sum(a * b for a, b in zip(x, folded, strict=True)) / dist**2)
        expected["eb_wd"].append(math.sqrt(sum(b * b for b in folded)) / dist)
    for column, values in expected.items():
        close(out[column], values, rtol=1e-8, atol=1e-12)
    assert out.gamma.isna().sum() == sum(g <= EPS for g in run.loss - run.loss_ref)
    if ell_inf_quantile:
        assert out.gamma_rp.isna().sum() == sum(run.loss - ell_inf <= EPS) > 0
    # A copy: the input keeps only its raw columns.
    assert list(run.df.columns) == list(pr.RAW_COLUMNS)
    assert all(out[c].dtype == np.float64 for c in pr.DERIVED_COLUMNS)


@pytest.mark.parametrize(
    "edit, expect_nan",
    [
        ({"lr": 0.0}, {"gamma", "gamma_rp", "gamma_rc"}),
        ({"lr": -0.1}, {"gamma", "gamma_rp", "gamma_rc"}),
        ({"update_sq": 0.0, "progress": 0.0}, {"cos_align"}),
        ({"dist_sq": 0.0}, {"gamma_rc", "cos_align", "rsi", "eb", "rsi_wd", "eb_wd", "rsi_eb"}),
        ({"loss_ref": "loss-eps/2"}, {"gamma"}),
        ({"loss_ref": "loss+1"}, {"gamma"}),
        ({"loss": -1.0, "loss_ref": -2.0}, {"gamma_rp"}),
    ],
)
def test_derive_undefined_rules(edit, expect_nan):
    run = make_run(3, "other", bad_gaps=False)
    df = run.df.copy()
    k = 11
    for column, value in edit.items():
        if value == "loss-eps/2":
            value = df.loc[k, "loss"] - 0.5 * EPS
        elif value == "loss+1":
            value = df.loc[k, "loss"] + 1.0
        df.loc[k, column] = value
    out = pr.derive(df)  # row 0 (D_0²) is never the edited row
    nan_at_k = {c for c in pr.DERIVED_COLUMNS if math.isnan(out.loc[k, c])}
    assert nan_at_k == expect_nan
    # Other rows are untouched by a one-row edit.
    base = pr.derive(run.df)
    rows = [i for i in range(run.T) if i != k]
    for c in pr.DERIVED_COLUMNS:
        close(out.loc[rows, c], base.loc[rows, c], rtol=0, atol=0)


@pytest.mark.parametrize(
    "dropped, nan_columns",
    [("grad_dot", {"star", "rsi", "rsi_eb"}), ("grad_sq", {"eb", "rsi_eb"}), ("loss_ref", {"gamma", "star"}),
     ("update_sq", {"cos_align"}), ("grad_dot_wd", {"rsi_wd"}), ("grad_sq_wd", {"eb_wd"})],
)
def test_missing_columns_skip_cleanly(dropped, nan_columns):
    run = make_run(4, "last")
    full = pr.derive(run.df)
    out = pr.derive(run.df.drop(columns=dropped))
    for c in pr.DERIVED_COLUMNS:
        if c in nan_columns:
            assert out[c].isna().all(), c
        else:
            close(out[c], full[c], rtol=0, atol=0)
    summary = pr.summarize(run.df.drop(columns=dropped))
    json.dumps(summary)
    if dropped == "loss_ref":
        assert summary["gamma_n_undefined"] == run.T
        assert math.isnan(summary["gamma_min"]) and math.isnan(summary["gamma_eff"])
        assert summary["rate_reason"] is not None
        assert summary["gamma_rp_n_undefined"] == 0


def test_unsorted_table_is_rejected():
    df = make_run(0).df
    with pytest.raises(ValueError, match="sorted"):
        pr.derive(df.iloc[::-1])


# ------------------------------------------------------------------------ certificates


@pytest.mark.parametrize("tail", [0, 4, 29, 30, 35])
def test_certify_matches_loop(tail):
    gamma = pr.derive(make_run(5, "last").df).gamma
    got = pr.certify(gamma, tail=tail)
    values = list(gamma)[: max(len(gamma) - tail, 0)]
    expected = stats_bf(values)
    for key, value in expected.items():
        close(got[key], value, rtol=1e-12)
    # From γ_k alone an undefined step's constraint is unknown, so it blocks the certificate.
    assert got["certified"] == (expected["gamma_min"] > 0 and expected["n_undefined"] == 0)
    json.dumps(got)


def test_certify_counts_undefined_and_rejects_bad_tail():
    got = pr.certify(np.array([1.0, np.nan, np.inf, 2.0]))
    # Undefined steps are counted and never make a certificate hold (issue 19): not certified.
    assert (got["n_undefined"], got["gamma_min"], got["certified"]) == (2, 1.0, False)
    assert pr.certify(np.array([1.0, 2.0]))["certified"]
    assert not pr.certify([np.nan])["certified"]
    with pytest.raises(ValueError):
        pr.certify([1.0], tail=-1)


@pytest.mark.parametrize("reference", ["last", "other"])
def test_gamma_eff_matches_explicit_distances(reference):
    run = make_run(6, reference)
    D0 = dist_sq_bf(run, 0)
    curve = pr.gamma_eff_curve(run.df)
    assert list(curve.index) == list(range(1, run.T + 1))
    for K in range(1, run.T + 1):
        denom = 0.0
        for k in range(K):
            denom += run.lr[k] * (run.loss[k] - run.loss_ref[k])
        expected = (D0 - dist_sq_bf(run, K)) / (2.0 * D0 * denom) if denom > 0 else math.nan
        close(curve.loc[K], expected, rtol=1e-9)
        close(pr.gamma_eff(run.df, K=K), expected, rtol=1e-9)
    assert math.isnan(pr.gamma_eff(run.df, K=0))
    with pytest.raises(ValueError):
        pr.gamma_eff(run.df, K=run.T + 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_telescoping_identity_with_last_iterate(seed):
    """θ* = θ_T: Σ P_k = ½D_0², γ_eff(T) = 1/(2Σ η gap) = the gap-weighted mean of γ_k."""
    run = make_run(seed, "last", bad_gaps=False)
    D0 = dist_sq_bf(run, 0)
    close(run.df.progress.sum(), 0.5 * D0, rtol=1e-12)
    weighted = sum(run.lr[k] * (run.loss[k] - run.loss_ref[k]) for k in range(run.T))
    close(pr.gamma_eff(run.df), 1.0 / (2.0 * weighted), rtol=1e-10)
    gamma = pr.derive(run.df).gamma.to_numpy()
    w = run.lr * (run.loss - run.loss_ref)
    close(np.sum(w * gamma) / np.sum(w), pr.gamma_eff(run.df), rtol=1e-10)
    # With a reference beyond the horizon the telescoping does not close.
    other = make_run(seed, "other", bad_gaps=False)
    w_other = sum(other.lr * (other.loss - other.loss_ref))
    assert not math.isclose(pr.gamma_eff(other.df), 1.0 / (2.0 * w_other), rel_tol=1e-3)


@pytest.mark.parametrize("column, tail", [("gamma", 0), ("gamma_rc", 0), ("star", 3)])
def test_per_epoch_matches_loop(column, tail):
    run = make_run(7, "last")
    derived = pr.derive(run.df)
    got = pr.per_epoch(run.df, column, tail=tail)  # derives on demand
    assert list(got.index) == [0, 1, 2]
    values = list(derived[column])[: run.T - tail]
    for e in range(3):
        vals = [v for v, ep in zip(values, run.epoch[: len(values)], strict=True) if ep == e]
        expected = stats_bf(vals)
        row = got.loc[e]
        close(row["min"], expected["gamma_min"])
        close(row["median"], expected["median"])
        close(row["mean"], expected["mean"])
        close(row["frac_positive"], expected["frac_positive"])
        assert row["n_undefined"] == expected["n_undefined"]
        assert row["n_steps"] == len(vals)


# ----------------------------------------------------------------------------- theorem 1


@pytest.mark.parametrize("reference", ["last", "other"])
def test_monotone_distance_matches_explicit_norms(reference):
    run = make_run(8, reference)
    got = pr.monotone_distance(run.df)
    dists = [math.sqrt(dist_sq_bf(run, k)) for k in range(run.T + 1)]
    increases = [dists[k + 1] - dists[k] for k in range(run.T) if dists[k + 1] > dists[k]]
    assert increases, "fixture should contain steps that move away from θ*"
    assert got["n_increase"] == len(increases)
    close(got["frac_increase"], len(increases) / run.T)
    close(got["max_increase"], max(increases) / dists[0], rtol=1e-8)
    close(got["sum_increase"], sum(increases) / dists[0], rtol=1e-8)
    close(got["curve"], [d / dists[0] for d in dists], rtol=1e-9, atol=1e-7)


def test_monotone_distance_without_increases():
    run = make_principle_run(0.5, seed=1)
    got = pr.monotone_distance(run.df)
    assert (got["n_increase"], got["max_increase"], got["sum_increase"]) == (0, 0.0, 0.0)
    assert np.all(np.diff(got["curve"]) < 0)


def make_samples(seed: int, with_ref: bool, drop_sample: int | None) -> pd.DataFrame:
    """8 samples, 3 epochs, batches of 2 without replacement; noisy decreasing losses."""
    rng = np.random.default_rng(seed)
    rows, step = [], 0
    scale = rng.uniform(0.5, 2.0, size=8)
    for e in range(3):
        order = rng.permutation(8)
        for b in range(4):
            for i in order[2 * b : 2 * b + 2]:
                loss = scale[i] * math.exp(-0.7 * e) + 0.3 * rng.uniform()
                row = {"step": step, "epoch": e, "index": int(i), "loss": loss}
                if with_ref:
                    row["loss_ref"] = 0.1 * rng.uniform()
                rows.append(row)
            step += 1
    df = pd.DataFrame(rows)
    if drop_sample is not None:  # this sample is only recorded at its first visit
        df = df[(df["index"] != drop_sample) | (df["epoch"] == 0)]
    return df.sample(frac=1.0, random_state=seed)  # input order must not matter


@pytest.mark.parametrize("with_ref, drop_sample", [(True, None), (False, None), (True, 3)])
def test_per_sample_convergence_matches_loop(with_ref, drop_sample):
    samples = make_samples(9, with_ref, drop_sample)
    summary, by_epoch = pr.per_sample_convergence(samples)
    visits: dict[int, list[tuple[int, float]]] = {}
    per_epoch: dict[int, list[float]] = {}
    for r in samples.itertuples():
        gap = r.loss - (r.loss_ref if with_ref else 0.0)
        visits.setdefault(r.index, []).append((r.step, gap))
        per_epoch.setdefault(r.epoch, []).append(gap)
    firsts = {i: min(v)[1] for i, v in visits.items()}
    lasts = {i: max(v)[1] for i, v in visits.items()}
    revisited = [i for i, v in visits.items() if len(v) >= 2]
    assert summary["n_samples"] == len(visits) == 8
    assert summary["n_revisited"] == len(revisited) == (7 if drop_sample is not None else 8)
    close(summary["frac_improved"], sum(lasts[i] <= firsts[i] for i in revisited) / len(revisited))
    close(summary["max_last_gap"], max(lasts.values()))
    close(summary["mean_last_gap"], sum(lasts.values()) / len(lasts))
    assert summary["uses_loss_ref"] == with_ref
    for e, gaps in per_epoch.items():
        close(by_epoch.loc[e, "mean_gap"], sum(gaps) / len(gaps))
        close(by_epoch.loc[e, "max_gap"], max(gaps))
        assert by_epoch.loc[e, "n_visits"] == len(gaps)


@pytest.mark.parametrize("reference, gamma", [("last", 0.01), ("other", 0.002), ("other", None)])
def test_rate_bound_matches_loop(reference, gamma):
    run = make_run(10, reference, bad_gaps=False)
    got = pr.rate_bound(run.df, gamma=gamma)
    if gamma is None:  # the default: γ_hi of the certified interval, NaN (no bound) when it is empty
        cert = pr.certify(run.df)
        gamma = cert["gamma_hi"] if cert["certified"] else math.nan
    assert got["gamma"] == gamma or math.isnan(got["gamma"]) and math.isnan(gamma)
    D0 = dist_sq_bf(run, 0)
    boundaries = [k for k in range(1, run.T) if run.epoch[k] != run.epoch[k - 1]] + [run.T]
    table = got["table"]
    assert table["K"].tolist() == boundaries == [10, 20, 30]
    for row, K in zip(table.itertuples(), boundaries, strict=True):
        sum_lr = sum(run.lr[:K])
        actual = sum(run.lr[k] * (run.loss[k] - run.loss_ref[k]) for k in range(K)) / sum_lr
        if gamma > 0:
            bound = 1.0 / (2.0 * gamma * sum_lr)
            violations = 0
            for k in range(K):
                p = 0.5 * (dist_sq_bf(run, k) - dist_sq_bf(run, k + 1))
                rhs = gamma * run.lr[k] * D0 * (run.loss[k] - run.loss_ref[k])
                violations += p < rhs - 1e-9 * max(abs(p), abs(rhs))
            assert row.premise_violations == violations
            assert bool(row.holds) == (actual <= bound)
        else:
            bound = math.nan
            assert got["reason"] and pd.isna(row.holds)
        close(row.actual, actual)
        close(row.bound, bound)
        close(row.tightness, actual / bound)
    explicit = pr.rate_bound(run.df, gamma=0.01, boundaries=[5, 30])["table"]
    assert explicit["K"].tolist() == [5, 30]
    with pytest.raises(ValueError):
        pr.rate_bound(run.df, boundaries=[0])


@pytest.mark.parametrize("gamma_true, seed", [(0.05, 0), (0.5, 1), (2.0, 2)])
def test_rate_bound_holds_when_principle_holds(gamma_true, seed):
    run = make_principle_run(gamma_true, seed)
    cert = pr.certify(pr.derive(run.df).gamma)
    assert cert["certified"] and cert["gamma_min"] >= gamma_true * (1 - 1e-12)
    assert cert["n_undefined"] == 0
    for gamma in (gamma_true, None):
        got = pr.rate_bound(run.df, gamma=gamma)
        assert got["reason"] is None
        table = got["table"]
        assert (table["premise_violations"] == 0).all()
        assert table["holds"].all()
        assert (table["tightness"] <= 1.0).all()
    # Claiming a γ far above the certified one breaks the premise, and that is counted.
    too_big = pr.rate_bound(run.df, gamma=20 * cert["gamma_min"])["table"]
    assert too_big["premise_violations"].iloc[-1] > 0


def test_rate_bound_implication_over_random_runs():
    """Theorem 1: premise on every step k < K  ⇒  bound at K. Never violated."""
    checked = violated = 0
    runs = [
        make_run(seed, ref, bad)
        for seed in range(6)
        for ref in ("last", "other")
        for bad in (False, True)
    ]
    runs += [make_principle_run(0.2, seed) for seed in range(4)]
    for run in runs:
        for gamma in (1e-3, 1e-2, 0.05, 0.2, 1.0):
            table = pr.rate_bound(run.df, gamma=gamma)["table"]
            premise = table["premise_violations"] == 0
            assert table.loc[premise, "holds"].all()
            checked += int(premise.sum())
            violated += int((~premise).sum())
    # Both branches must actually occur for the test to mean anything.
    assert checked > 10 and violated > 10


def test_rate_bound_uncertified_gives_reason():
    run = make_run(11, "last")
    cert = pr.certify(pr.derive(run.df).gamma)
    assert not cert["certified"]
    got = pr.rate_bound(run.df)
    assert "not > 0" in got["reason"]
    assert got["table"]["bound"].isna().all() and got["table"]["tightness"].isna().all()
    assert got["table"]["holds"].isna().all()
    assert got["table"]["actual"].notna().all()


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("reference", ["last", "other"])
def test_path_geometry_matches_loop(reference):
    run = make_run(12, reference)
    displacement = float(np.linalg.norm(run.theta[0] - run.theta[-1]))
    got = pr.path_geometry(run.df, displacement)
    length = sum(np.linalg.norm(run.theta[k] - run.theta[k + 1]) for k in range(run.T))
    cosines = []
    for k in range(run.T):
        step = run.theta[k + 1] - run.theta[k]  # −Δ_k
        toward = run.theta_star - run.theta[k]
        cosines.append(step @ toward / (np.linalg.norm(step) * np.linalg.norm(toward)))
    close(got["path_length"], length)
    close(got["path_ratio"], length / displacement)
    assert got["path_ratio"] >= 1.0  # triangle inequality
    close(got["cos_mean"], sum(cosines) / len(cosines))
    close(got["cos_median"], float(np.median(cosines)))
    close(got["cos_frac_positive"], sum(c > 0 for c in cosines) / len(cosines))
    assert got["cos_n_undefined"] == 0
    assert math.isnan(pr.path_geometry(run.df)["path_ratio"])


@pytest.mark.parametrize("n", [3, 50, 400])
def test_null_cos_scale_monte_carlo(n):
    rng = np.random.default_rng(n)
    fixed = rng.normal(size=n)
    fixed /= np.linalg.norm(fixed)
    u = rng.normal(size=(20_000, n))
    cos = (u @ fixed) / np.linalg.norm(u, axis=1)
    # Std. error of a std estimate from 20k draws is < 1 %; 4 % leaves ample room.
    assert pr.null_cos_scale(n) == pytest.approx(float(cos.std()), rel=0.04)
    assert abs(float(cos.mean())) < 4 * pr.null_cos_scale(n) / math.sqrt(20_000)
    with pytest.raises(ValueError):
        pr.null_cos_scale(0)


# ------------------------------------------------------------------------------- layers


def layer_bf(run: Run, group, by_epoch: bool) -> dict:
    """Per-(epoch,) group totals, shares and negative fractions by explicit loops."""
    result: dict = {}
    totals: dict = {}
    for k in range(run.T):
        x = run.theta[k] - run.theta_star
        delta = run.theta[k] - run.theta[k + 1]
        per_group: dict = {}
        for name, sl in TENSORS:
            p = sum(x[j] * delta[j] for j in range(sl.start, sl.stop)) - 0.5 * sum(
                delta[j] ** 2 for j in range(sl.start, sl.stop)
            )
            per_group[group(name)] = per_group.get(group(name), 0.0) + p
        e = int(run.epoch[k]) if by_epoch else None
        for g, p in per_group.items():
            key = (e, g) if by_epoch else g
            acc = result.setdefault(key, {"progress": 0.0, "neg": 0, "n": 0})
            acc["progress"] += p
            acc["neg"] += p < 0
            acc["n"] += 1
            totals[e] = totals.get(e, 0.0) + p
    for key, acc in result.items():
        acc["share"] = acc["progress"] / totals[key[0] if by_epoch else None]
    return result


@pytest.mark.parametrize("by_epoch", [False, True])
@pytest.mark.parametrize(
    "fn, group", [(pr.layer_shares, lambda n: n), (pr.module_shares, lambda n: n.rsplit(".", 1)[0])]
)
def test_shares_match_loop(fn, group, by_epoch):
    run = make_run(13, "other")
    # The long table decomposes P_k exactly.
    per_step = run.tensors.groupby("step")["progress"].sum().to_numpy()
    close(per_step, run.df.progress, rtol=1e-12, atol=1e-15)
    got = fn(run.tensors, by_epoch=by_epoch)
    expected = layer_bf(run, group, by_epoch)
    assert set(got.index) == set(expected)
    for key, acc in expected.items():
        row = got.loc[key]
        close(row["progress"], acc["progress"], rtol=1e-10, atol=1e-14)
        close(row["share"], acc["share"], rtol=1e-9)
        close(row["frac_negative"], acc["neg"] / acc["n"])
        assert row["n_steps"] == acc["n"]
    if by_epoch:
        close(got["share"].groupby(level="epoch").sum(), [1.0, 1.0, 1.0], rtol=1e-12)
    else:
        close(got["share"].sum(), 1.0, rtol=1e-12)
        names = [group(n) for n, _ in TENSORS]
        assert list(got.index) == list(dict.fromkeys(names))  # model order kept


def test_module_of():
    assert pr.module_of("blocks.0.conv.weight") == "blocks.0.conv"
    assert pr.module_of("bias") == ""


# ------------------------------------------------------------------------------ summary


@pytest.mark.parametrize("reference, tail", [("last", 0), ("last", 5), ("other", 2)])
def test_summarize_matches_bruteforce(reference, tail):
    run = make_run(14, reference)
    displacement = float(np.linalg.norm(run.theta[0] - run.theta[-1]))
    s = pr.summarize(run.df, tail=tail, displacement=displacement)
    json.loads(json.dumps(s))  # plain, serializable
    assert all(v is None or isinstance(v, bool | int | float | str) for v in s.values())
    n = run.T - tail
    assert (s["n_steps"], s["n_steps_total"], s["tail"]) == (n, run.T, tail)
    D0 = dist_sq_bf(run, 0)
    gamma = list(pr.derive(run.df).gamma)[:n]
    for key, value in stats_bf(gamma).items():
        close(s["gamma_" + key.removeprefix("gamma_")], value, rtol=1e-12)
    denom = sum(run.lr[k] * (run.loss[k] - run.loss_ref[k]) for k in range(n))
    close(s["gamma_eff"], (D0 - dist_sq_bf(run, n)) / (2 * D0 * denom), rtol=1e-9)
    dists = [math.sqrt(dist_sq_bf(run, k)) for k in range(n + 1)]
    ups = [dists[k + 1] - dists[k] for k in range(n) if dists[k + 1] > dists[k]]
    assert s["dist_n_increase"] == len(ups)
    close(s["dist_max_increase"], max(ups) / dists[0], rtol=1e-8)
    stars = [
        run.grads[k] @ (run.theta[k] - run.theta_star) - (run.loss[k] - run.loss_ref[k])
        for k in range(n)
    ]
    close(s["star_min"], min(stars))
    close(s["star_frac_nonneg"], sum(v >= 0 for v in stars) / n)
    length = sum(np.linalg.norm(run.theta[k] - run.theta[k + 1]) for k in range(run.T))
    close(s["path_ratio"], length / displacement)
    # The rate numbers at the final boundary, with γ = the certified γ_min.
    sum_lr = sum(run.lr[:n])
    close(s["rate_actual"], denom / sum_lr)
    gmin = s["gamma_min"]
    # The certificate: one γ > 0 with P_k ≥ γ η_k D_0² gap_k on every step k < n, every step
    # (negative and zero gaps too) checked at the candidates γ = each step's own bound.
    cons = [(0.5 * (dist_sq_bf(run, k) - dist_sq_bf(run, k + 1)), run.lr[k] * D0 * (run.loss[k] - run.loss_ref[k]),
             abs(run.loss[k] - run.loss_ref[k]) <= EPS) for k in range(n)]
    ok = [g for g in (p / w for p, w, z in cons if not z)
          if g > 0 and all((p >= -1e-15) if z else p >= g * w - 1e-9 * max(abs(p), abs(g * w)) for p, w, z in cons)]
    assert s["gamma_certified"] == bool(ok) == (s["rate_reason"] is None)
    if s["gamma_certified"]:
        close(s["gamma_hi"], gmin, rtol=0)
        close(s["rate_bound"], 1.0 / (2.0 * gmin * sum_lr))
        assert s["rate_holds"] == (denom / sum_lr <= s["rate_bound"])
    else:
        assert math.isnan(s["rate_bound"]) and s["rate_holds"] is None
    close(
        s["gamma_rc_min"],
        min(
            0.5 * (dist_sq_bf(run, k) - dist_sq_bf(run, k + 1)) / (run.lr[k] * dist_sq_bf(run, k))
            for k in range(n)
        ),
        rtol=1e-8,
    )


def test_summarize_rate_with_certified_gamma():
    run = make_principle_run(0.3, seed=3)
    s = pr.summarize(run.df, tail=4)
    n = run.T - 4
    assert s["gamma_certified"] and s["rate_reason"] is None and s["rate_holds"] is True
    sum_lr = sum(run.lr[:n])
    actual = sum(run.lr[k] * (run.loss[k] - run.loss_ref[k]) for k in range(n)) / sum_lr
    close(s["rate_tightness"], actual * 2.0 * s["gamma_min"] * sum_lr)
    assert s["rate_premise_violations"] == 0


@pytest.mark.parametrize(
    "epoch_factors, min_rel_drop, ell_inf",
    [
        ((1.0, 1.0, 1.0), 0.1, 0.0),  # flat: does not train
        ((1.0, 0.7, 0.5), 0.1, 0.0),  # halves: trains
        ((1.0, 0.97, 0.95), 0.1, 0.0),  # 5 % drop: flagged
        ((1.0, 0.97, 0.95), 0.01, 0.0),  # … unless the threshold is 1 %
        ((1.0, 0.9, 0.8), 0.1, 0.7),  # 20 % overall but little above ℓ_inf
    ],
)
def test_no_progress_flag(epoch_factors, min_rel_drop, ell_inf):
    run = make_run(15, "last")
    df = run.df.copy()
    df["loss"] = np.asarray(epoch_factors)[run.epoch] * (1.0 + 0.01 * np.sin(np.arange(run.T)))
    s = pr.summarize(df, ell_inf=ell_inf, min_rel_drop=min_rel_drop)
    first = [v for v, e in zip(df["loss"], run.epoch, strict=True) if e == 0]
    last = [v for v, e in zip(df["loss"], run.epoch, strict=True) if e == 2]
    mf, ml = sum(first) / len(first), sum(last) / len(last)
    close(s["loss_first_epoch"], mf)
    close(s["loss_last_epoch"], ml)
    assert s["no_progress"] == (ml - ell_inf > (1 - min_rel_drop) * (mf - ell_inf))


def test_no_progress_is_decided_from_the_steps_not_the_epochs():
    """Issue 21 item 4: a loop without epochs (one epoch for the whole run) whose batch loss fell
    from 3.99 to 2.13 trained; the first vs the last tenth of its steps says so."""
    run = make_run(15, "last")
    T = run.T
    df = run.df.copy()
    df["epoch"] = 0
    df["loss"] = np.linspace(3.99, 2.13, T)
    s = pr.summarize(df)
    tenth = math.ceil(T / 10)
    close(s["loss_first_steps"], float(np.mean(df["loss"].to_numpy()[:tenth])))
    close(s["loss_last_steps"], float(np.mean(df["loss"].to_numpy()[-tenth:])))
    assert s["loss_rel_drop_steps"] > 0.4 and s["no_progress"] is False
    assert math.isnan(s["loss_rel_drop"])  # one epoch is not compared with itself

    df["loss"] = 2.3 + 0.001 * np.sin(np.arange(T))  # flat, one epoch: flagged by its steps
    assert pr.summarize(df)["no_progress"] is True

    # Never flagged when either measure shows a fall beyond the threshold: a fast first epoch, flat after.
    many = run.df.copy()
    many["loss"] = np.where(run.epoch == 0, np.linspace(3.0, 2.0, T), 2.0)
    epochs = pr.summarize(many)
    assert epochs["loss_rel_drop"] > 0.1 and epochs["no_progress"] is False


def test_principles_import_only_numpy_pandas_and_stdlib():
    """No torch, directly or through another gammatrace subpackage (static check:
    importing the package itself runs gammatrace/__init__, which is not ours)."""
    allowed = {"__future__", "math", "typing", "dataclasses", "collections", "itertools", "functools", "numpy", "pandas",
               "scipy"}  # scipy: imported inside functions (claims statistics), never torch
    for path in pathlib.Path(pr.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                ok = name.split(".")[0] in allowed or name.startswith(("gammatrace.principles", "gammatrace.errors"))
                assert ok, f"{path.name} imports {name}"
