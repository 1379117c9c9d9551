"""Figures of a :class:`~gammatrace.landscape.compute.Landscape`, from its stored arrays only
(a re-plot never touches a model), on :class:`matplotlib.figure.Figure` objects (Agg
canvas, no pyplot state).

- :func:`figure_landscape` / :func:`plot_landscape` — one contour panel per plane:
  on a PCA plane the paths, and at checkpoints the direction of −∇L(θ_e) (black, what
  plain SGD would do there) next to the optimizer's actual epoch step (run colour), plus
  a panel of the cosine of the two per epoch; on random directions (Li et al. 2018) the
  contours around θ*, or for one direction all runs' curves L(θ* + α·d) on one axes.
- :func:`figure_interpolation` / :func:`plot_interpolation` — the loss along θ_0 → θ_T.

Artists carry ids (``Artist.get_gid``) so tests and users find them: ``contour-fill``,
``contour-lines``, ``path:NAME``, ``start:NAME`` (θ_0), ``end:NAME`` (θ_T, drawn above
the arrows), ``step:NAME``, ``grad:NAME``, ``curve:NAME``, ``interp:NAME``, ``cos:NAME``.
Captions are wrapped to the figure's width; they name the batch-norm mode only for
models with running statistics (else the module mode) and the number of samples the
loss was evaluated on.

Example:
    >>> import tempfile
    >>> from gammatrace.landscape.compute import example_landscape
    >>> out = Path(tempfile.mkdtemp())
    >>> png = plot_interpolation(example_landscape(), out / "interpolation.png")
    >>> png.name, png.stat().st_size > 0
    ('interpolation.png', True)
    >>> fig = figure_landscape(example_landscape())
    >>> [ax.get_title() for ax in fig.axes if ax.get_label() == "plane"]
    ['demo']

    A stored landscape (``compute_landscape``'s output folder) re-plots without a model:

    >>> from gammatrace.landscape.compute import Landscape
    >>> ls = Landscape.load(Path("out/ls"))            # needs a computed landscape in out/ls  # doctest: +SKIP
    >>> plot_landscape(ls, "out/ls/landscape.png")     # doctest: +SKIP
    PosixPath('out/ls/landscape.png')
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gammatrace.landscape.compute import Landscape, Plane
from gammatrace.store.backend import write_inside

GRADIENT_COLOR = "black"
# Arrows are drawn at a fixed length (this fraction of each axis's span) because only their *directions* are comparable: an epoch's step and a single
# gradient have different units and sizes.
ARROW_FRACTION = 0.07
MAX_ARROWS_PER_RUN = 12
MAX_COLUMNS = 3


def _colors(n: int) -> list:
    # matplotlib loads only when a figure is drawn
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def _mode(ls: Landscape) -> str:
    # "BN mode" only where there is batch norm to speak of; the mode still sets dropout.
    return f"{'BN' if ls.running_stats else 'module'} mode: {ls.settings['bn']}"


def _samples(ls: Landscape) -> str:
    """'loss on N fixed training samples', with the number actually evaluated (see
    ``Landscape.samples_used``): ``samples``, or all of a smaller training set."""
    asked = int(ls.settings["samples"])
    used = ls.samples_used or [asked] * len(ls.run_names)
    if len(set(used)) == 1:
        n = used[0]
        return f"loss on {n} fixed training samples" if n >= asked else f"loss on all {n} training samples"
    return "loss on " + ", ".join(f"{n} ({name})" for n, name in zip(used, ls.run_names, strict=True)) + \
        " training samples"


SEP = " · "


def _pack(parts: list[str], width: int) -> list[str]:
    """Caption parts joined by " · " into lines of at most ``width`` characters, breaking
    between parts (inside one only when it alone is longer than a line).

    Example:
        >>> _pack(["BN mode: train", "loss on 512 fixed training samples", "grid 21×21"], 60)
        ['BN mode: train · loss on 512 fixed training samples ·', 'grid 21×21']
    """
    lines: list[str] = []
    current = ""
    for part in parts:
        pieces = textwrap.wrap(part, width - 2, break_long_words=False) or [""]
        if current and len(current) + len(SEP) + len(pieces[0]) <= width:
            current += SEP + pieces[0]
        else:
            if current:
                lines.append(current + SEP.rstrip())
            current = pieces[0]
        for piece in pieces[1:]:
            lines.append(current)
            current = piece
    return [*lines, current] if current else lines


def _suptitle(fig: Figure, parts: list[str], fontsize: float) -> None:
    # Wrapped to the figure's width (a glyph of the default font is ~0.55 em wide on
    # average), so no caption is cut at the edges of a narrow figure.
    width = max(20, int(fig.get_figwidth() * 72 / (0.55 * fontsize)) - 2)
    fig.suptitle("\n".join(_pack(parts, width)), fontsize=fontsize)


def _caption(ls: Landscape) -> list[str]:
    s = ls.settings
    head = [_mode(ls), _samples(ls)]
    if ls.directions == "random":
        rule = "fixed at θ*" if s.get("ignore") == "biasbn" else "direction = θ*"
        n = s.get("dims", 2)
        return [*head, f"{n} filter-normalised random direction{'s' if n > 1 else ''} (seed {s['direction_seed']}; "
                       f"biases/norm parameters {rule})", f"[−{s['span']}, {s['span']}] on {s['grid']} points",
                "centre: θ_T of each path"]
    return [*head, f"grid {s['grid']}×{s['grid']}, extent {s['extent']}× the path",
            f"origin: {s['origin'].replace('theta_T', 'θ_T')}"]


def _unit_arrows(vectors: np.ndarray, span: np.ndarray) -> np.ndarray:
    # Normalise in axis-relative units so an arrow's drawn angle is its true angle in
    # the plane's coordinates even when the two axes have different ranges.
    rel = vectors / span
    norm = np.linalg.norm(rel, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(norm > 0, rel / norm, 0.0)
    return rel * span * ARROW_FRACTION


def _levels(Z: np.ndarray) -> tuple[np.ndarray, LogNorm | None]:
    finite = Z[np.isfinite(Z)]
    lo, hi = float(finite.min()), float(finite.max())
    if lo > 0 and hi / lo > 2:  # log-spaced levels resolve the basin, where the paths run
        return np.geomspace(lo, hi, 25), LogNorm(lo, hi)
    return np.linspace(lo, hi if hi > lo else lo + 1e-12, 25), None


def _draw_contours(fig: Figure, ax: Axes, plane: Plane) -> None:
    A, B = np.meshgrid(plane.alphas, plane.betas)
    levels, norm = _levels(plane.loss)
    cs = ax.contourf(A, B, plane.loss, levels=levels, norm=norm, cmap="viridis", alpha=0.85)
    cs.set_gid("contour-fill")
    lines = ax.contour(A, B, plane.loss, levels=levels[::3], colors="white", linewidths=0.6, alpha=0.8)
    lines.set_gid("contour-lines")
    ax.clabel(lines, levels=lines.levels[::2], fmt="%.3g", fontsize=7, colors="white")
    cb = fig.colorbar(cs, ax=ax, label="loss (evaluation subset)", shrink=0.9)
    # Plain labels at every fourth level: a log norm would otherwise print "1.4587×10⁰".
    cb.minorticks_off()
    cb.set_ticks(levels[::4], labels=[f"{v:.3g}" for v in levels[::4]])


def _draw_paths(ax: Axes, ls: Landscape, plane: Plane, colors: list) -> None:
    span = np.array([np.ptp(plane.alphas), np.ptp(plane.betas)])
    handles = []
    for r in plane.runs:
        name, c, xy = ls.run_names[r], colors[r], ls.coords[r]
        # The path thin, so the step arrows along it (which follow it) stay visible.
        ax.plot(xy[:, 0], xy[:, 1], "-", color=c, lw=1.1, alpha=0.75, zorder=3, gid=f"path:{name}")
        ax.plot(xy[:-1, 0], xy[:-1, 1], "o", color=c, ms=2.5, zorder=3)
        # The end points above the arrows that start or end at them (zorder 5).
        ax.plot(*xy[0], "o", color=c, ms=8, mec="black", zorder=6, gid=f"start:{name}")
        ax.plot(*xy[-1], "*", color=c, ms=14, mec="black", zorder=6, gid=f"end:{name}")
        n = len(ls.step_proj[r])
        if n:
            at = np.arange(0, n, max(1, math.ceil(n / MAX_ARROWS_PER_RUN)))
            step = _unit_arrows(ls.step_proj[r][at], span)
            grad = _unit_arrows(ls.grad_proj[r][at], span)
            kw = dict(angles="xy", scale_units="xy", scale=1, zorder=5)
            ax.quiver(xy[at, 0], xy[at, 1], step[:, 0], step[:, 1], color=c, width=0.006, edgecolor="white",
                      linewidth=0.6, gid=f"step:{name}", **kw)
            ax.quiver(xy[at, 0], xy[at, 1], grad[:, 0], grad[:, 1], color=GRADIENT_COLOR, alpha=0.85, width=0.0035,
                      gid=f"grad:{name}", **kw)
        handles.append(Line2D([], [], color=c, marker="o", label=f"{name} (θ_T loss {ls.path_loss[r][-1]:.3g})"))
    handles += [Line2D([], [], color="grey", marker="o", ls="", ms=8, mec="black", label="θ_0"),
                Line2D([], [], color="grey", marker="*", ls="", ms=12, mec="black", label="θ_T"),
                Line2D([], [], color="grey", marker=r"$\rightarrow$", ls="", ms=12,
                       label=r"actual epoch step $\theta_{e+1} - \theta_e$ (direction)"),
                Line2D([], [], color=GRADIENT_COLOR, marker=r"$\rightarrow$", ls="", ms=12,
                       label=r"SGD direction $-\nabla L(\theta_e)$ (direction)")]
    ax.legend(handles=handles, loc="best", fontsize=7, framealpha=0.85)
    ax.set_xlabel(f"PC1: {100 * plane.explained[0]:.1f}% of displacement variance")
    ax.set_ylabel(f"PC2: {100 * plane.explained[1]:.1f}% of displacement variance")


def _draw_center(ax: Axes, ls: Landscape, plane: Plane, colors: list) -> None:
    r = plane.source
    ax.plot(0.0, 0.0, "*", color=colors[r], ms=14, mec="black", zorder=4,
            label=f"θ* = θ_T of {ls.run_names[r]} (loss {ls.path_loss[r][-1]:.3g})")
    ax.legend(loc="upper right", fontsize=7, framealpha=0.85)
    ax.set_xlabel(r"$\alpha$ along $d_1$ (filter-normalised random direction)")
    ax.set_ylabel(r"$\beta$ along $d_2$ (filter-normalised random direction)")


def _draw_cosines(axc: Axes, ls: Landscape, colors: list) -> None:
    for r, name in enumerate(ls.run_names):
        n = len(ls.step_proj[r])
        if not n:
            continue
        epochs = np.arange(n)
        axc.plot(epochs, ls.cos_full[r], "-o", ms=3, color=colors[r], label=name, gid=f"cos:{name}")
        plane = np.array([_cos2(g, s) for g, s in zip(ls.grad_proj[r], ls.step_proj[r], strict=True)])
        axc.plot(epochs, plane, ":", color=colors[r], alpha=0.7)
    axc.axhline(0.0, color="grey", lw=0.8)
    axc.set_ylim(-1.05, 1.05)
    axc.set_xlabel("epoch e")
    axc.set_ylabel(r"$\cos(-\nabla L(\theta_e),\ \theta_{e+1} - \theta_e)$")
    axc.set_title("Does the step follow the SGD direction?\n(solid: full space, dotted: in its plane)", fontsize=10)
    if any(len(s) for s in ls.step_proj):
        axc.legend(fontsize=8)


def _plane_title(ls: Landscape, plane: Plane) -> str:
    if len(plane.runs) == 1:
        return plane.name
    return f"Shared PCA plane of {plane.name} (Li et al. 2018)"


def _figure_curves(ls: Landscape) -> Figure:
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot(label="plane")
    colors = _colors(len(ls.run_names))
    for plane in ls.planes:
        r = plane.source
        ax.plot(plane.alphas, plane.loss, "-o", ms=3, color=colors[r], gid=f"curve:{ls.run_names[r]}",
                label=f"{ls.run_names[r]} (θ_T loss {ls.path_loss[r][-1]:.3g})")
    ax.axvline(0.0, color="grey", ls=":", lw=1)
    ax.set_xlabel(r"$\alpha$: $\theta^* + \alpha\, d$, $d$ a filter-normalised random direction")
    ax.set_ylabel("loss (evaluation subset)")
    ax.set_title("Loss along a random direction around θ* = θ_T (Li et al. 2018)", fontsize=11)
    ax.legend(fontsize=8)
    _suptitle(fig, _caption(ls), 8)
    return fig


def figure_landscape(ls: Landscape) -> Figure:
    """The landscape figure (see module doc), not saved: its artists can be read back.

    Panels (axes labelled ``plane``) in ``ls.planes`` order, titled by the run's name (a
    shared plane: all names); a PCA landscape has one more axes, ``cosine``.

    Example:
        >>> from gammatrace.landscape.compute import example_landscape
        >>> fig = figure_landscape(example_landscape())
        >>> ax = next(a for a in fig.axes if a.get_label() == "plane")
        >>> next(l for l in ax.lines if l.get_gid() == "path:demo").get_xydata().tolist()
        [[-1.2, 0.7], [-0.5, 0.1], [0.0, 0.0]]
    """
    if ls.planes[0].dims == 1:
        return _figure_curves(ls)
    n = len(ls.planes)
    cells = n + (1 if ls.has_paths else 0)
    ncols = min(cells, MAX_COLUMNS)
    nrows = math.ceil(cells / ncols)
    fig = Figure(figsize=(5.8 * ncols + (1.8 if cells == 2 else 0), 5.0 * nrows + 0.4), layout="constrained")
    gs = fig.add_gridspec(nrows, ncols, width_ratios=[1.7, 1.0] if cells == 2 and ls.has_paths else None)
    colors = _colors(len(ls.run_names))
    for p, plane in enumerate(ls.planes):
        ax = fig.add_subplot(gs[p // ncols, p % ncols], label="plane")
        _draw_contours(fig, ax, plane)
        if ls.has_paths:
            _draw_paths(ax, ls, plane, colors)
        else:
            _draw_center(ax, ls, plane, colors)
        ax.set_title(_plane_title(ls, plane), fontsize=11)
    if ls.has_paths:
        _draw_cosines(fig.add_subplot(gs[n // ncols, n % ncols], label="cosine"), ls, colors)
    _suptitle(fig, _caption(ls), 8)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    # Atomically, never through a symbolic link planted at the figure's name.
    return write_inside(path.parent, path.name,
                        lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".").lower() or "png"))


def plot_landscape(ls: Landscape, path: str | Path) -> Path:
    """:func:`figure_landscape` saved as ``path`` (PNG at 110 dpi).

    Example:
        >>> import tempfile
        >>> from gammatrace.landscape.compute import example_landscape
        >>> png = plot_landscape(example_landscape(), Path(tempfile.mkdtemp()) / "landscape.png")
        >>> png.name, png.is_file()
        ('landscape.png', True)
    """
    return _save(figure_landscape(ls), path)


def _cos2(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.hypot(*a)), float(np.hypot(*b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def figure_interpolation(ls: Landscape) -> Figure:
    """Loss along θ(α) = (1 − α)·θ_0 + α·θ_T for each run, α from −0.25 to 1.25 (not saved).

    Example:
        >>> from gammatrace.landscape.compute import example_landscape
        >>> fig = figure_interpolation(example_landscape())
        >>> fig.axes[0].lines[0].get_gid()
        'interp:demo'
    """
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    lo, hi = np.inf, 0.0
    for r, (name, c) in enumerate(zip(ls.run_names, _colors(len(ls.run_names)), strict=True)):
        y = ls.interp_loss[r]
        finite = y[np.isfinite(y)]
        if len(finite):
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
        ax.plot(ls.interp_alpha, y, "-o", ms=3, color=c, label=name, gid=f"interp:{name}")
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
    buffers = " (buffers interpolated alike)" if ls.running_stats else ""
    _suptitle(fig, [f"{_mode(ls)}{buffers}", _samples(ls)], 9)
    return fig


def plot_interpolation(ls: Landscape, path: str | Path) -> Path:
    """:func:`figure_interpolation` saved as ``path``.

    Example:
        >>> import tempfile
        >>> from gammatrace.landscape.compute import example_landscape
        >>> png = plot_interpolation(example_landscape(), Path(tempfile.mkdtemp()) / "interpolation.png")
        >>> png.name, png.is_file()
        ('interpolation.png', True)
    """
    return _save(figure_interpolation(ls), path)
