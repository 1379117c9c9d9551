"""Issue 22, items 1-3: never delete or overwrite what is not ours, one writer per output
folder, every record finalised on resume. One test per audited failure; each was written
before its fix and failed on the code as it was.

* the user's files beside a report survive (`report RUN --out docs`);
* a symbolic link planted where a writer writes is refused, in one line, for every writer
  (a report folder, a report file, a landscape figure, a study cell, the run files, the lock);
* two reports into one folder: the second is refused in one line naming the holder;
* an analysis interrupted at the final write of ``reference_cache.json`` is finalised by the
  rerun: every file equal to an uninterrupted run's, and its warning printed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gammatrace
from gammatrace.cli import main
from gammatrace.engine import refcache, train_pass
from gammatrace.errors import UserError
from gammatrace.experiments.study import run_study, study_from_yaml
from gammatrace.landscape import landscape
from gammatrace.store.backend import UnsafePathError
from gammatrace.store.run import RunStore
from tests.conftest import one_error_line, tiny_config, tree_hashes


def _tree(root: Path) -> dict[str, str]:
    return tree_hashes(root, links=False)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> Path:
    """A tiny analysed run, shared read-only (tests copy it before changing anything)."""
    out = tmp_path_factory.mktemp("writers") / "run"
    gammatrace.train(tiny_config(epochs=2), out, progress=False)
    return out


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def _outside(tmp_path: Path) -> Path:
    """A folder outside every output folder, holding the user's file."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mine.txt").write_text("the user's")
    return outside


# ------------------------------------------------ 3. never delete what the tool did not write
def test_report_keeps_the_users_files_beside_it(analysed, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    users = {"layers-notes.pdf": b"%PDF notes", "trajectory_2024.png": b"\x89PNG 2024", "matched_pairs.pdf": b"%PDF mp",
             "theorem1.pdf": b"%PDF mine", ".x.tmp": b"the user's temporary file"}
    for name, data in users.items():
        (docs / name).write_bytes(data)
    for _ in range(2):  # the first report, and one that finds its own files from the first
        assert main(["report", str(analysed), "--out", str(docs)]) == 0
    assert (docs / "report.html").is_file() and (docs / "trajectory.png").is_file()
    for name, data in users.items():
        assert (docs / name).read_bytes() == data, name


def test_report_never_overwrites_a_users_file_of_the_same_name(analysed, tmp_path, capsys):
    # docs/trajectory.png of the user's own, no manifest listing it: the report would replace it.
    # Refused in one line before anything is written; a folder the tool owns (a run's report/,
    # reports written before manifests existed) and a report's own earlier files are overwritten.
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "trajectory.png").write_bytes(b"the user's figure")
    before = _tree(docs)
    assert main(["report", str(analysed), "--out", str(docs)]) == 2
    line = one_error_line(capsys)
    assert "trajectory.png" in line and "no earlier report here wrote it" in line
    after = _tree(docs)
    after.pop(".lock", None)  # the writers' lock file (fcntl), kept as every lock of the tool is
    assert after == before
    run = _copy(analysed, tmp_path)
    (run / "report").mkdir(exist_ok=True)
    (run / "report" / "trajectory.png").write_bytes(b"an old report's, before manifests")
    assert main(["report", str(run), "--out", str(run / "report")]) == 0
    assert (run / "report" / "trajectory.png").read_bytes() != b"an old report's, before manifests"


def test_a_figure_the_last_report_drew_and_this_one_skips_is_removed(analysed, tmp_path):
    out = tmp_path / "out"
    gammatrace.report([analysed], out)
    assert (out / "layers.png").is_file() and (out / "layers.pdf").is_file()
    bare = _copy(analysed, tmp_path, "bare")
    ref = bare / "analysis" / "last"
    for name in ("layers.parquet", "modules.parquet"):
        (ref / name).unlink()
    shutil.rmtree(ref / "tensors")
    (out / "layers_mine.png").write_bytes(b"the user's")
    gammatrace.report([bare], out)
    assert not (out / "layers.png").exists() and not (out / "layers.pdf").exists()
    assert (out / "layers_mine.png").read_bytes() == b"the user's"


# ------------------------------------------------------- 1. confinement in every writer
def test_report_folder_planted_as_a_link_in_a_run_folder(analysed, tmp_path, capsys):
    run = _copy(analysed, tmp_path)
    outside = _outside(tmp_path)
    (run / "report").symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    assert main(["report", str(run), "--out", str(run / "report")]) == 2
    line = one_error_line(capsys)
    assert "symbolic link" in line and "report" in line
    assert _tree(outside) == before


def test_run_does_not_report_through_a_planted_report_link(tmp_path, capsys):
    outside = _outside(tmp_path)
    out = tmp_path / "r"
    out.mkdir()
    (out / "report").symlink_to(outside, target_is_directory=True)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps(tiny_config(epochs=1)))
    before = _tree(outside)
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "symbolic link" in one_error_line(capsys)
    assert _tree(outside) == before


@pytest.mark.parametrize("where", ["run", "docs"])
def test_report_file_planted_as_a_link(analysed, tmp_path, capsys, where):
    outside = _outside(tmp_path)
    out = _copy(analysed, tmp_path) / "report" if where == "run" else tmp_path / "docs"
    out.mkdir()
    (out / "summary.md").symlink_to(outside / "mine.txt")
    assert main(["report", str(analysed), "--out", str(out)]) == 2
    assert "symbolic link" in one_error_line(capsys)
    assert (outside / "mine.txt").read_text() == "the user's"
    assert (out / "summary.md").is_symlink()


