"""The identity-mapping study on the engine: convergence to the known minimizer, γ and δ
against a NumPy brute force over every iterate, the verified replay behind every reference,
and the study's outputs (sentence numbers = JSON)."""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from gammatrace import principles as P
from gammatrace.data.loader import epoch_batches
from gammatrace.data.synthetic import planted_teacher, teacher_student
from gammatrace.engine.replay import ReplayMismatchError, replay
from gammatrace.experiments.identity import cli, study
from gammatrace.experiments.identity.problem import (
    CELL_BY_NAME,
    MAIN_CELL,
    PRESETS,
    align_to_teacher,
)
from gammatrace.reporting.document import md_escape
from gammatrace.store.run import Run, RunStore

TINY = PRESETS.get("tiny")()
# A horizon of two epochs (and one beyond it): the brute force below visits every step.
SHORT = replace(TINY, max_epochs=2, continuation_epochs=1)


def _f(W: np.ndarray, x: np.ndarray, identity: bool, a: float) -> np.ndarray:
    """y(x, W) = ‖σ(Wx [+ x])‖₁ with σ(z) = z (z > 0), a·z (z ≤ 0), written out in NumPy."""
    z = x @ (W + (np.eye(len(W)) if identity else 0)).T
    return np.abs(np.where(z > 0, z, a * z)).sum(1)


def _grad(W: np.ndarray, x: np.ndarray, y: np.ndarray, identity: bool, a: float) -> np.ndarray:
    """∇_W of mean (f − y)²: ∂|σ(z_i)|/∂z_i is 1 for z_i > 0 and −a for z_i < 0."""
    z = x @ (W + (np.eye(len(W)) if identity else 0)).T
    s = np.where(z > 0, 1.0, -a)
    r = 2.0 * (_f(W, x, identity, a) - y)
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
                         negative_slope=preset.negative_slope, seed=preset.seed, dtype="float64")
    x, y = ds.x_train[:, 0].numpy(), ds.y_train.reshape(-1).numpy()
    a, d = preset.negative_slope, preset.d
    batches = [b.numpy() for e in range(len(iterates) // (preset.n // preset.batch_size))
               for b in epoch_batches(preset.n, preset.batch_size, preset.seed, e)]
    Ws = [w.reshape(d, d) for w in iterates]
    assert len(batches) == len(Ws) - 1
    loss = np.array([np.mean((_f(W, x[b], cell.identity, a) - y[b]) ** 2) for W, b in zip(Ws[:-1], batches, strict=True)])
    loss_ref = np.array([np.mean((_f(W_ref, x[b], cell.identity, a) - y[b]) ** 2) for b in batches])
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
    W_star = planted_teacher(SHORT.d, cell.norm(SHORT), SHORT.seed, cell.identity).double().numpy()
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
    stalled = cells["noid-bounded-zero"]  # zero init without identity: the gradient is exactly 0
    assert not stalled["found_reached"] and stalled["w_dist_ratio"] == 1.0
    last = stalled["references"]["last"]["all"]
    assert last["gamma_n_undefined"] == last["n_steps"] == stalled["n_steps"]  # D_0 = 0: never silently dropped
    assert "found" not in stalled["references"]


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
    monkeypatch.setattr(study, "run_identity_mapping", lambda out, preset, workers, progress: summary)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["identity-mapping", "--preset", "tiny", "--out", str(summary.parent), "--quiet"])
    assert args.fn(args) == 0
    printed = capsys.readouterr().out
    assert data["headline"]["sentence"] in printed and f"summary: {summary}" in printed


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path):
    summary = study.run_identity_mapping(tmp_path, preset="quick", workers=2, progress=False)
    data = json.loads((tmp_path / "identity_mapping.json").read_text())
    head = data["headline"]
    for key, value in head["numbers"].items():
        assert format(value, head["formats"][key]) in head["sentence"]
    assert data["cells"]["id-bounded-random"]["reached_w_star"]
    assert summary.is_file() and data["wall_seconds"] < 600
