"""The CS260 report's MNIST experiment (its Fig. 3, study ``identity-mnist``): the network,
the study on the digits through the engine (errors = the engine's record, the figure = the
stored numbers, the zero-init finding), the paper preset on a generated MNIST folder in the
IDX format, and the paper preset's values pinned to the report's words."""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gammatrace.data import load_dataset
from gammatrace.errors import UserError
from gammatrace.experiments.identity import cli, mnist
from gammatrace.experiments.identity.figures import MNIST_ERROR, draw_mnist_error
from gammatrace.experiments.identity.mnist import (
    MNIST_CELL_BY_NAME,
    MNIST_CELLS,
    MNIST_PRESETS,
    MNIST_SOURCES,
    PANELS,
    REPORTED,
    mnist_config,
    run_identity_mnist,
    run_mnist_cell,
)
from gammatrace.experiments.identity.sources import phrase_in
from gammatrace.models import build
from gammatrace.store.run import Run

PAPERS = Path(__file__).resolve().parents[2] / "shared" / "papers"
PAPER_FILE = "003_169288aa6363f27d.txt"
TINY = MNIST_PRESETS.get("tiny")()


# --------------------------------------------------------------------------- the network


def test_identity_mlp_zero_init_with_and_without_the_identity_mapping():
    x = torch.rand(5, 1, 8, 8)
    for identity in (True, False):
        net = build("identity_mlp", input_shape=(1, 8, 8), num_classes=10, identity=identity, activation="prelu")
        for p in (net.hidden.weight, net.hidden.bias, net.out.weight, net.out.bias):
            torch.nn.init.zeros_(p)
        h = net.hidden_features(x)
        # σ((I + 0)x + 0) = σ(x) = x for pixels ≥ 0; without the identity mapping σ(0) = 0.
        torch.testing.assert_close(h, x.flatten(1) if identity else torch.zeros_like(h))
        loss = torch.nn.functional.cross_entropy(net(x), torch.arange(5))
        grads = dict(zip([n for n, _ in net.named_parameters()],
                         torch.autograd.grad(loss, list(net.parameters())), strict=True))
        # Without it only the output bias learns: the network can only predict a class prior.
        moving = {n for n, g in grads.items() if g.abs().max() > 0}
        assert moving == ({"out.weight", "out.bias"} if identity else {"out.bias"})
    with pytest.raises(ValueError, match="d > 0"):
        build("identity_mlp", input_shape=(0,), num_classes=10)


# --------------------------------------------------------------------------- the study on the digits


@pytest.fixture(scope="module")
def digits_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("identity_mnist")
    summary = run_identity_mnist(out, preset="tiny", workers=1, progress=False)
    return summary, mnist.load_results(out)


def test_errors_are_the_engines_record_averaged_over_the_runs(digits_study):
    _, data = digits_study
    assert set(data["cells"]) == set(TINY.cells)
    for c in data["cells"].values():
        runs = [Run(path) for path in c["run_paths"]]
        errors = np.array([1.0 - r.epochs()["test_acc"].to_numpy() for r in runs])
        assert errors.shape == (TINY.runs, TINY.epochs) and c["runs"] == TINY.runs
        np.testing.assert_allclose(c["curve"]["mean"], errors.mean(0), rtol=1e-12)
        np.testing.assert_allclose(c["curve"]["min"], errors.min(0), rtol=1e-12)
        assert c["final_error"]["mean"] == pytest.approx(errors[:, -1].mean(), rel=1e-12)
        for r, run in enumerate(runs):  # every run went through the engine: trained, replayed, analysed
            assert run.status.value == "complete" and run.config.seed == TINY.seed + r
            assert run.config.model.name == "identity_mlp" and run.references() == ["last"]


def test_zero_init_without_identity_predicts_the_most_frequent_class(digits_study):
    _, data = digits_study
    ds = load_dataset("digits", n_train=TINY.n_train, n_test=TINY.n_test)
    counts = np.bincount(ds.y_train.numpy(), minlength=10)
    majority = np.flatnonzero(counts == counts.max())
    assert len(majority) == 1  # the argument needs a unique most frequent training class
    expected = 1.0 - int((ds.y_test == int(majority[0])).sum()) / len(ds.y_test)  # the report's 0.8865 on MNIST
    stuck = data["cells"]["prelu-noid-zero"]
    assert stuck["final_error"]["min"] == stuck["final_error"]["max"] == pytest.approx(expected, abs=1e-12)
    assert data["cells"]["prelu-id-zero"]["final_error"]["max"] < expected - 0.2  # the identity mapping trains


