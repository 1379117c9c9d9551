"""The report's figures: the papers' three-row trajectory figure and per-layer shares.

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
    >>> notes  # the example entries have no γ_k column: that row is left out
    ['relu: γ row skipped (missing steps.gamma)', 'sigmoid: γ row skipped (missing steps.gamma)']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from gammatrace import principles as P
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

    def missing(self, tables: dict[str, pd.DataFrame]) -> list[str]:
        out = []
        for name in ("steps", "epochs", "layers"):
            frame = tables.get(name, pd.DataFrame())
            out += [f"{name}.{c}" for c in getattr(self, name) if c not in frame.columns]
        return out


DISTANCE = Needs(steps=("step", "dist_sq", "progress"))
LOSS = Needs(epochs=("epoch", "train_loss"))
LOSS_FALLBACK = Needs(epochs=("epoch", "mean_batch_loss"))
GAMMA = Needs(steps=("epoch", "gamma"))
LAYERS = Needs(layers=("tensor", "share", "frac_negative"))


def _tables(entry: RunEntry) -> dict[str, pd.DataFrame]:
    return {"steps": entry.steps, "epochs": main_epochs(entry), "layers": entry.layers}


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


def _save(fig: Figure, out: Path, stem: str) -> Path:
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    fig.savefig(out / f"{stem}.pdf", bbox_inches="tight")
    return png


# ------------------------------------------------------------------ trajectory figure
def gamma_epoch_stats(steps: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch quartiles and minimum of the defined γ_k (undefined steps are not values).

    Example:
        >>> import pandas as pd
        >>> s = pd.DataFrame({"epoch": [0, 0, 0, 1], "gamma": [1.0, 2.0, 3.0, float("nan")]})
        >>> gamma_epoch_stats(s)[["min", "median", "q75"]].values.tolist()
        [[1.0, 2.0, 2.5], [nan, nan, nan]]
    """
    g = steps[["epoch", "gamma"]].astype({"gamma": np.float64})
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


