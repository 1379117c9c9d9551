"""Loss landscape on the PCA plane of stored paths: every number against a brute force.

The brute forces here read the checkpoints with torch.load, flatten them by hand, put
parameters into a freshly built model with load_state_dict and call the run's own
loss — none of the landscape module's evaluation code.
"""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

import gammatrace.landscape.compute as compute_mod
import gammatrace.landscape.sources as sources_mod
from gammatrace.cli import main
from gammatrace.engine import train_pass
from gammatrace.engine.session import build_session
from gammatrace.landscape import compute_landscape, landscape, path_pca
from gammatrace.landscape.evaluate import evaluation_subset
from gammatrace.landscape.sources import RunSource
from gammatrace.store.run import Run
from tests.conftest import tiny_config

# ----------------------------------------------------------------------------- PCA


def test_path_in_a_plane_is_recovered_exactly():
    rng = np.random.default_rng(0)
    d = 40
    q, _ = np.linalg.qr(rng.normal(size=(d, 2)))
    plane = q.T  # an orthonormal basis of a random plane through the origin
    coefs = rng.normal(size=(9, 2)) * [3.0, 0.5]
    M = coefs @ plane  # a path whose displacements from θ_T lie exactly in the plane
    pca = path_pca(M)
    assert pca.explained.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(pca.coords @ pca.basis, M, atol=1e-12)  # coordinates reproduce the path
    np.testing.assert_allclose(pca.basis @ pca.basis.T, np.eye(2), atol=1e-12)
    # The recovered axes span the same plane: projecting the true basis onto them loses nothing.
    np.testing.assert_allclose(np.linalg.norm(plane @ pca.basis.T, axis=1), 1.0, atol=1e-12)


def test_explained_variance_matches_eigenvalues_of_the_gram_matrix():
    rng = np.random.default_rng(1)
    M = rng.normal(size=(7, 30)) * np.linspace(3, 0.1, 30)
    pca = path_pca(M)
    lam = np.sort(np.linalg.eigvalsh(M @ M.T))[::-1]  # brute force: uncentred second moments
    np.testing.assert_allclose(pca.explained, lam[:2] / lam.sum(), rtol=1e-10)
    np.testing.assert_allclose(pca.coords, M @ pca.basis.T, atol=1e-12)
    assert pca.coords[0, 0] >= 0 and pca.coords[0, 1] >= 0  # the sign convention


def test_rank_one_path_gets_an_orthonormal_second_axis():
    M = np.outer([2.0, 1.0, 0.0], np.arange(1.0, 6.0))
    pca = path_pca(M)
    assert pca.explained.tolist() == pytest.approx([1.0, 0.0], abs=1e-12)
    np.testing.assert_allclose(pca.basis @ pca.basis.T, np.eye(2), atol=1e-12)


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs from one θ_0 (same seed and model), SGD and Adam, 3 epochs each."""
    root = tmp_path_factory.mktemp("landscape_runs")
    paths = []
    for name, optim in (("sgd", {"name": "sgd", "lr": 0.2}), ("adam", {"name": "adam", "lr": 0.01})):
        train_pass(tiny_config(name=name, epochs=3, optim=optim), root / name, progress=False)
        paths.append(root / name)
    return paths


@pytest.fixture(scope="module")
def computed(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("landscape_out")
    ls = compute_landscape(runs, out, grid=5, extent=1.2, samples=48, bn="train", progress=False)
    return ls, out


def _state(run_path, rel):
    return torch.load(run_path / rel, map_location="cpu", weights_only=True)["model"]


class _ByHand:
    """A freshly built model of a run and its loss on the landscape's evaluation subset."""

    def __init__(self, run_path, samples, mode="train", seed=0):
        self.sess = build_session(Run(run_path).config)
        self.names = [n for n, p in self.sess.model.named_parameters() if p.requires_grad]
        idx = evaluation_subset(self.sess.data.n_train, samples, seed)
        self.batch = (self.sess.x[idx], self.sess.y[idx])
        self.mode = mode

    def flat(self, state):
        return np.concatenate([state[n].double().reshape(-1).numpy() for n in self.names])

    def load(self, state, theta=None):
        state = {k: v.clone() for k, v in state.items()}
        if theta is not None:
            at = 0
            for n in self.names:
                k = state[n].numel()
                state[n] = torch.from_numpy(theta[at:at + k]).reshape(state[n].shape).to(state[n].dtype)
                at += k
        self.sess.model.load_state_dict(state)
        getattr(self.sess.model, self.mode)()

    def loss(self, state, theta=None):
        self.load(state, theta)
        with torch.no_grad():
            return float(self.sess.loss_fn(self.sess.model, self.batch).double().mean())

    def grad(self, state):
        self.load(state)
        self.sess.model.zero_grad()
        self.sess.loss_fn(self.sess.model, self.batch).double().mean().backward()
        return np.concatenate([p.grad.double().reshape(-1).numpy() for n, p in self.sess.model.named_parameters()
                               if n in self.names])


