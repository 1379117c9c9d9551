"""The report's figures: the papers' trajectory figure (distance, loss, both γ's), Theorem 1's
per-epoch curves, γ against the training loss (matched loss), and per-layer shares.

Which γ: papers 000/001 plot the regularity principle's γ (gap to inf ℓ, shown as
γ/‖θ_0 − θ_T‖²), paper 002 the γ-optimization principle's γ (gap to ℓ(θ*; B_k)); the
trajectory figure draws both, each row labelled with its paper and formula.

Each plot declares the columns it needs (:class:`Needs`); a run lacking them is left
out of that plot with a note, and a plot with nothing to draw returns None (DESIGN §7).
Figures are drawn on :class:`matplotlib.figure.Figure` objects, which render with the
Agg canvas and never touch pyplot's global state or a display.

Example:
    >>> import tempfile
    >>> from gammatrace.reporting.collect import example_entry
    >>> entries = [example_entry("relu", 0.29, [1.0, 0.2, 0.1]), example_entry("sigmoid", 0.05, [1.0, 0.9, 0.85])]
    >>> notes = []
    >>> trajectory_figure(entries, tempfile.mkdtemp(), notes).name
    'trajectory.png'
    >>> notes[:3]  # the example entries have no gradient or γ columns: those rows are left out
    ['relu: gradient row skipped (missing steps.grad_sq, steps.loss)', 'relu: gamma row skipped (missing steps.gamma)', 'relu: gamma_rp row skipped (missing steps.gamma_rp)']
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter

from gammatrace import principles as P
from gammatrace.principles.gradients import COLLAPSE_RATIO
from gammatrace.reporting.collect import RunEntry, main_epochs

POSITIVE, NEGATIVE = "#4C72B0", "#C44E52"


@dataclass(frozen=True)
class Needs:
    """Columns a plot needs from each of a run's tables.

    Example:
        >>> import pandas as pd
        >>> Needs(steps=("step", "gamma")).missing({"steps": pd.DataFrame({"step": [0]})})
        ['steps.gamma']
    """

    steps: tuple[str, ...] = ()
    epochs: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    curvature: tuple[str, ...] = ()

    def missing(self, tables: dict[str, pd.DataFrame]) -> list[str]:
        out = []
        for name in ("steps", "epochs", "layers", "curvature"):
            frame = tables.get(name, pd.DataFrame())
            out += [f"{name}.{c}" for c in getattr(self, name) if c not in frame.columns]
        return out


DISTANCE = Needs(steps=("step", "dist_sq", "progress"))
LOSS = Needs(epochs=("epoch", "train_loss"))
LOSS_FALLBACK = Needs(epochs=("epoch", "mean_batch_loss"))
GRAD = Needs(steps=("step", "epoch", "grad_sq", "loss"))
GAMMA = Needs(steps=("epoch", "gamma"))
GAMMA_RP = Needs(steps=("epoch", "gamma_rp"))
RATE = Needs(steps=("step", "epoch", "lr", "loss", "loss_ref", "progress", "dist_sq"))
# The two γ rows: (column, needs, title with paper and formula, y label).
GAMMA_ROWS = (
    ("gamma", GAMMA, r"γ-optimization principle (paper 002, Def. 1): "
                     r"$\gamma_k = P_k\,/\,(\eta_k D_0^2\,(\ell_k - \ell(\theta^*; B_k)))$",
     r"$\gamma_k$ per epoch"),
    ("gamma_rp", GAMMA_RP, r"regularity principle (papers 000/001, eq. 2): "
                           r"$\gamma^{RP}_k/\|\theta_0-\theta_T\|^2 = P_k\,/\,(\eta_k D_0^2\,(\ell_k - \inf\,\ell))$",
     r"$\gamma^{RP}_k / D_0^2$ per epoch"),
)
LAYERS = Needs(layers=("tensor", "share", "frac_negative"))
# The loss row's title: what it shows (a run of the user's own loop measured no full training loss).
LOSS_TITLES = {"full": "full training loss after each epoch",
               "batch": "mean batch loss over each epoch (no full training loss measured)"}


def _tables(entry: RunEntry) -> dict[str, pd.DataFrame]:
    return {"steps": entry.steps, "epochs": main_epochs(entry), "layers": entry.layers, "curvature": entry.curvature}


def run_colors(n: int) -> list:
    """One colour per run position, the same in every figure of a report.

    Example:
        >>> len(run_colors(3)), run_colors(12)[0] == run_colors(12)[0]
        (3, True)
    """
    # matplotlib loads only when a figure is drawn
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def legend_label(entry: RunEntry) -> str:
    return f"{entry.label} (no progress)" if entry.no_progress else entry.label


def save_figure(fig: Figure, out: str | Path, stem: str) -> Path:
    """Write ``<stem>.png`` (120 dpi) and ``<stem>.pdf`` into ``out``; the PNG's path."""
    out = Path(out)
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    fig.savefig(out / f"{stem}.pdf", bbox_inches="tight")
    return png