def test_out_that_is_a_link_elsewhere_is_resolved_once_and_said(analysed, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "docs").symlink_to(real, target_is_directory=True)
    assert main(["report", str(analysed), "--out", str(tmp_path / "docs")]) == 0
    err = capsys.readouterr().err
    assert f"is a symbolic link to {real}" in err
    assert (real / "report.html").is_file() and (tmp_path / "docs").is_symlink()


def test_landscape_figure_planted_as_a_link(analysed, tmp_path, capsys):
    outside = _outside(tmp_path)
    out = tmp_path / "ls"
    out.mkdir()
    (out / "landscape_per_path.png").symlink_to(outside / "mine.txt")
    assert main(["landscape", str(analysed), "--out", str(out), "--plane", "per_path", "--grid", "3",
                 "--samples", "32", "--quiet"]) == 2
    assert "symbolic link" in one_error_line(capsys)
    assert (outside / "mine.txt").read_text() == "the user's"


def test_landscape_row_cache_planted_as_a_link(analysed, tmp_path):
    outside = _outside(tmp_path)
    out = tmp_path / "ls"
    out.mkdir()
    (out / "landscape_rows").symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        landscape([analysed], out, grid=3, samples=32, progress=False)
    assert _tree(outside) == before


def test_study_cell_planted_as_a_link(tmp_path):
    spec = tmp_path / "acts.yaml"
    spec.write_text(json.dumps({"base": tiny_config(epochs=1), "variants": {
        "relu": {"model": {"activation": "relu"}}, "tanh": {"model": {"activation": "tanh"}}}}))
    study = study_from_yaml(spec)
    out = tmp_path / "study"
    out.mkdir()
    outside = _outside(tmp_path)
    (out / "relu").symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    with pytest.raises(UserError, match="symbolic link"):
        run_study(study, out, seeds=1, progress=False, check_free=False)
    assert _tree(outside) == before


def test_a_run_below_a_study_folder_through_a_link_is_refused(tmp_path):
    # What a Ray task of the study does: train_pass on the cell's folder.
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text("{}")
    outside = _outside(tmp_path)
    (study / "relu").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        train_pass(tiny_config(epochs=1), study / "relu", progress=False)
    assert sorted(p.name for p in outside.iterdir()) == ["mine.txt"]


def test_run_files_and_the_lock_never_go_through_a_planted_link(tmp_path):
    store = RunStore(tmp_path / "run")
    (tmp_path / "run" / "sub").mkdir(parents=True)
    (tmp_path / "run" / "inner").symlink_to(tmp_path / "run" / "sub", target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symbolic link"):  # a link even to a folder inside
        store.write_json("inner/x.json", {})
    assert not any((tmp_path / "run" / "sub").iterdir())
    outside = _outside(tmp_path)
    for target in (outside / "mine.txt", tmp_path / "run" / "sub" / "theirs.txt"):
        (tmp_path / "run" / "sub" / "theirs.txt").write_text("the user's")
        for name in ("run.json", ".lock"):
            (tmp_path / "run" / name).unlink(missing_ok=True)
            (tmp_path / "run" / name).symlink_to(target)
        with pytest.raises(UserError, match="symbolic link|outside"):
            store.write_json("run.json", {})
        with pytest.raises(UserError, match="symbolic link|outside"), store.lock():
            pass
        assert target.read_text() == "the user's"


# ---------------------------------------------------------- 2. one writer per output folder
_SLOW_REPORT = """
import sys, time
import gammatrace.reporting.build as build
real = build.to_markdown
def slow(blocks):
    print("drawing", flush=True)
    time.sleep(float(sys.argv[3]))
    return real(blocks)
build.to_markdown = slow
build.report([sys.argv[1]], sys.argv[2], title="first")
"""


def test_two_reports_into_one_folder(analysed, tmp_path, capsys):
    out = tmp_path / "docs"
    first = subprocess.Popen([sys.executable, "-c", _SLOW_REPORT, str(analysed), str(out), "6"],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert first.stdout.readline().strip() == "drawing"
        assert main(["report", str(analysed), "--out", str(out)]) == 2
        line = one_error_line(capsys)
        assert "in use by process" in line and str(first.pid) in line
    finally:
        assert first.wait(timeout=120) == 0
    assert (out / "summary.md").read_text().startswith("# first")


# ------------------------------------------------------- 3. every record finalised on resume
def test_analysis_interrupted_at_its_final_record_is_finalised_by_the_rerun(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(refcache, "GAMMA_FLAG", -1.0)  # every cached analysis warns: the warning must be printed
    trained = tmp_path / "trained"
    train_pass(tiny_config(epochs=2), trained, progress=False)
    whole, cut = _copy(trained, tmp_path, "whole"), _copy(trained, tmp_path, "cut")

    assert main(["analyze", str(whole), "--quiet"]) == 0
    warned = capsys.readouterr().err
    assert "may move γ_k" in warned

    real = RunStore.write_json

    def interrupted(self, rel, obj):
        if rel.endswith("reference_cache.json") and obj.get("complete"):
            raise KeyboardInterrupt  # Ctrl-C at the final write of the record
        return real(self, rel, obj)

    monkeypatch.setattr(RunStore, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gammatrace.analyze(cut, progress=False)
    monkeypatch.setattr(RunStore, "write_json", real)
    assert json.loads((cut / "analysis" / "last" / "reference_cache.json").read_text())["complete"] is False
    capsys.readouterr()

    assert main(["analyze", str(cut), "--quiet"]) == 0
    assert "may move γ_k" in capsys.readouterr().err
    assert _tree(cut) == _tree(whole)
