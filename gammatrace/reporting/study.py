"""The report of a study: claim checks, a table per run, a null baseline, figures per group.

A study folder holds ``study.json`` (cells, groups, seeds, claims; the typed
:class:`~gammatrace.store.study.StudyMeta`, written by
:func:`gammatrace.experiments.study.run_study`) beside one folder per run. This module
turns the runs' own summaries and step tables into:

- the **claim check**: for each claim, the cells' median γ_k (averaged over seeds)
  under θ* = θ_T *and* under the continuation reference, their convergence speed
  (epochs to the target loss, or the final loss), the measured orderings, Spearman ρ
  and a plain verdict — all from :mod:`gammatrace.reporting.claims`, the rule the
  report of plain runs uses too. γ_eff is never the γ of a claim: with θ* = θ_T it is
  a function of the losses (DESIGN §1);
- a table per run (certified γ_min, fraction γ_k > 0, γ_eff labelled loss-determined,
  monotone-distance violations, rate-bound tightness, epochs to a loss threshold,
  final train/test numbers, flags);
- a null baseline for alignment (:func:`~gammatrace.reporting.claims.null_baseline`).

Example:
    >>> from gammatrace.reporting.collect import example_entry
    >>> last = [example_entry(n, g, [1, loss]) for n, g, loss in [("a", 0.3, 0.10), ("b", 0.2, 0.11), ("c", 0.1, 0.12)]]
    >>> meta = StudyMeta(study="s", runs={e.run.path.name: e.label for e in last},  # run folder -> cell
    ...                  claims=[Claim("a first", ["a", "b", "c"])])
    >>> blocks = claim_blocks(meta.claims[0], study_runs(meta, last, cont=[]))
    >>> blocks[-1].rows[0][-1], blocks[-1].rows[1][-1]
    ('consistent (ρ(claimed order, γ) = 1, ρ(γ, speed) = 1)', 'inconclusive (cells excluded: a, b, c)')
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gammatrace.principles.claims import RHO_MIN, RunPoint, check_claim
from gammatrace.reporting.claims import (
    LOSS_RATIO_LIMIT,
    convergence,
    end_point_problem,
    epochs_to,
    null_baseline,
    run_point,
    target_of,
    threshold_of,
)
from gammatrace.reporting.collect import RunEntry, num
from gammatrace.reporting.content import GAMMA_EFF_LOSS_LABEL
from gammatrace.reporting.document import MISSING, Block, Bullets, Heading, Table, Text, fmt
from gammatrace.store.run import Run, StoreError
from gammatrace.store.study import Claim, StudyMeta

REFERENCES = {"last": "θ* = θ_T (last iterate)", "continuation": "continuation θ* (trained beyond the horizon)"}


def find_study(runs: Sequence[Any]) -> Path | None:
    """``study.json`` of the folder holding every run, when each run is one of its runs.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> StudyMeta(study="activation", runs={"relu-s0": "relu", "tanh-s0": "tanh"}).write(folder)
        >>> find_study([folder / "relu-s0", folder / "tanh-s0"]) == folder / "study.json"
        True
        >>> print(find_study([folder / "relu-s0", folder / "other"]))  # not a run of the study
        None
    """
    paths = [Path(r.path if isinstance(r, Run) else r).resolve() for r in runs]
    parents = {p.parent for p in paths}
    if len(parents) != 1:
        return None
    candidate = StudyMeta.path(parents.pop())
    if not candidate.is_file():
        return None
    try:
        names = set(StudyMeta.load(candidate).runs)
    except StoreError:  # a damaged study.json: report the runs plainly
        return None
    return candidate if all(p.name in names for p in paths) else None


# ----------------------------------------------------------------------- study runs
@dataclass(eq=False)
class StudyRun:
    """A run of the study with both references' entries and its place in the grid."""

    name: str
    cell: str
    group: str
    last: RunEntry
    cont: RunEntry | None

    def entry(self, ref: str) -> RunEntry | None:
        return self.last if ref == "last" else self.cont

    def point(self, ref: str, conv: float) -> RunPoint:
        # The flags that exclude a run come from its training: the same for every reference.
        return run_point(self.entry(ref), conv, run=self.name, cell=self.cell, trained=self.last, reference=ref)