def test_basis_and_path_coordinates_match_checkpoints(runs, computed):
    ls, out = computed
    hand = _ByHand(runs[0], 48)
    paths = [[_state(r, f"checkpoints/epoch_{e:04d}.pt") for e in range(3)] + [_state(r, "final.pt")] for r in runs]
    origin = hand.flat(paths[0][-1])  # documented origin: θ_T of the first run
    M = np.vstack([[hand.flat(s) - origin for s in p] for p in paths])
    lam = np.sort(np.linalg.eigvalsh(M @ M.T))[::-1]
    np.testing.assert_allclose(ls.explained, lam[:2] / lam.sum(), rtol=1e-9)
    with np.load(out / "landscape_basis.npz") as z:
        np.testing.assert_array_equal(z["origin_0"], origin)
        basis = z["basis_0"]
    np.testing.assert_allclose(np.vstack(ls.coords), M @ basis.T, atol=1e-12)
    # One θ_0 for both runs (same seed, same model): their paths start at one point.
    np.testing.assert_array_equal(ls.coords[0][0], ls.coords[1][0])
    assert ls.coords[0][-1] == pytest.approx([0.0, 0.0], abs=1e-15)


def test_contour_values_equal_direct_loss_evaluations(runs, computed):
    ls, out = computed
    hand = _ByHand(runs[0], 48)
    final = _state(runs[0], "final.pt")
    with np.load(out / "landscape_basis.npz") as z:
        origin, u, v = z["origin_0"], z["basis_0"][0], z["basis_0"][1]
    for j, i in ((0, 0), (4, 4), (0, 4), (2, 2), (3, 1)):
        a, b = ls.alphas[i], ls.betas[j]
        direct = hand.loss(final, origin + a * u + b * v)
        assert ls.loss[j, i] == pytest.approx(direct, rel=1e-12), (i, j)
    assert ls.loss[2, 2] == pytest.approx(hand.loss(final), rel=1e-12)  # the centre is θ_T itself
    # Grid half-widths: extent × the farthest path point on each axis.
    reach = np.abs(np.vstack(ls.coords)).max(axis=0)
    assert [ls.alphas[-1], ls.betas[-1]] == pytest.approx(1.2 * reach)


def test_gradient_and_step_directions_match_autograd(runs, computed):
    ls, out = computed
    with np.load(out / "landscape_basis.npz") as z:
        basis = z["basis_0"]
    for r, run in enumerate(runs):
        hand = _ByHand(run, 48)
        s0, s1 = _state(run, "checkpoints/epoch_0000.pt"), _state(run, "checkpoints/epoch_0001.pt")
        g = -hand.grad(s0)
        step = hand.flat(s1) - hand.flat(s0)
        np.testing.assert_allclose(ls.grad_proj[r][0], basis @ g, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ls.step_proj[r][0], basis @ step, rtol=1e-9, atol=1e-14)
        assert ls.cos_full[r][0] == pytest.approx(g @ step / np.linalg.norm(g) / np.linalg.norm(step), rel=1e-9)
        assert ls.path_loss[r][0] == pytest.approx(hand.loss(s0), rel=1e-12)
    # Plain SGD's epoch step follows the full-batch gradient more closely than Adam's does.
    assert ls.cos_full[0][0] > ls.cos_full[1][0]


def test_interpolation_ends_are_the_losses_of_theta0_and_thetaT(runs, computed):
    ls, _ = computed
    a = ls.interp_alpha
    assert a[0] == -0.25 and a[-1] == 1.25
    for r, run in enumerate(runs):
        hand = _ByHand(run, 48)
        s0, sT = _state(run, "checkpoints/epoch_0000.pt"), _state(run, "final.pt")
        assert ls.interp_loss[r][a == 0.0][0] == hand.loss(s0)
        assert ls.interp_loss[r][a == 1.0][0] == hand.loss(sT)
        mid = 0.5 * hand.flat(s0) + 0.5 * hand.flat(sT)
        assert ls.interp_loss[r][a == 0.5][0] == pytest.approx(hand.loss(sT, mid), rel=1e-12)