# ------------------------------------------------------------------ trajectory figure
def gamma_epoch_stats(steps: pd.DataFrame, column: str = "gamma") -> pd.DataFrame:
    """Per-epoch quartiles and minimum of the defined values of a γ column (undefined
    steps are not values).

    Example:
        >>> import pandas as pd
        >>> s = pd.DataFrame({"epoch": [0, 0, 0, 1], "gamma": [1.0, 2.0, 3.0, float("nan")]})
        >>> gamma_epoch_stats(s)[["min", "median", "q75"]].values.tolist()
        [[1.0, 2.0, 2.5], [nan, nan, nan]]
    """
    g = steps[["epoch", column]].astype({column: np.float64}).rename(columns={column: "gamma"})
    g = g.assign(gamma=g["gamma"].where(np.isfinite(g["gamma"])))
    by = g.groupby("epoch", sort=True)["gamma"]
    return pd.DataFrame({"min": by.min(), "q25": by.quantile(0.25), "median": by.median(),
                         "q75": by.quantile(0.75)})


def _gamma_scale(values: np.ndarray) -> tuple[str, float | None]:
    """'log' if every plotted γ is > 0, else 'symlog' with a linear zone below the data.

    γ spans decades across runs (a no-progress run's γ_k are orders of magnitude above
    a trained one's) and its per-epoch minimum can be negative; symlog keeps both
    visible. The linear threshold is the decade below the smallest |γ| plotted, so
    every positive median lies in the logarithmic part.
    """
    values = values[np.isfinite(values)]
    if not len(values) or (values > 0).all():
        return "log", None
    magnitudes = np.abs(values[values != 0])
    lo = magnitudes.min() if len(magnitudes) else 1.0
    return "symlog", 10.0 ** math.floor(math.log10(lo))


def _aggregate(series: list[pd.Series]) -> pd.DataFrame:
    """Mean, min and max over runs at each x, over the runs that reach that x (seeds of
    one cell stop at different epochs under a target loss)."""
    table = pd.concat(series, axis=1).sort_index()
    return pd.DataFrame({"mean": table.mean(axis=1), "lo": table.min(axis=1), "hi": table.max(axis=1)})


def _cell_label(name: str, runs: Sequence[RunEntry], seeded: bool) -> str:
    flagged = sum(e.no_progress for e in runs)
    label = name + (f" (n={len(runs)})" if seeded else "")
    if flagged == len(runs):
        return f"{label} (no progress)"
    return f"{label} ({flagged}/{len(runs)} no progress)" if flagged else label


@dataclass(frozen=True)
class _Line:
    """One line of the trajectory figure: a cell's analysed runs (one run, or its seeds) and their style."""

    name: str
    runs: list[RunEntry]
    color: Any
    seeded: bool  # some line of the figure has several runs: lines are means, bands min–max

    @property
    def ls(self) -> str:
        return "--" if all(e.no_progress for e in self.runs) else "-"

    def handle(self) -> Line2D:
        return Line2D([], [], color=self.color, ls=self.ls, lw=1.5, label=_cell_label(self.name, self.runs, self.seeded))

    def draw(self, ax: Axes, agg: pd.DataFrame, x: np.ndarray, marker: str | None = None) -> None:
        """The mean over the line's runs (with their min–max band when the figure is seeded)."""
        if self.seeded:
            ax.fill_between(x, agg["lo"], agg["hi"], color=self.color, alpha=0.15, lw=0)
        ax.plot(x, agg["mean"], self.ls, marker=marker, ms=3, color=self.color, lw=1.3)


@dataclass
class RowDrawn:
    """What one row of the trajectory figure did, per line: its legend handle where the row
    drew it (None where not), and its notes (why a run was left out, what the row shows instead)."""

    handles: list[Line2D | None] = field(default_factory=list)
    notes: list[list[str]] = field(default_factory=list)

    def add(self, line: _Line, notes: list[str], drew: bool) -> None:
        self.handles.append(line.handle() if drew else None)
        self.notes.append(notes)


def distance_row(ax: Axes, lines: Sequence[_Line]) -> RowDrawn:
    """Row 1 (needs :data:`DISTANCE` and the steps per epoch): d_k/D_0 per step, x = step /
    steps per epoch, with the end point d_T/D_0."""
    drawn = RowDrawn()
    for line in lines:
        notes, curves = [], []
        for e in line.runs:
            miss, spe = DISTANCE.missing(_tables(e)), e.steps_per_epoch
            if miss or not spe:
                notes.append(f"{e.label}: distance row skipped (missing {', '.join(miss) or 'steps per epoch'})")
                continue
            steps = e.steps.sort_values("step")
            curve = P.monotone_distance(steps)["curve"]  # d_k/D_0 for k = 0 … T
            index = np.append(steps["step"].to_numpy(), steps["step"].iloc[-1] + 1) / spe
            curves.append(pd.Series(curve, index=index))
        if curves:
            agg = _aggregate(curves)
            line.draw(ax, agg, agg.index.to_numpy())
        drawn.add(line, notes, bool(curves))
    ax.set_ylabel(r"$d_k / D_0$")
    ax.set_ylim(bottom=0)
    ax.set_title("normalized distance to the reference point", fontsize=10)
    return drawn