def trajectory_figure(entries: Sequence[RunEntry], out: str | Path, notes: list[str],
                      title: str = "", cells: dict[str, list[RunEntry]] | None = None,
                      stem: str = "trajectory") -> Path | None:
    """Draw ``<stem>.png``/``.pdf``: d_k/D_0, training loss and per-epoch γ_k vs epochs.

    One line per run, or with ``cells`` (name -> the runs of one cell, e.g. its seeds)
    one line per cell. Row 1: d_k/D_0 per step (x = step / steps per epoch) with the
    end point d_T/D_0 (0 for θ* = θ_T). Row 2: full training loss after each epoch
    (x = epoch + 1; mean batch loss if the full loss was not measured); log y when it
    spans more than a decade. Row 3: γ_k per epoch at the epoch's middle (x = epoch +
    ½): the median as the line, minimum as ▼ markers; log y, or symlog when a value is
    ≤ 0 (see :func:`_gamma_scale`). The shaded band is the 25–75% range of γ_k when
    every line is one run; when a cell has several runs, every line is the mean over
    its runs (of d_k/D_0, of the loss, of the per-epoch median γ_k) and the band is
    the min–max over them. Lines whose runs are all flagged "no progress" are dashed.
    Appends to ``notes`` why a run or row was left out; returns None when nothing is
    drawable.

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
    colors = run_colors(len(cells))
    drawable = []
    for (name, runs), color in zip(cells.items(), colors, strict=True):
        for e in runs:
            if not e.analysed:
                notes.append(f"{e.label} not drawn: {e.problem}")
        ok = [e for e in runs if e.analysed]
        if ok:
            drawable.append((name, ok, color))
    if not drawable:
        notes.append("trajectory figure not drawn: no analysed run")
        return None

    fig = Figure(figsize=(7.5, 9.0), layout="constrained")
    ax_d, ax_l, ax_g = fig.subplots(3, 1, sharex=True)
    handles: list[Line2D] = []
    loss_values: list[np.ndarray] = []
    gamma_values: list[np.ndarray] = []
    gamma_drawn = []

    def draw(ax, agg: pd.DataFrame, x: np.ndarray, ls: str, color, marker: str | None = None) -> None:
        if seeded:
            ax.fill_between(x, agg["lo"], agg["hi"], color=color, alpha=0.15, lw=0)
        ax.plot(x, agg["mean"], ls, marker=marker, ms=3, color=color, lw=1.3)

    for name, runs, color in drawable:
        ls = "--" if all(e.no_progress for e in runs) else "-"
        drew = False
        # --- row 1: normalized distance, aligned on the step index
        curves = []
        for e in runs:
            tables, spe = _tables(e), e.steps_per_epoch
            miss = DISTANCE.missing(tables)
            if miss or not spe:
                notes.append(f"{e.label}: distance row skipped (missing {', '.join(miss) or 'steps per epoch'})")
                continue
            steps = e.steps.sort_values("step")
            curve = P.monotone_distance(steps)["curve"]  # d_k/D_0 for k = 0 … T
            index = np.append(steps["step"].to_numpy(), steps["step"].iloc[-1] + 1) / spe
            curves.append(pd.Series(curve, index=index))
        if curves:
            agg = _aggregate(curves)
            draw(ax_d, agg, agg.index.to_numpy(), ls, color)
            drew = True
        # --- row 2: training loss per epoch
        losses = []
        for e in runs:
            tables = _tables(e)
            ep = tables["epochs"]
            if not LOSS.missing(tables):
                y = ep["train_loss"].to_numpy(float)
            elif not LOSS_FALLBACK.missing(tables):
                y = ep["mean_batch_loss"].to_numpy(float)
                notes.append(f"{e.label}: loss row shows the mean batch loss (no full training loss measured)")
            else:
                notes.append(f"{e.label}: loss row skipped (missing {', '.join(LOSS.missing(tables))})")
                continue
            if len(y):
                losses.append(pd.Series(y, index=ep["epoch"].to_numpy() + 1))
                loss_values.append(y)
        if losses:
            agg = _aggregate(losses)
            draw(ax_l, agg, agg.index.to_numpy(), ls, color, marker="o")
            drew = True
        # --- row 3: γ per epoch
        stats = []
        for e in runs:
            miss = GAMMA.missing(_tables(e))
            if miss:
                notes.append(f"{e.label}: γ row skipped (missing {', '.join(miss)})")
                continue
            st = gamma_epoch_stats(e.steps)
            if st["median"].notna().any():
                stats.append(st)
                gamma_values.append(st.to_numpy().ravel())
            else:
                notes.append(f"{e.label}: γ row skipped (no defined γ_k)")
        if stats:
            gamma_drawn.append((ls, color, stats))
            drew = True
        if drew:
            handles.append(Line2D([], [], color=color, ls=ls, lw=1.5, label=_cell_label(name, runs, seeded)))

    scale, linthresh = _gamma_scale(np.concatenate(gamma_values) if gamma_values else np.empty(0))
    for ls, color, stats in gamma_drawn:
        if seeded:
            agg = _aggregate([st["median"] for st in stats])
            low = pd.concat([st["min"] for st in stats], axis=1).min(axis=1)
            x = agg.index.to_numpy() + 0.5
            draw(ax_g, agg, x, ls, color, marker="o")
        else:
            st = stats[0]
            x = st.index.to_numpy() + 0.5
            ax_g.fill_between(x, st["q25"], st["q75"], color=color, alpha=0.15, lw=0)
            ax_g.plot(x, st["median"], ls, marker="o", ms=3, color=color, lw=1.3)
            low = st["min"]
        # clip_on=False: the lowest minimum sits on the axis edge and would be cut in half.
        ax_g.plot(low.index.to_numpy() + 0.5, low, ls="none", marker="v", ms=4, color=color, alpha=0.8,
                  clip_on=False)

    ax_d.set_ylabel(r"$d_k / D_0$")
    ax_d.set_ylim(bottom=0)
    ax_d.set_title("normalized distance to the reference point", fontsize=10)
    ax_l.set_ylabel("training loss")
    all_loss = np.concatenate(loss_values) if loss_values else np.empty(0)
    all_loss = all_loss[np.isfinite(all_loss)]
    if len(all_loss) and (all_loss > 0).all() and all_loss.max() / all_loss.min() > 10:
        ax_l.set_yscale("log")
    ax_l.set_title("full training loss after each epoch", fontsize=10)
    if gamma_drawn:
        if scale == "symlog":
            ax_g.set_yscale("symlog", linthresh=linthresh)
            ax_g.axhline(0.0, color="0.5", lw=0.6)
        else:
            ax_g.set_yscale("log")
        band = "seed min–max" if seeded else "25–75%"
        style = [Line2D([], [], color="0.3", marker="o", ms=3, label="mean of medians" if seeded else "median"),
                 Patch(color="0.3", alpha=0.15, label=band),
                 Line2D([], [], color="0.3", ls="none", marker="v", ms=4, label="min")]
        ax_g.legend(handles=style, fontsize=8, loc="best", ncols=3)
    ax_g.set_ylabel(r"$\gamma_k$ per epoch" + (" (symlog)" if scale == "symlog" else ""))
    ax_g.set_title(r"$\gamma_k$ per epoch", fontsize=10)
    ax_g.set_xlabel("epoch")
    ax_g.set_xlim(left=0)
    for ax in (ax_d, ax_l, ax_g):
        ax.grid(alpha=0.3, lw=0.5)
    # Below the plots rather than inside one: with several runs a legend covers curves.
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=min(len(handles), 3))
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, out, stem)


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
    return _save(fig, out, stem)
