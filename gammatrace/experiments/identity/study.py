"""Running the identity-mapping study on the engine: every cell is an ordinary run
(pass 1 trains and finds the horizon T; pass 2 replays it, verified step by step, once per
reference), then the analysis, the figures and the report.

Per cell and repeat, below ``out/<cell>/`` (the first repeat) or ``out/<cell>-run<r>/``:

- ``planted.pt`` — W* as a state dict of the student, written *before* training: the
  run's reference (``reference.kind: file``);
- ``run/`` — the engine's run folder (DESIGN §4), analysed against four references:
  ``planted`` (W*), ``found`` (the permuted teacher the run reached, written to
  ``found.pt`` after pass 1 when it is not W* itself), ``last`` (θ_T) and
  ``continuation`` (θ_{T+E}); the engine names a file reference after the file and its
  content (``file-planted-<hash>``), recorded as ``run_references`` in the summary. The one-point strong convexity δ_k against W* and against
  the minimizer reached is the replay's step hook
  (:class:`~gammatrace.engine.hooks.OnePointConvexity`), stored as
  ``analysis/<reference>/one_point/``.

Every reference is measured by a verified replay of the one recorded trajectory: each
replayed step's loss and each epoch's end state must equal pass 1's bit for bit, or
:class:`~gammatrace.engine.replay.ReplayMismatchError` stops the study. A rerun with the
same ``out`` resumes: finished runs and replays are kept.

Example:
    >>> summary = run_identity_mapping("out/im", preset="quick", workers=2)  # a long training (minutes)  # doctest: +SKIP
    >>> summary.name  # doctest: +SKIP
    'summary.md'
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from gammatrace.analysis import analyze
from gammatrace.data.synthetic import planted_teacher
from gammatrace.engine.hooks import OnePointConvexity
from gammatrace.engine.replay import replay
from gammatrace.engine.session import build_session
from gammatrace.engine.trainer import train_pass
from gammatrace.errors import UserError
from gammatrace.executors import make_executor
from gammatrace.experiments.identity.figures import (
    FIGURES,
    figure_loss_distance,
    figure_one_point,
    figure_references,
)
from gammatrace.experiments.identity.problem import (
    PRESETS,
    Cell,
    Preset,
    align_to_teacher,
    planted_args,
    row_spread,
    run_config,
    run_name,
)
from gammatrace.experiments.identity.report import report_blocks, study_folder, write_text_inside
from gammatrace.experiments.identity.summary import (
    REACHED,
    headline,
    loss_distance_curves,
    summarize_cell,
    summarize_repeats,
)
from gammatrace.reporting.document import to_html, to_markdown
from gammatrace.store.backend import inside
from gammatrace.store.run import Run, RunStore, Status

PLANTED_FILE, FOUND_FILE = "planted.pt", "found.pt"
# The probe's measured columns: what the analysis derives γ from.
RAW_COLUMNS = ["step", "epoch", "lr", "loss", "loss_ref", "progress", "dist_sq", "update_sq", "grad_dot", "grad_sq"]


@contextmanager
def _callers_threads() -> Iterator[None]:
    # The engine sets the run's thread count (part of the trajectory's identity); the
    # process that called the study gets its own back.
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _weight(state: dict[str, torch.Tensor]) -> np.ndarray:
    return state["linear.weight"].double().numpy()


def _epoch_table(run: Run, W_star: np.ndarray, W_found: np.ndarray | None) -> pd.DataFrame:
    """Full training loss, ‖W − W*‖_F and ‖W − Π·W*‖_F (NaN when the run reached no
    minimizer) at the start of every epoch 0..T (row T is θ_T)."""
    sess = build_session(run.config)
    rows = []
    for e in range(run.meta.horizon_epochs + 1):
        sess.load_state(run.store.read_torch(run.store.checkpoint(e)))
        W = _weight(sess.model.state_dict())
        rows.append({"epoch": e, "train_loss": sess.evaluate()["train_loss"],
                     "w_dist": float(np.linalg.norm(W - W_star)),
                     "found_dist": float(np.linalg.norm(W - W_found)) if W_found is not None else np.nan})
    return pd.DataFrame(rows)


def _measure(run: Run, reference: str | None, hooks: tuple = ()) -> str:
    """Replay against ``reference`` (with ``hooks``) and analyse; returns the engine's name of it."""
    name = replay(run.path, reference, hooks=hooks, progress=False)
    # A stalled run has D_0 = 0 against its own θ_T: its ratios are NaN (counted in the
    # summaries), which numpy would also announce as warnings.
    with np.errstate(divide="ignore", invalid="ignore"):
        analyze(run.path, reference, progress=False)
    return name


