"""Everything the report shows about one run, read once from disk.

A run that cannot be analysed (diverged, still training, no analysis for the asked
reference) is still an entry: it is listed and flagged, only its measured tables are
empty. Nothing here computes a new number the analysis did not; the report shows the
runs' own summaries.

Example (:func:`example_entry` writes a run folder with no analysis on disk):
    >>> entries = collect([example_entry("relu").run.path, example_entry("tanh", analysed=False).run])
    >>> [(e.label, e.status_text, e.analysed, e.summary) for e in entries]
    [('relu', 'complete (not analysed)', False, None), ('tanh', 'trained (not analysed)', False, None)]
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from gammatrace import principles as P
from gammatrace.analysis import load_hook_table
from gammatrace.config import RunConfig
from gammatrace.reporting.document import fmt
from gammatrace.store.run import Run, RunMeta, RunStore, Status, StoreError


@dataclass(eq=False)  # identity: entries hold DataFrames, which have no truth value
class RunEntry:
    """One run as the report sees it.

    ``summary`` is None when the run has no analysis for the reference (then
    ``problem`` says why); ``steps``/``layers`` are empty frames when absent.
    """

    label: str
    run: Run
    summary: dict[str, Any] | None
    problem: str | None
    steps: pd.DataFrame = field(default_factory=pd.DataFrame)
    epochs: pd.DataFrame = field(default_factory=pd.DataFrame)
    layers: pd.DataFrame = field(default_factory=pd.DataFrame)
    layers_note: str | None = None
    window: int | None = None  # cut to its first ``window`` epochs for a claim (:meth:`first_epochs`)
    # The curvature step-hook table (analysis/<ref>/curvature/, one row per measured step):
    # empty when the run's config has no curvature block.
    curvature: pd.DataFrame = field(default_factory=pd.DataFrame)
    # RSI and EB of the evaluation-subset loss at epoch ends (analysis/<ref>/subset_secant/,
    # :class:`~gammatrace.engine.hooks.SubsetSecant`): empty without a curvature block.
    secant: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def analysed(self) -> bool:
        return self.summary is not None

    @property
    def diverged(self) -> bool:
        return self.run.status == "diverged"

    @property
    def diverged_at_step(self) -> int | None:
        step = self.run.meta.diverged_at_step
        return int(step) if step is not None else None

    @property
    def no_progress(self) -> bool:
        return bool(self.summary and self.summary.get("no_progress"))

    @property
    def status_text(self) -> str:
        if self.diverged:
            return f"diverged at step {self.diverged_at_step}"
        if self.problem:
            return f"{self.run.status} (not analysed)"
        return self.run.status

    @property
    def steps_per_epoch(self) -> int | None:
        spe = self.run.meta.steps_per_epoch
        if spe:
            return int(spe)
        if len(self.steps) and "epoch" in self.steps:
            # Older runs without the field: the first epoch's row count.
            return int((self.steps["epoch"] == self.steps["epoch"].iloc[0]).sum())
        return None

    def final(self, column: str) -> float:
        """``train_loss``/``test_acc``/… after the last analysed epoch (NaN if never measured).

        From the summary when analysed, else from the epochs table, so a run that was
        never analysed still shows where it got to.
        """
        if self.summary and _finite(self.summary.get(column)):
            return float(self.summary[column])
        main = main_epochs(self)
        if len(main) and column in main:
            return float(main[column].iloc[-1])
        return math.nan

    @property
    def final_train_loss(self) -> float:
        """The full training loss after the last epoch; where none was measured (a run of the
        user's own loop: :func:`gammatrace.save_run`), the mean batch loss of its last epoch —
        :attr:`final_loss_kind` says which, and every place that shows it says so too."""
        full = self.final("train_loss")
        return full if math.isfinite(full) else self.final("mean_batch_loss")

    @property
    def final_loss_kind(self) -> str | None:
        """What :attr:`final_train_loss` is: ``FULL_LOSS``, ``MEAN_BATCH_LOSS``, or None when unknown.

        Example:
            >>> e = example_entry("mine", analysed=False)
            >>> e.epochs = e.epochs.rename(columns={"train_loss": "mean_batch_loss"})
            >>> e.final_train_loss, e.final_loss_kind, final_loss_text(e)
            (0.12, 'mean batch loss', '0.12 (mean batch loss of the last epoch)')
        """
        if math.isfinite(self.final("train_loss")):
            return FULL_LOSS
        return MEAN_BATCH_LOSS if math.isfinite(self.final("mean_batch_loss")) else None

    @property
    def analysis_options(self) -> str | None:
        """What the analysis' summaries leave out or assume, in words (None: every step, ℓ_inf = 0):
        the tail (``analyze --tail``) and ℓ_inf (``--ell-inf``). Every table and figure that
        shows a number of such a summary says so.

        Example:
            >>> e = example_entry("relu")
            >>> e.summary.update(tail=28, n_steps_total=140, ell_inf=0.5)
            >>> e.analysis_options
            'steps 0–111 of 140 (the last 28 left out: --tail 28); ℓ_inf = 0.5 (--ell-inf)'
        """
        if not self.summary:
            return None
        tail, ell_inf, parts = int(self.summary.get("tail") or 0), num(self.summary.get("ell_inf")), []
        if tail:
            total = self.summary.get("n_steps_total")
            total = int(total) if total is not None else len(self.steps)
            parts.append(f"steps 0–{total - tail - 1} of {total} (the last {tail} left out: --tail {tail})")
        if math.isfinite(ell_inf) and ell_inf != 0:
            parts.append(f"ℓ_inf = {ell_inf:g} (--ell-inf)")
        return "; ".join(parts) or None

    @property
    def analysed_steps(self) -> str:
        """The steps (and options) the summary's numbers are over, for a table cell.

        Example:
            >>> example_entry("relu").analysed_steps
            'all 3 steps'
        """
        if not self.summary:
            return "—"
        total = self.summary.get("n_steps_total")
        return self.analysis_options or f"all {int(total) if total is not None else len(self.steps)} steps"

    @property
    def n_epochs(self) -> int | None:
        if self.summary and self.summary.get("epochs") is not None:
            return int(self.summary["epochs"])
        done = self.run.meta.epochs_done
        return int(done) if done is not None else None

    @cached_property  # read by the runs table and the figure; the steps do not change
    def gradient_collapse(self) -> int | None:
        """The epoch where the gradients collapsed (:func:`~gammatrace.principles.gradients.gradient_collapse`;
        paper 002's "vanishing gradient"), None when they did not or were not recorded."""
        if not len(self.steps) or "grad_sq" not in self.steps or "loss" not in self.steps:
            return None
        return P.gradient_collapse(self.steps.sort_values("step"))

    def first_epochs(self, n: int) -> RunEntry:
        """This run as a claim stated over its first ``n`` epochs sees it: the steps and
        epochs of epochs 0 … n − 1 (after the analysis' excluded tail), the summary's γ
        statistics (``gamma_*``, ``gamma_rp_*``: :func:`~gammatrace.principles.certify`)
        recomputed over them. θ* is unchanged (each reference's own), and so are the
        run's final train loss and epochs: the end point the γ's are measured against.

        Example:
            >>> import pandas as pd
            >>> e = example_entry("relu", losses=[2.0, 1.0, 0.5])
            >>> e.summary = {"gamma_median": 9.0, "tail": 0, "epochs": 3}
            >>> e.steps = pd.DataFrame({"step": range(5), "epoch": [0, 0, 1, 1, 2],
            ...                         "gamma": [1.0, 2.0, 3.0, 5.0, 9.0], "gamma_rp": [1.0] * 5})
            >>> w = e.first_epochs(2)
            >>> w.summary["gamma_median"], len(w.steps), len(w.epochs), w.n_epochs, w.window
            (2.5, 4, 2, 3, 2)
        """
        if n < 1:
            raise ValueError(f"a claim window needs at least one epoch, got {n}")
        if not self.analysed:
            return replace(self, window=n)
        steps = self.steps.sort_values("step")
        steps = steps.iloc[: max(len(steps) - int(self.summary.get("tail") or 0), 0)]
        steps = steps[steps["epoch"] < n].reset_index(drop=True) if "epoch" in steps else steps.iloc[:0]
        epochs = self.epochs[self.epochs["epoch"] < n] if "epoch" in self.epochs else self.epochs
        curvature, secant = ((t[t["epoch"] < n].reset_index(drop=True) if "epoch" in t else t)
                             for t in (self.curvature, self.secant))
        summary = dict(self.summary)
        raw = {"step", "progress", "lr", "loss", "dist_sq"} <= set(steps.columns)
        d0 = num(summary.get("d0_sq"))
        for name in ("gamma", "gamma_rp"):
            if name in steps:
                # The certified interval needs the raw columns (a step with undefined γ_k is a
                # constraint too); from γ_k alone such a step is unknown and nothing is certified.
                stats = (P.certify(steps, column=name, d0_sq=d0 if math.isfinite(d0) else None,
                                   ell_inf=num(summary.get("ell_inf")) if _finite(summary.get("ell_inf")) else 0.0)
                         if raw and (name == "gamma_rp" or "loss_ref" in steps) else P.certify(steps[name]))
                summary.update({f"{name}_{key.removeprefix('gamma_')}": v for key, v in stats.items()
                                if key not in ("conflict_steps", "zero_fail_steps")})
        return replace(self, steps=steps, epochs=epochs, summary=summary, window=n, curvature=curvature,
                       secant=secant)


FULL_LOSS, MEAN_BATCH_LOSS = "full training loss", "mean batch loss"


def final_loss_text(entry: RunEntry) -> str:
    """The final train loss as a cell or in a sentence, saying when it is the mean batch loss."""
    value = fmt(entry.final_train_loss)
    return f"{value} (mean batch loss of the last epoch)" if entry.final_loss_kind == MEAN_BATCH_LOSS else value


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x: Any) -> float:
    """A summary value as float; NaN for None/absent/flags (JSON stores NaN as null).

    Example:
        >>> num(0.25), num(None), num(True)
        (0.25, nan, nan)
    """
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def main_epochs(entry: RunEntry) -> pd.DataFrame:
    """The epochs of the analysed horizon (a continuation reference trains beyond it)."""
    ep = entry.epochs
    if not len(ep):
        return ep
    if "phase" in ep:
        ep = ep[ep["phase"] == "main"]
    horizon = entry.run.meta.horizon_epochs
    if horizon is not None and "epoch" in ep:
        ep = ep[ep["epoch"] < horizon]
    return ep.reset_index(drop=True)


def _layers(run: Run, ref: str) -> tuple[pd.DataFrame, str | None]:
    """Per-tensor shares with the tensor names as a column, or an empty frame and why."""
    rel = f"analysis/{ref}/layers.parquet"
    table = run.store.read_parquet(rel) if run.store.exists(rel) else pd.DataFrame()
    if len(table) and "tensor" in table:
        return table, None
    # A layers table written without its index has lost the tensor names; the per-step
    # tensor shards still have them, and re-aggregating them is the same computation.
    tensors = run.tensor_steps(ref)
    if len(tensors) and {"step", "epoch", "tensor", "progress"} <= set(tensors.columns):
        return P.layer_shares(tensors).reset_index(), None
    if len(table):
        return pd.DataFrame(), "layers table has no tensor names and no per-tensor steps to recover them"
    return pd.DataFrame(), "no per-tensor table (analysis without per_tensor)"


def _label(run: Run, seen: dict[str, int]) -> str:
    # Two runs of one name (e.g. the same config in two folders) need distinct labels.
    name = run.name
    seen[name] = seen.get(name, 0) + 1
    return name if seen[name] == 1 else f"{name} ({run.path.parent.name}/{run.path.name})"


def collect(runs: list[str | Path | Run], reference: str | None = None) -> list[RunEntry]:
    """Open each run and read its summary, step table, epochs and per-tensor shares.

    Example:
        >>> run = example_entry("relu").run  # a run folder without an analysis
        >>> [entry] = collect([run.path])
        >>> entry.problem == f"{run.path} has no analysis yet; run `gammatrace analyze {run.path}`"
        True
        >>> first, second = collect([run.path, run.path])  # one name twice: told apart
        >>> first.label, second.label == f"relu ({run.path.parent.name}/{run.path.name})"
        ('relu', True)
    """
    entries: list[RunEntry] = []
    seen: dict[str, int] = {}
    for item in runs:
        run = item if isinstance(item, Run) else Run(item)
        label = _label(run, seen)
        epochs = run.epochs()
        try:
            summary = run.summary(reference)
        except StoreError as exc:
            problem = (f"diverged at step {run.meta.diverged_at_step}; no final point to analyse against"
                       if run.status == "diverged" else str(exc))
            entries.append(RunEntry(label, run, None, problem, epochs=epochs))
            continue
        # The analysis read (its tail and ℓ_inf: its own derived steps); the per-tensor shares
        # are the reference's, the same for all its analyses.
        name = summary.get("analysis") or reference or summary.get("reference") or "last"
        steps = run.steps(name)
        layers, note = _layers(run, name.split("/")[0])
        # Measured by a replay, never recomputed: at θ_k alone, so shared by every reference.
        curvature = load_hook_table(run, "curvature", name)
        entries.append(RunEntry(label, run, summary, None, steps=steps, epochs=epochs,
                                layers=layers, layers_note=note, curvature=curvature,
                                secant=load_hook_table(run, "subset_secant", name)))
    return entries


@cache
def _examples_folder() -> tempfile.TemporaryDirectory:
    # One folder for every example run of the process, removed when the interpreter exits.
    return tempfile.TemporaryDirectory(prefix="gammatrace-examples-")


def example_entry(label: str = "run", gamma_median: float = 0.3, losses: Sequence[float] = (1.2, 0.5, 0.12),
                  target_loss: float | None = None, no_progress: bool = False, analysed: bool = True,
                  n_params: int = 100) -> RunEntry:
    """A small analysed run for examples and tests, without training one.

    ``run.json`` goes to a fresh folder, removed when the interpreter exits (the run's config, its target loss,
    whether the last of ``losses`` reached it, ``n_params``); the per-epoch full train
    losses are ``losses``; the summary holds ``gamma_median``, the final train loss and
    ``no_progress``; the step table has three steps (two toward θ*, one away).
    ``analysed=False`` gives the entry of a run without an analysis.

    Example:
        >>> e = example_entry("relu", 0.29, [1.0, 0.2, 0.1], target_loss=0.15)
        >>> e.label, e.final_train_loss, e.run.meta.reached_target, e.n_epochs
        ('relu', 0.1, True, 3)
    """
    folder = Path(tempfile.mkdtemp(dir=_examples_folder().name))
    reached = None if target_loss is None else bool(losses[-1] <= target_loss)
    config = RunConfig(name=label, target_loss=target_loss).model_dump(mode="json")
    RunStore(folder).write_meta(RunMeta(config=config, status=Status.COMPLETE if analysed else Status.TRAINED,
                                        epochs_done=len(losses), horizon_epochs=len(losses), steps_per_epoch=2,
                                        n_params=n_params, reached_target=reached))
    epochs = pd.DataFrame({"epoch": range(len(losses)), "train_loss": [float(x) for x in losses]})
    if not analysed:
        return RunEntry(label, Run(folder), None, "no analysis yet", epochs=epochs)
    steps = pd.DataFrame({"step": [0, 1, 2], "epoch": [0, 0, 1], "dist_sq": [1.0, 0.81, 0.64],
                          "update_sq": [0.01, 0.01, 0.01], "progress": [0.095, -0.01, 0.075],
                          "cos_align": [0.95, -0.05, 0.9]})
    drop = 1.0 - losses[-1] / losses[0] if losses[0] else math.nan
    summary = {"reference": "last", "gamma_median": gamma_median, "train_loss": float(losses[-1]),
               "epochs": len(losses), "no_progress": no_progress, "loss_rel_drop": drop}
    return RunEntry(label, Run(folder), summary, None, steps=steps, epochs=epochs)


# The curvature summary of a run: (key, label, columns it needs, statistic) — each label says
# exactly what the number is (where it was measured, over which rows).
CURVATURE_SUMMARY = (
    ("n", "curvature measurements (steps)", (), lambda t: len(t)),
    ("lambda_1_median", "median λ_1 (evaluation subset)", ("lambda_1",), lambda t: t["lambda_1"].median()),
    ("lambda_1_max", "max λ_1 (evaluation subset)", ("lambda_1",), lambda t: t["lambda_1"].max()),
    ("stability_ratio_max", "max sharpness / stability threshold", ("stability_ratio",),
     lambda t: t["stability_ratio"].max()),
    ("frac_unstable", "fraction of measurements with sharpness ≥ threshold", ("stability_ratio",),
     lambda t: (t["stability_ratio"] >= 1).mean() if t["stability_ratio"].notna().any() else math.nan),
    ("outlier_ratio_median", "median λ_1/λ_k (evaluation subset)", ("outlier_ratio",),
     lambda t: t["outlier_ratio"].median()),
    ("trace_median", "median tr H (evaluation subset)", ("trace",), lambda t: t["trace"].median()),
    ("beta_eff_median", "median effective β-smoothness along the step (its mini-batch)", ("beta_eff",),
     lambda t: t["beta_eff"].median()),
)


def curvature_summary(entry: RunEntry) -> dict[str, float]:
    """The run's curvature table summarised (:data:`CURVATURE_SUMMARY`, the statistics whose
    columns it has); {} without a table. NaN rows (a trace not measured, an eigenvalue that
    did not converge) are left out of each statistic (pandas' median and max skip them), never
    read as zero; a statistic with no finite row is NaN.

    Example:
        >>> e = example_entry("bn")
        >>> curvature_summary(e)
        {}
        >>> e.curvature = pd.DataFrame({"lambda_1": [2.0, 4.0], "stability_ratio": [0.5, 1.5],
        ...     "outlier_ratio": [3.0, 5.0], "trace": [math.nan] * 2, "beta_eff": [1.0, 3.0]})
        >>> s = curvature_summary(e)
        >>> s["n"], s["lambda_1_median"], s["frac_unstable"], math.isnan(s["trace_median"])
        (2.0, 3.0, 0.5, True)
    """
    table = entry.curvature
    if not len(table):
        return {}
    return {key: float(stat(table)) for key, _, needs, stat in CURVATURE_SUMMARY if set(needs) <= set(table.columns)}
