"""The identity-mapping study: convergence to the known minimizer, γ and δ against a NumPy
brute force over stored iterates, and the study's outputs (sentence numbers = JSON)."""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import pytest

from gammatrace import principles as P
from gammatrace.experiments import identity_mapping as im
from gammatrace.experiments.identity_cli import register

TINY = im.PRESETS.get("tiny")()


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


def _brute_force(preset, cell, iterates, batches, W_ref):
    """γ_k, P_k, d_k² and the loss gap from the stored iterates, by DESIGN §1's formulas."""
    x, y, _ = (t.numpy() for t in im.problem(preset, cell))
    y = y.reshape(-1)
    a, d = preset.negative_slope, preset.d
    Ws = [w.reshape(d, d) for w in iterates]
    loss = np.array([np.mean((_f(W, x[b], cell.identity, a) - y[b]) ** 2) for W, b in zip(Ws[:-1], batches)])
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


def test_gamma_against_the_true_minimizer_matches_brute_force():
    cell = im.CELL_BY_NAME["id-bounded-random"]
    r = im.run_pass(TINY, cell, "planted", epochs=2, one_point=True, keep_iterates=True)
    W_star = im.problem(TINY, cell)[2].numpy()
    bf = _brute_force(TINY, cell, r.iterates, r.batches, W_star)
    steps = P.derive(r.steps, eps=TINY.eps)
    assert len(steps) == len(bf["gamma"]) == 2 * (TINY.n // TINY.batch_size)
    np.testing.assert_allclose(steps["loss"], bf["loss"], rtol=1e-12)
    assert np.all(np.abs(steps["loss_ref"]) <= 1e-28)  # the teacher is the student at θ* = W*
    np.testing.assert_allclose(steps["progress"], bf["progress"], rtol=1e-9, atol=1e-18)
    np.testing.assert_allclose(steps["dist_sq"], bf["dist_sq"], rtol=1e-12)
    np.testing.assert_allclose(steps["gamma"], bf["gamma"], rtol=1e-8)
    # One-point strong convexity: δ_k from the full-data gradient, by hand.
    delta = [(_grad(W, bf["x"], bf["y"], True, TINY.negative_slope).ravel() @ (W - W_star).ravel())
             / np.sum((W - W_star) ** 2) for W in bf["Ws"][:-1]]
    np.testing.assert_allclose(r.delta["delta"], delta, rtol=1e-9)


def test_gamma_against_the_last_iterate_matches_brute_force():
    cell = im.CELL_BY_NAME["noid-bounded-random"]
    first = im.run_pass(TINY, cell, "planted", epochs=2, keep_iterates=True)
    W_T = first.states["final"]["linear.weight"]
    r = im.run_pass(TINY, cell, {"linear.weight": W_T}, epochs=2)
    np.testing.assert_array_equal(r.steps["loss"], first.steps["loss"])  # one trajectory, bit for bit
    bf = _brute_force(TINY, cell, first.iterates, first.batches, W_T.numpy())
    gamma = P.derive(r.steps, eps=TINY.eps)["gamma"]
    np.testing.assert_allclose(gamma, bf["gamma"], rtol=1e-8)
    assert np.isnan(bf["gamma"]).any()  # θ_T can beat θ_k on a batch: the undefined case is exercised
    np.testing.assert_allclose(r.steps["loss_ref"], bf["loss_ref"], rtol=1e-10)


def test_alignment_is_the_nearest_of_all_permuted_teachers():
    rng = np.random.default_rng(0)
    W_star = 0.7 * rng.normal(size=(4, 4))
    for identity in (True, False):
        eye = np.eye(4) if identity else 0
        perm_true = np.array([2, 0, 3, 1])
        W = (W_star + eye)[perm_true] - eye + 1e-3 * rng.normal(size=(4, 4))
        perm, W_pi = im.align_to_teacher(W, W_star, identity)
        brute = min(itertools.permutations(range(4)), key=lambda p: np.sum((W - ((W_star + eye)[list(p)] - eye)) ** 2))
        assert perm.tolist() == list(brute) == perm_true.tolist()
        x = rng.normal(size=(50, 4))  # a permuted teacher is the same function
        np.testing.assert_allclose(_f(W_pi, x, identity, 0.25), _f(W_star, x, identity, 0.25), rtol=1e-12)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("identity_mapping")
    summary = im.run_identity_mapping(out, preset="tiny", workers=1, progress=False)
    return summary, json.loads((out / "identity_mapping.json").read_text())


def test_identity_bounded_case_reaches_the_planted_minimizer(study):
    _, data = study
    main = data["cells"]["id-bounded-random"]
    assert main["w_dist_final"] < 0.05 * main["w_dist_initial"]
    assert main["reached_w_star"] and main["found_is_planted"]
    assert main["one_point"]["planted"]["frac_holds"] == 1.0  # Li & Yuan's condition, on every step


def test_study_cells_behave_as_the_theory_says(study):
    _, data = study
    cells = data["cells"]
    assert set(cells) == set(TINY.cells)
    assert all(c["passes_bitwise_equal"] for c in cells.values())
    permuted = cells["noid-bounded-random"]  # without identity: a permuted teacher, not W*
    assert permuted["found_reached"] and not permuted["found_is_planted"] and not permuted["reached_w_star"]
    stalled = cells["noid-bounded-zero"]  # zero init without identity: the gradient is exactly 0
    assert not stalled["found_reached"] and stalled["w_dist_ratio"] == 1.0
    last = stalled["references"]["last"]["all"]
    assert last["gamma_n_undefined"] == last["n_steps"] == stalled["n_steps"]  # D_0 = 0: never silently dropped
    assert "found" not in stalled["references"]


def test_study_writes_outputs_and_its_sentence_quotes_the_json(study):
    summary, data = study
    out = summary.parent
    for name in ("summary.md", "identity_mapping.json", "fig4_loss_distance.png", "one_point_convexity.png",
                 "gamma_references.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    head = data["headline"]
    sentence = head["sentence"]
    assert sentence in summary.read_text() and sentence.count(". ") == 0  # one sentence
    for key, value in head["numbers"].items():
        assert format(value, head["formats"][key]) in sentence, key
    main = data["cells"][im.MAIN_CELL]
    n, refs = head["numbers"], main["references"]
    assert n["true_late_median"] == refs["found"]["late"]["gamma_median"]
    assert n["last_late_median"] == refs["last"]["late"]["gamma_median"]
    assert n["cont_late_median"] == refs["continuation"]["late"]["gamma_median"]
    assert n["last_late_inc"] == refs["last"]["late"]["dist_n_increase"]
    assert n["body_ratio"] == main["distortion"]["last"]["body"]["median_ratio"]
    assert n["late_steps"] == round(TINY.late_fraction * main["n_steps"])
    assert n["n_reached"] == sum(c["found_reached"] for c in data["cells"].values())


def test_cli_prints_the_sentence_and_the_paths(study, monkeypatch, capsys):
    summary, data = study
    monkeypatch.setattr(im, "run_identity_mapping", lambda out, preset, workers, progress: summary)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["identity-mapping", "--preset", "tiny", "--out", str(summary.parent), "--quiet"])
    assert args.fn(args) == 0
    printed = capsys.readouterr().out
    assert data["headline"]["sentence"] in printed and f"summary: {summary}" in printed


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path):
    summary = im.run_identity_mapping(tmp_path, preset="quick", workers=2, progress=False)
    data = json.loads((tmp_path / "identity_mapping.json").read_text())
    head = data["headline"]
    for key, value in head["numbers"].items():
        assert format(value, head["formats"][key]) in head["sentence"]
    assert data["cells"]["id-bounded-random"]["reached_w_star"]
    assert summary.is_file() and data["wall_seconds"] < 300
