"""The survey's landscape statements as hypotheses (issue 24, item 4), on hand-made curvature tables.

The tables follow the curvature step-hook contract (``analysis/<ref>/curvature/epoch_*.parquet``:
``step, epoch, lr, at_epoch_end, lambda_1 … lambda_k, trace, trace_se, stability_ratio,
stability_threshold_kind, outlier_ratio, beta_eff, …``). What must hold: a hypothesis's verdict is
the claims' rule on each run's statistic (never a second rule); a hypothesis with any run
unmeasured says "not measured" and no verdict; the correlation is Spearman's ρ with its n.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gammatrace.experiments.study import STUDIES
from gammatrace.principles.claims import (
    CONSISTENT,
    INCONCLUSIVE,
    NOT_CONSISTENT,
    RunPoint,
    check_claim,
)
from gammatrace.principles.survey import NOT_MEASURED, SURVEY, Hypothesis, path_statistic, spearman
from gammatrace.reporting.collect import example_entry
from gammatrace.reporting.document import Bullets, Figure, Table, Text
from gammatrace.reporting.study import StudyRun
from gammatrace.reporting.survey import (
    check_hypothesis,
    correlations,
    curvature_table,
    gamma_lambda_figure,
    hypotheses_of,
    survey_blocks,
)
from gammatrace.store.run import RunStore
from gammatrace.store.study import StudyMeta

PAPERS_SURVEY = Path(__file__).resolve().parents[1].parent / "shared" / "papers" / SURVEY


def table(lambdas, *, k=3, lr=0.02, beta=None, rng=None):
    """A curvature table of the contract's columns, one row per measurement."""
    lam1 = np.asarray(lambdas, dtype=float)
    n = len(lam1)
    lam3 = lam1 / 10.0
    return pd.DataFrame({
        "step": np.arange(n) * 20, "epoch": np.arange(n), "lr": lr, "at_epoch_end": True,
        "lambda_1": lam1, "lambda_2": lam1 / 2.0, "lambda_3": lam3, "trace": np.nan, "trace_se": np.nan,
        "stability_ratio": lr * lam1 / 2.0, "stability_threshold_kind": "sgd", "outlier_ratio": lam1 / lam3,
        "beta_eff": lam1 * 0.8 if beta is None else beta, "loss_range_min": 0.1, "loss_range_max": 0.2,
        "grad_change_max": 1.0})


def runs_of(cells, seeds, gamma=lambda cell, s: 0.3):
    return [StudyRun(f"{c}-s{s}", c, "cnn1d", example_entry(f"{c}-s{s}", gamma(c, s)), None, s)
            for c in cells for s in range(seeds)]


BN = Hypothesis("With BN, λ_1 smaller", "none > all ≈ first", "lambda_1", SURVEY, "Lipschitz", "Santurkar et al.",
                "cnn1d")


def test_path_statistic_is_the_median_over_the_rows():
    t = table([5.0, 1.0, 3.0, np.nan])
    assert path_statistic(t, "lambda_1") == 3.0
    assert path_statistic(t, "stability") == pytest.approx(0.02 * 3.0 / 2.0)
    assert path_statistic(t, "outlier_ratio") == pytest.approx(10.0)
    assert math.isnan(path_statistic(t.drop(columns="beta_eff"), "beta_eff"))
    assert math.isnan(path_statistic(None, "lambda_1"))
    assert math.isnan(path_statistic(table([np.nan]), "lambda_1"))


def test_spearman_equals_scipy_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(3, 20))
        x = rng.integers(0, 5, n).astype(float)  # ties on purpose
        y = x + rng.integers(0, 3, n)
        rho, m = spearman(x, y)
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            assert math.isnan(rho)
            continue
        assert m == n and rho == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2], [2, 1]) == (pytest.approx(math.nan, nan_ok=True), 2)


@pytest.mark.parametrize("shift, verdict", [(5.0, CONSISTENT), (-5.0, NOT_CONSISTENT)])
def test_a_hypothesis_is_decided_by_the_claims_rule_on_each_runs_statistic(shift, verdict):
    runs = runs_of(("all", "first", "none"), 6)
    tables = {r.name: table([10.0 + (shift if r.cell == "none" else 0.0) + 0.1 * r.seed] * 3) for r in runs}
    check = check_hypothesis(BN, runs, tables)
    # The same numbers through check_claim directly: the one rule, nothing else.
    points = [RunPoint(r.name, r.cell, path_statistic(tables[r.name], "lambda_1"), math.nan, None, r.seed)
              for r in runs]
    direct = check_claim(BN.order, points)
    assert check.verdict == direct.verdict == verdict
    assert check.text == direct.text
    assert [t.p_value for t in check.result.relations] == [t.p_value for t in direct.relations]


