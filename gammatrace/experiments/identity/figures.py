"""The study's three figures (matplotlib, imported only when a figure is drawn).

Each takes the cells' :func:`~gammatrace.experiments.identity.study.run_cell` results or
summaries and writes one PNG into ``out``, named in :data:`FIGURES`; the report links them
by file name.

Example:
    >>> FIGURES
    ('fig4_loss_distance.png', 'one_point_convexity.png', 'gamma_references.png')
    >>> from gammatrace.experiments.identity.problem import PRESETS
    >>> figure_loss_distance(results, PRESETS.get("quick")(), Path("out/im")).name  # needs a study's results  # doctest: +SKIP
    'fig4_loss_distance.png'
    'fig4_loss_distance.png'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gammatrace import principles as P
from gammatrace.experiments.identity.problem import CELL_BY_NAME, Cell, Preset
from gammatrace.experiments.identity.summary import REFERENCE_LABELS

LOSS_DISTANCE, ONE_POINT, REFERENCES = "fig4_loss_distance.png", "one_point_convexity.png", "gamma_references.png"
FIGURES = (LOSS_DISTANCE, ONE_POINT, REFERENCES)


def _style(cell: Cell) -> dict[str, Any]:
    # matplotlib is costly to import and needed only when drawing
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    color = cmap({(True, True): 0, (True, False): 1, (False, True): 2, (False, False): 3}[(cell.identity, cell.bounded)])
    return {"color": color, "ls": "-" if cell.init == "random" else "--"}


def _save(fig, path: Path, dpi: int = 90) -> Path:
    fig.savefig(path, dpi=dpi)
    return path


def figure_loss_distance(results: dict[str, dict[str, Any]], preset: Preset, out: Path) -> Path:
    """The report's Fig. 4: training loss, ‖W − W*‖_F and the distance to the minimizer reached."""
    # matplotlib is costly to import and needed only when drawing
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for name, r in results.items():
        cell, spe = CELL_BY_NAME[name], r["steps_per_epoch"]
        st = _style(cell)
        ep = r["epochs"]
        T = r["horizon"]
        axes[0].semilogy(ep["epoch"][: T + 1], ep["train_loss"][: T + 1], label=cell.label(preset), **st)
        planted = r["steps"]["planted"]
        x = planted["step"].to_numpy() / spe
        axes[1].semilogy(x, np.sqrt(planted["dist_sq"]), **st)
        if "found" in r["steps"]:
            found = r["steps"]["found"]
            axes[2].semilogy(found["step"].to_numpy() / spe, np.sqrt(found["dist_sq"]), **st)
    axes[0].set_title("full training loss")
    axes[1].set_title("‖W − W*‖_F  (planted teacher)")
    axes[2].set_title("‖W − Π·W*‖_F  (the exact minimizer reached;\nstalled runs reach none)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Teacher–student, y = ‖σ(Wx + x)‖₁ vs ‖σ(Wx)‖₁, PReLU slope {preset.negative_slope:g}: "
                 f"SGD lr {preset.lr:g}, d = {preset.d}, n = {preset.n}, batch {preset.batch_size}", fontsize=10)
    return _save(fig, out / LOSS_DISTANCE)


def figure_one_point(summaries: dict[str, dict[str, Any]], preset: Preset, out: Path) -> Path:
    """Per-epoch δ_min and the fraction of steps where the one-point condition holds."""
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
                              label=cell.label(preset), **st)
            axes[1, col].plot([int(e) for e in ep], [op["per_epoch"][e]["frac_holds"] for e in ep], **st)
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
    return _save(fig, out / ONE_POINT)


def figure_references(results: dict[str, dict[str, Any]], summaries: dict[str, dict[str, Any]], preset: Preset,
                      out: Path) -> Path:
    """γ_k and d_k/D_0 against the exact minimizer, θ_T and θ_{T+E}, for the cells that reached one."""
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
            kw = {"color": colors[ref], "lw": 0.7 if ref == "found" else 1.0, "label": REFERENCE_LABELS[ref]}
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
    # Thousands of noisy steps per panel make a heavy PNG; a lower resolution keeps it light.
    return _save(fig, out / REFERENCES, dpi=70)