def claim_blocks(claim: Claim, runs: Sequence[StudyRun], heading_level: int = 3) -> list[Block]:
    """The claim's section: per-cell table, orderings, and the verdict for both references.

    The verdict is :func:`~gammatrace.principles.claims.check_claim` over the claim's
    runs (:func:`~gammatrace.reporting.claims.run_point`), inconclusive when the runs
    that may be compared end at losses too far apart
    (:func:`~gammatrace.reporting.claims.end_point_problem`). Example: see the module.
    """
    order = list(claim.order)
    mine = [r for r in runs if r.cell in order]
    convs = convergence([r.last for r in mine])
    conv = dict(zip((r.name for r in mine), convs.values, strict=True))
    conv_text = convs.text
    apart = end_point_problem([r.last for r in mine])
    results = {ref: check_claim(order, [r.point(ref, conv[r.name]) for r in mine], incomparable=apart)
               for ref in REFERENCES}
    title = claim.text + (f" — {claim.group}" if claim.group else "")
    blocks: list[Block] = [Heading(title, heading_level)]

    def per_cell(ref: str, key: str, cell: str) -> str:
        vals = [num(r.entry(ref).summary.get(key)) for r in mine
                if r.cell == cell and r.entry(ref) is not None and r.entry(ref).analysed]
        vals = [v for v in vals if math.isfinite(v)]
        if not vals:
            return MISSING
        if len(vals) == 1:
            return fmt(vals[0])
        return f"{fmt(float(np.mean(vals)))} [{fmt(min(vals), 3)}, {fmt(max(vals), 3)}]"

    rows = []
    for rank, cell in enumerate(order, 1):
        cells_runs = [r for r in mine if r.cell == cell]
        cv = [conv[r.name] for r in cells_runs]
        if not cv:
            cv_text = MISSING
        elif not np.isfinite(cv).all():
            cv_text = "not reached"
        elif len(cv) == 1:
            cv_text = fmt(cv[0])
        else:
            cv_text = f"{fmt(float(np.mean(cv)))} [{fmt(min(cv), 3)}, {fmt(max(cv), 3)}]"
        why = results["last"].excluded.get(cell) or results["continuation"].excluded.get(cell) or ""
        rows.append([cell, str(rank), str(len(cells_runs)), per_cell("last", "gamma_median", cell),
                     per_cell("continuation", "gamma_median", cell), per_cell("last", "gamma_frac_positive", cell),
                     per_cell("last", "gamma_min", cell), cv_text, why or "—"])
    blocks.append(Table(["cell", "claimed rank", "runs", "median γ_k, θ* = θ_T", "median γ_k, continuation θ*",
                         "fraction γ_k > 0", "certified γ_min", conv_text.split(" (")[0], "excluded"], rows))
    items = []
    for ref, label in REFERENCES.items():
        r = results[ref]
        items.append(f"by median γ_k, {label}: " + (" > ".join(r.gamma_order) or "no comparable cell"))
    items.append(f"by convergence, {conv_text}: " + (" > ".join(results["last"].speed_order) or "no comparable cell"))
    blocks.append(Bullets(items))
    blocks.append(Table(["reference point", "ρ(claimed order, median γ_k) over cells",
                         "ρ(median γ_k, convergence speed) over runs", "runs", "verdict"],
                        [[label, fmt(results[ref].rho_claim, 3), fmt(results[ref].rho_speed, 3),
                          str(results[ref].n_runs), results[ref].text] for ref, label in REFERENCES.items()]))
    return blocks


def claim_check_blocks(info: StudyMeta, runs: Sequence[StudyRun]) -> list[Block]:
    """The "Claim check" section: the rules in words, then every claim."""
    blocks: list[Block] = [Heading("Claim check", 2), Text(
        "γ of a cell = the median of its per-step γ_k, averaged over its seeds (min–max in brackets). γ_eff is "
        "not used here: with θ* = θ_T it is a function of the losses alone (see below). Each claim is checked "
        "with θ* = θ_T and with the continuation reference θ* (trained beyond the analysed horizon, so the "
        "telescoping does not close), side by side. Convergence speed: epochs to the common target loss, or the "
        f"final train loss without one. Verdict: consistent when ρ(claimed order, γ) ≥ {RHO_MIN:g} and ρ(γ, "
        f"speed) ≥ {RHO_MIN:g}; not consistent when either is ≤ −{RHO_MIN:g}; inconclusive when a cell of the "
        "claim has a run that is excluded (no progress, missed target, diverged, not analysed), fewer than 3 "
        f"cells are comparable, the final train losses of the comparable runs differ by more than "
        f"{LOSS_RATIO_LIMIT:g}×, the seeds' γ ranges of cells adjacent in the claim overlap, or the correlation "
        "is weak. The report of runs outside a study applies the same rule.")]
    if not info.claims:
        return blocks + [Text("This study states no claim.")]
    for claim in info.claims:
        blocks += claim_blocks(claim, runs)
    return blocks