def loss_row(ax: Axes, lines: Sequence[_Line]) -> RowDrawn:
    """Row 2 (needs :data:`LOSS`, else :data:`LOSS_FALLBACK`): the full training loss after
    each epoch (x = epoch + 1), else (a run of the user's own loop) the mean batch loss over
    the epoch, the title and axis saying which; log y when it spans more than a decade."""
    drawn, values, kinds = RowDrawn(), [], {}
    for line in lines:
        notes, losses = [], []
        for e in line.runs:
            tables = _tables(e)
            ep = tables["epochs"]
            if not LOSS.missing(tables):
                y = ep["train_loss"].to_numpy(float)
                kinds.setdefault("full", []).append(e.label)
            elif not LOSS_FALLBACK.missing(tables):
                y = ep["mean_batch_loss"].to_numpy(float)
                kinds.setdefault("batch", []).append(e.label)
                notes.append(f"{e.label}: loss row shows the mean batch loss (no full training loss measured)")
            else:
                notes.append(f"{e.label}: loss row skipped (missing {', '.join(LOSS.missing(tables))})")
                continue
            if len(y):
                losses.append(pd.Series(y, index=ep["epoch"].to_numpy() + 1))
                values.append(y)
        if losses:
            agg = _aggregate(losses)
            line.draw(ax, agg, agg.index.to_numpy(), marker="o")
        drawn.add(line, notes, bool(losses))
    every = np.concatenate(values) if values else np.empty(0)
    every = every[np.isfinite(every)]
    if len(every) and (every > 0).all() and every.max() / every.min() > 10:
        ax.set_yscale("log")
    ax.set_ylabel("mean batch loss" if set(kinds) == {"batch"} else "training loss")
    ax.set_title(LOSS_TITLES["batch"] if set(kinds) == {"batch"} else LOSS_TITLES["full"] if "batch" not in kinds
                 else f"{LOSS_TITLES['full']}; mean batch loss over the epoch for {', '.join(kinds['batch'])}",
                 fontsize=10)
    return drawn


def gradient_row(ax: Axes, lines: Sequence[_Line]) -> RowDrawn:
    """Row 3 (needs :data:`GRAD`): the median raw mini-batch ‖g_k‖ per epoch (x = epoch + ½,
    log y; ``grad_sq``: before clipping, unscaled), dashed the gradient the optimizer received
    (``grad_sq_used``) where a run's differs (clipping), and ✕ with a dotted line at each
    run's gradient collapse (read from the raw one)."""
    drawn = RowDrawn()
    for line in lines:
        notes, norms, collapses, used = [], [], [], []
        for e in line.runs:
            miss = GRAD.missing(_tables(e))
            if miss:
                notes.append(f"{e.label}: gradient row skipped (missing {', '.join(miss)})")
                continue
            steps = e.steps.sort_values("step")
            norms.append(P.grad_norm_per_epoch(steps)["median"])
            if "grad_sq_used" in steps and not np.array_equal(steps["grad_sq_used"], steps["grad_sq"]):
                used.append(P.grad_norm_per_epoch(steps.assign(grad_sq=steps["grad_sq_used"]))["median"])
            epoch = e.gradient_collapse
            if epoch is not None:
                collapses.append((epoch, float(norms[-1].loc[epoch])))
                notes.append(f"{e.label}: gradient collapse at epoch {epoch} (median ‖g_k‖ fell to ≤ "
                             f"{COLLAPSE_RATIO:g} of its peak with the loss still high)")
        if norms:
            agg = _aggregate(norms)
            line.draw(ax, agg, agg.index.to_numpy() + 0.5, marker="o")
            if used:
                agg_used = _aggregate(used)
                ax.plot(agg_used.index.to_numpy() + 0.5, agg_used["mean"], "--", color=line.color, lw=1.0,
                        gid="grad-used")
            for epoch, value in collapses:
                # The line shows the epoch even when the norm is exactly 0 (off a log axis).
                ax.axvline(epoch + 0.5, color=line.color, ls=":", lw=1.0, gid="collapse-epoch")
                if value > 0:
                    ax.plot([epoch + 0.5], [value], ls="none", marker="X", ms=9, color=line.color, mec="k", mew=0.6,
                            zorder=5, gid="collapse")
        drawn.add(line, notes, bool(norms))
    ax.set_ylabel(r"$\|g_k\|$ per epoch")
    if ax.lines:
        ax.set_yscale("log")
        keys = [Line2D([], [], color="0.3", marker="o", ms=3, label="median ‖g_k‖")]
        if any(drawn_line.get_gid() == "grad-used" for drawn_line in ax.lines):
            keys.append(Line2D([], [], color="0.3", ls="--", label="as the optimizer received it (clipped)"))
        if any(drawn_line.get_gid() == "collapse-epoch" for drawn_line in ax.lines):
            keys.append(Line2D([], [], color="0.3", ls=":", marker="X", ms=8, mec="k", label="gradient collapse"))
        ax.legend(handles=keys, fontsize=7, loc="best", ncols=2)
    ax.set_title("mini-batch gradient norm (raw: before clipping, unscaled)", fontsize=10)
    return drawn


