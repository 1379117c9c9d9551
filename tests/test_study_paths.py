"""Paper 002's PCA figure drawn by a study (issue 13, item 6): the cells a study names in
``paths`` get their first seed's path on its own PCA plane, with the SGD direction and the
actual step projected, in the report — figure and cosine table equal to the stored landscape,
and that landscape equal to one computed directly.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from gammatrace.experiments.study import ClaimSpec, GridSpec, GroupSpec, StudyError, run_study
from gammatrace.landscape import Landscape, compute_landscape, figure_landscape, landscape_stem
from gammatrace.reporting import build
from gammatrace.store.study import StudyMeta

TINY = {"epochs": 3, "batch_size": 32, "data": {"name": "digits", "n_train": 96, "n_test": 64},
        "model": {"name": "mlp", "width": 8, "depth": 2}, "optim": {"lr": 0.05}}
OPTS = {"sgd": {"optim": {"name": "sgd"}}, "momentum": {"optim": {"name": "momentum", "momentum": 0.5}},
        "adam": {"optim": {"name": "adam", "lr": 0.01}}}


def test_paths_name_variants_and_resolve_to_cells_in_every_group():
    spec = GridSpec(name="opt", base=TINY, variants=OPTS, paths=["momentum", "adam"],
                    groups={"a": GroupSpec(), "b": GroupSpec(variants={"sgd": {}, "adam": OPTS["adam"]})})
    study = spec.build()
    assert study.paths == ["a-momentum", "a-adam", "b-adam"]
    assert study.meta(2).paths == ["a-momentum", "a-adam", "b-adam"]
    with pytest.raises(StudyError, match="paths name unknown variants"):
        GridSpec(name="opt", base=TINY, variants=OPTS, paths=["nesterov"]).build()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("optstudy")
    spec = GridSpec(name="opt", base=TINY, variants=OPTS, paths=["momentum", "adam"], seeds=2,
                    claims=[ClaimSpec(text="Adam first", order="adam > momentum ≈ sgd")])
    html = run_study(spec.build(), out, workers=1, progress=False)
    return out, html


def test_report_draws_each_named_path_on_its_own_plane(study):
    out, html = study
    folder = out / "report" / "paths_opt"
    ls = Landscape.load(folder, landscape_stem(plane="per_path"))
    assert ls.run_names == ["momentum-s0", "adam-s0"]  # first seed of each named cell, nothing else
    # The same landscape computed directly from the two runs.
    direct = compute_landscape([out / "momentum-s0", out / "adam-s0"], out / "direct", plane="per_path",
                               grid=build.PATHS_GRID, samples=build.PATHS_SAMPLES, progress=False)
    for mine, ref in zip(ls.planes, direct.planes, strict=True):
        np.testing.assert_array_equal(mine.loss, ref.loss)
        np.testing.assert_array_equal(mine.explained, ref.explained)
    for r in range(2):
        np.testing.assert_array_equal(ls.coords[r], direct.coords[r])
        np.testing.assert_array_equal(ls.grad_proj[r], direct.grad_proj[r])
    # The figure in the report draws the stored numbers: one panel per path.
    fig = figure_landscape(ls)
    for name, coords in zip(ls.run_names, ls.coords, strict=True):
        [line] = [ln for ax in fig.axes for ln in ax.lines if ln.get_gid() == f"path:{name}"]
        np.testing.assert_array_equal(line.get_xydata(), coords)
    assert (folder / "landscape_per_path.png").is_file()


def test_report_table_gives_the_stored_cosines(study):
    out, _ = study
    md = (out / "report" / "summary.md").read_text()
    assert "paths_opt/landscape_per_path.png" in md
    ls = Landscape.load(out / "report" / "paths_opt", landscape_stem(plane="per_path"))
    for i, cell in enumerate(["momentum", "adam"]):
        [row] = [line for line in md.splitlines() if re.match(rf"\| {cell} \| {len(ls.cos_full[i])} \|", line)]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(float(np.mean(ls.cos_full[i])), rel=5e-4)
        assert float(cells[3]) == pytest.approx(float(np.min(ls.cos_full[i])), rel=5e-4)


def test_pruned_checkpoints_leave_a_note_not_a_failure(study, tmp_path):
    out, _ = study
    meta = StudyMeta.load(out / "study.json")
    # A study naming a path whose run folder has no checkpoints: the report says why and goes on.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("report"))
    shutil.rmtree(copy / "adam-s0" / "checkpoints")
    html = build.report([copy / name for name in meta.runs], copy / "report")
    md = (copy / "report" / "summary.md").read_text()
    assert "paths_opt.png not drawn:" in md and html.is_file()
