"""Issue 22, item 1, the writers the first round left out: the identity studies' reports,
figures and runs, and `gammatrace inspect --out`, write through the one confined writer
(:func:`~gammatrace.store.backend.write_inside`). A symbolic link planted in the output
folder (a report file, a figure, a run's folder) is refused in one line, exit 2, before
anything trains; the file or folder it points to is untouched. A link planted after that
check (while the study trains) is refused by the write itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gammatrace.cli import main
from gammatrace.experiments.identity.figures import FIGURES, MNIST_ERROR, _save
from gammatrace.experiments.identity.mnist import MNIST_PRESETS, mnist_run_name
from gammatrace.experiments.identity.problem import PRESETS, run_name
from gammatrace.experiments.identity.report import write_text_inside
from gammatrace.store.backend import UnsafePathError
from tests.conftest import one_error_line, tiny_config, tree_hashes


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mine.txt").write_text("the user's")
    return outside


def _plant(out: Path, rel: str, outside: Path) -> None:
    """``out/rel`` as a symbolic link to the user's file (a file name) or folder."""
    link = out / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside / "mine.txt" if Path(rel).suffix else outside)


def _first_mapping_run() -> str:
    pre = PRESETS.get("tiny")()
    return run_name(pre.selected()[0], 0)


def _first_mnist_run() -> str:
    pre = MNIST_PRESETS.get("tiny")()
    return mnist_run_name(pre.selected()[0], 0)


@pytest.mark.parametrize("command, rel", [
    ("identity-mapping", "summary.md"), ("identity-mapping", "report.html"), ("identity-mapping", FIGURES[0]),
    ("identity-mapping", "identity_mapping.json"), ("identity-mapping", "RUN"), ("identity-mapping", "RUN/run"),
    ("identity-mnist", "summary.md"), ("identity-mnist", MNIST_ERROR), ("identity-mnist", "RUN"),
])
def test_a_link_planted_in_an_identity_study_folder_is_refused_before_training(command, rel, tmp_path, capsys):
    outside = _outside(tmp_path)
    before = tree_hashes(outside)
    out = tmp_path / "study"
    run = _first_mapping_run() if command == "identity-mapping" else _first_mnist_run()
    if rel.startswith("RUN/"):
        (out / run).mkdir(parents=True)
    rel = rel.replace("RUN", run)
    _plant(out, rel, outside)
    assert main([command, "--out", str(out), "--preset", "tiny", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert f"{out / rel} is a symbolic link inside the study folder" in line, line
    assert tree_hashes(outside) == before
    assert sorted(p.name for p in out.rglob("*")) == sorted({Path(rel).name, *Path(rel).parent.parts})


@pytest.mark.parametrize("name", ["summary.md", "report.html"])
def test_the_identity_reports_write_through_the_confined_writer(name, tmp_path):
    # A link planted after the up-front check (while the cells train): the write refuses it.
    outside = _outside(tmp_path)
    out = tmp_path / "study"
    out.mkdir()
    assert write_text_inside(out, name, "ok").read_text() == "ok"
    (out / name).unlink()
    _plant(out, name, outside)
    with pytest.raises(UnsafePathError, match="symbolic link inside the study folder"):
        write_text_inside(out, name, "overwritten")
    assert (outside / "mine.txt").read_text() == "the user's"


def test_the_identity_figures_write_through_the_confined_writer(tmp_path):
    from matplotlib.figure import Figure

    outside = _outside(tmp_path)
    out = tmp_path / "study"
    out.mkdir()
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    assert _save(fig, out / FIGURES[1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _plant(out, FIGURES[0], outside)
    with pytest.raises(UnsafePathError, match="symbolic link inside the study folder"):
        _save(fig, out / FIGURES[0])
    assert (outside / "mine.txt").read_text() == "the user's"
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def _inspect_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config()))
    return cfg


def test_inspect_refuses_a_figure_planted_as_a_link(tmp_path, capsys):
    outside = _outside(tmp_path)
    out = tmp_path / "insp"
    _plant(out, "inspect_tiny.png", outside)
    assert main(["inspect", str(_inspect_config(tmp_path)), "--out", str(out)]) == 2
    assert f"{out / 'inspect_tiny.png'} is a symbolic link inside the output folder" in one_error_line(capsys)
    assert (outside / "mine.txt").read_text() == "the user's"


def test_inspect_out_as_a_link_is_resolved_once_and_said(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "docs").symlink_to(real, target_is_directory=True)
    assert main(["inspect", str(_inspect_config(tmp_path)), "--out", str(tmp_path / "docs")]) == 0
    assert f"is a symbolic link to {real}; writing there" in capsys.readouterr().err
    assert (real / "inspect_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_out_through_a_link_planted_in_a_run_folder_is_refused(tmp_path, capsys):
    outside = _outside(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "figs").symlink_to(outside, target_is_directory=True)
    assert main(["inspect", str(_inspect_config(tmp_path)), "--out", str(run / "figs")]) == 2
    assert "is a symbolic link inside the run folder" in one_error_line(capsys)
    assert sorted(p.name for p in outside.iterdir()) == ["mine.txt"]