def test_stored_grid_is_reused_and_invalidated_by_new_settings(runs, computed, monkeypatch, tmp_path):
    ls, out = computed
    work = tmp_path / "copy"
    shutil.copytree(out, work)

    def forbidden(*args, **kwargs):
        raise AssertionError("the grid was recomputed although it is stored")

    monkeypatch.setattr(compute_mod, "grid_rows_task", forbidden)
    again = compute_landscape(runs, work, grid=5, extent=1.2, samples=48, bn="train", progress=False)
    assert again.reused and not ls.reused
    np.testing.assert_array_equal(again.loss, ls.loss)
    for a, b in zip(again.interp_loss, ls.interp_loss, strict=True):
        np.testing.assert_array_equal(a, b)
    files = landscape(runs, work, grid=5, extent=1.2, samples=48, bn="train", progress=False)  # re-plot only
    assert files["landscape"].stat().st_size > 10_000 and files["interpolation"].is_file()
    with pytest.raises(AssertionError, match="recomputed"):  # another grid size is another landscape
        compute_landscape(runs, work, grid=3, extent=1.2, samples=48, bn="train", progress=False)


def test_grid_rows_are_independent_picklable_tasks(runs, computed):
    # What a worker process gets: the pickled task, and no evaluator built yet.
    ls, out = computed
    sources_mod._cached_evaluator.cache_clear()
    tasks = [(str(out / "landscape_basis.npz"), RunSource(str(runs[0])), 0, 48, "train", 0, ls.alphas, ls.betas,
              [int(j) for j in rows]) for rows in np.array_split(np.arange(len(ls.betas)), 3)]
    parts = [compute_mod.grid_rows_task(*pickle.loads(pickle.dumps(t))) for t in reversed(tasks)]
    np.testing.assert_array_equal(np.vstack([row for part in parts[::-1] for row in part]), ls.loss)


@pytest.mark.slow
def test_parallel_grid_rows_equal_serial(runs, tmp_path):
    serial = compute_landscape(runs[:1], tmp_path / "s", grid=3, samples=32, progress=False)
    parallel = compute_landscape(runs[:1], tmp_path / "p", grid=3, samples=32, workers=2, progress=False)
    np.testing.assert_array_equal(serial.loss, parallel.loss)


def test_bn_eval_mode_uses_the_final_running_statistics(tmp_path):
    run = tmp_path / "bn"
    train_pass(tiny_config(name="bn", epochs=2, model={"batchnorm": True}), run, progress=False)
    ls = compute_landscape([run], tmp_path / "out", grid=3, samples=32, bn="eval", progress=False)
    hand = _ByHand(run, 32, mode="eval")
    final = _state(run, "final.pt")
    assert ls.loss[1, 1] == pytest.approx(hand.loss(final), rel=1e-12)
    with np.load(tmp_path / "out" / "landscape_basis.npz") as z:
        theta = z["origin_0"] + ls.alphas[0] * z["basis_0"][0] + ls.betas[2] * z["basis_0"][1]
    assert ls.loss[2, 0] == pytest.approx(hand.loss(final, theta), rel=1e-12)
    # Each checkpoint is evaluated with its own buffers, not θ_T's.
    s0 = _state(run, "checkpoints/epoch_0000.pt")
    assert ls.path_loss[0][0] == pytest.approx(hand.loss(s0), rel=1e-12)
    train_mode = _ByHand(run, 32, mode="train").loss(final)
    assert train_mode != pytest.approx(ls.loss[1, 1], rel=1e-6)  # the mode matters, and is the one asked for


def test_runs_on_other_data_are_refused(runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    meta = json.loads((other / "run.json").read_text())
    meta["config"]["data"]["n_train"] = 80
    (other / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="other data"):
        compute_landscape([runs[0], other], tmp_path / "out", grid=3, samples=16, progress=False)


def test_cli_writes_figures_and_prints_paths(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["landscape", str(runs[0]), str(runs[1]), "--out", str(out), "--grid", "3", "--samples", "16",
                 "--quiet"]) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    for key, name in (("landscape", "landscape.png"), ("interpolation", "interpolation.png"),
                      ("grid", "landscape.npz"), ("meta", "landscape.json")):
        assert printed[key] == str(out / name) and (out / name).is_file()
    meta = json.loads((out / "landscape.json").read_text())
    assert meta["settings"]["bn"] == "train" and meta["settings"]["origin"] == "theta_T of sgd"
