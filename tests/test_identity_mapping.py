"""The identity-mapping study on the engine: convergence to the known minimizer, γ and δ
against a NumPy brute force over every iterate, the verified replay behind every reference,
the study's outputs (sentence numbers = JSON, figures = the stored numbers), the teacher's
output (Σσ by default, Σ|σ| as an option) and the paper preset pinned to the report's words."""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gammatrace import principles as P
from gammatrace.data.loader import epoch_batches
from gammatrace.data.synthetic import planted_teacher, teacher_student
from gammatrace.engine.replay import ReplayMismatchError, replay
from gammatrace.experiments.identity import cli, study
from gammatrace.experiments.identity.figures import (
    draw_loss_distance,
    draw_one_point,
    draw_references,
)
from gammatrace.experiments.identity.problem import (
    CELL_BY_NAME,
    MAIN_CELL,
    PRESETS,
    SOURCES,
    Preset,
    align_to_teacher,
    planted_args,
    run_config,
)
from gammatrace.experiments.identity.sources import PAPER, phrase_in
from gammatrace.experiments.identity.summary import CURVES, loss_distance_curves, summarize_cell
from gammatrace.reporting.document import md_escape
from gammatrace.store.run import Run, RunStore

TINY = PRESETS.get("tiny")()
# A horizon of two epochs (and one beyond it): the brute force below visits every step.
SHORT = replace(TINY, max_epochs=2, continuation_epochs=1)


def _f(W: np.ndarray, x: np.ndarray, identity: bool, a: float, output: str = "sum") -> np.ndarray:
    """y(x, W) = Σ_i σ(Wx [+ x])_i (or Σ_i |σ(·)_i|) with σ(z) = z (z > 0), a·z (z ≤ 0), in NumPy."""
    z = x @ (W + (np.eye(len(W)) if identity else 0)).T
    h = np.where(z > 0, z, a * z)
    return (np.abs(h) if output == "abs" else h).sum(1)


def _grad(W: np.ndarray, x: np.ndarray, y: np.ndarray, identity: bool, a: float, output: str = "sum") -> np.ndarray:
    """∇_W of mean (f − y)²: ∂σ(z_i)/∂z_i is 1 for z_i > 0 and a for z_i < 0 — the report's
    eq. (5)–(6); ∂|σ(z_i)|/∂z_i is −a below zero."""
    z = x @ (W + (np.eye(len(W)) if identity else 0)).T
    s = np.where(z > 0, 1.0, -a if output == "abs" else a)
    r = 2.0 * (_f(W, x, identity, a, output) - y)
    return (r[:, None, None] * s[:, :, None] * x[:, None, :]).mean(0)


class _Iterates:
    """A step hook that records W_k itself: the brute force needs every iterate."""

    name = "iterates"

    def __init__(self, session, reference):
        self.weight = session.model.linear.weight

    def __call__(self, batch):
        return {f"w{i}": v for i, v in enumerate(self.weight.detach().reshape(-1).tolist())}


def _run(tmp_path, name: str, preset=SHORT) -> tuple[dict, Run, np.ndarray]:
    """run_cell on one cell, then one more verified replay that records every iterate W_0..W_T."""
    result = study.run_cell(preset, CELL_BY_NAME[name], tmp_path)
    run = Run(result["run"])
    replay(run.path, None, hooks=(_Iterates,), progress=False)
    table = run.store.read_shards(RunStore.analysis(result["run_references"]["planted"], "iterates"))
    d = preset.d
    W = table[[f"w{i}" for i in range(d * d)]].to_numpy()
    W_T = run.store.read_torch(RunStore.FINAL)["model"]["linear.weight"].numpy().reshape(1, -1)
    return result, run, np.concatenate([W, W_T])