def gamma_row(column: str, ax: Axes, lines: Sequence[_Line]) -> RowDrawn:
    """Rows 4 and 5 (needs :data:`GAMMA` / :data:`GAMMA_RP`, one row of :data:`GAMMA_ROWS`
    per ``column``): the γ column per epoch at the epoch's middle, median as the line and
    minimum as ▼; log y, or symlog when a value is ≤ 0 (:func:`_gamma_scale`)."""
    _, needs, row_title, ylabel = next(row for row in GAMMA_ROWS if row[0] == column)
    drawn, values = RowDrawn(), []
    seeded = any(line.seeded for line in lines)
    for line in lines:
        notes, stats = [], []
        for e in line.runs:
            miss = needs.missing(_tables(e))
            if miss:
                notes.append(f"{e.label}: {column} row skipped (missing {', '.join(miss)})")
                continue
            st = gamma_epoch_stats(e.steps, column)
            if st["median"].notna().any():
                stats.append(st)
                values.append(st.to_numpy().ravel())
            else:
                notes.append(f"{e.label}: {column} row skipped (no defined value)")
        if stats:
            _draw_gamma(ax, line, stats)
        drawn.add(line, notes, bool(stats))
    scale, linthresh = _gamma_scale(np.concatenate(values) if values else np.empty(0))
    if any(drawn.handles):
        if scale == "symlog":
            ax.set_yscale("symlog", linthresh=linthresh)
            ax.axhline(0.0, color="0.5", lw=0.6)
        else:
            ax.set_yscale("log")
        band = "seed min–max" if seeded else "25–75%"
        style = [Line2D([], [], color="0.3", marker="o", ms=3, label="mean of medians" if seeded else "median"),
                 Patch(color="0.3", alpha=0.15, label=band),
                 Line2D([], [], color="0.3", ls="none", marker="v", ms=4, label="min")]
        ax.legend(handles=style, fontsize=7, loc="best", ncols=3)
    ax.set_ylabel(ylabel + (" (symlog)" if scale == "symlog" else ""), fontsize=9)
    ax.set_title(row_title, fontsize=8.5)
    return drawn


def _draw_gamma(ax: Axes, line: _Line, stats: list[pd.DataFrame]) -> None:
    """One line's γ: the median (mean of its runs' medians when seeded) with its band, and ▼ at the minimum."""
    if line.seeded:
        agg = _aggregate([st["median"] for st in stats])
        low = pd.concat([st["min"] for st in stats], axis=1).min(axis=1)
        line.draw(ax, agg, agg.index.to_numpy() + 0.5, marker="o")
    else:
        st = stats[0]
        x = st.index.to_numpy() + 0.5
        ax.fill_between(x, st["q25"], st["q75"], color=line.color, alpha=0.15, lw=0)
        ax.plot(x, st["median"], line.ls, marker="o", ms=3, color=line.color, lw=1.3)
        low = st["min"]
    # clip_on=False: the lowest minimum sits on the axis edge and would be cut in half.
    ax.plot(low.index.to_numpy() + 0.5, low, ls="none", marker="v", ms=4, color=line.color, alpha=0.8,
            clip_on=False)


# The curvature rows (the curvature table, analysis/<ref>/curvature/): (column, needs, title, y label).
# Measured at θ_k before step k, so a row's x is k / steps per epoch.
CURVATURE_ROWS = (
    ("sharpness", Needs(curvature=("step", "sharpness", "stability_threshold", "stability_threshold_kind")),
     "sharpness on the evaluation subset: λ_1 of the Hessian{adaptive}; dashed: the optimizer's stability "
     "threshold ({kinds})", "sharpness"),
    ("trace", Needs(curvature=("step", "trace")), "Hessian trace tr H on the evaluation subset (Hutchinson; exact when trace_samples ≥ the parameter count)",
     "tr H"),
    ("outlier_ratio", Needs(curvature=("step", "outlier_ratio")),
     "outlier ratio λ_1 / λ_k of the top-k Hessian eigenvalues (λ_1 against the bulk, as Ghorbani et al.'s "
     "isolated eigenvalues, only when k exceeds the number of outliers)",
     r"$\lambda_1/\lambda_k$"),
    ("beta_eff", Needs(curvature=("step", "beta_eff")),
     r"effective β-smoothness along the step (Santurkar et al.): "
     r"$\max_s \|\nabla\ell(\theta_k) - \nabla\ell(\theta_k - s g_k)\| / \|s g_k\|$ on $B_k$", r"$\beta_{eff}$"),
)
THRESHOLD_TEXT = {"sgd": "2/η", "heavy_ball": "2(1+β)/η", "nesterov": "(2+2β)/((1+2β)η)",
                  "adam_preconditioned": "Adam: (2+2β₁)/((1−β₁)η) on λ_1(P⁻¹H)",
                  "rmsprop_preconditioned": "RMSprop: 2(1+μ)/η on λ_1(P⁻¹H)",
                  "adagrad_preconditioned": "Adagrad: 2/η_t on λ_1(P⁻¹H)", "unknown": "unknown optimizer: none"}