def test_too_few_seeds_is_said_not_decided():
    runs = runs_of(("all", "first", "none"), 2)
    tables = {r.name: table([20.0 if r.cell == "none" else 2.0]) for r in runs}
    check = check_hypothesis(BN, runs, tables)
    assert check.verdict == INCONCLUSIVE and "cannot be reached" in check.text


def test_an_excluded_run_makes_it_inconclusive_as_for_a_claim():
    runs = runs_of(("all", "none"), 6)
    runs[0] = StudyRun(runs[0].name, "all", "cnn1d", example_entry(runs[0].name, losses=[2.3, 2.29],
                                                                    no_progress=True), None, 0)
    tables = {r.name: table([20.0 if r.cell == "none" else 2.0]) for r in runs}
    check = check_hypothesis(Hypothesis("t", "none > all", "lambda_1", group="cnn1d"), runs, tables)
    assert check.verdict == INCONCLUSIVE and "cells excluded: all" in check.text


@pytest.mark.parametrize("damage, why", [
    (lambda t, name: {k: v for k, v in t.items() if k != name}, "no curvature table: all-s0"),
    (lambda t, name: {k: (v.drop(columns="lambda_1") if k == name else v) for k, v in t.items()},
     "the curvature tables lack lambda_1"),
    (lambda t, name: {k: (v.assign(lambda_1=np.nan) if k == name else v) for k, v in t.items()},
     "no finite lambda_1 along the path: all-s0"),
])
def test_missing_data_says_not_measured_never_a_verdict(damage, why):
    runs = runs_of(("all", "first", "none"), 6)
    tables = {r.name: table([20.0 if r.cell == "none" else 2.0]) for r in runs}
    assert check_hypothesis(BN, runs, tables).verdict == CONSISTENT  # measured, it would be decided
    check = check_hypothesis(BN, runs, damage(tables, "all-s0"))
    assert check.result is None and check.verdict == NOT_MEASURED
    assert check.text == f"{NOT_MEASURED} ({why})"


def test_correlation_is_spearman_over_the_runs_with_both_numbers():
    gam = {("a", 0): 0.1, ("a", 1): 0.2, ("b", 0): 0.3, ("b", 1): 0.4}
    runs = runs_of(("a", "b"), 2, gamma=lambda c, s: gam[c, s])
    lam = {"a-s0": 9.0, "a-s1": 7.0, "b-s0": 8.0, "b-s1": 1.0}
    tables = {n: table([v], lr=0.1) for n, v in lam.items()}
    corr = {c.statistic: c for c in correlations(runs, tables)}
    expected = stats.spearmanr([0.1, 0.2, 0.3, 0.4], [9.0, 7.0, 8.0, 1.0]).statistic
    assert corr["lambda_1"].rho == pytest.approx(expected) and corr["lambda_1"].n == 4
    assert corr["stability"].rho == pytest.approx(expected)  # one lr: η·λ_1/2 ranks as λ_1
    assert corr["lambda_1"].text.startswith(f"cnn1d: Spearman ρ = {expected:.2f} between median γ_k and median λ_1")
    assert "over n = 4 runs of 2 cell(s)" in corr["lambda_1"].text
    del tables["b-s1"]
    del tables["a-s1"]
    short = {c.statistic: c for c in correlations(runs, tables)}["lambda_1"]
    assert short.n == 2 and "not computed" in short.text


def write_curvature(run, frame, ref="last"):
    RunStore(run.path).write_parquet(RunStore.shard(RunStore.analysis(ref, "curvature"), 0), frame)


