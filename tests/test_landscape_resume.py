"""An interrupted landscape grid resumes from its finished rows: the result equals an
uninterrupted computation bit for bit, finished rows are not evaluated again, and rows
stored for other settings are never reused."""

from __future__ import annotations

import numpy as np
import pytest

import gammatrace.landscape.compute as compute_mod
from gammatrace.engine import train_pass
from gammatrace.landscape import compute_landscape
from tests.conftest import tiny_config

GRID = 4
SAMPLES = 32


class Killed(RuntimeError):
    """Stands for the process dying in the middle of the grid."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_runs")
    for name, optim in (("momentum", {"name": "momentum", "lr": 0.1}), ("adam", {"name": "adam", "lr": 0.01})):
        train_pass(tiny_config(name=name, epochs=2, optim=optim), root / name, progress=False)
    return [root / "momentum", root / "adam"]


@pytest.fixture
def rows_seen(monkeypatch):
    """Record every grid row evaluated, as (hash of its plane origin, row); optionally
    die after ``limit`` rows."""
    seen: list[tuple[int, int]] = []
    state = {"limit": None}
    real = compute_mod.row_loss

    def counting(ev, origin, basis, buffers, alphas, betas, row):
        if state["limit"] is not None and len(seen) >= state["limit"]:
            raise Killed("killed mid-grid")
        seen.append((hash(origin.tobytes()), row))
        return real(ev, origin, basis, buffers, alphas, betas, row)

    monkeypatch.setattr(compute_mod, "row_loss", counting)
    return seen, state


def _assert_same(a, b):
    assert len(a.planes) == len(b.planes)
    for pa, pb in zip(a.planes, b.planes, strict=True):
        np.testing.assert_array_equal(pa.loss, pb.loss)
        np.testing.assert_array_equal(pa.alphas, pb.alphas)
    for name in ("coords", "step_proj", "grad_proj", "cos_full", "path_loss", "interp_loss"):
        for xa, xb in zip(getattr(a, name), getattr(b, name), strict=True):
            np.testing.assert_array_equal(xa, xb)


def test_interrupted_grid_resumes_bit_for_bit_without_recomputing_rows(runs, tmp_path, rows_seen):
    seen, state = rows_seen
    opts = dict(plane="per_path", grid=GRID, samples=SAMPLES, progress=False)
    full = compute_landscape(runs, tmp_path / "full", **opts)
    assert len(seen) == 2 * GRID  # two planes of GRID rows
    assert not (tmp_path / "full" / "landscape_per_path_rows").exists()  # cleaned up when done

    seen.clear()
    state["limit"] = GRID + 1  # all of plane 0 and one row of plane 1, then the process "dies"
    with pytest.raises(Killed):
        compute_landscape(runs, tmp_path / "part", **opts)
    finished = list(seen)
    rows = tmp_path / "part" / "landscape_per_path_rows"
    assert sorted(p.name for p in rows.glob("*.npy")) == \
        [f"p000_r{j:05d}.npy" for j in range(GRID)] + ["p001_r00000.npy"]
    assert not (tmp_path / "part" / "landscape_per_path.json").exists()

    seen.clear()
    state["limit"] = None
    resumed = compute_landscape(runs, tmp_path / "part", **opts)
    assert not resumed.reused
    assert len(seen) == GRID - 1 and not set(seen) & set(finished)  # only the missing rows
    _assert_same(resumed, full)
    assert not rows.exists()

    seen.clear()
    again = compute_landscape(runs, tmp_path / "part", **opts)  # finished: reused as a whole
    assert again.reused and seen == []
    _assert_same(again, full)


def test_rows_of_other_settings_are_not_reused(runs, tmp_path, rows_seen):
    seen, state = rows_seen
    state["limit"] = 3
    with pytest.raises(Killed):
        compute_landscape(runs[:1], tmp_path / "out", grid=GRID, samples=SAMPLES, progress=False)
    assert len(list((tmp_path / "out" / "landscape_rows").glob("*.npy"))) == 3
    for changed in ({"samples": SAMPLES // 2}, {"extent": 2.0}, {"bn": "eval"}):
        seen.clear()
        state["limit"] = 2
        with pytest.raises(Killed):  # another setting: a fresh grid (and it too is interrupted)
            compute_landscape(runs[:1], tmp_path / "out", grid=GRID, progress=False, **{"samples": SAMPLES, **changed})
        assert [row for _, row in seen] == [0, 1]
        assert len(list((tmp_path / "out" / "landscape_rows").glob("*.npy"))) == 2
    seen.clear()
    state["limit"] = None
    resumed = compute_landscape(runs[:1], tmp_path / "out", grid=GRID, samples=SAMPLES, bn="eval", progress=False)
    assert [row for _, row in seen] == [2, 3]  # its own two rows were kept
    fresh = compute_landscape(runs[:1], tmp_path / "fresh", grid=GRID, samples=SAMPLES, bn="eval", progress=False)
    _assert_same(resumed, fresh)


def test_a_different_path_invalidates_stored_rows(runs, tmp_path, rows_seen):
    seen, state = rows_seen
    state["limit"] = 2
    with pytest.raises(Killed):
        compute_landscape(runs[:1], tmp_path / "out", directions="random", dims=1, grid=5, samples=SAMPLES,
                          progress=False)
    seen.clear()
    state["limit"] = None
    # Same folder and settings, another run: its fingerprint (and plane) differ, so nothing is reused.
    other = compute_landscape(runs[1:], tmp_path / "out", directions="random", dims=1, grid=5, samples=SAMPLES,
                              progress=False)
    assert sorted(row for _, row in seen) == [0, 1, 2, 3, 4]
    fresh = compute_landscape(runs[1:], tmp_path / "fresh", directions="random", dims=1, grid=5, samples=SAMPLES,
                              progress=False)
    _assert_same(other, fresh)


def test_damaged_row_file_is_computed_again(runs, tmp_path, rows_seen):
    seen, state = rows_seen
    state["limit"] = 2
    with pytest.raises(Killed):
        compute_landscape(runs[:1], tmp_path / "out", grid=GRID, samples=SAMPLES, progress=False)
    (tmp_path / "out" / "landscape_rows" / "p000_r00001.npy").write_bytes(b"garbage")
    seen.clear()
    state["limit"] = None
    resumed = compute_landscape(runs[:1], tmp_path / "out", grid=GRID, samples=SAMPLES, progress=False)
    assert [row for _, row in seen] == [1, 2, 3]
    _assert_same(resumed, compute_landscape(runs[:1], tmp_path / "fresh", grid=GRID, samples=SAMPLES, progress=False))
