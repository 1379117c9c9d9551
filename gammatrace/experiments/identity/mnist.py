"""Study ``identity-mnist``: the CS260 report's MNIST experiment (its Fig. 3a–c, §5.1–5.3).

A network with one hidden layer, ReLU vs PReLU, with and without the identity mapping,
from a random and from a zero initialization; the test error averaged over 5 runs. The
report compares (a) ReLU vs PReLU without identity mapping, random init; (b) PReLU with
vs without identity mapping, random init; (c) the same from a zero init. This study runs
all eight combinations (the report's five cells and the three ReLU ones it leaves out).

Where the report is silent, chosen here (each listed in :data:`MNIST_SOURCES`):

- **architecture**: the model ``identity_mlp``, logits = V σ((I + W) x + b) + c, or
  V σ(W x + b) + c without the identity mapping. The hidden layer is as wide as the input
  (784 for MNIST, 64 for the 8×8 digits), so that I + W is defined as in the report's
  eq. (1) y = ‖σ(Wx + x)‖₁; the output layer is a plain linear layer with bias (its width,
  10, differs from the hidden one, so no identity mapping can apply there). Both layers
  have biases.
- **PReLU**: one learned slope shared by the layer, initially 0.25 (He et al. 2015).
- **zero init**: every weight and bias 0 (the PReLU slope stays 0.25); random init:
  PyTorch's default. Without the identity mapping a zero init leaves σ(0) = 0 as the
  hidden features, so only the output bias learns and the network predicts the most
  frequent class — the report's 0.8865 is 1 − 1135/10000, MNIST's share of "1"s.
- **training**: plain SGD, lr 0.1 (the teacher–student experiment's), batch 100, cross
  entropy, pixels in [0, 1]; 20 epochs on MNIST, 30 on the digits.
- **the 5 runs**: seeds 0–4 (initialization and batch order); the data split is fixed.

Each cell and run is one engine run (:func:`gammatrace.analysis.train`: pass 1 trains,
pass 2 replays against θ_T and analyses), so γ is measured too.

Example:
    >>> MNIST_PRESETS.names()
    ['paper', 'quick', 'tiny']
    >>> cfg = mnist_config(MNIST_PRESETS.get("paper")(), MNIST_CELL_BY_NAME["prelu-id-zero"], repeat=2,
    ...                    data_dir="/datasets")
    >>> cfg.data.name, cfg.data.switches()["data_dir"], cfg.model.name, cfg.model.init, cfg.seed, cfg.epochs
    ('mnist', '/datasets', 'identity_mlp', 'zero', 2, 20)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gammatrace.analysis import train
from gammatrace.config import RunConfig
from gammatrace.errors import ConfigError, UserError
from gammatrace.executors import make_executor
from gammatrace.experiments.identity.figures import MNIST_ERROR, figure_mnist_error
from gammatrace.experiments.identity.report import (
    mnist_report_blocks,
    study_folder,
    write_text_inside,
)
from gammatrace.experiments.identity.sources import Source, quote
from gammatrace.registry import Registry
from gammatrace.reporting.document import to_html, to_markdown
from gammatrace.store.backend import inside
from gammatrace.store.run import RunStore, Status

MNIST_PRESETS: Registry[Callable[[], MnistPreset]] = Registry("identity-mnist preset")
RESULTS_FILE = "identity_mnist.json"


@dataclass(frozen=True)
class MnistPreset:
    """Data and training settings of the MNIST-style study (units in comments)."""

    data: str = "digits"  # dataset: "digits" (embedded) or "mnist" (a local folder of the four IDX files)
    n_train: int | None = None  # training samples kept (None: all)
    n_test: int | None = None
    epochs: int = 30
    batch_size: int = 100
    lr: float = 0.1  # SGD learning rate (constant)
    prelu_init: float = 0.25  # PReLU's initial slope (learned)
    runs: int = 5  # runs per cell, seeds seed … seed + runs − 1: mean and spread over them
    seed: int = 0
    cells: tuple[str, ...] = ()  # () = all eight

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ConfigError(f"runs must be >= 1, got {self.runs}")

    def selected(self) -> tuple[MnistCell, ...]:
        """The cells this preset runs, in :data:`MNIST_CELLS` order.

        Example:
            >>> [c.name for c in MNIST_PRESETS.get("tiny")().selected()]
            ['relu-noid-random', 'prelu-noid-zero', 'prelu-id-zero']
        """
        unknown = set(self.cells) - set(MNIST_CELL_BY_NAME)
        if unknown:
            raise ConfigError(f"unknown cells {sorted(unknown)}; choose from {sorted(MNIST_CELL_BY_NAME)}")
        return tuple(c for c in MNIST_CELLS if not self.cells or c.name in self.cells)


@dataclass(frozen=True)
class MnistCell:
    """One configuration: activation, identity mapping on/off, random/zero initialization."""

    activation: str
    identity: bool
    init: str

    @property
    def name(self) -> str:
        return f"{self.activation}-{'id' if self.identity else 'noid'}-{self.init}"

    @property
    def label(self) -> str:
        act = {"relu": "ReLU", "prelu": "PReLU"}[self.activation]
        return f"{act}, {'with' if self.identity else 'without'} identity mapping, {self.init} init"


MNIST_CELLS = tuple(MnistCell(a, i, init) for a in ("relu", "prelu") for i in (False, True)
                    for init in ("random", "zero"))
MNIST_CELL_BY_NAME = {c.name: c for c in MNIST_CELLS}

MNIST_PRESETS.register("paper")(lambda: MnistPreset(data="mnist", epochs=20))
MNIST_PRESETS.register("quick")(lambda: MnistPreset(data="digits", epochs=30))
# For the test suite: the digits, a few epochs, two runs; one cell per finding.
MNIST_PRESETS.register("tiny")(lambda: MnistPreset(data="digits", n_train=300, n_test=200, epochs=3, batch_size=50,
                                                  runs=2, cells=("relu-noid-random", "prelu-noid-zero",
                                                                 "prelu-id-zero")))

# The report's panels of Fig. 3 (and one for the ReLU cells it does not show).
PANELS = (
    ("(a) ReLU vs PReLU: no identity mapping, random init", ("relu-noid-random", "prelu-noid-random")),
    ("(b) PReLU with and without identity mapping, random init", ("prelu-noid-random", "prelu-id-random")),
    ("(c) PReLU with and without identity mapping, zero init", ("prelu-noid-zero", "prelu-id-zero")),
    ("(d) ReLU, the cells the report does not show", ("relu-noid-zero", "relu-id-random", "relu-id-zero")),
)

# The report's average test errors (its §5.1–5.3), for its five cells.
REPORTED = {
    "relu-noid-random": (0.01768, quote(
        "For ReLU without identity mapping, random initialization, we get an average error rate of 0.01768")),
    "prelu-noid-random": (0.01742, quote(
        "For PReLU without identity mapping, random initialization, we get an average error rate of 0.01742")),
    "prelu-id-random": (0.01646, quote(
        "And for PReLU with identity mapping, random initialization, we get an error rate of 0.01646")),
    "prelu-noid-zero": (0.8865, quote(
        "For PReLU without identity mapping, zero initialization, we get an average error rate of 0.8865")),
    "prelu-id-zero": (0.0165, quote(
        "for PReLU with identity mapping, zero initialization, we get an error rate of 0.0165")),
}

# Where each value of the paper preset comes from.
MNIST_SOURCES: dict[str, dict[str, Source]] = {"paper": {
    "data": quote("Here we used MNIST handwritten digits dataset"),
    "network": quote("one-hidden-layer neural network", "model identity_mlp"),
    "activations": quote("with PReLU activation and ReLU activation respectively"),
    "identity": quote("two layer NN with and without identity mapping respectively"),
    "inits": quote("for the initialization we use zeros instead of some random values",
                   "zero: every weight and bias 0; random: PyTorch's default"),
    "runs": quote("We conducted each setting of experiments for 5 times and took the"),
    "hidden_width": Source.not_stated("the input size (784), so that I + W is defined as in eq. (1)"),
    "output_layer": Source.not_stated("linear 784 → 10 with bias, no identity mapping (the widths differ)"),
    "biases": Source.not_stated("both layers have biases"),
    "prelu_init": Source.not_stated("one learned slope per layer, initially 0.25 (He et al. 2015)"),
    "optimizer": Source.not_stated("plain SGD, as in the teacher–student experiment"),
    "lr": Source.not_stated("0.1, the teacher–student experiment's"),
    "batch_size": Source.not_stated("100"),
    "epochs": Source.not_stated("20"),
    "loss": Source.not_stated("cross entropy"),
    "preprocessing": Source.not_stated("pixels scaled to [0, 1], nothing else"),
    "seed": Source.not_stated("runs use seeds 0–4 (initialization and batch order); the data split is fixed"),
}}


def mnist_run_name(cell: MnistCell, repeat: int) -> str:
    """The run folder of repeat ``repeat`` of a cell.

    Example:
        >>> mnist_run_name(MNIST_CELLS[0], 3)
        'relu-noid-random-run3'
    """
    return f"{cell.name}-run{repeat}"


def mnist_config(preset: MnistPreset, cell: MnistCell, repeat: int = 0, data_dir: str | None = None,
                 device: str = "cpu") -> RunConfig:
    """The engine's config of one run: float32, plain SGD, one thread, θ* = θ_T.

    Example:
        >>> cfg = mnist_config(MNIST_PRESETS.get("quick")(), MNIST_CELL_BY_NAME["relu-id-random"])
        >>> cfg.model.switches(), cfg.loss, cfg.optim.lr, cfg.batch_size, cfg.data.name
        ({'identity': True, 'activation': 'relu', 'activation_options': {}}, 'cross_entropy', 0.1, 100, 'digits')
    """
    data: dict[str, Any] = {"name": preset.data, "n_train": preset.n_train, "n_test": preset.n_test}
    if data_dir is not None:
        data["data_dir"] = str(data_dir)
    options = {"init": preset.prelu_init} if cell.activation == "prelu" else {}
    return RunConfig.model_validate({
        "name": mnist_run_name(cell, repeat), "seed": preset.seed + repeat, "threads": 1, "device": device,
        "data": data,
        "model": {"name": "identity_mlp", "identity": cell.identity, "activation": cell.activation,
                  "activation_options": options, "init": "default" if cell.init == "random" else cell.init},
        "loss": "cross_entropy", "optim": {"name": "sgd", "lr": preset.lr},
        "epochs": preset.epochs, "batch_size": preset.batch_size,
        # Per-sample convergence over 60,000 samples is not what this study asks.
        "analysis": {"per_sample": False},
    })


def run_mnist_cell(preset: MnistPreset, cell: MnistCell, out: str | Path, repeat: int = 0,
                   data_dir: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Train, replay and analyse one run below ``out/<cell>-run<repeat>/`` (a top-level task
    for the executors); returns its test error per epoch and its γ summary.

    Example:
        >>> r = run_mnist_cell(MNIST_PRESETS.get("tiny")(), MNIST_CELLS[0], "out/mn")  # a training (seconds)  # doctest: +SKIP
        >>> len(r["test_error"])  # doctest: +SKIP
        3
    """
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    try:
        # the run's folder: never a symbolic link planted in the study's folder
        run = train(mnist_config(preset, cell, repeat, data_dir, device),
                    inside(Path(out).resolve(), mnist_run_name(cell, repeat), what="the study folder"),
                    progress=False)
    finally:
        torch.set_num_threads(before)  # the engine sets the run's thread count
    if run.status == Status.DIVERGED:
        raise UserError(f"{run.path}: training diverged ({run.meta.error})")
    epochs = run.epochs()
    epochs = epochs[epochs["epoch"] < run.meta.horizon_epochs]
    summary = run.summary()
    return {"cell": cell.name, "repeat": repeat, "run": str(run.path),
            "test_error": (1.0 - epochs["test_acc"]).tolist(), "train_loss": epochs["train_loss"].tolist(),
            "gamma": {k: summary.get(k) for k in ("gamma_median", "gamma_frac_positive", "gamma_min", "gamma_eff",
                                                  "no_progress", "loss_rel_drop")},
            "seconds": time.perf_counter() - t0}


