"""One PCA plane per path (γ-principle paper, Fig. 12) and filter-normalised random
directions (Li et al. 2018): every stored number against a brute force, every figure
against the stored numbers.

The brute forces read checkpoints with torch.load, flatten them by hand and evaluate a
freshly built model (``tests.test_landscape._ByHand``), never the landscape's own code.
"""

from __future__ import annotations

import numpy as np
import pytest

import gammatrace.landscape.compute as compute_mod
from gammatrace.cli import main
from gammatrace.engine import train_pass
from gammatrace.landscape import (
    Landscape,
    compute_landscape,
    figure_landscape,
    filter_normalized_directions,
    landscape,
)
from gammatrace.landscape.directions import filter_normalize
from tests.conftest import tiny_config
from tests.test_landscape import _ByHand, _state

SAMPLES = 48


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Momentum and Adam from one θ_0, an MLP with batch norm (as the optimizer study), 3 epochs."""
    root = tmp_path_factory.mktemp("planes_runs")
    for name, optim in (("momentum", {"name": "momentum", "lr": 0.1}), ("adam", {"name": "adam", "lr": 0.01})):
        train_pass(tiny_config(name=name, epochs=3, optim=optim, model={"batchnorm": True}), root / name,
                   progress=False)
    return [root / "momentum", root / "adam"]


@pytest.fixture(scope="module")
def per_path(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("per_path")
    return compute_landscape(runs, out, plane="per_path", grid=5, samples=SAMPLES, progress=False), out


def _path_states(run):
    return [_state(run, f"checkpoints/epoch_{e:04d}.pt") for e in range(3)] + [_state(run, "final.pt")]


def assert_contours_follow(ax, alphas, betas, Z):
    """The vertices of the drawn contour lines lie on grid edges, where the stored grid,
    interpolated linearly along that edge (what marching squares does), equals the line's
    level. (Inline contour labels cut the lines, adding vertices inside cells: those are
    skipped, and must stay a minority.)"""
    cs = next(c for c in ax.collections if c.get_gid() == "contour-lines")
    checked = total = 0
    for level, path in zip(cs.levels, cs.get_paths(), strict=True):
        for x, y in path.vertices:
            total += 1
            # on a grid line up to round-off of the interpolation (x₁·t + x₂·(1 − t) with x₁ = x₂)
            i = np.flatnonzero(np.abs(alphas - x) <= 1e-12 * np.ptp(alphas))
            j = np.flatnonzero(np.abs(betas - y) <= 1e-12 * np.ptp(betas))
            if i.size:  # on a vertical grid line: interpolate along β
                k = int(np.clip(np.searchsorted(betas, y), 1, len(betas) - 1))
                t = (y - betas[k - 1]) / (betas[k] - betas[k - 1])
                z = (1 - t) * Z[k - 1, i[0]] + t * Z[k, i[0]]
            elif j.size:  # on a horizontal grid line: interpolate along α
                k = int(np.clip(np.searchsorted(alphas, x), 1, len(alphas) - 1))
                t = (x - alphas[k - 1]) / (alphas[k] - alphas[k - 1])
                z = (1 - t) * Z[j[0], k - 1] + t * Z[j[0], k]
            else:
                continue
            assert z == pytest.approx(level, rel=1e-9, abs=1e-12)
            checked += 1
    assert checked > 10 and checked >= 0.7 * total  # the figure does have contour lines, from this grid


# ---------------------------------------------------------------------- one plane per path


def test_each_path_has_its_own_pca_plane_centred_on_its_own_end(runs, per_path):
    ls, out = per_path
    assert [p.name for p in ls.planes] == ["momentum", "adam"] and [p.runs for p in ls.planes] == [[0], [1]]
    z = np.load(out / "landscape_per_path_basis.npz")
    for r, run in enumerate(runs):
        hand = _ByHand(run, SAMPLES)
        states = _path_states(run)
        origin = hand.flat(states[-1])  # its own θ_T
        M = np.stack([hand.flat(s) - origin for s in states])
        lam = np.sort(np.linalg.eigvalsh(M @ M.T))[::-1]  # uncentred second moments of its own displacements
        plane = ls.planes[r]
        np.testing.assert_allclose(plane.explained, lam[:2] / lam.sum(), rtol=1e-9)
        np.testing.assert_array_equal(z[f"origin_{r}"], origin)
        basis = z[f"basis_{r}"]
        np.testing.assert_allclose(basis @ basis.T, np.eye(2), atol=1e-12)
        np.testing.assert_allclose(ls.coords[r], M @ basis.T, atol=1e-12)
        assert ls.coords[r][-1] == pytest.approx([0.0, 0.0], abs=1e-15)
        reach = np.abs(ls.coords[r]).max(axis=0)  # the grid spans this path only
        assert [plane.alphas[-1], plane.betas[-1]] == pytest.approx(1.2 * reach)
        assert ls.plane_of(r) is plane
    # Two different planes: the other path's displacements are not all captured by this one.
    overlap = np.linalg.svd(z["basis_0"] @ z["basis_1"].T, compute_uv=False)
    assert overlap.min() < 0.99
    with pytest.raises(AttributeError, match="one per path"):
        _ = ls.loss  # no single grid to speak of


def test_per_path_grid_gradients_and_steps_match_brute_force(runs, per_path):
    ls, out = per_path
    z = np.load(out / "landscape_per_path_basis.npz")
    for r, run in enumerate(runs):
        hand = _ByHand(run, SAMPLES)
        states = _path_states(run)
        origin, (u, v) = z[f"origin_{r}"], z[f"basis_{r}"]
        plane = ls.planes[r]
        for j, i in ((0, 0), (4, 1), (2, 3)):
            theta = origin + plane.alphas[i] * u + plane.betas[j] * v
            # grid points carry their own θ_T's buffers (batch-norm statistics)
            assert plane.loss[j, i] == pytest.approx(hand.loss(states[-1], theta), rel=1e-12), (r, i, j)
        assert plane.loss[2, 2] == pytest.approx(hand.loss(states[-1]), rel=1e-12)
        for e in range(3):
            g = -hand.grad(states[e])  # the SGD direction at θ_e
            step = hand.flat(states[e + 1]) - hand.flat(states[e])
            np.testing.assert_allclose(ls.grad_proj[r][e], z[f"basis_{r}"] @ g, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(ls.step_proj[r][e], z[f"basis_{r}"] @ step, rtol=1e-9, atol=1e-14)
            assert ls.cos_full[r][e] == pytest.approx(g @ step / np.linalg.norm(g) / np.linalg.norm(step), rel=1e-9)
            assert ls.path_loss[r][e] == pytest.approx(hand.loss(states[e]), rel=1e-12)


def test_a_path_alone_on_the_shared_plane_is_its_per_path_plane(runs, per_path, tmp_path):
    ls, _ = per_path
    alone = compute_landscape([runs[1]], tmp_path, grid=5, samples=SAMPLES, progress=False)
    np.testing.assert_array_equal(alone.loss, ls.planes[1].loss)
    np.testing.assert_array_equal(alone.coords[0], ls.coords[1])
    np.testing.assert_array_equal(alone.grad_proj[0], ls.grad_proj[1])
    np.testing.assert_array_equal(alone.interp_loss[0], ls.interp_loss[1])


def test_per_path_figure_draws_the_stored_numbers(per_path):
    ls, _ = per_path
    fig = figure_landscape(ls)
    panels = [ax for ax in fig.axes if ax.get_label() == "plane"]
    assert [ax.get_title() for ax in panels] == ["momentum", "adam"]
    for r, ax in enumerate(panels):
        plane = ls.planes[r]
        assert f"{100 * plane.explained[0]:.1f}%" in ax.get_xlabel()
        assert f"{100 * plane.explained[1]:.1f}%" in ax.get_ylabel()
        path = next(line for line in ax.lines if line.get_gid() == f"path:{ls.run_names[r]}")
        np.testing.assert_array_equal(path.get_xydata(), ls.coords[r])
        span = np.array([np.ptp(plane.alphas), np.ptp(plane.betas)])
        for kind, stored in (("step", ls.step_proj[r]), ("grad", ls.grad_proj[r])):
            q = next(c for c in ax.collections if c.get_gid() == f"{kind}:{ls.run_names[r]}")
            np.testing.assert_array_equal(q.get_offsets(), ls.coords[r][:3])  # an arrow at each checkpoint
            drawn = np.column_stack([q.U, q.V]) / span
            want = stored / span
            cross = drawn[:, 0] * want[:, 1] - drawn[:, 1] * want[:, 0]
            np.testing.assert_allclose(cross / np.linalg.norm(drawn, axis=1) / np.linalg.norm(want, axis=1), 0,
                                       atol=1e-9)  # the same direction ...
            assert ((drawn * want).sum(axis=1) > 0).all()  # ... not the opposite one
        assert_contours_follow(ax, plane.alphas, plane.betas, plane.loss)
    cosine = next(ax for ax in fig.axes if ax.get_label() == "cosine")
    for r, name in enumerate(ls.run_names):
        np.testing.assert_array_equal(next(li for li in cosine.lines if li.get_gid() == f"cos:{name}").get_ydata(),
                                      ls.cos_full[r])


def test_per_path_reloads_and_replots_without_recomputing(runs, per_path, monkeypatch):
    ls, out = per_path

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed although stored")

    monkeypatch.setattr(compute_mod, "grid_rows_task", forbidden)
    files = landscape(runs, out, plane="per_path", grid=5, samples=SAMPLES, progress=False)
    assert files["landscape"].name == "landscape_per_path.png" and files["landscape"].stat().st_size > 20_000
    assert files["interpolation"].name == "landscape_per_path_interpolation.png"
    again = Landscape.load(out, "landscape_per_path")
    assert again.reused and again.settings["plane"] == "per_path"
    for a, b in zip(again.planes, ls.planes, strict=True):
        np.testing.assert_array_equal(a.loss, b.loss)
        assert (a.name, a.runs, a.origin) == (b.name, b.runs, b.origin)
    for a, b in zip(again.step_proj, ls.step_proj, strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------ filter-normalised random directions


def test_filter_normalised_directions_have_the_filter_norms_of_the_weights(runs):
    hand = _ByHand(runs[0], SAMPLES)
    final = _state(runs[0], "final.pt")
    shapes = [tuple(final[n].shape) for n in hand.names]
    assert any(len(s) == 1 for s in shapes) and any(len(s) == 2 for s in shapes)  # BN/bias and linear weights
    center = hand.flat(final)
    d = filter_normalized_directions(center, shapes, n=2, seed=5)
    keep = filter_normalized_directions(center, shapes, n=2, seed=5, ignore="none")
    at = 0
    for name, shape in zip(hand.names, shapes, strict=True):
        size = int(np.prod(shape))
        w = final[name].double().numpy()
        for k in range(2):
            dk = d[k, at:at + size].reshape(shape)
            if len(shape) > 1:  # each output neuron's row has the norm of that row of θ*
                np.testing.assert_allclose(np.linalg.norm(dk.reshape(shape[0], -1), axis=1),
                                           np.linalg.norm(w.reshape(shape[0], -1), axis=1), rtol=1e-13)
                np.testing.assert_array_equal(keep[k, at:at + size], d[k, at:at + size])
            else:  # biases and batch-norm scales/shifts: no direction (biasbn), or θ* itself (none)
                assert (dk == 0).all(), name
                np.testing.assert_array_equal(keep[k, at:at + size], w.reshape(-1))
        at += size
    np.testing.assert_array_equal(d, filter_normalized_directions(center, shapes, n=2, seed=5))  # same seed
    assert not np.array_equal(d, filter_normalized_directions(center, shapes, n=2, seed=6))
    assert abs(d[0] @ d[1]) < 0.2 * np.linalg.norm(d[0]) * np.linalg.norm(d[1])  # two independent draws


def test_conv_filters_are_output_channels():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 2, 2)) * np.array([1.0, 10.0, 0.1, 0.0])[:, None, None, None]
    d = filter_normalize(rng.normal(size=w.shape), w)
    np.testing.assert_allclose(np.linalg.norm(d.reshape(4, -1), axis=1), [np.linalg.norm(w[i]) for i in range(4)],
                               rtol=1e-13)
    assert (d[3] == 0).all()  # a dead filter gets no direction


def test_random_directions_landscape_matches_brute_force(runs, tmp_path):
    hand = _ByHand(runs[1], 32)
    final = _state(runs[1], "final.pt")
    center = hand.flat(final)
    shapes = [tuple(final[n].shape) for n in hand.names]
    two = compute_landscape(runs[1:], tmp_path, directions="random", dims=2, grid=3, span=0.5, samples=32,
                            direction_seed=7, progress=False)
    z = np.load(tmp_path / "landscape_random_2d_basis.npz")
    np.testing.assert_array_equal(z["origin_0"], center)
    np.testing.assert_array_equal(z["basis_0"], filter_normalized_directions(center, shapes, n=2, seed=7))
    d1, d2 = z["basis_0"]
    np.testing.assert_array_equal(two.alphas, [-0.5, 0.0, 0.5])
    for j, i in ((0, 0), (2, 1), (1, 2)):
        theta = center + two.alphas[i] * d1 + two.betas[j] * d2
        assert two.loss[j, i] == pytest.approx(hand.loss(final, theta), rel=1e-12)
    assert two.loss[1, 1] == pytest.approx(hand.loss(final), rel=1e-12)
    assert two.coords[0].shape == (0, 2) and two.interp_loss[0].size == 0  # nothing projected on random axes
    assert two.path_loss[0][-1] == pytest.approx(hand.loss(final), rel=1e-12)

    one = compute_landscape(runs[1:], tmp_path, directions="random", dims=1, grid=5, samples=32,
                            direction_seed=7, progress=False)
    z1 = np.load(tmp_path / "landscape_random_1d_basis.npz")
    np.testing.assert_array_equal(z1["basis_0"][0], d1)  # the first direction is drawn first
    assert one.loss.shape == (5,) and one.betas.size == 0
    for i in range(5):
        assert one.loss[i] == pytest.approx(hand.loss(final, center + one.alphas[i] * d1), rel=1e-12)
    assert one.loss[2] == two.loss[1, 1]  # α = 0 is θ* in both


def test_random_figures_draw_the_stored_numbers(runs, tmp_path):
    one = compute_landscape(runs, tmp_path, directions="random", dims=1, grid=5, samples=32, progress=False)
    ax = figure_landscape(one).axes[0]
    for r, name in enumerate(one.run_names):
        line = next(li for li in ax.lines if li.get_gid() == f"curve:{name}")
        np.testing.assert_array_equal(line.get_xdata(), one.planes[r].alphas)
        np.testing.assert_array_equal(line.get_ydata(), one.planes[r].loss)
    assert {t.get_text().split(" (")[0] for t in ax.get_legend().get_texts()} == {"momentum", "adam"}
    two = compute_landscape(runs, tmp_path, directions="random", dims=2, grid=5, samples=32, progress=False)
    panels = [a for a in figure_landscape(two).axes if a.get_label() == "plane"]
    assert [a.get_title() for a in panels] == ["momentum", "adam"]
    for ax, plane in zip(panels, two.planes, strict=True):
        assert_contours_follow(ax, plane.alphas, plane.betas, plane.loss)


def test_cli_random_directions_and_bad_dims(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["landscape", str(runs[0]), "--out", str(out), "--directions", "random", "--dims", "1",
                 "--grid", "3", "--samples", "16", "--quiet"]) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert printed["landscape"] == str(out / "landscape_random_1d.png") and (out / "landscape_random_1d.png").is_file()
    assert "interpolation" not in printed
    stored = Landscape.load(out, "landscape_random_1d")
    assert stored.settings["dims"] == 1 and stored.settings["ignore"] == "biasbn" and stored.loss.shape == (3,)
    assert main(["landscape", str(runs[0]), "--out", str(out), "--dims", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PCA plane is 2-D" in err[0]
