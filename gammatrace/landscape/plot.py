"""Figures of a :class:`~gammatrace.landscape.compute.Landscape`: the contour plane with the
paths and the update directions, and the 1-D interpolation θ_0 → θ_T.

Drawn on :class:`matplotlib.figure.Figure` objects (Agg canvas, no pyplot state), from the
stored arrays only, so a re-plot never touches a model.

Example:
    >>> import tempfile
    >>> from gammatrace.landscape.compute import example_landscape
    >>> out = Path(tempfile.mkdtemp())
    >>> png = plot_interpolation(example_landscape(), out / "interpolation.png")
    >>> png.name, png.stat().st_size > 0
    ('interpolation.png', True)

    A stored landscape (``compute_landscape``'s output folder) re-plots without a model:

    >>> from gammatrace.landscape.compute import Landscape
    >>> ls = Landscape.load(Path("out/ls"))            # needs a computed landscape in out/ls  # doctest: +SKIP
    >>> plot_landscape(ls, "out/ls/landscape.png")     # doctest: +SKIP
    PosixPath('out/ls/landscape.png')
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gammatrace.landscape.compute import Landscape

GRADIENT_COLOR = "black"
# Arrows are drawn at a fixed length (this fraction of each axis's span) because only their *directions* are comparable: an epoch's step and a single
# gradient have different units and sizes.
ARROW_FRACTION = 0.07
MAX_ARROWS_PER_RUN = 12


def _colors(n: int) -> list:
    # matplotlib loads only when a figure is drawn
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def _caption(ls: Landscape) -> str:
    s = ls.settings
    return (f"BN mode: {s['bn']} · loss on {s['samples']} fixed training samples · grid {s['grid']}×{s['grid']}, "
            f"extent {s['extent']}× the path · origin: {s['origin'].replace('theta_T', 'θ_T')}")


def _unit_arrows(vectors: np.ndarray, span: np.ndarray) -> np.ndarray:
    # Normalise in axis-relative units so an arrow's drawn angle is its true angle in
    # the plane's coordinates even when the two axes have different ranges.
    rel = vectors / span
    norm = np.linalg.norm(rel, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(norm > 0, rel / norm, 0.0)
    return rel * span * ARROW_FRACTION


def plot_landscape(ls: Landscape, path: str | Path) -> Path:
    """Contours of the loss on the PCA plane, every run's path, and at checkpoints the
    direction of −∇L(θ_e) (black) next to the optimizer's actual epoch step (run colour);
    right: the cosine of the two in the full parameter space, per epoch.

    Example:
        >>> import tempfile
        >>> from gammatrace.landscape.compute import example_landscape
        >>> png = plot_landscape(example_landscape(), Path(tempfile.mkdtemp()) / "landscape.png")
        >>> png.name, png.is_file()
        ('landscape.png', True)
    """
    path = Path(path)
    fig = Figure(figsize=(13.5, 6.0), layout="constrained")
    gs = fig.add_gridspec(1, 2, width_ratios=[1.7, 1.0])
    ax, axc = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    A, B = np.meshgrid(ls.alphas, ls.betas)
    Z = ls.loss
    finite = Z[np.isfinite(Z)]
    lo, hi = float(finite.min()), float(finite.max())
    if lo > 0 and hi / lo > 2:  # log-spaced levels resolve the basin, where the paths run
        levels = np.geomspace(lo, hi, 25)
        cs = ax.contourf(A, B, Z, levels=levels, norm=LogNorm(lo, hi), cmap="viridis", alpha=0.85)
    else:
        levels = np.linspace(lo, hi if hi > lo else lo + 1e-12, 25)
        cs = ax.contourf(A, B, Z, levels=levels, cmap="viridis", alpha=0.85)
    ax.contour(A, B, Z, levels=levels[::3], colors="white", linewidths=0.5, alpha=0.6)
    cb = fig.colorbar(cs, ax=ax, label="loss (evaluation subset)", shrink=0.9)
    # Plain labels at every fourth level: a log norm would otherwise print "1.4587×10⁰".
    cb.minorticks_off()
    cb.set_ticks(levels[::4], labels=[f"{v:.3g}" for v in levels[::4]])

    span = np.array([np.ptp(ls.alphas), np.ptp(ls.betas)])
    handles = []
    for r, (name, c) in enumerate(zip(ls.run_names, _colors(len(ls.run_names)), strict=True)):
        xy = ls.coords[r]
        ax.plot(xy[:, 0], xy[:, 1], "-", color=c, lw=1.6, zorder=3)
        ax.plot(xy[:-1, 0], xy[:-1, 1], "o", color=c, ms=2.5, zorder=3)
        ax.plot(*xy[0], "o", color=c, ms=8, mec="black", zorder=4)
        ax.plot(*xy[-1], "*", color=c, ms=14, mec="black", zorder=4)
        n = len(ls.step_proj[r])
        if n:
            every = max(1, math.ceil(n / MAX_ARROWS_PER_RUN))
            at = np.arange(0, n, every)
            step = _unit_arrows(ls.step_proj[r][at], span)
            grad = _unit_arrows(ls.grad_proj[r][at], span)
            kw = dict(angles="xy", scale_units="xy", scale=1, width=0.0035, zorder=5)
            ax.quiver(xy[at, 0], xy[at, 1], step[:, 0], step[:, 1], color=c, **kw)
            ax.quiver(xy[at, 0], xy[at, 1], grad[:, 0], grad[:, 1], color=GRADIENT_COLOR, alpha=0.8, **kw)
            epochs = np.arange(n)
            axc.plot(epochs, ls.cos_full[r], "-o", ms=3, color=c, label=name)
            plane = np.array([_cos2(g, s) for g, s in zip(ls.grad_proj[r], ls.step_proj[r], strict=True)])
            axc.plot(epochs, plane, ":", color=c, alpha=0.7)
        final = ls.path_loss[r][-1]
        handles.append(Line2D([], [], color=c, marker="o", label=f"{name} (θ_T loss {final:.3g})"))
    handles += [Line2D([], [], color="grey", marker="o", ls="", ms=8, mec="black", label="θ_0"),
                Line2D([], [], color="grey", marker="*", ls="", ms=12, mec="black", label="θ_T"),
                Line2D([], [], color="grey", marker=r"$\rightarrow$", ls="", ms=12,
                       label=r"actual epoch step $\theta_{e+1} - \theta_e$ (direction)"),
                Line2D([], [], color=GRADIENT_COLOR, marker=r"$\rightarrow$", ls="", ms=12,
                       label=r"$-\nabla L(\theta_e)$, plain gradient step (direction)")]
    ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.85)
    ax.set_xlabel(f"PC1: {100 * ls.explained[0]:.1f}% of displacement variance")
    ax.set_ylabel(f"PC2: {100 * ls.explained[1]:.1f}% of displacement variance")
    ax.set_title("Loss on the PCA plane of the path (Li et al. 2018)", fontsize=11)
    axc.axhline(0.0, color="grey", lw=0.8)
    axc.set_ylim(-1.05, 1.05)
    axc.set_xlabel("epoch e")
    axc.set_ylabel(r"$\cos(-\nabla L(\theta_e),\ \theta_{e+1} - \theta_e)$")
    axc.set_title("Does the step follow the gradient?\n(solid: full space, dotted: in the plane)", fontsize=10)
    if ls.run_names and any(len(s) for s in ls.step_proj):
        axc.legend(fontsize=8)
    fig.suptitle(_caption(ls), fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _cos2(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.hypot(*a)), float(np.hypot(*b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def plot_interpolation(ls: Landscape, path: str | Path) -> Path:
    """Loss along θ(α) = (1 − α)·θ_0 + α·θ_T for each run, α from −0.25 to 1.25.

    Example:
        >>> import tempfile
        >>> from gammatrace.landscape.compute import example_landscape
        >>> png = plot_interpolation(example_landscape(), Path(tempfile.mkdtemp()) / "interpolation.png")
        >>> png.name, png.is_file()
        ('interpolation.png', True)
    """
    path = Path(path)
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    lo, hi = np.inf, 0.0
    for r, (name, c) in enumerate(zip(ls.run_names, _colors(len(ls.run_names)), strict=True)):
        y = ls.interp_loss[r]
        finite = y[np.isfinite(y)]
        if len(finite):
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
        ax.plot(ls.interp_alpha, y, "-o", ms=3, color=c, label=name)
    for a, label in ((0.0, "θ_0"), (1.0, "θ_T")):
        ax.axvline(a, color="grey", ls=":", lw=1)
        ax.annotate(label, (a, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=9, color="grey")
    if lo > 0 and hi / lo > 5:  # log only where it helps; a narrow range reads better linear
        ax.set_yscale("log")
    ax.set_xlabel("α")
    ax.set_ylabel("loss (evaluation subset)")
    ax.set_title("Straight line θ_0 → θ_T: θ(α) = (1 − α)·θ_0 + α·θ_T", fontsize=11)
    ax.legend(fontsize=8)
    s = ls.settings
    fig.suptitle(f"BN mode: {s['bn']} (buffers interpolated alike) · {s['samples']} fixed training samples",
                 fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