def test_figure_draws_the_stored_errors(digits_study):
    summary, data = digits_study
    assert (summary.parent / MNIST_ERROR).stat().st_size > 0
    fig = draw_mnist_error(data["cells"], PANELS)
    seen = set()
    for ax, (_, names) in zip(fig.axes, [(t, [n for n in names if n in data["cells"]]) for t, names in PANELS
                                         if any(n in data["cells"] for n in names)], strict=True):
        lines = {line.get_gid(): line for line in ax.get_lines()}
        assert set(lines) == set(names)
        for name in names:
            c = data["cells"][name]
            np.testing.assert_array_equal(lines[name].get_xdata(), c["epoch"])
            np.testing.assert_array_equal(lines[name].get_ydata(), c["curve"]["mean"])
            bands = [b for b in ax.collections if b.get_gid() == f"{name}:band"]
            if c["curve"]["min"] != c["curve"]["max"]:
                ys = set(bands[0].get_paths()[0].vertices[:, 1].tolist())
                assert ys == set(c["curve"]["min"]) | set(c["curve"]["max"])
            seen.add(name)
    assert seen == set(data["cells"])


def test_report_table_shows_each_cells_error(digits_study):
    summary, data = digits_study
    text = summary.read_text()
    for c in data["cells"].values():
        assert f"{c['final_error']['mean']:.4f} ± {c['final_error']['std']:.4f}" in text
    assert "0.8865" in text  # the report's number beside ours, for the cell it reports
    assert (summary.parent / "report.html").is_file()


def test_cli_runs_the_study_and_prints_the_table(digits_study, monkeypatch, capsys):
    summary, data = digits_study
    calls = []

    def fake(out: str, preset: str = "quick", workers: int = 1, progress: bool = True, executor: str = "local",
             data_dir: str | None = None, device: str = "cpu"):
        calls.append((out, preset, data_dir, device, progress))
        return summary

    monkeypatch.setattr(mnist, "run_identity_mnist", fake)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["identity-mnist", "--preset", "tiny", "--out", "o", "--quiet"])
    assert args.fn(args) == 0
    assert calls == [("o", "tiny", None, "cpu", False)]
    printed = capsys.readouterr().out
    e = data["cells"]["prelu-noid-zero"]["final_error"]
    assert f"prelu-noid-zero: test error {e['mean']:.4f} ± {e['std']:.4f}" in printed


def test_data_dir_is_refused_for_the_embedded_digits(tmp_path):
    with pytest.raises(UserError, match="--data-dir is for MNIST"):
        run_identity_mnist(tmp_path, preset="quick", data_dir=str(tmp_path), progress=False)


# --------------------------------------------------------------------------- the paper preset on a generated MNIST folder


def _write_idx(path: Path, a: np.ndarray) -> None:
    # IDX: two zero bytes, type 0x08 (uint8), the number of dimensions, each dimension big-endian.
    path.write_bytes(struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes())