def curvature_row(column: str, ax: Axes, lines: Sequence[_Line]) -> RowDrawn:
    """A curvature row (one of :data:`CURVATURE_ROWS`): the column per measured step (x = step /
    steps per epoch; mean over a cell's runs with their min–max band), log y when every value is
    positive; the sharpness row adds each line's stability threshold dashed. A run without the
    columns, or with no finite value (a trace not measured), is left out with a note."""
    _, needs, row_title, ylabel = next(row for row in CURVATURE_ROWS if row[0] == column)
    drawn, values, kinds = RowDrawn(), [], set()
    for line in lines:
        notes, curves, thresholds = [], [], []
        for e in line.runs:
            miss, spe = needs.missing(_tables(e)), e.steps_per_epoch
            if miss or not spe:
                notes.append(f"{e.label}: {column} row skipped (missing {', '.join(miss) or 'steps per epoch'})")
                continue
            table = e.curvature.sort_values("step")
            y = table[column].to_numpy(float)
            if not np.isfinite(y).any():
                notes.append(f"{e.label}: {column} row skipped (not measured: no finite value)")
                continue
            x = table["step"].to_numpy() / spe
            curves.append(pd.Series(y, index=x))
            values.append(y[np.isfinite(y)])
            if column == "sharpness":
                kinds.update(table["stability_threshold_kind"].astype(str))
                thresholds.append(pd.Series(table["stability_threshold"].to_numpy(float), index=x))
        if curves:
            agg = _aggregate(curves)
            line.draw(ax, agg, agg.index.to_numpy(), marker=".")
            if thresholds:
                limit = _aggregate(thresholds)
                ax.plot(limit.index.to_numpy(), limit["mean"], "--", color=line.color, lw=1.0, gid="threshold")
        drawn.add(line, notes, bool(curves))
    every = np.concatenate(values) if values else np.empty(0)
    if len(every) and (every > 0).all():
        ax.set_yscale("log")
    adaptive = any(k.endswith("_preconditioned") for k in kinds)
    title = row_title.format(adaptive=", or of P⁻¹H for an adaptive optimizer (P its preconditioner)" if adaptive
                             else "", kinds="; ".join(THRESHOLD_TEXT.get(k, k) for k in sorted(kinds)) or "none")
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=8.5)
    return drawn


# The trajectory figure's rows, top to bottom: each draws every line on its own axis; the
# curvature rows follow where some run has a curvature table.
TRAJECTORY_ROWS: tuple[Callable[[Axes, Sequence[_Line]], RowDrawn], ...] = (
    distance_row, loss_row, gradient_row, *(functools.partial(gamma_row, column) for column, *_ in GAMMA_ROWS))
TRAJECTORY_CURVATURE_ROWS: tuple[Callable[[Axes, Sequence[_Line]], RowDrawn], ...] = tuple(
    functools.partial(curvature_row, column) for column, *_ in CURVATURE_ROWS)


def _curvature_drawers(entries: Sequence[RunEntry], notes: list[str]) -> tuple[Callable[[Axes, Sequence[_Line]],
                                                                                       RowDrawn], ...]:
    """The curvature rows to draw: none without a curvature table; a row no run has a finite
    value of (the trace with ``trace_samples: 0``) is left out with one note, not a note per run."""
    tables = [e.curvature for e in entries if len(e.curvature)]
    if not tables:
        return ()
    drawers = []
    for (column, *_), drawer in zip(CURVATURE_ROWS, TRAJECTORY_CURVATURE_ROWS, strict=True):
        if any(column in t and np.isfinite(t[column].to_numpy(float)).any() for t in tables):
            drawers.append(drawer)
        else:
            # The config's reason, where every run gives it (a Probe's table has no run config).
            unmeasured = column == "trace" and all(
                e.run.config is not None and e.run.config.curvature is not None
                and e.run.config.curvature.trace_samples == 0 for e in entries if len(e.curvature))
            why = " (trace_samples: 0)" if unmeasured else ""
            notes.append(f"{column} row not drawn: no run measured it{why}")
    return tuple(drawers)


def trajectory_figure(entries: Sequence[RunEntry], out: str | Path, notes: list[str],
                      title: str = "", cells: dict[str, list[RunEntry]] | None = None,
                      stem: str = "trajectory") -> Path | None:
    """Draw ``<stem>.png``/``.pdf``: d_k/D_0, training loss, ‖g_k‖ and both γ's per epoch vs epochs.

    One line per run, or with ``cells`` (name -> the runs of one cell, e.g. its seeds)
    one line per cell. Row 1: d_k/D_0 per step (x = step / steps per epoch) with the
    end point d_T/D_0 (0 for θ* = θ_T). Row 2: full training loss after each epoch
    (x = epoch + 1; mean batch loss if the full loss was not measured); log y when it
    spans more than a decade. Row 3: the raw mini-batch gradient norm ‖g_k‖ per epoch
    (median at x = epoch + ½, log y) with ✕ at each run's gradient collapse
    (:func:`~gammatrace.principles.gradients.gradient_collapse`: paper 002's "vanishing
    gradient", at which it cuts its no-BN ResNet curves; here the curves go on and the
    epoch is marked). Rows 4 and 5: per epoch at the epoch's middle (x = epoch
    + ½), the γ-optimization principle's γ_k (paper 002: gap to ℓ(θ*; B_k)) and the
    regularity principle's γ^RP_k / D_0² (papers 000/001: gap to inf ℓ), each titled
    with its paper and formula: the median as the line, minimum as ▼ markers; log y,
    or symlog when a value is ≤ 0 (see :func:`_gamma_scale`). The shaded band is the
    25–75% range when every line is one run; when a cell has several runs, every line
    is the mean over its runs (of d_k/D_0, of the loss, of the per-epoch median) and
    the band is the min–max over them. Lines whose runs are all flagged "no progress"
    are dashed. Appends to ``notes`` why a run or row was left out; returns None when
    nothing is drawable. Where some run has a curvature table, four rows follow
    (:data:`CURVATURE_ROWS`, per measured step): the sharpness with each optimizer's
    stability threshold dashed, the Hessian trace, the outlier ratio λ_1/λ_k and the
    effective β-smoothness along the step; a run without them is left out of those rows with
    a note. Each row is one function of :data:`TRAJECTORY_ROWS` (its columns, its lines, its
    axis); this function keeps the layout.

    Example (the module's example draws one; here nothing is drawable):
        >>> import tempfile
        >>> from gammatrace.reporting.collect import example_entry
        >>> notes = []
        >>> print(trajectory_figure([example_entry("relu", analysed=False)], tempfile.mkdtemp(), notes))
        None
        >>> notes[-1]
        'trajectory figure not drawn: no analysed run'
    """
    out = Path(out)
    if cells is None:
        cells = {e.label: [e] for e in entries}
    seeded = any(len(runs) > 1 for runs in cells.values())
    lines = []
    for (name, runs), color in zip(cells.items(), run_colors(len(cells)), strict=True):
        notes.extend(f"{e.label} not drawn: {e.problem}" for e in runs if not e.analysed)
        ok = [e for e in runs if e.analysed]
        if ok:
            lines.append(_Line(name, ok, color, seeded))
    if not lines:
        notes.append("trajectory figure not drawn: no analysed run")
        return None

    drawers = TRAJECTORY_ROWS + _curvature_drawers([e for line in lines for e in line.runs], notes)
    fig = Figure(figsize=(7.5, 2.7 * len(drawers)), layout="constrained")
    axes = fig.subplots(len(drawers), 1, sharex=True)
    rows = [row(ax, lines) for row, ax in zip(drawers, axes, strict=True)]
    notes.extend(options_notes([e for line in lines for e in line.runs]))
    handles = []
    for i in range(len(lines)):  # notes line by line, as a reader goes through the legend
        for row in rows:
            notes.extend(row.notes[i])
        handles += [h for h in (row.handles[i] for row in rows) if h is not None][:1]
    axes[-1].set_xlabel("epoch")
    axes[-1].set_xlim(left=0)
    for ax in axes:
        ax.grid(alpha=0.3, lw=0.5)
    # Below the plots rather than inside one: with several runs a legend covers curves.
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=min(len(handles), 3))
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, out, stem)