def runs_table(runs: Sequence[StudyRun]) -> list[Block]:
    """One row per run: the numbers the papers report and the flags that qualify them."""
    blocks: list[Block] = []
    groups: dict[str, list[StudyRun]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    notes = []
    rows = []
    for group, members in groups.items():
        thr, how = threshold_of([r.last for r in members])
        notes.append(f"{group}: loss threshold {how}")
        for r in members:
            e, s = r.last, r.last.summary or {}
            c = r.cont.summary if r.cont is not None and r.cont.analysed else {}
            flags = []
            if e.diverged:
                flags.append(f"diverged at step {e.diverged_at_step}")
            elif not e.analysed:
                flags.append("not analysed")
            if e.no_progress:
                flags.append("no progress")
            if target_of(e) is not None and e.run.meta.reached_target is False:
                flags.append("missed target")
            mse = e.run.config.loss == "mse"
            test = e.final("test_loss" if mse else "test_acc")
            rows.append([r.name, r.cell, group, ", ".join(flags) or "—", fmt(e.n_epochs), fmt(epochs_to(e, thr)),
                         fmt(e.final_train_loss), fmt(e.final("train_loss" if mse else "train_acc")),
                         (f"MSE {fmt(test)}" if mse else fmt(test)) if math.isfinite(test) else MISSING,
                         fmt(s.get("gamma_min")), fmt(s.get("gamma_frac_positive")), fmt(s.get("gamma_median")),
                         fmt(c.get("gamma_median")), fmt(s.get("gamma_eff")), fmt(s.get("dist_n_increase")),
                         fmt(s.get("rate_tightness"))])
    blocks.append(Table(["run", "cell", "group", "flags", "epochs", "epochs to threshold", "final train loss",
                         "final train acc / MSE", "final test acc / MSE", "certified γ_min", "fraction γ_k > 0",
                         "median γ_k", "median γ_k (continuation)", GAMMA_EFF_LOSS_LABEL, "d_k increases",
                         "rate tightness (actual / bound)"], rows))
    blocks.append(Text("γ numbers use θ* = θ_T unless marked continuation; γ_eff is the loss-determined identity "
                       "of DESIGN §1, shown for reference only. Loss thresholds: " + "; ".join(notes) + "."))
    return blocks


# ------------------------------------------------------------------------ null baseline
def null_blocks(runs: Sequence[StudyRun]) -> list[Block]:
    rows = []
    for r in runs:
        if not r.last.analysed:
            continue
        b = null_baseline(r.last)
        rows.append([r.name, fmt(b["cos_mean"]), fmt(b["cos_null_sd"]), fmt(b["cos_z"], 3), fmt(b["frac_progress"]),
                     fmt(b["frac_progress_null"])])
    return [Heading("Null baseline for alignment", 2), Text(
        "Real updates against random directions of the same norm (θ* = θ_T). A random direction has cos_align "
        "of mean 0 and standard deviation ≈ 1/√n (n parameters); z = mean cos_align / (1/√(nT)) over the T steps. "
        "A random step of length ‖Δ_k‖ from θ_k decreases the distance to θ* (P_k > 0) only when its cosine "
        "exceeds ‖Δ_k‖/(2d_k): the null fraction is that probability, computed exactly (Beta law of the cosine) "
        "from each step's stored d_k² and ‖Δ_k‖², averaged over the steps — not sampled."),
        Table(["run", "mean cos_align", "null sd of one step (1/√n)", "z vs null", "fraction P_k > 0",
               "fraction P_k > 0, random direction (exact)"], rows)]


# ---------------------------------------------------------------------------- assembly
def study_runs(info: StudyMeta, last: Sequence[RunEntry], cont: Sequence[RunEntry]) -> list[StudyRun]:
    """The runs of a study: each θ_T entry with its continuation entry (matched by run
    folder name), and its cell and group from ``study.json``. Example: see the module."""
    by_name = {e.run.path.name: e for e in cont}
    return [StudyRun(e.run.path.name, info.cell(e.run.path.name), info.group(e.run.path.name), e,
                     by_name.get(e.run.path.name)) for e in last]


def safe_stem(text: str) -> str:
    """A file-name-safe stem for a group name.

    Example:
        >>> safe_stem("resnet18 / cifar10")
        'resnet18_cifar10'
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "group"


def cells_of_group(runs: Sequence[StudyRun], group: str) -> dict[str, list[RunEntry]]:
    out: dict[str, list[RunEntry]] = {}
    for r in runs:
        if r.group == group:
            out.setdefault(r.cell, []).append(r.last)
    return out