def run_cell(preset: Preset, cell: Cell, out: str | Path, repeat: int = 0) -> dict[str, Any]:
    """Train and measure one repeat of a cell below ``out/<run_name>/`` (a top-level task
    for the executors); repeat r uses seed ``preset.seed_of(r)`` for the teacher, the
    inputs, the init and the batch order.

    Pass 1 trains to the horizon T and E epochs beyond; the minimizer the run reached is
    read off θ_{T+E} (:func:`~gammatrace.experiments.identity.problem.align_to_teacher`);
    pass 2 replays the first T epochs against W*, the minimizer reached (when it is not
    W* itself), θ_T and θ_{T+E}, with δ_k against the first two.

    Example:
        >>> from gammatrace.experiments.identity.problem import CELLS
        >>> out = run_cell(PRESETS.get("tiny")(), CELLS[0], "out/im")  # a long training (seconds)  # doctest: +SKIP
        >>> sorted(out["steps"])  # doctest: +SKIP
        ['continuation', 'found', 'last', 'planted']
    """
    t0 = time.perf_counter()
    # the cell's folder and its run: never a symbolic link planted in the study's folder
    folder = inside(Path(out).resolve(), f"{run_name(cell, repeat)}/run", what="the study folder").parent
    files = RunStore(folder)
    cfg = run_config(preset, cell, files.path(PLANTED_FILE), repeat)
    with _callers_threads():
        student = build_session(cfg).model
        W_star = planted_teacher(**planted_args(preset, cell, repeat))
        files.write_torch(PLANTED_FILE, student.reference_state(W_star))
        run = train_pass(cfg, folder / "run", progress=False)
        if run.status == Status.DIVERGED:
            raise UserError(f"{cell.name}: training diverged ({run.meta.error}); see {run.path}")
        W_star = W_star.double().numpy()
        W0 = _weight(run.store.read_torch(run.store.checkpoint(0))["model"])
        W_final = _weight(run.store.read_torch(RunStore.FINAL)["model"])
        W_cont = _weight(run.store.read_torch(RunStore.REFERENCE)["model"])
        perm, W_found = align_to_teacher(W_cont, W_star, cell.identity)
        # "Reached" is judged against the permuted teacher nearest to θ_{T+E}: a run that
        # stalls (zero init without identity) reaches none and has no exact θ*.
        reached = bool(np.linalg.norm(W_cont - W_found) <= REACHED * np.linalg.norm(W0 - W_found))

        one_point = (OnePointConvexity,)
        measured = {"planted": _measure(run, None, one_point)}
        if reached and np.array_equal(perm, np.arange(len(perm))):
            measured["found"] = measured["planted"]
        elif reached:
            files.write_torch(FOUND_FILE, student.reference_state(torch.from_numpy(W_found)))
            measured["found"] = _measure(run, str(files.path(FOUND_FILE)), one_point)
        for name in ("last", "continuation"):
            measured[name] = _measure(run, name)
        run = Run(run.path)
        epochs = _epoch_table(run, W_star, W_found if reached else None)
    steps = {name: run.steps(ref)[RAW_COLUMNS] for name, ref in measured.items()}
    delta = {name: run.store.read_shards(RunStore.analysis(measured[name], OnePointConvexity.name))
             for name in ("planted", "found") if name in measured}
    return {"cell": cell.name, "repeat": repeat, "run": str(run.path), "run_references": measured, "steps": steps,
            "delta": {k: v[["step", "epoch", "delta"]] for k, v in delta.items()},
            "horizon": run.meta.horizon_epochs, "steps_per_epoch": run.meta.steps_per_epoch, "epochs": epochs,
            "perm": perm.tolist(), "found_reached": reached,
            "found_dist_final": float(np.linalg.norm(W_final - W_found)),
            "found_dist_initial": float(np.linalg.norm(W0 - W_found)),
            "row_spread_final": row_spread(W_final), "seconds": time.perf_counter() - t0}


def run_identity_mapping(out: str | Path, preset: str = "quick", workers: int = 1, progress: bool = True,
                         executor: str = "local") -> Path:
    """Run the study: every cell (in parallel over ``workers``), figures, report, JSON.

    Args:
        out: output folder (figures, summary.md, report.html, identity_mapping.json, one run per cell)
        preset: the cells and training settings
        workers: cells run in parallel processes
        progress: show progress bars
        executor: where the cells run: local processes or a Ray cluster

    Every cell runs ``runs`` times (the preset's); the per-cell numbers, the γ analysis and
    the sentence are the first repeat's, the convergence table and Fig. 4 show the mean
    and the spread (min–max) over all. Writes ``fig4_loss_distance.png``,
    ``one_point_convexity.png``, ``gamma_references.png``, ``summary.md``, ``report.html``
    and ``identity_mapping.json`` (every number, the curves drawn, the headline numbers and
    the sentence) into ``out``, the cells' runs below it; returns the path of ``summary.md``.

    Example:
        >>> import json
        >>> path = run_identity_mapping("out/im", preset="quick", workers=2)  # a long training (minutes)  # doctest: +SKIP
        >>> json.loads((path.parent / "identity_mapping.json").read_text())["headline"]["sentence"]  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    pre = PRESETS.get(preset)()
    out = study_folder(out, [*(f"{run_name(cell, r)}/run" for cell in pre.selected() for r in range(pre.runs)),
                             *FIGURES, "summary.md", "report.html", "identity_mapping.json"], progress)
    tasks = [(pre, cell, str(out), r) for cell in pre.selected() for r in range(pre.runs)]
    done = make_executor(executor, workers=workers).map(run_cell, tasks, desc="identity-mapping cells",
                                                        progress=progress)
    repeats: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(done, key=lambda r: r["repeat"]):
        repeats.setdefault(r["cell"], []).append(r)
    results = {name: rs[0] for name, rs in repeats.items()}
    summaries = {}
    for name, rs in repeats.items():
        each = [summarize_cell(r, pre) for r in rs]
        summaries[name] = {**each[0], "repeats": summarize_repeats(each)}
    head = headline(summaries, pre)
    curves = loss_distance_curves(repeats)
    figures = [figure_loss_distance(curves, pre, out), figure_one_point(summaries, pre, out),
               figure_references(results, summaries, pre, out)]
    wall = time.perf_counter() - t0
    RunStore(out).write_json("identity_mapping.json", {"preset": preset, "settings": asdict(pre), "wall_seconds": wall,
                                                       "headline": head, "cells": summaries, "curves": curves})
    blocks = report_blocks(summaries, head, pre, preset, wall, [p.name for p in figures])
    write_text_inside(out, "summary.md", to_markdown(blocks))
    write_text_inside(out, "report.html", to_html(blocks, title="Identity mapping: a teacher–student problem", base=out))
    if progress:
        print(head["sentence"], file=sys.stderr)
    return out / "summary.md"
