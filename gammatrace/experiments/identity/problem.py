"""The problem of the identity-mapping study: presets (with where each paper value comes
from), the eight cells, each cell and run as an engine :class:`~gammatrace.config.RunConfig`,
and the permuted teachers.

The student is Li & Yuan's two-layer network (model ``teacher_student``) with the report's
eq. (4) output Σ_i σ(·)_i (``output="abs"`` keeps Σ|σ(·)_i|, the literal ‖·‖₁ of its eq. (1))
and a PReLU of fixed slope a = 0.25: PReLU's initial value, *not learned* — with a learned
slope plain SGD at lr 0.1 diverges on this problem (measured with both outputs: NaN within
10 epochs in most cells). The data are the ``teacher_student`` dataset, targets from the
same network at the planted W* (:func:`~gammatrace.data.synthetic.planted_teacher`).
Everything runs in float64.

Presets: ``paper`` (the report's Fig. 4 settings, every value with its :class:`Source`),
``extended`` (the settings used before issue 13: Li & Yuan-style spectral norms 0.5 / 4,
training to a loss of 1e-12), ``quick`` (a laptop run), ``quick-abs`` (``quick`` with the
literal ‖·‖₁ teacher, for comparison) and ``tiny`` (the tests).

Example:
    >>> cfg = run_config(PRESETS.get("tiny")(), CELLS[0], "w.pt")
    >>> cfg.dtype, cfg.data.name, cfg.model.name, cfg.reference.kind, cfg.reference.extra_epochs
    ('float64', 'teacher_student', 'teacher_student', 'file', 3)
    >>> paper = PRESETS.get("paper")()
    >>> paper.bounded_norm, paper.bounded_norm_kind, paper.unbounded_norm, paper.unbounded_norm_kind, paper.runs
    (0.1, 'spectral', 1.0, 'frobenius', 5)
    >>> str(SOURCES["paper"]["batch_size"])
    'not stated — 100, the batch size of the settings before (the report gives none)'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gammatrace.config import RunConfig
from gammatrace.errors import ConfigError
from gammatrace.experiments.identity.sources import Source, quote
from gammatrace.registry import Registry

PRESETS: Registry[Callable[[], Preset]] = Registry("identity-mapping preset")
NORM_SYMBOLS = {"spectral": "‖W*‖₂", "frobenius": "‖W*‖_F"}


@dataclass(frozen=True)
class Preset:
    """Sizes and hyper-parameters of one run of the study (units in comments).

    The defaults are the ``extended`` preset: the report's d, n, lr and batch with Li &
    Yuan-style spectral bounds and training to a loss of 1e-12.
    """

    d: int = 10  # input dimension; W is d×d
    n: int = 5000  # training samples
    batch_size: int = 100
    lr: float = 0.1  # SGD learning rate η (constant)
    max_epochs: int = 60  # cap of the horizon T
    target_loss: float | None = 1e-12  # T = first epoch whose full training loss is ≤ this; None: T = max_epochs
    continuation_epochs: int = 20  # E: θ_{T+E} is the continuation reference
    bounded_norm: float = 0.5  # ‖W*‖ of the bounded teacher (Li & Yuan: small)
    bounded_norm_kind: str = "spectral"  # which norm: spectral ‖·‖₂ or frobenius ‖·‖_F
    unbounded_norm: float = 4.0  # ‖W*‖ of the unbounded teacher
    unbounded_norm_kind: str = "spectral"
    output: str = "sum"  # teacher and student output: Σσ (the report's eq. (4)) or "abs", Σ|σ|
    init_scale: float = 0.1  # random init: W entries N(0, init_scale²/d)
    negative_slope: float = 0.25  # the PReLU slope a (fixed, not learned)
    runs: int = 1  # independent repeats per cell (seeds seed, seed+1, …): mean and spread over them
    seed: int = 0
    late_fraction: float = 0.1  # the "near the end" window: last 10% of the horizon's steps
    eps: float = 1e-20  # a loss gap ≤ eps leaves γ_k undefined (float64 round-off is ~1e-30 here)
    cells: tuple[str, ...] = ()  # names of the cells to run; () = all eight

    def __post_init__(self) -> None:
        if self.continuation_epochs < 1:
            raise ConfigError("continuation_epochs must be >= 1: the study compares against θ_{T+E}")
        if self.runs < 1:
            raise ConfigError(f"runs must be >= 1, got {self.runs}")
        for kind in (self.bounded_norm_kind, self.unbounded_norm_kind):
            if kind not in NORM_SYMBOLS:
                raise ConfigError(f"norm kind must be one of {sorted(NORM_SYMBOLS)}, got {kind!r}")

    def selected(self) -> tuple[Cell, ...]:
        """The cells this preset runs, in :data:`CELLS` order.

        Example:
            >>> [c.name for c in PRESETS.get("tiny")().selected()][:2]
            ['id-bounded-random', 'noid-bounded-random']
        """
        unknown = set(self.cells) - set(CELL_BY_NAME)
        if unknown:
            raise ConfigError(f"unknown cells {sorted(unknown)}; choose from {sorted(CELL_BY_NAME)}")
        return tuple(c for c in CELLS if not self.cells or c.name in self.cells)

    def seed_of(self, repeat: int) -> int:
        """The seed of repeat ``repeat`` (0-based) of a cell: teacher W*, inputs, init and batch order.

        Example:
            >>> PRESETS.get("paper")().seed_of(4)
            4
        """
        return self.seed + repeat


PAPER_PRESET = Preset(d=10, n=5000, batch_size=100, lr=0.1, max_epochs=10, target_loss=None,
                      bounded_norm=0.1, bounded_norm_kind="spectral", unbounded_norm=1.0,
                      unbounded_norm_kind="frobenius", output="sum", runs=5)
PRESETS.register("paper")(lambda: PAPER_PRESET)
PRESETS.register("extended")(lambda: Preset())  # the paper preset's settings before issue 13
PRESETS.register("quick")(lambda: Preset(n=1000, batch_size=20, max_epochs=30, continuation_epochs=10))
PRESETS.register("quick-abs")(lambda: replace(PRESETS.get("quick")(), output="abs"))
# For the test suite: seconds, not minutes, and the same code path — one cell that
# reaches W* (within 5% of the start's distance by T), one that reaches a permuted teacher,
# one that starts at the symmetric point (zero init without identity). Σσ converges more
# slowly than Σ|σ| (the PReLU's mean slope (1 + a)/2 couples the rows), hence lr 0.2 here.
PRESETS.register("tiny")(lambda: Preset(d=4, n=100, batch_size=5, lr=0.2, max_epochs=14, continuation_epochs=3,
                                        target_loss=1e-10, seed=0,
                                        cells=("id-bounded-random", "noid-bounded-random", "noid-bounded-zero")))

# Where each value of a paper preset comes from (the report prints it; a test finds every
# quoted phrase in ../shared/papers/). Training values the report does not state are
# "not stated" with the choice; the measurement's own settings are marked as such.
SOURCES: dict[str, dict[str, Source]] = {"paper": {
    "d": quote("random generalized input dataset of dimension $d = 10$"),
    "n": quote("and size of 5000"),
    "lr": quote("we set learning rate as 0.1"),
    "max_epochs": quote("epoch as 10", "T = 10 epochs exactly: no early stop at a target loss"),
    "target_loss": Source.not_stated("none: the report trains a fixed 10 epochs"),
    "bounded_norm": quote("= 0.1 and $\\|w^*\\|_F = 1$",
                          "‖W*‖₂ = 0.1 for the bounded teacher: both cannot hold at once for d = 10, "
                          "since ‖W‖_F ≤ √10·‖W‖₂ ≈ 0.32"),
    "bounded_norm_kind": quote("For the bound, we set $\\|w^*\\|_2$"),
    "unbounded_norm": quote("= 0.1 and $\\|w^*\\|_F = 1$", "‖W*‖_F = 1 for the teacher without the bound"),
    "unbounded_norm_kind": quote("= 0.1 and $\\|w^*\\|_F = 1$", "Frobenius"),
    "runs": quote("To avoid coincidence, we conducted each setting of experiments for 5 times"),
    "output": quote("L(W) = \\mathbb{E}_x[(\\sum_i(\\sigma(\\langle w_i + e_i, x \\rangle)",
                    "eq. (4): Σ_i σ(·), the sum eq. (1)'s ‖·‖₁ is defined as"),
    "activation": quote("share the same structure of 2-layer with PReLU activation"),
    "loss": quote("W via l_2 loss", "the mean squared error"),
    "optimizer": quote("SGD can converge to global minima", "plain SGD, no momentum"),
    "inputs": quote("x \\sim \\mathcal{N}(0, I)"),
    "batch_size": Source.not_stated("100, the batch size of the settings before (the report gives none)"),
    "negative_slope": Source.not_stated("0.25, PReLU's initial value (He et al. 2015); the teacher's slope too"),
    "learned_slope": Source.not_stated("not learned: with a learned slope SGD at lr 0.1 diverges here"),
    "init_scale": Source.not_stated("random init W_ij ~ N(0, 0.1²/d), i.e. ‖W_0‖₂ ≈ 0.2"),
    "seed": Source.not_stated("runs use seeds 0–4; each run draws its own teacher W*, inputs, init and "
                              "batch order (the report says only that it repeated each setting)"),
    "continuation_epochs": Source.not_stated("a measurement setting: θ_{T+E} with E = 20, for the "
                                             "continuation reference"),
    "late_fraction": Source.not_stated("a measurement setting: the last 10% of steps"),
    "eps": Source.not_stated("a measurement setting: γ_k undefined where the loss gap ≤ 1e-20"),
    "cells": Source.not_stated("all eight: the report's Fig. 4 shows identity on/off and bound on/off; "
                               "random and zero init (its Theorem: 'random/zero/standard all work') both run"),
}}


@dataclass(frozen=True)
class Cell:
    """One configuration: identity mapping on/off, bounded/unbounded ‖W*‖, random/zero init."""

    identity: bool
    bounded: bool
    init: str

    @property
    def name(self) -> str:
        return f"{'id' if self.identity else 'noid'}-{'bounded' if self.bounded else 'unbounded'}-{self.init}"

    def norm(self, preset: Preset) -> float:
        return preset.bounded_norm if self.bounded else preset.unbounded_norm

    def norm_kind(self, preset: Preset) -> str:
        return preset.bounded_norm_kind if self.bounded else preset.unbounded_norm_kind

    def label(self, preset: Preset) -> str:
        return (f"{'identity' if self.identity else 'no identity'}, "
                f"{NORM_SYMBOLS[self.norm_kind(preset)]}={self.norm(preset):g}, {self.init} init")


CELLS = tuple(Cell(i, b, init) for i in (True, False) for b in (True, False) for init in ("random", "zero"))
CELL_BY_NAME = {c.name: c for c in CELLS}
# The setting of Li & Yuan's convergence theorem: identity mapping, small ‖W*‖, random init.
MAIN_CELL = "id-bounded-random"


def run_name(cell: Cell, repeat: int) -> str:
    """The folder (and run name) of repeat ``repeat`` of a cell: the cell's name for the first.

    Example:
        >>> run_name(CELLS[0], 0), run_name(CELLS[0], 2)
        ('id-bounded-random', 'id-bounded-random-run2')
    """
    return cell.name if repeat == 0 else f"{cell.name}-run{repeat}"


def planted_args(preset: Preset, cell: Cell, repeat: int = 0) -> dict:
    """The keyword arguments of :func:`~gammatrace.data.synthetic.planted_teacher` for a repeat.

    Example:
        >>> planted_args(PRESETS.get("paper")(), CELL_BY_NAME["noid-unbounded-zero"], 1)
        {'dim': 10, 'norm_bound': 1.0, 'seed': 1, 'identity': False, 'norm': 'frobenius'}
    """
    return {"dim": preset.d, "norm_bound": cell.norm(preset), "seed": preset.seed_of(repeat),
            "identity": cell.identity, "norm": cell.norm_kind(preset)}


def run_config(preset: Preset, cell: Cell, planted: str | Path, repeat: int = 0) -> RunConfig:
    """The engine's config of one repeat of a cell: float64, plain SGD, one thread, θ* = the file ``planted``.

    The horizon T is the first epoch whose full training loss is ≤ ``target_loss`` (or
    ``max_epochs``; exactly ``max_epochs`` when ``target_loss`` is None); the run trains
    ``continuation_epochs`` beyond it for θ_{T+E}. The random init is the model's own
    (N(0, init_scale²/d) entries); the zero init is the ``zero`` scheme of the init
    registry. Repeat ``repeat`` uses seed ``preset.seed_of(repeat)`` for everything.

    Example:
        >>> cfg = run_config(PRESETS.get("quick")(), CELL_BY_NAME["noid-unbounded-zero"], "w.pt")
        >>> cfg.model.init, cfg.data.switches()["norm_bound"], cfg.optim.lr, cfg.batch_size
        ('zero', 4.0, 0.1, 20)
        >>> cfg = run_config(PRESETS.get("paper")(), CELL_BY_NAME["id-unbounded-random"], "w.pt", repeat=3)
        >>> cfg.seed, cfg.data.switches()["norm"], cfg.data.switches()["output"], cfg.epochs, cfg.target_loss
        (3, 'frobenius', 'sum', 10, None)
    """
    seed = preset.seed_of(repeat)
    return RunConfig.model_validate({
        "name": run_name(cell, repeat), "seed": seed, "threads": 1, "dtype": "float64",
        "data": {"name": "teacher_student", "num_train": preset.n, "dim": preset.d, "norm_bound": cell.norm(preset),
                 "norm": cell.norm_kind(preset), "identity": cell.identity, "negative_slope": preset.negative_slope,
                 "output": preset.output, "seed": seed, "dtype": "float64"},
        "model": {"name": "teacher_student", "identity": cell.identity, "activation": "leaky_relu",
                  "activation_options": {"negative_slope": preset.negative_slope}, "output": preset.output,
                  "init": "default" if cell.init == "random" else cell.init, "init_scale": preset.init_scale},
        "loss": "mse", "optim": {"name": "sgd", "lr": preset.lr},
        "epochs": preset.max_epochs, "batch_size": preset.batch_size, "target_loss": preset.target_loss,
        "reference": {"kind": "file", "path": str(planted), "extra_epochs": preset.continuation_epochs},
        # One weight tensor (no per-tensor shares to speak of); per-sample convergence is not studied here.
        "analysis": {"eps": preset.eps, "per_tensor": False, "per_sample": False},
    })


def align_to_teacher(W: np.ndarray, W_star: np.ndarray, identity: bool) -> tuple[np.ndarray, np.ndarray]:
    """The permuted teacher nearest to W: (perm, W_Π) with rows of the effective weight matched.

    The effective weight is I + W with the identity mapping, W without; permuting its
    rows permutes the hidden units, which the sum Σ_i σ(·)_i does not see, so W_Π is a
    global minimizer exactly as W* is. The matching is the optimal assignment of rows
    (squared distance), so W_Π is the nearest of the d! equivalent minimizers.

    Example:
        >>> Ws = np.diag([1.0, 2.0])
        >>> perm, Wp = align_to_teacher(Ws[::-1].copy(), Ws, identity=False)
        >>> perm.tolist(), Wp.tolist()
        ([1, 0], [[0.0, 2.0], [1.0, 0.0]])
    """
    # scipy is costly to import and needed only here
    from scipy.optimize import linear_sum_assignment

    eye = np.eye(len(W)) if identity else np.zeros_like(W)
    A, B = W + eye, W_star + eye
    cost = ((A[:, None, :] - B[None, :, :]) ** 2).sum(-1)
    _, perm = linear_sum_assignment(cost)
    return perm, B[perm] - eye


def row_spread(W: np.ndarray) -> float:
    """How different the hidden units are: ‖W − 1·w̄ᵀ‖_F / ‖W‖_F, w̄ the mean row (0 when
    every row is the same, as a zero init without the identity mapping keeps them; NaN at W = 0).

    Example:
        >>> row_spread(np.ones((3, 2))), round(row_spread(np.eye(2)), 3)
        (0.0, 0.707)
    """
    norm = float(np.linalg.norm(W))
    return float(np.linalg.norm(W - W.mean(axis=0, keepdims=True)) / norm) if norm > 0 else float("nan")