def _brute_force(preset, cell, iterates, W_ref):
    """γ_k, P_k, d_k² and the loss gap from the stored iterates, by DESIGN §1's formulas."""
    ds = teacher_student(num_train=preset.n, dim=preset.d, norm_bound=cell.norm(preset), identity=cell.identity,
                         negative_slope=preset.negative_slope, seed=preset.seed, dtype="float64",
                         norm=cell.norm_kind(preset), output=preset.output)
    x, y = ds.x_train[:, 0].numpy(), ds.y_train.reshape(-1).numpy()
    a, d = preset.negative_slope, preset.d
    batches = [b.numpy() for e in range(len(iterates) // (preset.n // preset.batch_size))
               for b in epoch_batches(preset.n, preset.batch_size, preset.seed, e)]
    Ws = [w.reshape(d, d) for w in iterates]
    assert len(batches) == len(Ws) - 1
    out = preset.output
    loss = np.array([np.mean((_f(W, x[b], cell.identity, a, out) - y[b]) ** 2)
                     for W, b in zip(Ws[:-1], batches, strict=True)])
    loss_ref = np.array([np.mean((_f(W_ref, x[b], cell.identity, a, out) - y[b]) ** 2) for b in batches])
    diff = np.array([(W - W_ref).ravel() for W in Ws[:-1]])
    delta = iterates[:-1] - iterates[1:]
    progress = np.einsum("ij,ij->i", diff, delta) - 0.5 * np.einsum("ij,ij->i", delta, delta)
    d0_sq = float(diff[0] @ diff[0])
    gap = loss - loss_ref
    # DESIGN §1: a step whose loss gap is not positive has no γ_k (NaN, counted).
    gamma = np.where(gap > preset.eps, progress / (preset.lr * d0_sq * gap), np.nan)
    return {"gamma": gamma, "progress": progress, "dist_sq": np.einsum("ij,ij->i", diff, diff), "loss": loss,
            "loss_ref": loss_ref, "x": x, "y": y, "Ws": Ws}


def test_gamma_and_delta_against_the_true_minimizer_match_brute_force(tmp_path):
    cell = CELL_BY_NAME["id-bounded-random"]
    result, run, iterates = _run(tmp_path, cell.name)
    W_star = planted_teacher(**planted_args(SHORT, cell)).double().numpy()
    bf = _brute_force(SHORT, cell, iterates, W_star)
    steps = P.derive(result["steps"]["planted"], eps=SHORT.eps)
    assert len(steps) == len(bf["gamma"]) == 2 * (SHORT.n // SHORT.batch_size)
    np.testing.assert_allclose(steps["loss"], bf["loss"], rtol=1e-12)
    assert np.all(np.abs(steps["loss_ref"]) <= 1e-28)  # the teacher is the student at θ* = W*
    np.testing.assert_allclose(steps["progress"], bf["progress"], rtol=1e-9, atol=1e-18)
    np.testing.assert_allclose(steps["dist_sq"], bf["dist_sq"], rtol=1e-12)
    np.testing.assert_allclose(steps["gamma"], bf["gamma"], rtol=1e-8)
    # One-point strong convexity: δ_k from the full-data gradient at W_k, by hand.
    delta = [(_grad(W, bf["x"], bf["y"], True, SHORT.negative_slope).ravel() @ (W - W_star).ravel())
             / np.sum((W - W_star) ** 2) for W in bf["Ws"][:-1]]
    np.testing.assert_allclose(result["delta"]["planted"]["delta"], delta, rtol=1e-9)
    assert result["delta"]["planted"]["step"].tolist() == list(range(len(delta)))


def test_gamma_against_the_last_iterate_matches_brute_force(tmp_path):
    cell = CELL_BY_NAME["noid-bounded-random"]
    result, run, iterates = _run(tmp_path, cell.name)
    W_T = iterates[-1].reshape(SHORT.d, SHORT.d)
    # Every reference measures the one recorded trajectory, bit for bit.
    np.testing.assert_array_equal(result["steps"]["last"]["loss"], result["steps"]["planted"]["loss"])
    recorded = run.record_steps()  # the horizon and the continuation epoch beyond it
    np.testing.assert_array_equal(result["steps"]["last"]["loss"], recorded["loss"][: len(iterates) - 1])
    bf = _brute_force(SHORT, cell, iterates, W_T)
    gamma = P.derive(result["steps"]["last"], eps=SHORT.eps)["gamma"]
    np.testing.assert_allclose(gamma, bf["gamma"], rtol=1e-8)
    assert np.isnan(bf["gamma"]).any()  # θ_T can beat θ_k on a batch: the undefined case is exercised
    np.testing.assert_allclose(result["steps"]["last"]["loss_ref"], bf["loss_ref"], rtol=1e-10)


def test_a_replay_that_leaves_the_recorded_trajectory_stops_the_study(tmp_path):
    cell = CELL_BY_NAME["id-bounded-zero"]
    result = study.run_cell(SHORT, cell, tmp_path)
    store = Run(result["run"]).store
    # Tamper with one recorded loss of pass 1 and drop the measurements: the study's
    # replays must find the difference rather than trust the recording.
    rel = store.shard(RunStore.STEPS, 1)
    steps = store.read_parquet(rel)
    steps.loc[3, "loss"] = np.nextafter(steps.loc[3, "loss"], np.inf)
    store.write_parquet(rel, steps)
    for ref in result["run_references"].values():
        for p in sorted(store.path(RunStore.analysis(ref, "steps")).glob("*.parquet")):
            p.unlink()
    with pytest.raises(ReplayMismatchError, match=f"step {int(steps.loc[3, 'step'])} "):
        study.run_cell(SHORT, cell, tmp_path)


def test_alignment_is_the_nearest_of_all_permuted_teachers():
    rng = np.random.default_rng(0)
    W_star = 0.7 * rng.normal(size=(4, 4))
    for identity in (True, False):
        eye = np.eye(4) if identity else 0
        perm_true = np.array([2, 0, 3, 1])
        W = (W_star + eye)[perm_true] - eye + 1e-3 * rng.normal(size=(4, 4))
        perm, W_pi = align_to_teacher(W, W_star, identity)
        brute = min(itertools.permutations(range(4)), key=lambda p: np.sum((W - ((W_star + eye)[list(p)] - eye)) ** 2))
        assert perm.tolist() == list(brute) == perm_true.tolist()
        x = rng.normal(size=(50, 4))  # a permuted teacher is the same function
        np.testing.assert_allclose(_f(W_pi, x, identity, 0.25), _f(W_star, x, identity, 0.25), rtol=1e-12)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("identity_mapping")
    summary = study.run_identity_mapping(out, preset="tiny", workers=1, progress=False)
    return summary, json.loads((out / "identity_mapping.json").read_text())


def test_identity_bounded_case_reaches_the_planted_minimizer(tiny_study):
    _, data = tiny_study
    main = data["cells"]["id-bounded-random"]
    assert main["w_dist_final"] < 0.05 * main["w_dist_initial"]
    assert main["reached_w_star"] and main["found_is_planted"]
    assert main["one_point"]["planted"]["frac_holds"] == 1.0  # Li & Yuan's condition, on every step


def test_study_cells_behave_as_the_theory_says(tiny_study):
    _, data = tiny_study
    cells = data["cells"]
    assert set(cells) == set(TINY.cells)
    permuted = cells["noid-bounded-random"]  # without identity: a permuted teacher, not W*
    assert permuted["found_reached"] and not permuted["found_is_planted"] and not permuted["reached_w_star"]
    assert "found" in permuted["one_point"] and "found" in permuted["references"]
    # Zero init without identity, with Σσ and a PReLU: σ'(0) = a ≠ 0, so W moves and the loss
    # falls, but every row gets the same gradient — the hidden units stay one unit, d times,
    # and no minimizer is reached.
    sym = cells["noid-bounded-zero"]
    assert sym["loss_final"] < 0.9 * sym["loss_initial"] and sym["row_spread_final"] < 1e-12
    assert not sym["found_reached"] and "found" not in sym["references"]
    assert cells[MAIN_CELL]["row_spread_final"] > 0.1


def test_with_the_literal_l1_output_a_zero_init_without_identity_never_moves(tmp_path):
    """The finding before the eq. (4) output: Σ|σ(·)| has |·|'(0) = 0, so at W = 0 the gradient is exactly 0."""
    pre = replace(SHORT, output="abs")
    result = study.run_cell(pre, CELL_BY_NAME["noid-bounded-zero"], tmp_path)
    s = summarize_cell(result, pre)
    assert s["w_dist_ratio"] == 1.0 and s["loss_final"] == s["loss_initial"] and not s["found_reached"]
    last = s["references"]["last"]["all"]
    assert last["gamma_n_undefined"] == last["n_steps"] == s["n_steps"]  # D_0 = 0: never silently dropped
    assert Run(result["run"]).config.data.switches()["output"] == "abs"


def test_a_repeat_draws_its_own_teacher_data_and_init(tmp_path):
    cell = CELL_BY_NAME["id-unbounded-random"]
    pre = replace(SHORT, unbounded_norm=1.0, unbounded_norm_kind="frobenius")
    result = study.run_cell(pre, cell, tmp_path, repeat=1)
    run = Run(result["run"])
    assert result["repeat"] == 1 and run.path.parent.name == f"{cell.name}-run1" and run.config.seed == pre.seed + 1
    planted = RunStore(run.path.parent).read_torch(study.PLANTED_FILE)["linear.weight"].double()
    assert torch.equal(planted.float(), planted_teacher(**planted_args(pre, cell, 1)))
    assert float(torch.linalg.matrix_norm(planted)) == pytest.approx(1.0, rel=1e-6)  # ‖W*‖_F = 1
    assert not torch.equal(planted.float(), planted_teacher(**planted_args(pre, cell, 0)))


def test_every_cell_is_an_analysed_engine_run(tiny_study):
    _, data = tiny_study
    for c in data["cells"].values():
        run = Run(c["run"])
        names = c["run_references"]
        expected = {"planted", "last", "continuation"} | ({"found"} if c["found_reached"] else set())
        assert set(names) == expected and set(run.references()) == set(names.values())
        assert names["last"] == "last" and names["planted"].startswith("file-planted-")
        assert (names["found"] == names["planted"]) == c["found_is_planted"] if c["found_reached"] else True
        assert run.config.dtype == "float64" and run.meta.horizon_epochs == c["horizon_epochs"]
        one_point = run.store.read_shards(RunStore.analysis(names["planted"], "one_point"))
        assert len(one_point) == c["n_steps"] == len(run.steps("last"))


def test_study_writes_outputs_and_its_sentence_quotes_the_json(tiny_study):
    summary, data = tiny_study
    out = summary.parent
    for name in ("summary.md", "report.html", "identity_mapping.json", "fig4_loss_distance.png",
                 "one_point_convexity.png", "gamma_references.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    head = data["headline"]
    sentence = head["sentence"]
    assert md_escape(sentence) in summary.read_text() and sentence.count(". ") == 0  # one sentence
    for key, value in head["numbers"].items():
        assert format(value, head["formats"][key]) in sentence, key
    main = data["cells"][MAIN_CELL]
    n, refs = head["numbers"], main["references"]
    assert n["true_late_median"] == refs["found"]["late"]["gamma_median"]
    assert n["last_late_median"] == refs["last"]["late"]["gamma_median"]
    assert n["cont_late_median"] == refs["continuation"]["late"]["gamma_median"]
    assert n["last_late_inc"] == refs["last"]["late"]["dist_n_increase"]
    assert n["body_ratio"] == main["distortion"]["last"]["body"]["median_ratio"]
    assert n["late_steps"] == round(TINY.late_fraction * main["n_steps"])
    assert n["n_reached"] == sum(c["found_reached"] for c in data["cells"].values())


def test_a_rerun_resumes_from_the_runs_on_disk(tiny_study, monkeypatch):
    summary, data = tiny_study
    trained = []
    monkeypatch.setattr("gammatrace.engine.session.Session.run_epoch",
                        lambda *a, **k: trained.append(a) or pd.DataFrame())
    again = study.run_identity_mapping(summary.parent, preset="tiny", workers=1, progress=False)
    assert not trained  # every run and every replay was on disk
    assert json.loads((again.parent / "identity_mapping.json").read_text())["headline"] == data["headline"]


def test_cli_prints_the_sentence_and_the_paths(tiny_study, monkeypatch, capsys):
    summary, data = tiny_study
    calls = []

    def fake(out: str, preset: str = "quick", workers: int = 1, progress: bool = True, executor: str = "local"):
        calls.append({"out": out, "preset": preset, "workers": workers, "progress": progress, "executor": executor})
        return summary

    monkeypatch.setattr(study, "run_identity_mapping", fake)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["identity-mapping", "--preset", "tiny", "--out", str(summary.parent), "--quiet"])
    assert args.fn(args) == 0
    assert calls == [{"out": str(summary.parent), "preset": "tiny", "workers": 1, "progress": False,
                      "executor": "local"}]
    printed = capsys.readouterr().out
    assert data["headline"]["sentence"] in printed and f"summary: {summary}" in printed


# --------------------------------------------------------------------------- figures: the stored numbers


def _lines(fig) -> dict[tuple[int, str], object]:
    return {(i, line.get_gid()): line for i, ax in enumerate(fig.axes) for line in ax.get_lines() if line.get_gid()}


def _arr(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)  # JSON stores NaN as null


def test_fig4_draws_the_stored_curves_and_they_are_the_runs_numbers(tiny_study):
    summary, data = tiny_study
    fig = draw_loss_distance(data["curves"], TINY)
    lines = _lines(fig)
    for name, c in data["curves"].items():
        for panel, key in enumerate(CURVES):
            mean = _arr(c[key]["mean"])
            if not np.isfinite(mean).any():  # the distance to a minimizer no run reached: not drawn
                assert (panel, name) not in lines
                continue
            np.testing.assert_array_equal(lines[panel, name].get_xdata(), c["epoch"])
            np.testing.assert_array_equal(lines[panel, name].get_ydata(), mean)
        # The stored curve is the engine's own record: the full training loss after epoch e
        # (epochs.parquet) is the curve at e + 1, and ‖W_T − W*‖ is final.pt against planted.pt.
        run = Run(data["cells"][name]["run"])
        recorded = run.epochs()["train_loss"].to_numpy()[: run.meta.horizon_epochs]
        np.testing.assert_allclose(_arr(c["train_loss"]["mean"])[1:], recorded, rtol=1e-12)
        W_T = run.store.read_torch(RunStore.FINAL)["model"]["linear.weight"]
        W_star = RunStore(run.path.parent).read_torch(study.PLANTED_FILE)["linear.weight"]
        assert c["w_dist"]["mean"][-1] == pytest.approx(float(torch.linalg.matrix_norm(W_T - W_star)), rel=1e-12)
    assert (summary.parent / "fig4_loss_distance.png").stat().st_size > 0


def test_fig4_band_is_the_min_max_over_runs():
    def epochs(*loss):
        return {"epochs": pd.DataFrame({"epoch": range(len(loss)), "train_loss": loss, "w_dist": loss,
                                        "found_dist": [np.nan] * len(loss)})}

    curves = loss_distance_curves({MAIN_CELL: [epochs(4.0, 1.0, 0.5), epochs(2.0, 3.0, 0.25)]})
    fig = draw_loss_distance(curves, TINY)
    np.testing.assert_array_equal(_lines(fig)[0, MAIN_CELL].get_ydata(), [3.0, 2.0, 0.375])
    (band,) = [c for c in fig.axes[0].collections if c.get_gid() == f"{MAIN_CELL}:band"]
    ys = set(band.get_paths()[0].vertices[:, 1].tolist())
    assert ys == {2.0, 4.0, 1.0, 3.0, 0.25, 0.5}  # the min and the max at every epoch, nothing else


def test_one_point_and_reference_figures_draw_the_stored_numbers(tiny_study, tmp_path):
    summary, data = tiny_study
    fig = draw_one_point(data["cells"], TINY)
    lines = _lines(fig)
    for name, c in data["cells"].items():
        per_epoch = c["one_point"]["planted"]["per_epoch"]
        epochs = sorted(per_epoch, key=int)
        np.testing.assert_array_equal(lines[0, name].get_ydata(), _arr([per_epoch[e]["delta_min"] for e in epochs]))
        np.testing.assert_array_equal(lines[2, name].get_ydata(), _arr([per_epoch[e]["frac_holds"] for e in epochs]))
    # γ_k per reference: the analysed steps of the run on disk (run_cell resumes from them).
    result = study.run_cell(TINY, CELL_BY_NAME[MAIN_CELL], summary.parent)
    fig = draw_references({MAIN_CELL: result}, {MAIN_CELL: data["cells"][MAIN_CELL]}, TINY)
    lines = _lines(fig)
    for ref in ("found", "last", "continuation"):
        steps = Run(result["run"]).steps(result["run_references"][ref])
        gamma = P.derive(steps[study.RAW_COLUMNS], eps=TINY.eps)["gamma"].to_numpy()
        np.testing.assert_array_equal(lines[0, f"{MAIN_CELL}:{ref}"].get_ydata(), gamma)


# --------------------------------------------------------------------------- the paper preset, pinned

# The CS260 report in the shared papers folder (a sibling of the clone in CI).
PAPERS = Path(__file__).resolve().parents[2] / "shared" / "papers"
PAPER_FILE = "003_169288aa6363f27d.txt"
PAPER_PRESET = PRESETS.get("paper")()
# (preset field, value, the report's words for it)
PINNED = [
    ("d", 10, "random generalized input dataset of dimension $d = 10$"),
    ("n", 5000, "and size of 5000"),
    ("lr", 0.1, "we set learning rate as 0.1"),
    ("max_epochs", 10, "epoch as 10"),
    ("bounded_norm", 0.1, "= 0.1 and $\\|w^*\\|_F = 1$"),
    ("bounded_norm_kind", "spectral", "For the bound, we set $\\|w^*\\|_2$"),
    ("unbounded_norm", 1.0, "= 0.1 and $\\|w^*\\|_F = 1$"),
    ("unbounded_norm_kind", "frobenius", "= 0.1 and $\\|w^*\\|_F = 1$"),
    ("runs", 5, "To avoid coincidence, we conducted each setting of experiments for 5 times"),
    ("output", "sum", "L(W) = \\mathbb{E}_x[(\\sum_i(\\sigma(\\langle w_i + e_i, x \\rangle)"),
]
# What the study fixes in every config, with the report's words.
FIXED = [
    ("activation", "share the same structure of 2-layer with PReLU activation"),
    ("loss", "W via l_2 loss"),
    ("optimizer", "SGD can converge to global minima"),
    ("inputs", "x \\sim \\mathcal{N}(0, I)"),
]
# Values the report does not state: the preset's choice.
NOT_STATED = {"batch_size": 100, "target_loss": None, "negative_slope": 0.25, "init_scale": 0.1, "seed": 0,
              "continuation_epochs": 20, "late_fraction": 0.1, "eps": 1e-20, "cells": ()}


@pytest.mark.parametrize("field,value,phrase", PINNED)
def test_paper_preset_values_are_the_reports(field, value, phrase):
    assert getattr(PAPER_PRESET, field) == value
    source = SOURCES["paper"][field]
    assert source.stated and source.paper == PAPER_FILE == PAPER and source.phrase == phrase


def test_paper_preset_fixed_values_and_the_unstated_ones():
    cfg = run_config(PAPER_PRESET, CELL_BY_NAME["id-bounded-random"], "w.pt")
    assert (cfg.model.activation, cfg.loss, cfg.optim.name, cfg.data.name) == ("leaky_relu", "mse", "sgd",
                                                                                "teacher_student")
    assert cfg.epochs == 10 and cfg.target_loss is None  # T = 10 epochs exactly
    for key, phrase in FIXED:
        assert SOURCES["paper"][key].phrase == phrase
    for field, value in NOT_STATED.items():
        assert getattr(PAPER_PRESET, field) == value and not SOURCES["paper"][field].stated, field
        assert str(SOURCES["paper"][field]).startswith("not stated — ")
    assert not SOURCES["paper"]["learned_slope"].stated
    # Every setting of the preset says where it comes from.
    assert {f.name for f in fields(Preset)} <= set(SOURCES["paper"])


@pytest.mark.parametrize("phrase", sorted({s.phrase for s in SOURCES["paper"].values() if s.stated}))
def test_quoted_phrases_are_in_the_paper(phrase):
    if not (PAPERS / PAPER_FILE).is_file():
        pytest.skip(f"{PAPERS / PAPER_FILE} is absent: the shared papers folder sits beside the clone")
    assert phrase_in((PAPERS / PAPER_FILE).read_text(), phrase)


def test_the_reports_two_norms_cannot_hold_at_once():
    # "‖w*‖₂ = 0.1 and ‖w*‖_F = 1" for d = 10: ‖W‖_F ≤ √d·‖W‖₂, so the preset splits them.
    W = planted_teacher(**planted_args(PAPER_PRESET, CELL_BY_NAME["id-bounded-random"])).double()
    assert float(torch.linalg.matrix_norm(W, ord=2)) == pytest.approx(0.1, rel=1e-6)
    assert float(torch.linalg.matrix_norm(W)) <= np.sqrt(10) * 0.1 + 1e-6 < 1.0


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path):
    summary = study.run_identity_mapping(tmp_path, preset="quick", workers=2, progress=False)
    data = json.loads((tmp_path / "identity_mapping.json").read_text())
    head = data["headline"]
    for key, value in head["numbers"].items():
        assert format(value, head["formats"][key]) in head["sentence"]
    assert data["cells"]["id-bounded-random"]["reached_w_star"]
    assert summary.is_file() and data["wall_seconds"] < 600