def options_notes(entries: Sequence[RunEntry]) -> list[str]:
    """What a figure drawn from every step says of a run whose analysis has a tail or an ℓ_inf.

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> e = example_entry("relu")
        >>> e.summary.update(tail=2, n_steps_total=3, ell_inf=0.5)
        >>> options_notes([e])  # doctest: +NORMALIZE_WHITESPACE
        ['relu: every step drawn; the tables are over steps 0–0 of 3 (the last 2 left out: --tail 2);
          γ^RP_k measured above ℓ_inf = 0.5 (--ell-inf)']
    """
    out = []
    for e in entries:
        tail, ell_inf = int((e.summary or {}).get("tail") or 0), (e.summary or {}).get("ell_inf")
        parts = [f"every step drawn; the tables are over {e.analysis_options.split('; ')[0]}"] if tail else []
        if isinstance(ell_inf, (int, float)) and math.isfinite(ell_inf) and ell_inf != 0:
            parts.append(f"γ^RP_k measured above ℓ_inf = {ell_inf:g} (--ell-inf)")
        if parts:
            out.append(f"{e.label}: " + "; ".join(parts))
    return out


# ------------------------------------------------------------------ Theorem 1 figure
def theorem1_figure(cells: dict[str, list[RunEntry]], out: str | Path, notes: list[str], title: str = "",
                    stem: str = "theorem1") -> Path | None:
    """Draw ``<stem>.png``/``.pdf``: Theorem 1's per-epoch curves, one line per cell (its
    first seed when it has several, so a bound is one run's).

    Row 1: d/D_0 at every epoch boundary (the theorem says it never rises). Row 2: the
    rate of item 3 at every epoch boundary K: the running mean of the loss gap,
    Σ_{k<K} η_k (ℓ_k − ℓ*_k) / Σ_{k<K} η_k (solid), and its bound 1 / (2 γ Σ_{k<K} η_k)
    with γ = γ_hi = γ_min, the largest γ of the certified interval (dashed; not drawn when
    the interval is empty: no γ > 0 meets every step, no bound). Returns None when no
    run has the columns.

    Example:
        >>> import tempfile
        >>> from gammatrace.reporting.collect import example_entry
        >>> print(theorem1_figure({"relu": [example_entry("relu")]}, tempfile.mkdtemp(), notes := []))
        None
        >>> notes[0]
        'relu: Theorem 1 figure skipped (missing steps.lr, steps.loss, steps.loss_ref)'
    """
    out = Path(out)
    colors = run_colors(len(cells))
    lines = []
    for (name, runs), color in zip(cells.items(), colors, strict=True):
        e = next((r for r in runs if r.analysed), None)
        if e is None:
            continue
        miss = RATE.missing(_tables(e))
        if miss:
            notes.append(f"{e.label}: Theorem 1 figure skipped (missing {', '.join(miss)})")
            continue
        steps = e.steps.sort_values("step")
        tail = int((e.summary or {}).get("tail") or 0) if e.window is None else 0
        if tail:  # the steps of the Theorem 1 table and the analysis' rate.parquet, said in the notes
            steps = steps.iloc[: max(len(steps) - tail, 0)]
            notes.append(f"{e.label}: Theorem 1 figure over {e.analysis_options.split('; ')[0]}")
        # The bound takes γ_hi (= γ_min), the largest γ of the certified interval; none when it is empty.
        cert = P.certify(steps)
        gamma = float(cert["gamma_hi"]) if cert["certified"] and math.isfinite(cert["gamma_hi"]) else math.nan
        dist = P.epoch_distance(steps)
        rate = P.rate_bound(steps, gamma=gamma)["table"]
        lines.append((name, color, dist["curve"], rate, gamma > 0))
    if not lines:
        notes.append("Theorem 1 figure not drawn: no run has the columns")
        return None
    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    ax_d, ax_r = fig.subplots(2, 1, sharex=True)
    for name, color, curve, rate, bounded in lines:
        ax_d.plot(np.arange(len(curve)), curve, "-o", ms=3, color=color, lw=1.3, label=name)
        x = np.arange(1, len(rate) + 1)
        ax_r.plot(x, rate["actual"], "-o", ms=3, color=color, lw=1.3, label=f"{name}: running mean gap")
        if bounded:
            ax_r.plot(x, rate["bound"], "--", color=color, lw=1.1, label=f"{name}: bound (γ = γ_hi = γ_min)")
    ax_d.set_ylabel(r"$d / D_0$ at epoch boundaries")
    ax_d.set_ylim(bottom=0)
    ax_d.set_title("Theorem 1 (1): distance to θ* at every epoch boundary (never rises)", fontsize=10)
    ax_r.set_yscale("log")
    ax_r.set_ylabel("loss gap")
    ax_r.set_title(r"Theorem 1 (3): $\sum_{k<K}\eta_k(\ell_k-\ell^*_k)/\sum_{k<K}\eta_k$ (solid) "
                   r"$\leq 1/(2\gamma\sum_{k<K}\eta_k)$ (dashed)", fontsize=9)
    ax_r.set_xlabel("epoch")
    for ax in (ax_d, ax_r):
        ax.grid(alpha=0.3, lw=0.5)
    ax_r.legend(fontsize=7, ncols=2, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, out, stem)