def test_report_section_reads_the_tables_from_disk_and_draws_the_figure(tmp_path):
    runs = runs_of(("all", "first", "none"), 6, gamma=lambda c, s: 0.3 if c != "none" else 0.1 + 0.01 * s)
    for r in runs:
        write_curvature(r.last.run, table([30.0 + r.seed if r.cell == "none" else 3.0 + 0.1 * r.seed]))
    assert curvature_table(runs[0].last)["lambda_1"].tolist() == [3.0]
    info = StudyMeta(study="batchnorm", runs={r.name: r.cell for r in runs},
                     hypotheses=[BN.as_json(), Hypothesis("t", "none > all", "trace", group="cnn1d").as_json()])
    assert [h.statistic for h in hypotheses_of(info)] == ["lambda_1", "trace"]
    blocks = survey_blocks(info, runs, tmp_path)
    sentences = next(b for b in blocks if isinstance(b, Bullets)).items
    assert "— consistent (every relation p < α" in sentences[0]
    assert "the survey's summary of Santurkar et al." in sentences[0]
    # The trace column is in the contract but empty here (trace_samples 0): not measured.
    assert "— not measured (no finite trace along the path: " in sentences[1]
    assert any(isinstance(b, Table) for b in blocks)
    assert any(isinstance(b, Text) and "not that one causes the other" in b.text for b in blocks)
    fig = next(b for b in blocks if isinstance(b, Figure))
    assert fig.png == "gamma_lambda_cnn1d.png"
    assert (tmp_path / fig.png).is_file() and (tmp_path / fig.pdf).is_file()
    # The example runs' step tables lack γ and the gradient products: no RSI/EB figure, said so.
    assert any(isinstance(b, Text) and b.text.startswith("rsi_eb_cnn1d.png not drawn. ") for b in blocks)


def test_rsi_eb_figure_is_drawn_for_any_study(tmp_path):
    runs = runs_of(("a", "b"), 2)
    for i, r in enumerate(runs):
        r.last.steps = pd.DataFrame({"epoch": [0, 0, 1, 1], "gamma": [0.2, 0.3, 0.4, 0.1 + i],
                                     "grad_dot": [1.0, 2.0, 1.0, -1.0], "grad_sq": [4.0, 4.0, 1.0, 1.0],
                                     "dist_sq": [1.0, 1.0, 4.0, 4.0]})
    blocks = survey_blocks(StudyMeta(study="plain", runs={r.name: r.cell for r in runs}), runs, tmp_path)
    assert blocks[0].text == "RSI/EB beside γ"
    [fig] = [b for b in blocks if isinstance(b, Figure)]
    assert fig.png == "rsi_eb_cnn1d.png" and (tmp_path / fig.png).is_file()


def test_a_study_without_curvature_says_not_measured(tmp_path):
    runs = runs_of(("all", "none"), 2)
    info = StudyMeta(study="batchnorm", runs={r.name: r.cell for r in runs}, hypotheses=[BN.as_json()])
    blocks = survey_blocks(info, runs, tmp_path)
    assert next(b for b in blocks if isinstance(b, Bullets)).items[0].endswith(
        "— not measured (no curvature table: all-s0, all-s1, none-s0, none-s1). Source: "
        f"{SURVEY} (the survey's summary of Santurkar et al.): “Lipschitz”.")
    assert not any(isinstance(b, Figure) for b in blocks)
    assert survey_blocks(StudyMeta(study="x", runs={r.name: r.cell for r in runs}), runs, tmp_path) == []
    notes = []
    assert gamma_lambda_figure(runs, {}, tmp_path, notes) is None and "skipped" in notes[0]


def test_the_batchnorm_study_carries_the_survey_statements_quoted():
    study = STUDIES.get("batchnorm")("quick", None)
    hyps = study.hypotheses
    assert [(h.statistic, h.order_text) for h in hyps] == [("lambda_1", "none > all ≈ first")] * 1 + [
        ("beta_eff", "none > all ≈ first"), ("outlier_ratio", "none > all ≈ first")]
    assert {h.summary_of for h in hyps} == {"Santurkar et al.", "Ghorbani et al."}
    assert all(h.source == SURVEY for h in hyps)
    meta = study.meta(study.seeds)
    assert [Hypothesis.from_json(h) for h in meta.hypotheses] == hyps
    assert all(cfg.curvature is not None for cfg in study.cells.values())
    if PAPERS_SURVEY.is_file():  # the quotes are the survey's words (whitespace normalized)
        text = " ".join(PAPERS_SURVEY.read_text().split())
        for h in hyps:
            assert " ".join(h.quote.split()) in text, h.quote
    # Other studies' study.json is unchanged: no hypotheses key.
    assert "hypotheses" not in STUDIES.get("activation")("quick", None).meta(1).model_dump()