def _mnist_folder(root: Path, n_train: int = 24, n_test: int = 10) -> Path:
    """A folder in MNIST's layout and format: 28×28 uint8 images, labels 0–9."""
    rng = np.random.default_rng(0)
    folder = root / "mnist"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = (rng.random((n, 28, 28)) * 64).astype(np.uint8)
        images[:, 2:26, 2 + 2 * labels[0]:4 + 2 * labels[0]] = 255  # some structure; content does not matter
        _write_idx(folder / f"{split}-images-idx3-ubyte", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte", labels)
    return root


def test_paper_preset_runs_on_a_generated_mnist_folder(tmp_path):
    root = _mnist_folder(tmp_path / "data")
    paper = MNIST_PRESETS.get("paper")()
    result = run_mnist_cell(paper, MNIST_CELL_BY_NAME["prelu-id-zero"], tmp_path / "out", 0, data_dir=str(root))
    run = Run(result["run"])
    assert run.config.data.name == "mnist" and run.config.data.switches()["data_dir"] == str(root)
    assert len(result["test_error"]) == paper.epochs == 20 and run.status.value == "complete"
    state = run.store.read_torch("final.pt")["model"]
    assert tuple(state["hidden.weight"].shape) == (784, 784) and tuple(state["out.weight"].shape) == (10, 784)
    assert "act.weight" in state  # the PReLU slope is a learned parameter


@pytest.mark.slow
def test_paper_preset_whole_study_on_a_generated_mnist_folder(tmp_path):
    root = _mnist_folder(tmp_path / "data")
    summary = run_identity_mnist(tmp_path / "out", preset="paper", data_dir=str(root), workers=2, progress=False)
    data = mnist.load_results(tmp_path / "out")
    assert set(data["cells"]) == {c.name for c in MNIST_CELLS}
    assert all(c["runs"] == 5 and len(c["curve"]["mean"]) == 20 for c in data["cells"].values())
    assert "Settings and where they come from" in summary.read_text()


# --------------------------------------------------------------------------- the paper preset, pinned

PAPER = MNIST_PRESETS.get("paper")()
# (setting, how the preset or its configs hold it, the report's words)
PINNED = [
    ("data", lambda: PAPER.data == "mnist", "Here we used MNIST handwritten digits dataset"),
    ("network", lambda: mnist_config(PAPER, MNIST_CELLS[0]).model.name == "identity_mlp",
     "one-hidden-layer neural network"),
    ("activations", lambda: {c.activation for c in MNIST_CELLS} == {"relu", "prelu"},
     "with PReLU activation and ReLU activation respectively"),
    ("identity", lambda: {c.identity for c in MNIST_CELLS} == {True, False},
     "two layer NN with and without identity mapping respectively"),
    ("inits", lambda: {mnist_config(PAPER, c).model.init for c in MNIST_CELLS} == {"default", "zero"},
     "for the initialization we use zeros instead of some random values"),
    ("runs", lambda: PAPER.runs == 5, "We conducted each setting of experiments for 5 times and took the"),
]
NOT_STATED = {"hidden_width": lambda: True, "output_layer": lambda: True, "biases": lambda: True,
              "prelu_init": lambda: PAPER.prelu_init == 0.25,
              "optimizer": lambda: mnist_config(PAPER, MNIST_CELLS[0]).optim.name == "sgd",
              "lr": lambda: PAPER.lr == 0.1, "batch_size": lambda: PAPER.batch_size == 100,
              "epochs": lambda: PAPER.epochs == 20,
              "loss": lambda: mnist_config(PAPER, MNIST_CELLS[0]).loss == "cross_entropy",
              "preprocessing": lambda: True, "seed": lambda: PAPER.seed == 0}


@pytest.mark.parametrize("key,holds,phrase", PINNED, ids=[k for k, _, _ in PINNED])
def test_mnist_paper_preset_values_are_the_reports(key, holds, phrase):
    assert holds()
    assert MNIST_SOURCES["paper"][key].phrase == phrase and MNIST_SOURCES["paper"][key].paper == PAPER_FILE


def test_mnist_paper_preset_unstated_values_say_so():
    for key, holds in NOT_STATED.items():
        assert holds() and not MNIST_SOURCES["paper"][key].stated, key
    assert set(MNIST_SOURCES["paper"]) == {k for k, _, _ in PINNED} | set(NOT_STATED)
    assert PAPER.n_train is None and PAPER.n_test is None and PAPER.cells == ()  # all of MNIST, all eight cells


@pytest.mark.parametrize("phrase", sorted({s.phrase for s in MNIST_SOURCES["paper"].values() if s.stated}
                                          | {s.phrase for _, s in REPORTED.values()}))
def test_quoted_phrases_are_in_the_paper(phrase):
    if not (PAPERS / PAPER_FILE).is_file():
        pytest.skip(f"{PAPERS / PAPER_FILE} is absent: the shared papers folder sits beside the clone")
    assert phrase_in((PAPERS / PAPER_FILE).read_text(), phrase)


def test_reported_errors_are_the_reports_numbers():
    for name, (value, source) in REPORTED.items():
        assert name in MNIST_CELL_BY_NAME and source.phrase.endswith(f"{value:g}")
    assert REPORTED["prelu-noid-zero"][0] == pytest.approx(1 - 1135 / 10000)  # MNIST's test share of "1"s


def test_report_leads_with_the_findings_checked_as_claims(digits_study):
    from gammatrace.experiments.identity.claims import (
        MNIST_CLAIMS,
        check_mnist_claims,
        final_accuracy,
        mnist_points,
    )
    summary, data = digits_study
    parts = summary.read_text().split("\n\n")
    # After the title, each finding's verdict in one sentence, then the figure.
    bullets = parts[1].splitlines()
    assert len(bullets) == len(MNIST_CLAIMS) and all(b.startswith("- ") for b in bullets)
    assert parts[2].startswith("![")
    checked = dict((c.order, r) for c, r in check_mnist_claims(mnist_points(data["cells"])))
    # The tiny preset runs prelu-noid-zero and prelu-id-zero: that finding is checked, with 2 seeds
    # (it cannot reach a verdict: 2^-2 ≥ α, said), the others lack a cell.
    r = checked["prelu-id-zero > prelu-noid-zero"]
    assert r is not None and r.design == "paired" and r.verdict == "inconclusive" and "cannot be reached" in r.text
    assert checked["prelu-noid-random > relu-noid-random"] is None
    assert any("prelu-id-zero > prelu-noid-zero by test accuracy — inconclusive" in b for b in bullets)
    # Its numbers are the runs' final test accuracy, the error table's 1 − error.
    for name in ("prelu-id-zero", "prelu-noid-zero"):
        accs = [final_accuracy(p)[0] for p in data["cells"][name]["run_paths"]]
        assert 1 - np.mean(accs) == pytest.approx(data["cells"][name]["final_error"]["mean"], abs=1e-12)
    assert "<details><summary>How the findings are checked</summary>" in (summary.parent / "report.html").read_text()