# --------------------------------------------------------------- γ at matched loss
def matched_figure(panels: dict[str, tuple[dict[str, list[RunEntry]], object]], out: str | Path,
                   notes: list[str], title: str = "", stem: str = "matched") -> Path | None:
    """Draw ``<stem>.png``/``.pdf``: γ_k against the training loss, not against epochs.

    One panel per reference (``panels``: title -> (cell -> its runs, the
    :class:`~gammatrace.reporting.claims.MatchedLoss` of those runs)). Dots: every
    step's γ_k against its mini-batch loss ℓ_k (faint); line: each cell's median γ_k at
    the matched levels of the full training loss (the claim test's statistic; mean over
    seeds, band min–max); shaded: the loss range every run reaches. Returns None when
    nothing is drawable.

    Example:
        >>> import tempfile
        >>> from gammatrace.reporting.collect import example_entry
        >>> print(matched_figure({"θ_T": ({"relu": [example_entry("relu")]}, None)}, tempfile.mkdtemp(),
        ...                      notes := []))
        None
        >>> notes
        ['γ-vs-loss figure not drawn: no run has steps.loss and steps.gamma']
    """
    out = Path(out)
    usable = {t: ({c: [e for e in rs if e.analysed and {"loss", "gamma"} <= set(e.steps.columns)]
                   for c, rs in cells.items()}, m) for t, (cells, m) in panels.items()}
    if not any(rs for cells, _ in usable.values() for rs in cells.values()):
        notes.append("γ-vs-loss figure not drawn: no run has steps.loss and steps.gamma")
        return None
    fig = Figure(figsize=(6.0 * len(usable), 4.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(usable), squeeze=False)).ravel()
    rng = np.random.default_rng(0)  # one stream over the panels, in order
    for ax, (panel, (cells, m)) in zip(axes, usable.items(), strict=True):
        _matched_panel(ax, panel, cells, m, rng)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, out, stem)


def _matched_panel(ax: Axes, panel: str, cells: dict[str, list[RunEntry]], m: Any, rng: np.random.Generator) -> None:
    """One reference's panel: each cell's dots and matched-level line, the shared loss range, the axes."""
    values = []
    for (cell, runs), color in zip(cells.items(), run_colors(len(cells)), strict=True):
        if runs:
            values += _matched_cell(ax, cell, runs, color, m, rng)
    if m is not None and len(m.levels):
        ax.axvspan(m.edges[0], m.edges[-1], color="0.85", alpha=0.4, lw=0, zorder=0)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
    all_y = np.concatenate(values) if values else np.empty(0)
    scale, linthresh = _gamma_scale(all_y)
    if scale == "symlog":
        # The linear zone at the 5% quantile of |γ_k|: a few tiny values would stretch the log part.
        small = np.abs(all_y[np.isfinite(all_y) & (all_y != 0)])
        if len(small):
            linthresh = max(linthresh, 10.0 ** math.floor(math.log10(np.quantile(small, 0.05))))
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.axhline(0.0, color="0.5", lw=0.6)
    else:
        ax.set_yscale("log")
    ax.invert_xaxis()  # training moves left to right: loss falls
    ax.set_xlabel(r"training loss ($\ell_k$ for dots, full loss for the levels)")
    ax.set_ylabel(r"$\gamma_k$")
    ax.set_title(panel, fontsize=10)
    ax.grid(alpha=0.3, lw=0.5)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no analysed run for this reference", transform=ax.transAxes, ha="center",
                fontsize=9, color="0.4")


