"""The study's three figures (matplotlib, imported only when a figure is drawn).

Each takes the cells' :func:`~gammatrace.experiments.identity.study.run_cell` results or
summaries and writes one PNG into ``out``, named in :data:`FIGURES`; the report links them
by file name.

Example:
    >>> FIGURES
    ('fig4_loss_distance.png', 'one_point_convexity.png', 'gamma_references.png')
    >>> from gammatrace.experiments.identity.problem import PRESETS
    >>> import json
    >>> curves = json.load(open("out/im/identity_mapping.json"))["curves"]  # needs a study's output  # doctest: +SKIP
    >>> figure_loss_distance(curves, PRESETS.get("quick")(), Path("out/im")).name  # doctest: +SKIP
    'fig4_loss_distance.png'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gammatrace import principles as P
from gammatrace.experiments.identity.problem import CELL_BY_NAME, Cell, Preset
from gammatrace.experiments.identity.summary import CURVES, REFERENCE_LABELS
from gammatrace.store.backend import write_inside

LOSS_DISTANCE, ONE_POINT, REFERENCES = "fig4_loss_distance.png", "one_point_convexity.png", "gamma_references.png"
FIGURES = (LOSS_DISTANCE, ONE_POINT, REFERENCES)
MNIST_ERROR = "fig3_test_error.png"  # the identity-mnist study's figure


def _style(cell: Cell) -> dict[str, Any]:
    # matplotlib is costly to import and needed only when drawing
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    color = cmap({(True, True): 0, (True, False): 1, (False, True): 2, (False, False): 3}[(cell.identity, cell.bounded)])
    return {"color": color, "ls": "-" if cell.init == "random" else "--"}


def _save(fig, path: Path, dpi: int = 90) -> Path:
    # Atomically and never through a symbolic link planted in the study's folder (issue 22).
    return write_inside(path.parent, path.name, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"),
                        what="the study folder")


def _band(ax, x, stats: dict[str, list], gid: str, **style) -> None:
    """The mean as a line, the min–max over repeats as a band (drawn only when they differ)."""
    mean = np.asarray(stats["mean"], dtype=float)
    ax.plot(x, mean, gid=gid, **style)
    lo, hi = np.asarray(stats["min"], dtype=float), np.asarray(stats["max"], dtype=float)
    if not np.allclose(lo, hi, equal_nan=True):
        ax.fill_between(x, lo, hi, color=style.get("color"), alpha=0.15, lw=0, gid=f"{gid}:band")


def draw_loss_distance(curves: dict[str, dict[str, Any]], preset: Preset):
    """The report's Fig. 4 as a matplotlib Figure: per epoch, the full training loss,
    ‖W − W*‖_F and the distance to the exact minimizer reached — the mean over the cell's
    repeats as a line (``gid`` = cell name), their min–max as a band (``gid`` = name + ":band").

    ``curves``: :func:`~gammatrace.experiments.identity.summary.loss_distance_curves`.
    """
    # matplotlib is costly to import and needed only when drawing
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for name, c in curves.items():
        cell = CELL_BY_NAME[name]
        st = _style(cell)
        x = np.asarray(c["epoch"])
        for ax, key in zip(axes, CURVES, strict=True):
            if np.isfinite(np.asarray(c[key]["mean"], dtype=float)).any():
                _band(ax, x, c[key], name, label=cell.label(preset), **st)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    n = max((c["n"] for c in curves.values()), default=1)
    over = f" (mean of {n} runs, band: min–max)" if n > 1 else ""
    axes[0].set_title("full training loss" + over)
    axes[1].set_title("‖W − W*‖_F  (planted teacher)")
    axes[2].set_title("‖W − Π·W*‖_F  (the exact minimizer reached;\nruns that reach none are left out)")
    axes[0].legend(fontsize=7)
    y = "Σ_i σ(Wx + x)_i vs Σ_i σ(Wx)_i" if preset.output == "sum" else "Σ_i |σ(Wx + x)_i| vs Σ_i |σ(Wx)_i|"
    fig.suptitle(f"Teacher–student, y = {y}, PReLU slope {preset.negative_slope:g} (fixed): "
                 f"SGD lr {preset.lr:g}, d = {preset.d}, n = {preset.n}, batch {preset.batch_size}", fontsize=10)
    return fig


def figure_loss_distance(curves: dict[str, dict[str, Any]], preset: Preset, out: Path) -> Path:
    """:func:`draw_loss_distance` written to ``out/fig4_loss_distance.png``."""
    return _save(draw_loss_distance(curves, preset), out / LOSS_DISTANCE)


def figure_one_point(summaries: dict[str, dict[str, Any]], preset: Preset, out: Path) -> Path:
    """:func:`draw_one_point` written to ``out/one_point_convexity.png``."""
    return _save(draw_one_point(summaries, preset), out / ONE_POINT)


def draw_one_point(summaries: dict[str, dict[str, Any]], preset: Preset):
    """Per-epoch δ_min and the fraction of steps where the one-point condition holds
    (the first repeat's; lines carry ``gid`` = cell name), against W* and against the
    minimizer reached."""
    # matplotlib is costly to import and needed only when drawing
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    for col, ref in enumerate(("planted", "found")):
        for name, s in summaries.items():
            op = s["one_point"].get(ref)
            if op is None:
                continue
            cell = CELL_BY_NAME[name]
            ep = sorted(op["per_epoch"], key=int)
            st = _style(cell)
            axes[0, col].plot([int(e) for e in ep], [op["per_epoch"][e]["delta_min"] for e in ep],
                              label=cell.label(preset), gid=name, **st)
            axes[1, col].plot([int(e) for e in ep], [op["per_epoch"][e]["frac_holds"] for e in ep], gid=name, **st)
        axes[0, col].set_yscale("symlog", linthresh=1e-2)
        axes[0, col].axhline(0, color="grey", lw=0.8)
        what = "W*" if ref == "planted" else "Π·W* (minimizer reached)"
        axes[0, col].set_title(f"δ_min per epoch against {what}")
        axes[1, col].set_title(f"fraction of steps with ⟨∇L(W), W − {what.split()[0]}⟩ > 0")
        axes[1, col].set_xlabel("epoch")
        axes[1, col].set_ylim(-0.05, 1.05)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("One-point strong convexity along the SGD path: δ_k = ⟨∇L(W_k), W_k − W*⟩ / ‖W_k − W*‖² "
                 "(∇L: full training loss)", fontsize=10)
    return fig


def figure_references(results: dict[str, dict[str, Any]], summaries: dict[str, dict[str, Any]], preset: Preset,
                      out: Path) -> Path:
    """:func:`draw_references` written to ``out/gamma_references.png``."""
    # Thousands of noisy steps per panel make a heavy PNG; a lower resolution keeps it light.
    return _save(draw_references(results, summaries, preset), out / REFERENCES, dpi=70)


def draw_references(results: dict[str, dict[str, Any]], summaries: dict[str, dict[str, Any]], preset: Preset):
    """γ_k and d_k/D_0 against the exact minimizer, θ_T and θ_{T+E}, for the cells that
    reached one (the first repeat; lines carry ``gid`` = "cell:reference")."""
    # matplotlib is costly to import and needed only when drawing
    from matplotlib.figure import Figure

    names = [n for n in results if "found" in results[n]["steps"]]
    fig = Figure(figsize=(13, 2.3 * max(len(names), 1) + 0.8), layout="constrained")
    axes = np.atleast_2d(fig.subplots(max(len(names), 1), 2, squeeze=False))
    colors = {"found": "black", "last": "#C44E52", "continuation": "#4C72B0"}
    for row, name in enumerate(names):
        r, s = results[name], summaries[name]
        n = s["n_steps"]
        frac = np.arange(n) / n
        # The truth is drawn last and thin: where a proxy agrees it is hidden under it,
        # where it deviates (the grey late window) it shows.
        for ref in ("last", "continuation", "found"):
            with np.errstate(divide="ignore", invalid="ignore"):
                full = P.derive(r["steps"][ref], eps=preset.eps)
                curve = P.monotone_distance(full)["curve"]
            kw = {"color": colors[ref], "lw": 0.7 if ref == "found" else 1.0, "label": REFERENCE_LABELS[ref],
                  "gid": f"{name}:{ref}"}
            axes[row, 0].plot(frac, full["gamma"], **kw)
            axes[row, 1].semilogy(np.arange(n + 1) / n, curve, **kw)
        for ax in axes[row]:
            ax.axvspan(1 - preset.late_fraction, 1, color="grey", alpha=0.15, lw=0)
            ax.grid(alpha=0.3)
        axes[row, 0].set_yscale("symlog", linthresh=1e-2)
        axes[row, 0].set_ylabel(CELL_BY_NAME[name].label(preset), fontsize=8)
    if names:
        axes[0, 0].set_title("γ_k (grey: last 10% of the horizon)")
        axes[0, 1].set_title("d_k / D_0")
        axes[0, 1].legend(fontsize=7)
        axes[-1, 0].set_xlabel("k / T")
        axes[-1, 1].set_xlabel("k / T")
    fig.suptitle("The same SGD trajectory measured against the exact minimizer and against the papers' proxies",
                 fontsize=10)
    return fig


def draw_mnist_error(cells: dict[str, dict[str, Any]], panels: tuple[tuple[str, tuple[str, ...]], ...]):
    """The report's Fig. 3: test error per epoch, one panel per comparison — the mean over
    the runs as a line (``gid`` = cell name), the min–max as a band (``gid`` = name + ":band").

    ``cells``: :func:`~gammatrace.experiments.identity.mnist.summarize_mnist`; ``panels``:
    (title, cell names) pairs; cells not run are left out.
    """
    # matplotlib is costly to import and needed only when drawing
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    shown = [(title, [n for n in names if n in cells]) for title, names in panels]
    shown = [(title, names) for title, names in shown if names]
    fig = Figure(figsize=(4.6 * max(len(shown), 1), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(shown), 1), squeeze=False)[0])
    cmap = colormaps["tab10"]
    order = list(cells)
    for ax, (title, names) in zip(axes, shown, strict=False):
        for name in names:
            c = cells[name]
            style = {"color": cmap(order.index(name) % 10), "ls": "-" if c["init"] == "random" else "--",
                     "label": c["label"]}
            _band(ax, np.asarray(c["epoch"]), c["curve"], name, **style)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test error")
    n = max((c["runs"] for c in cells.values()), default=1)
    fig.suptitle(f"One hidden layer, identity mapping, zero vs random init: test error, mean of {n} runs "
                 "(band: min–max)", fontsize=10)
    return fig


def figure_mnist_error(cells: dict[str, dict[str, Any]], panels: tuple[tuple[str, tuple[str, ...]], ...],
                       out: Path) -> Path:
    """:func:`draw_mnist_error` written to ``out/fig3_test_error.png``."""
    return _save(draw_mnist_error(cells, panels), out / MNIST_ERROR)