def _stats(a: np.ndarray) -> dict[str, Any]:
    return {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "min": a.min(0).tolist(), "max": a.max(0).tolist()}


def summarize_mnist(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per cell: the test error per epoch and at the end (mean, std, min, max over the runs),
    the final training loss, the γ summary of each run, and the report's number where it
    gives one.

    Example:
        >>> rs = [{"cell": "prelu-id-zero", "repeat": r, "test_error": [0.5, e], "train_loss": [1.0, 0.5],
        ...        "gamma": {"gamma_median": 0.1, "no_progress": False}, "run": f"out/r{r}", "seconds": 1.0}
        ...       for r, e in enumerate([0.1, 0.3])]
        >>> s = summarize_mnist(rs)["prelu-id-zero"]
        >>> s["final_error"]["mean"], s["curve"]["max"], s["reported_error"]
        (0.2, [0.5, 0.3], 0.0165)
    """
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: r["repeat"]):
        by_cell.setdefault(r["cell"], []).append(r)
    out = {}
    for name in [c.name for c in MNIST_CELLS if c.name in by_cell]:
        rs, cell = by_cell[name], MNIST_CELL_BY_NAME[name]
        err = np.array([r["test_error"] for r in rs], dtype=float)
        loss = np.array([r["train_loss"][-1] for r in rs], dtype=float)
        reported = REPORTED.get(name)
        out[name] = {"cell": name, "label": cell.label, "activation": cell.activation, "identity": cell.identity,
                     "init": cell.init, "runs": len(rs), "epoch": list(range(1, err.shape[1] + 1)),
                     "curve": _stats(err), "final_error": {k: v[-1] for k, v in _stats(err).items()},
                     "final_train_loss": {k: v for k, v in zip(("mean", "min", "max"),
                                                                (loss.mean(), loss.min(), loss.max()), strict=True)},
                     "gamma": [r["gamma"] for r in rs], "run_paths": [r["run"] for r in rs],
                     "reported_error": reported[0] if reported else None,
                     "reported_source": str(reported[1]) if reported else None,
                     "seconds": float(sum(r["seconds"] for r in rs))}
    return out


def run_identity_mnist(out: str | Path, preset: str = "quick", workers: int = 1, progress: bool = True,
                       executor: str = "local", data_dir: str | None = None, device: str = "cpu") -> Path:
    """Run the report's MNIST experiment: every cell ``runs`` times (in parallel over
    ``workers``), the figure, the report and the JSON.

    Args:
        out: output folder (fig3_test_error.png, summary.md, report.html, identity_mnist.json, one run per cell and run)
        preset: quick (the scikit-learn digits, embedded) | paper (MNIST from a local folder) | tiny (the tests)
        workers: runs in parallel processes
        progress: show progress bars
        executor: where the runs go: local processes or a Ray cluster
        data_dir: the folder holding MNIST's four IDX files (paper preset; default $GAMMATRACE_DATA, else ./data)
        device: torch device of the runs (e.g. cuda for the paper preset)

    Returns the path of ``summary.md``.

    Example:
        >>> path = run_identity_mnist("out/mn", preset="quick", workers=2)  # a long training (minutes)  # doctest: +SKIP
        >>> json.loads((path.parent / "identity_mnist.json").read_text())["cells"]["prelu-noid-zero"]["final_error"]["mean"]  # doctest: +SKIP
        0.9136...
    """
    t0 = time.perf_counter()
    pre = MNIST_PRESETS.get(preset)()
    if data_dir is not None and pre.data != "mnist":
        raise UserError(f"--data-dir is for MNIST; preset {preset!r} uses the embedded {pre.data}")
    out = study_folder(out, [*(mnist_run_name(cell, r) for cell in pre.selected() for r in range(pre.runs)),
                             MNIST_ERROR, "summary.md", "report.html", RESULTS_FILE], progress)
    tasks = [(pre, cell, str(out), r, data_dir, device) for cell in pre.selected() for r in range(pre.runs)]
    done = make_executor(executor, workers=workers).map(run_mnist_cell, tasks, desc="identity-mnist runs",
                                                        progress=progress)
    cells = summarize_mnist(list(done))
    figure = figure_mnist_error(cells, PANELS, out)
    wall = time.perf_counter() - t0
    RunStore(out).write_json(RESULTS_FILE, {"preset": preset, "settings": asdict(pre), "wall_seconds": wall,
                                            "cells": cells})
    blocks = mnist_report_blocks(cells, asdict(pre), preset, MNIST_SOURCES.get(preset, {}), wall, [figure.name])
    write_text_inside(out, "summary.md", to_markdown(blocks))
    write_text_inside(out, "report.html", to_html(blocks, title="Identity mapping on MNIST (CS260 report, Fig. 3)",
                                                  base=out))
    if progress:
        for name, c in cells.items():
            print(f"{name}: test error {c['final_error']['mean']:.4f} ± {c['final_error']['std']:.4f}",
                  file=sys.stderr)
    return out / "summary.md"


def load_results(out: str | Path) -> dict[str, Any]:
    """The study's numbers (``identity_mnist.json``) from its output folder.

    Example:
        >>> load_results("out/mn")["cells"]["prelu-id-zero"]["final_error"]["mean"]  # needs a study's output  # doctest: +SKIP
    """
    return RunStore(out).read_json(RESULTS_FILE)