def _matched_cell(ax: Axes, cell: str, runs: list[RunEntry], color: Any, m: Any,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """One cell's every-step dots, and its median γ_k at the matched levels (mean over seeds,
    band min–max); the γ values drawn (they set the panel's y scale)."""
    x = np.concatenate([e.steps["loss"].to_numpy(float) for e in runs])
    y = np.concatenate([e.steps["gamma"].to_numpy(float) for e in runs])
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    if len(x) > 3000:  # a readable cloud: a fixed subsample
        pick = rng.choice(len(x), 3000, replace=False)
        x, y = x[pick], y[pick]
    ax.scatter(x, y, s=2, color=color, alpha=0.12, lw=0)
    per = [m.per_level[e.label] for e in runs if e.label in m.per_level] if m is not None and len(m.levels) else []
    if not per:
        ax.plot([], [], "-o", ms=3, color=color, label=cell)
        return [y]
    table = np.vstack(per)
    defined = np.isfinite(table)
    count = defined.sum(axis=0)
    with np.errstate(invalid="ignore"):  # a level no seed reached stays NaN
        mean = np.where(defined, table, 0.0).sum(axis=0) / count
    ax.plot(m.levels, mean, "-o", ms=3, color=color, lw=1.5, label=cell)
    if len(per) > 1:
        lo = np.where(defined, table, np.inf).min(axis=0)
        hi = np.where(defined, table, -np.inf).max(axis=0)
        ok = count > 0
        ax.fill_between(m.levels[ok], lo[ok], hi[ok], color=color, alpha=0.2, lw=0)
    return [y, table.ravel()]


# ---------------------------------------------------------------------- layers figure
def layers_figure(entries: Sequence[RunEntry], out: str | Path, notes: list[str],
                  stem: str = "layers") -> Path | None:
    """Draw ``<stem>.png``/``.pdf``: each tensor's share of the total progress Σ_k P_k.

    One panel per run with a per-tensor table, one horizontal bar per tensor in model
    order; a negative share (the tensor moved the trajectory away from θ* overall) is
    drawn in a distinct colour, and each bar is annotated with the fraction of steps on
    which that tensor pulled against (P_{k,i} < 0). Returns None, with a note, when no
    run has the table.

    Example:
        >>> import tempfile
        >>> from gammatrace.reporting.collect import example_entry
        >>> relu, tanh = example_entry("relu"), example_entry("tanh")
        >>> relu.layers = pd.DataFrame({"tensor": ["0.weight", "0.bias"], "share": [1.1, -0.1],
        ...                             "frac_negative": [0.2, 0.6]})
        >>> layers_figure([relu, tanh], tempfile.mkdtemp(), notes := []).name
        'layers.png'
        >>> notes
        ['tanh: no layer panel (missing layers.tensor, layers.share, layers.frac_negative)']
    """
    out = Path(out)
    colors = run_colors(len(entries))
    panels = []
    for e, color in zip(entries, colors, strict=True):
        if not e.analysed:
            continue
        miss = LAYERS.missing(_tables(e))
        if miss or not len(e.layers):
            notes.append(f"{e.label}: no layer panel ({e.layers_note or 'missing ' + ', '.join(miss)})")
            continue
        panels.append((e, color))
    if not panels:
        notes.append("layers figure not drawn: no run has a per-tensor table")
        return None

    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    most = max(len(e.layers) for e, _ in panels)
    fig = Figure(figsize=(4.2 * ncols, nrows * (0.28 * most + 1.2)))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, (e, color) in zip(axes[: len(panels)], panels, strict=True):
        t = e.layers
        share = t["share"].to_numpy(float)
        y = np.arange(len(t))
        ax.barh(y, share, color=np.where(share < 0, NEGATIVE, POSITIVE), height=0.7)
        ax.set_yticks(y, [str(n) for n in t["tensor"]], fontsize=7)
        ax.invert_yaxis()  # model order, input layer on top
        ax.axvline(0.0, color="0.3", lw=0.6)
        for yi, s, f in zip(y, share, t["frac_negative"].to_numpy(float), strict=True):
            if np.isfinite(s) and np.isfinite(f):
                ax.annotate(f"{f:.0%}", (s, yi), xytext=(3 if s >= 0 else -3, 0), textcoords="offset points",
                            ha="left" if s >= 0 else "right", va="center", fontsize=6, color="0.35")
        lo, hi = np.nanmin(np.append(share, 0.0)), np.nanmax(np.append(share, 0.0))
        pad = 0.18 * (hi - lo or 1.0)
        ax.set_xlim(lo - (pad if lo < 0 else 0.02 * pad), hi + pad)
        ax.set_title(legend_label(e), fontsize=9, color=color)
        ax.set_xlabel(r"share of $\Sigma_k\,P_k$", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3, lw=0.5)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.legend(handles=[Patch(color=POSITIVE, label="share ≥ 0 (toward θ*)"),
                        Patch(color=NEGATIVE, label="share < 0 (pulls against)")],
               loc="upper center", ncols=2, fontsize=8, bbox_to_anchor=(0.5, 1.0))
    fig.text(0.5, -0.01, r"bar labels: fraction of steps on which the tensor pulled against ($P_{k,i} < 0$)",
             ha="center", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return save_figure(fig, out, stem)
