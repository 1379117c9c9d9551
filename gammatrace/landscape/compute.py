"""Compute (or reload, or resume) the loss surface around one or several paths.

A landscape is a list of **planes** (panels), each a centre θ*, one or two directions,
a grid of coefficients and the loss on it, chosen by ``directions`` (:data:`DIRECTIONS`):

``pca`` — the plane of the top-2 principal directions of path displacements
(Li et al. 2018, §7), drawn with the paths and the update directions. ``plane``
(:data:`PCA_PLANES`) says which displacements:

* ``shared`` (default): one plane for all runs R_1 … R_m (which must share model, data
  and loss). Its **origin** is θ_T of the *first* run; every run's displacements
  θ_e − origin are stacked into one matrix whose top-2 principal directions u, v span
  the plane (:func:`~gammatrace.landscape.pca.path_pca`); with one run this is exactly
  Li et al. (2018). Runs that share θ_0 start from the same projected point, so several
  optimizers compare on one set of axes.
* ``per_path``: one plane per run — its own origin (its θ_T), the top-2 PCA of its own
  displacements, its own grid — as in the γ-principle paper's Figure 12 ("for the
  parameters in each optimization path, we compute their first and second principle
  components as the 2D axes"). Each path is shown where it has most variance; runs
  need not share a model.

On a PCA plane the **loss grid** is L(origin + a·u + b·v) over a ∈ [−A, A], b ∈ [−B, B]
where A (B) is ``extent`` times the largest |coordinate| of the plane's path points on u
(v). At every checkpoint θ_e (e < E) of every run: the plain gradient-descent direction
−∇L(θ_e) on the evaluation subset (what SGD would do there) and the optimizer's actual
epoch step θ_{e+1} − θ_e, both projected onto the run's plane, and their cosine in the
full space; each checkpoint is evaluated with its own buffers. And the **1-D
interpolation** θ(α) = (1 − α)·θ_0 + α·θ_T of each run, α ∈ [−0.25, 1.25] (floating
buffers interpolated alike), exactly θ_0 at α = 0 and θ_T at α = 1.

``random`` — Li et al.'s main plots: per run, θ* = its θ_T and ``dims`` (1 or 2)
filter-normalised Gaussian directions (:mod:`~gammatrace.landscape.directions`; biases
and norm parameters by ``ignore``) drawn from ``direction_seed`` — the same draws for
every run, and apart from ``seed`` (the evaluation subset's), so another direction is
evaluated on the same samples; the loss
L(θ* + α·d) on α ∈ [−span, span] (``dims`` 1, a curve) or L(θ* + α·d₁ + β·d₂) on the
square (``dims`` 2). Random directions are nearly orthogonal to any path (Li et al. §7),
so nothing is projected onto them.

A PCA plane needs a path that moves: one whose checkpoints all equal θ_0 is refused
(random directions around a single point are fine). The loss at every checkpoint is
evaluated before the grid; a path of checkpoint files whose θ_T is clearly (1 %) above
its θ_0 draws a :class:`~gammatrace.landscape.sources.LandscapeWarning` (files in the
wrong order? a diverging run is legitimate, so it is not refused). ``samples`` larger
than a training set evaluates the whole set: ``Landscape.samples_used`` (stored) says
how many samples each path's loss is on.

Grid points use the plane's centre's buffers (batch-norm running statistics). A grid
is cut into **rows** (a value of b, or one point of a curve), run as tasks on
:func:`~gammatrace.executors.make_executor` (one task per row with one worker, so the
progress bar moves row by row; the evaluator, the plane and θ_T's buffers are built
once per process); each row is written to
``out/<stem>_rows/`` the moment it is done (atomically), next to a key of the settings,
the inputs and the planes' exact bytes. An interrupted computation rerun with the same
settings on the same inputs computes only the missing rows (and gets the bit-identical
result; with ``progress`` a line on stderr says how many rows were on disk); any change
of setting, input or plane discards the stored rows.

Everything lands in ``out/<stem>.npz`` (arrays), ``out/<stem>.json`` (settings, runs,
planes, a fingerprint of the inputs) and ``out/<stem>_basis.npz`` (each plane's centre
and directions), where the stem (:func:`landscape_stem`) is ``landscape`` for the shared
PCA plane, ``landscape_per_path`` and ``landscape_random_1d``/``_2d`` otherwise — so
the kinds sit side by side in one folder. A second call with the same settings on the
same inputs loads them instead of recomputing. Paths are run folders
(:class:`~gammatrace.landscape.sources.RunSource`) or checkpoint files of any loop
(:class:`~gammatrace.landscape.sources.CheckpointSource`: ``model``, ``data``, ``loss``).
Runs and ``out`` may be URLs (``s3://…``): every file goes through the store, so grid
tasks on Ray nodes need no shared file system (checkpoint files must be readable
where the tasks run). With ``checkpoint_every: k`` the path points are the stored
checkpoints (every k epochs); a run whose checkpoints were pruned is refused.

Example (a full run from training to figures is :mod:`gammatrace.landscape`'s example):
    >>> ls = compute_landscape(["runs/sgd", "runs/adam"], "out/ls", grid=11)  # needs trained runs in runs/  # doctest: +SKIP
    >>> ls.loss.shape, ls.explained.round(2)                                  # doctest: +SKIP
    ((11, 11), array([0.83, 0.09]))
    >>> per = compute_landscape(["runs/sgd", "runs/adam"], "out/ls", plane="per_path")  # doctest: +SKIP
    >>> [(p.name, p.loss.shape) for p in per.planes]                                   # doctest: +SKIP
    [('sgd', (21, 21)), ('adam', (21, 21))]

    What it stores, on the synthetic :func:`example_landscape` (no run needed):

    >>> ls = example_landscape()
    >>> ls.loss.shape, ls.coords[0].shape, ls.step_proj[0].shape, landscape_stem("random", dims=1)
    ((7, 7), (3, 2), (2, 2), 'landscape_random_1d')
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from gammatrace.executors import make_executor
from gammatrace.landscape.directions import IGNORE, filter_normalized_directions
from gammatrace.landscape.evaluate import BN_MODES, LossEvaluator, Trajectory
from gammatrace.landscape.pca import PathPCA, path_pca
from gammatrace.landscape.sources import (
    CheckpointSource,
    LandscapeInputError,
    LandscapeWarning,
    PathSource,
    make_sources,
)
from gammatrace.registry import Registry
from gammatrace.store.backend import Location, location
from gammatrace.store.run import RunStore, StoreError

LANDSCAPE_VERSION = 2
KEY_FILE = "key.json"  # in the rows folder: what its rows were computed for


def landscape_stem(directions: str = "pca", plane: str = "shared", dims: int = 2) -> str:
    """The base name of a landscape's files in its output folder (see module doc).

    Example:
        >>> landscape_stem(), landscape_stem(plane="per_path"), landscape_stem("random", dims=2)
        ('landscape', 'landscape_per_path', 'landscape_random_2d')
    """
    if directions == "random":
        return f"landscape_random_{dims}d"
    return "landscape" if plane == "shared" else f"landscape_{plane}"


@dataclass
class Plane:
    """One panel of a :class:`Landscape`: a centre, its grid and the loss on it.

    ``name`` is the panel's title (the run's name; the runs' names joined for a shared
    plane); ``origin`` says what the centre is; ``runs`` are the indices of the runs drawn
    on it; ``source`` the run whose model, data and buffers evaluate the grid. 2-D:
    ``loss[j, i]`` is the loss at (``alphas[i]``, ``betas[j]``), the layout
    ``contour(alphas, betas, loss)`` expects. 1-D (``betas`` empty): ``loss[i]`` at
    ``alphas[i]``. ``explained`` (PCA planes): each axis's fraction of the
    displacements' second moment; empty for random directions.
    """

    name: str
    origin: str
    runs: list[int]
    source: int
    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    explained: np.ndarray

    @property
    def dims(self) -> int:
        return 1 if self.betas.size == 0 else 2


@dataclass
class Landscape:
    """The stored result of :func:`compute_landscape` (per-run lists in run order).

    ``planes`` (one for the shared plane, one per run otherwise). Per run r:
    ``coords[r]`` (E_r+1, 2) its path on its plane (:meth:`plane_of`); ``step_proj[r]`` /
    ``grad_proj[r]`` (E_r, 2) the projected actual epoch step and −∇L at each
    checkpoint; ``cos_full[r]`` their cosine in the full space; ``path_loss[r]`` the loss
    at each checkpoint; ``interp_loss[r]`` the loss along ``interp_alpha``. For random
    directions only ``path_loss`` is filled (the others are empty).
    ``loss``/``alphas``/``betas``/``explained`` are the single plane's, when there is one.
    ``samples_used[r]``: how many training samples run r's loss is evaluated on (the
    ``samples`` setting, or the whole set when that is smaller; empty when unknown, for
    landscapes stored before it was recorded); ``running_stats``: whether a model has a
    normalisation layer with running statistics (which the ``bn`` mode concerns).
    """

    settings: dict[str, Any]
    run_names: list[str]
    run_paths: list[str]
    planes: list[Plane]
    coords: list[np.ndarray]
    step_proj: list[np.ndarray]
    grad_proj: list[np.ndarray]
    cos_full: list[np.ndarray]
    path_loss: list[np.ndarray]
    interp_alpha: np.ndarray
    interp_loss: list[np.ndarray]
    reused: bool = False
    files: dict[str, Path | Location] = field(default_factory=dict)
    samples_used: list[int] = field(default_factory=list)
    running_stats: bool = False

    _PER_RUN = ("coords", "step_proj", "grad_proj", "cos_full", "path_loss", "interp_loss")

    @property
    def directions(self) -> str:
        return self.settings.get("directions", "pca")

    @property
    def stem(self) -> str:
        s = self.settings
        return landscape_stem(self.directions, s.get("plane", "shared"), s.get("dims", 2))

    @property
    def has_paths(self) -> bool:
        """Whether paths, update directions and interpolations were computed (PCA planes)."""
        return self.directions == "pca"

    def figure_names(self) -> dict[str, str]:
        """File names of the figures :func:`~gammatrace.landscape.landscape` draws.

        Example:
            >>> example_landscape().figure_names()
            {'landscape': 'landscape.png', 'interpolation': 'interpolation.png'}
        """
        names = {"landscape": f"{self.stem}.png"}
        if self.has_paths:
            names["interpolation"] = "interpolation.png" if self.stem == "landscape" else f"{self.stem}_interpolation.png"
        return names

    def plane_of(self, run: int) -> Plane:
        """The plane run ``run`` is drawn on."""
        return next(p for p in self.planes if run in p.runs)

    def _single(self) -> Plane:
        if len(self.planes) != 1:
            raise AttributeError(f"this landscape has {len(self.planes)} planes (one per path): "
                                 "read ls.planes[p].loss, .alphas, .betas, .explained")
        return self.planes[0]

    @property
    def loss(self) -> np.ndarray:
        return self._single().loss

    @property
    def alphas(self) -> np.ndarray:
        return self._single().alphas

    @property
    def betas(self) -> np.ndarray:
        return self._single().betas

    @property
    def explained(self) -> np.ndarray:
        return self._single().explained

    def save(self, out: Path | Location) -> None:
        arrays: dict[str, np.ndarray] = {"interp_alpha": self.interp_alpha}
        for p, pl in enumerate(self.planes):
            arrays.update({f"alphas_{p}": pl.alphas, f"betas_{p}": pl.betas, f"loss_{p}": pl.loss,
                           f"explained_{p}": pl.explained})
        for name in self._PER_RUN:
            arrays.update({f"{name}_{r}": a for r, a in enumerate(getattr(self, name))})
        _atomic_npz(out / f"{self.stem}.npz", arrays)
        # The JSON last: a store whose JSON matches the settings has its arrays complete.
        meta = {"settings": self.settings, "runs": self.run_names, "run_paths": self.run_paths,
                "samples_used": [int(n) for n in self.samples_used], "running_stats": bool(self.running_stats),
                "planes": [{"name": pl.name, "origin": pl.origin, "runs": pl.runs, "source": pl.source,
                            "explained": pl.explained.tolist()} for pl in self.planes]}
        RunStore(out).write_json(f"{self.stem}.json", meta)

    @classmethod
    def load(cls, out: str | Path | Location, stem: str = "landscape") -> Landscape:
        """A stored landscape (``stem``: :func:`landscape_stem`), without any model.

        Example:
            >>> Landscape.load("out/ls").planes[0].loss.shape  # needs a computed landscape in out/ls  # doctest: +SKIP
            (21, 21)
        """
        out = location(out)
        meta = RunStore(out).read_json(f"{stem}.json")
        arrays = _read_npz(out / f"{stem}.npz")
        n = len(meta["runs"])
        planes = [Plane(name=m["name"], origin=m["origin"], runs=list(m["runs"]), source=int(m["source"]),
                        alphas=arrays[f"alphas_{p}"], betas=arrays[f"betas_{p}"], loss=arrays[f"loss_{p}"],
                        explained=arrays[f"explained_{p}"]) for p, m in enumerate(meta["planes"])]
        per_run = {name: [arrays[f"{name}_{r}"] for r in range(n)] for name in cls._PER_RUN}
        return cls(settings=meta["settings"], run_names=meta["runs"], run_paths=meta["run_paths"], planes=planes,
                   interp_alpha=arrays["interp_alpha"], reused=True, files=_files(out, stem),
                   samples_used=[int(n) for n in meta.get("samples_used", [])],
                   running_stats=bool(meta.get("running_stats", False)), **per_run)


def example_landscape() -> Landscape:
    """A small synthetic :class:`Landscape` for examples of the figures: no run, no model.

    The bowl L(a, b) = a² + 4b² + 0.1 on a 7×7 grid, and one path of three points
    (θ_0, θ_1, θ_T = the origin) descending into it, with the exact −∇L at θ_0 and θ_1.

    Example:
        >>> ls = example_landscape()
        >>> ls.run_names, float(ls.loss.min()), ls.path_loss[0].round(2).tolist()
        (['demo'], 0.1, [3.5, 0.39, 0.1])
        >>> ls.interp_loss[0][[5, 25]].round(2).tolist()  # α = 0 (θ_0) and α = 1 (θ_T)
        [3.5, 0.1]
    """
    def bowl(xy: np.ndarray) -> np.ndarray:
        return xy[..., 0] ** 2 + 4 * xy[..., 1] ** 2 + 0.1

    alphas = betas = np.linspace(-1.5, 1.5, 7)
    coords = np.array([[-1.2, 0.7], [-0.5, 0.1], [0.0, 0.0]])
    steps = np.diff(coords, axis=0)
    grads = -np.column_stack([2 * coords[:-1, 0], 8 * coords[:-1, 1]])
    interp_alpha = interpolation_alphas()
    line = (1.0 - interp_alpha[:, None]) * coords[0]  # θ(α) from θ_0 to θ_T = 0
    settings = {"version": LANDSCAPE_VERSION, "directions": "pca", "plane": "shared", "grid": len(alphas),
                "extent": 1.2, "samples": 0, "bn": "train", "seed": 0, "origin": "theta_T of demo", "inputs": []}
    plane = Plane(name="demo", origin="theta_T of demo", runs=[0], source=0, alphas=alphas, betas=betas,
                  loss=bowl(np.stack(np.meshgrid(alphas, betas), axis=-1)), explained=np.array([0.9, 0.1]))
    return Landscape(settings=settings, run_names=["demo"], run_paths=[""], planes=[plane],
                     coords=[coords], step_proj=[steps], grad_proj=[grads],
                     cos_full=[np.array([_cos(g, s) for g, s in zip(grads, steps, strict=True)])],
                     path_loss=[bowl(coords)], interp_alpha=interp_alpha, interp_loss=[bowl(line)])


def _files(out: Path | Location, stem: str) -> dict[str, Path | Location]:
    return {"grid": out / f"{stem}.npz", "meta": out / f"{stem}.json", "basis": out / f"{stem}_basis.npz"}


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()  # a file object: np.savez would append ".npz" to a name
    np.savez(buf, **arrays)
    return buf.getvalue()


def _atomic_npz(path: Path | Location, arrays: dict[str, np.ndarray]) -> None:
    # Through the store: a killed process leaves the old file or the new one, locally
    # (temporary file + rename) or on object storage (one PUT).
    RunStore(path.parent).write_bytes(path.name, _npz_bytes(arrays))


def _read_npz(path: str | Path | Location) -> dict[str, np.ndarray]:
    path = location(path)
    with np.load(io.BytesIO(RunStore(path.parent).read_bytes(path.name))) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------ the planes

class LandscapeConfig(BaseModel):
    """What a landscape is computed with: the planes, the grid, the evaluation, and where
    the rows run. The ``gammatrace landscape`` options are generated from these fields
    (:func:`~gammatrace.cliopts.add_options`); :meth:`key` says which of them a stored
    landscape is reused for.

    Example:
        >>> cfg = LandscapeConfig(directions="random", dims=1, grid=5)
        >>> cfg.key()["dims"], "extent" in cfg.key(), "workers" in cfg.key()
        (1, False, False)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    plane: str = Field("shared", description="PCA directions: one plane for all paths (shared, centred on the first "
                       "run's θ_T) or one plane per path (per_path, as the γ-principle paper's Fig. 12)")
    directions: str = Field("pca", description="pca (the paths' principal plane, with the paths drawn) or random "
                            "(filter-normalised Gaussian directions around each path's θ_T, Li et al. 2018)")
    dims: int = Field(2, description="number of random directions: 1 (a curve) or 2 (contours); PCA planes are 2-D")
    grid: int = Field(21, description="grid points per axis")
    extent: float = Field(1.2, description="PCA planes: half-width of the grid / the path's reach on each axis")
    span: float = Field(1.0, description="random directions: α (and β) run over [-span, span]")
    samples: int = Field(512, description="size of the fixed training subset the loss is evaluated on (the whole "
                         "set when it is smaller)")
    bn: str = Field("train", description="module mode of every evaluation")
    ignore: str = Field("biasbn", description="random directions: biasbn (biases and norm parameters stay at θ*, as "
                        "Li et al.) or none (their direction is θ* itself)")
    seed: int = Field(0, description="seed of the evaluation subset (and of dropout)")
    direction_seed: int = Field(0, description="random directions: seed of their Gaussian draws (the same for every "
                                "path; apart from seed so that another direction is evaluated on the same samples)")
    model: str | None = Field(None, description="checkpoint files: 'package.module:factory', a zero-argument callable "
                              "returning the nn.Module")
    data: str | None = Field(None, description="checkpoint files: 'package.module:factory' returning the training "
                             "data as (inputs, targets) tensors or a map-style Dataset of (input, target) pairs")
    loss: str = Field("cross_entropy", description="checkpoint files: per-sample loss of the model's output and the "
                      "targets (runs use their config's)")
    workers: int = Field(1, description="processes for the grid rows")
    executor: str = Field("local", description="where the grid rows run (local processes or Ray)")
    address: str | None = Field(None, description="Ray cluster address (executor ray); default: a local instance")

    def check(self) -> None:
        """Refuse a value out of range or a name outside its registry before any work."""
        if self.grid < 2:
            raise LandscapeInputError(f"grid must be >= 2 points per axis, got {self.grid}")
        if not self.extent > 0 or not self.span > 0:
            raise LandscapeInputError(f"extent and span must be > 0, got {self.extent} and {self.span}")
        if self.dims not in (1, 2):
            raise LandscapeInputError(f"dims must be 1 or 2, got {self.dims}")
        if self.directions == "pca" and self.dims != 2:
            raise LandscapeInputError("the PCA plane is 2-D: --dims 1 needs --directions random")
        DIRECTIONS.get(self.directions)
        PCA_PLANES.get(self.plane)
        BN_MODES.get(self.bn)
        IGNORE.get(self.ignore)

    def key(self) -> dict[str, Any]:
        """The settings that change a landscape's numbers (the inputs, model, data and loss
        included, are fingerprinted apart; where the rows run changes no number)."""
        shared = ("directions", "grid", "samples", "bn", "seed")
        own = ("plane", "extent") if self.directions == "pca" else ("dims", "span", "ignore", "direction_seed")
        return {"version": LANDSCAPE_VERSION, **{name: getattr(self, name) for name in shared + own}}


@dataclass
class PlaneAxes:
    """A plane before its grid is evaluated: centre, directions (rows of ``basis``) and grid.

    ``pca`` and ``coords`` (each of ``runs``' path on the plane) only for PCA planes.
    """

    name: str
    origin_label: str
    runs: list[int]
    source: int
    origin: np.ndarray
    basis: np.ndarray
    explained: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray
    pca: PathPCA | None = None
    coords: list[np.ndarray] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        """Rows of the grid: one per β (2-D) or one per point (1-D)."""
        return len(self.betas) if len(self.basis) == 2 else len(self.alphas)

    def arrays(self, p: int) -> dict[str, np.ndarray]:
        """What the basis file stores of plane ``p`` (what grid tasks read)."""
        out = {f"origin_{p}": self.origin, f"basis_{p}": self.basis, f"explained_{p}": self.explained}
        if self.pca is not None:
            out[f"singular_values_{p}"] = self.pca.singular_values
        return out


PlaneBuilder = Callable[[list[Trajectory], list[LossEvaluator], LandscapeConfig], list[PlaneAxes]]
DIRECTIONS: Registry[PlaneBuilder] = Registry("landscape directions")
# Which runs' displacements make one PCA plane: n runs -> groups of run indices.
PCA_PLANES: Registry[Callable[[int], list[list[int]]]] = Registry("PCA plane")
PCA_PLANES.register("shared")(lambda n: [list(range(n))])
PCA_PLANES.register("per_path")(lambda n: [[r] for r in range(n)])


@DIRECTIONS.register("pca")
def pca_planes(trajs: list[Trajectory], evs: list[LossEvaluator], opt: LandscapeConfig) -> list[PlaneAxes]:
    """One PCA plane per group of :data:`PCA_PLANES` (``opt.plane``), centred on θ_T of
    the group's first run, its grid ``opt.extent`` × the group's reach on each axis."""
    out = []
    for group in PCA_PLANES.get(opt.plane)(len(trajs)):
        first = trajs[group[0]]
        for r in group:
            if len(trajs[r].points) < 2:
                raise LandscapeInputError(f"{trajs[r].name}: a PCA plane needs at least two points of the path "
                                          "(θ_0 … θ_T); give more checkpoints, or --directions random")
        origin = first.points[-1]
        displacements = np.vstack([trajs[r].points - origin for r in group])
        if not displacements.any():  # no direction to find: the contours would be of an arbitrary plane
            names = ", ".join(trajs[r].name for r in group)
            raise LandscapeInputError(
                f"{names}: the path{'s do' if len(group) > 1 else ' does'} not move (every checkpoint equals θ_0); "
                "a loss landscape around a single point: --directions random")
        pca = path_pca(displacements)
        coords, start = [], 0
        for r in group:
            coords.append(pca.coords[start:start + len(trajs[r].points)])
            start += len(trajs[r].points)
        reach = np.abs(np.vstack(coords)).max(axis=0)
        half = opt.extent * np.where(reach > 0, reach, reach.max() if reach.max() > 0 else 1.0)
        name = first.name if len(group) == 1 else " + ".join(trajs[r].name for r in group)
        out.append(PlaneAxes(name=name, origin_label=f"theta_T of {first.name}", runs=list(group), source=group[0],
                        origin=origin, basis=pca.basis, explained=pca.explained,
                        alphas=np.linspace(-half[0], half[0], opt.grid),
                        betas=np.linspace(-half[1], half[1], opt.grid), pca=pca, coords=coords))
    return out


@DIRECTIONS.register("random")
def random_planes(trajs: list[Trajectory], evs: list[LossEvaluator], opt: LandscapeConfig) -> list[PlaneAxes]:
    """Per run: ``opt.dims`` filter-normalised random directions around its θ_T (one seed
    for all runs), α (and β) on ``opt.grid`` points of [−span, span]."""
    out = []
    for r, t in enumerate(trajs):
        center = t.points[-1]
        basis = filter_normalized_directions(center, evs[r].shapes, n=opt.dims, seed=opt.direction_seed,
                                             ignore=opt.ignore)
        axis = np.linspace(-opt.span, opt.span, opt.grid)
        out.append(PlaneAxes(name=t.name, origin_label=f"theta_T of {t.name}", runs=[r], source=r, origin=center,
                        basis=basis, explained=np.empty(0), alphas=axis,
                        betas=axis.copy() if opt.dims == 2 else np.empty(0)))
    return out


# ------------------------------------------------------------------------- grid rows

def row_file(plane: int, row: int) -> str:
    """The name of one finished grid row in the rows folder.

    Example:
        >>> row_file(1, 7)
        'p001_r00007.npy'
    """
    return f"p{plane:03d}_r{row:05d}.npy"


def row_loss(ev: LossEvaluator, origin: np.ndarray, basis: np.ndarray, buffers: dict[str, torch.Tensor],
             alphas: np.ndarray, betas: np.ndarray, row: int) -> np.ndarray:
    """Losses of one grid row: origin + a·u + β_row·v for every a (2-D), or the one point
    origin + α_row·u (1-D). The same expressions the tests evaluate by hand.

    Example:
        >>> ev = LossEvaluator("runs/sgd")  # needs a trained run in runs/sgd  # doctest: +SKIP
        >>> row_loss(ev, np.zeros(ev.n_params), np.eye(2, ev.n_params), {}, np.linspace(-1, 1, 3),
        ...          np.array([0.0]), 0).shape                                  # doctest: +SKIP
        (3,)
    """
    if len(basis) == 1:
        return np.array([ev.loss(origin + alphas[row] * basis[0], buffers)])
    return np.array([ev.loss(origin + a * basis[0] + betas[row] * basis[1], buffers) for a in alphas])


def _plane_inputs(basis_file: str, source: PathSource, plane: int, samples: int, bn: str,
                  seed: int) -> tuple[LossEvaluator, np.ndarray, np.ndarray, dict[str, torch.Tensor]]:
    """The evaluator (cached per process by the source), the plane's origin and basis, and θ_T's buffers."""
    ev = source.evaluator(samples, bn, seed)
    path = location(basis_file)  # a path or a URL: grid tasks read it wherever they run
    with np.load(io.BytesIO(RunStore(path.parent).read_bytes(path.name))) as z:
        origin, basis = z[f"origin_{plane}"], z[f"basis_{plane}"]
    return ev, origin, basis, source.final_buffers(ev)


# One plane's inputs per process: with one task per row, the basis file and θ_T's
# checkpoint are read once per plane, not once per row. The digest (of the settings,
# inputs and planes) is part of the key, so a rewritten basis file is never stale.
@functools.lru_cache(maxsize=1)
def _cached_plane_inputs(basis_file: str, source: PathSource, plane: int, samples: int, bn: str, seed: int,
                         digest: str) -> tuple[LossEvaluator, np.ndarray, np.ndarray, dict[str, torch.Tensor]]:
    return _plane_inputs(basis_file, source, plane, samples, bn, seed)


def grid_rows_task(basis_file: str, source: PathSource, plane: int, samples: int, bn: str,
                   seed: int, alphas: np.ndarray, betas: np.ndarray, rows: Sequence[int],
                   rows_dir: str | None = None, digest: str = "") -> list[np.ndarray]:
    """:func:`row_loss` of each of ``rows`` of plane ``plane``; each row is written to
    ``rows_dir`` (if given) as soon as it is done, so an interrupted grid resumes there.

    A top-level function with picklable arguments (the basis travels as a file name, not
    as d-sized arrays; the path as a small frozen source), so rows go to any executor.
    With a ``digest`` of the settings, inputs and planes, the plane's inputs are read
    once per process (tasks of one row each cost no more than one of many rows).

    Example:
        >>> grid_rows_task("out/landscape_basis.npz", RunSource("runs/sgd"), 0, 512, "train", 0,
        ...                np.linspace(-1, 1, 5), np.linspace(-1, 1, 5), [0])[0].shape  # needs a computed landscape  # doctest: +SKIP
        (5,)
    """
    if digest:
        ev, origin, basis, buffers = _cached_plane_inputs(basis_file, source, plane, samples, bn, seed, digest)
    else:
        ev, origin, basis, buffers = _plane_inputs(basis_file, source, plane, samples, bn, seed)
    store = RunStore(rows_dir) if rows_dir is not None else None
    out = []
    for j in rows:
        row = row_loss(ev, origin, basis, buffers, alphas, betas, int(j))
        if store is not None:
            buf = io.BytesIO()
            np.save(buf, row)
            store.write_bytes(row_file(plane, int(j)), buf.getvalue())
        out.append(row)
    return out


def _clear(store: RunStore) -> None:
    for name in store.files(""):
        store.remove(name)
    if isinstance(store.root, Path):  # an object store has no folders to remove
        with contextlib.suppress(OSError):
            store.root.rmdir()


def _stored_rows(store: RunStore, key: dict[str, Any]) -> set[str]:
    """Names of the rows stored for exactly ``key``; rows of any other key are removed."""
    try:
        if store.exists(KEY_FILE) and store.read_json(KEY_FILE) == key:
            return {n for n in store.files("") if n.endswith(".npy")}
    except (StoreError, OSError, ValueError):
        pass  # a damaged key: start the rows afresh
    _clear(store)
    store.write_json(KEY_FILE, key)
    return set()


def _read_row(store: RunStore, name: str) -> np.ndarray | None:
    try:
        return np.load(io.BytesIO(store.read_bytes(name)), allow_pickle=False)
    except (StoreError, OSError, ValueError):
        return None  # a damaged row is computed again


# ----------------------------------------------------------------------- per-run work

def interpolation_alphas(lo: float = -0.25, hi: float = 1.25, per_unit: int = 20) -> np.ndarray:
    """α values k / per_unit from ``lo`` to ``hi``; 0 and 1 are exactly on the grid.

    Example:
        >>> a = interpolation_alphas()
        >>> len(a), float(a[5]), float(a[25])
        (31, 0.0, 1.0)
    """
    return np.arange(round(lo * per_unit), round(hi * per_unit) + 1) / per_unit


def interpolate_state(theta0: np.ndarray, theta1: np.ndarray, buf0: dict[str, torch.Tensor],
                      buf1: dict[str, torch.Tensor], alpha: float) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """(1 − α)·θ_0 + α·θ_1 and the buffers alike (integer buffers from the nearer end).

    Written as a weighted sum rather than θ_0 + α(θ_1 − θ_0) so that α = 0 and α = 1 give
    the end points bit for bit.

    Example:
        >>> t, _ = interpolate_state(np.array([1.0]), np.array([3.0]), {}, {}, 1.0)
        >>> t.tolist()
        [3.0]
    """
    theta = (1.0 - alpha) * theta0 + alpha * theta1
    bufs = {}
    for k, a in buf0.items():
        b = buf1.get(k, a)
        if a.is_floating_point():
            bufs[k] = ((1.0 - alpha) * a.double() + alpha * b.double()).to(a.dtype)
        else:
            bufs[k] = a if alpha < 0.5 else b
    return theta, bufs


def _check_compatible(sources: list[PathSource], trajs: list[Trajectory]) -> None:
    # Only for a shared plane: one plane shows one loss surface.
    first = sources[0].compatibility()
    for src, traj in zip(sources[1:], trajs[1:], strict=True):
        other = src.compatibility()
        if (other.get("data"), other.get("loss")) != (first.get("data"), first.get("loss")):
            raise LandscapeInputError(f"{src.label} trains on other data or another loss than {sources[0].label}; "
                                      "one plane shows one loss surface (--plane per_path draws one each)")
        if other.get("model") != first.get("model") or traj.points.shape[1] != trajs[0].points.shape[1]:
            raise LandscapeInputError(f"{src.label} trains another network than {sources[0].label} "
                                      f"({traj.points.shape[1]} vs {trajs[0].points.shape[1]} parameters); "
                                      "paths of different models share no plane (--plane per_path)")


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def _path_losses(t: Trajectory, ev: LossEvaluator) -> np.ndarray:
    return np.array([ev.loss(p, b) for p, b in zip(t.points, t.buffers, strict=True)])


def _warn_if_ends_higher(source: PathSource, path_loss: np.ndarray) -> None:
    # Only files a user ordered (a gammatrace run's order is its own); "clearly" above:
    # by more than 1 %, so a path that ends where it starts up to noise is quiet.
    first, last = float(path_loss[0]), float(path_loss[-1])
    if isinstance(source, CheckpointSource) and len(path_loss) > 1 and last > first + 0.01 * abs(first):
        warnings.warn(f"{source.name}: the path ends higher than it starts (loss {last:.4g} at θ_T, {first:.4g} at "
                      "θ_0); check that its checkpoint files are given in training order, θ_0 first",
                      LandscapeWarning, stacklevel=3)


def _path_analysis(t: Trajectory, ev: LossEvaluator, axes: PlaneAxes, r: int,
                   path_loss: np.ndarray) -> dict[str, np.ndarray]:
    # What a PCA panel draws of run r; on random directions only the loss along the path.
    if axes.pca is None:
        empty = np.zeros((0, 2))
        return {"coords": empty, "step_proj": empty, "grad_proj": empty, "cos_full": np.zeros(0),
                "path_loss": path_loss, "interp_loss": np.zeros(0)}
    steps = np.diff(t.points, axis=0)
    grads = np.stack([-ev.gradient(t.points[e], t.buffers[e]) for e in range(len(steps))]) \
        if len(steps) else np.zeros((0, t.points.shape[1]))
    interp = [ev.loss(*interpolate_state(t.points[0], t.points[-1], t.buffers[0], t.buffers[-1], a))
              for a in interpolation_alphas()]
    return {"coords": axes.coords[axes.runs.index(r)], "step_proj": axes.pca.project(steps),
            "grad_proj": axes.pca.project(grads),
            "cos_full": np.array([_cos(g, s) for g, s in zip(grads, steps, strict=True)]),
            "path_loss": path_loss, "interp_loss": np.array(interp)}


def _grid_losses(axes: list[PlaneAxes], sources: list[PathSource], basis_file: Path | Location,
                 rows_store: RunStore, key: dict[str, Any], cfg: LandscapeConfig, progress: bool) -> list[np.ndarray]:
    """Each plane's loss grid: the rows stored for ``key`` read back, the others computed."""
    have = _stored_rows(rows_store, key)
    done: dict[tuple[int, int], np.ndarray] = {}
    for p, ax in enumerate(axes):
        for j in range(ax.n_rows):
            row = _read_row(rows_store, row_file(p, j)) if row_file(p, j) in have else None
            if row is not None:
                done[p, j] = row
    workers = cfg.workers
    total = sum(ax.n_rows for ax in axes)
    if progress and done and len(done) < total:
        print(f"landscape grid: {len(done)} of {total} rows already on disk, computing the other "
              f"{total - len(done)}", file=sys.stderr)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    tasks, where = [], []
    for p, ax in enumerate(axes):
        missing = [j for j in range(ax.n_rows) if (p, j) not in done]
        # One worker: a task per row, so the bar moves with every row (the plane's inputs
        # are cached per process). Several: a few chunks per worker, fewer pickled tasks.
        n_tasks = len(missing) if workers <= 1 else min(len(missing), 2 * workers)
        for chunk in np.array_split(np.array(missing, dtype=int), n_tasks) if missing else []:
            rows = [int(j) for j in chunk]
            tasks.append((str(basis_file), sources[ax.source], p, cfg.samples, cfg.bn, cfg.seed, ax.alphas, ax.betas, rows,
                          str(rows_store.root), digest))
            where.append((p, rows))
    if tasks:
        try:
            results = make_executor(cfg.executor, workers=workers, address=cfg.address).map(
                grid_rows_task, tasks, desc="landscape grid", progress=progress)
        finally:
            _cached_plane_inputs.cache_clear()  # d-sized arrays: not kept in this process after the grid
        for (p, rows), values in zip(where, results, strict=True):
            done.update({(p, j): v for j, v in zip(rows, values, strict=True)})
    return [np.vstack([done[p, j] for j in range(ax.n_rows)]) if len(ax.basis) == 2
            else np.concatenate([done[p, j] for j in range(ax.n_rows)]) for p, ax in enumerate(axes)]


# ---------------------------------------------------------------------- entry point

def compute_landscape(runs: list[str | Path] | list[list[str | Path]] | dict[str, list[str | Path]],
                      out: str | Path, config: LandscapeConfig | None = None, *, progress: bool = True,
                      **options: Any) -> Landscape:
    """Loss surface(s), projected paths, gradient/step directions and interpolations (see module doc).

    Reuses the stored landscape when it was computed with the same settings from the
    same inputs (``Landscape.reused`` says which happened), and resumes an interrupted
    grid from its finished rows.

    Args:
        runs: trained run directories; or, with --model and --data, the checkpoint files of one path in order
            (θ_0 first, θ_T last)
            (in Python also several paths: a list of such lists, or a dict {name: files})
        out: output folder (figures and the stored grid)
        config: the settings (:class:`LandscapeConfig`; its defaults when None)
        progress: show a progress bar
        options: fields of :class:`LandscapeConfig` that replace ``config``'s (``grid=11``)

    Example:
        >>> ls = compute_landscape(["runs/quickstart/relu"], "out", grid=5, samples=64)  # needs a trained run  # doctest: +SKIP
        >>> ls.loss.shape, ls.reused                                                  # doctest: +SKIP
        ((5, 5), False)
        >>> compute_landscape(["runs/quickstart/relu"], "out", LandscapeConfig(grid=5, samples=64)).reused  # doctest: +SKIP
        True
    """
    cfg = LandscapeConfig.model_validate({**(config.model_dump() if config else {}), **options})
    cfg.check()
    out = location(out)
    sources = make_sources(runs, model=cfg.model, data=cfg.data, loss=cfg.loss)
    for s in sources:
        s.check()
    stem = landscape_stem(cfg.directions, cfg.plane, cfg.dims)
    settings = cfg.key()
    if cfg.directions == "pca":
        shared = PCA_PLANES.get(cfg.plane)(len(sources)) == [list(range(len(sources)))]
        settings["origin"] = f"theta_T of {sources[0].name}" if shared else "theta_T of each path"
    else:
        settings["origin"] = "theta_T of each path"
    settings["inputs"] = [s.fingerprint() for s in sources]
    settings = json.loads(json.dumps(settings))  # as it reads back from the JSON
    store = RunStore(out)
    rows_store = RunStore(out / f"{stem}_rows")
    if store.exists(f"{stem}.json") and store.exists(f"{stem}.npz"):
        try:
            if store.read_json(f"{stem}.json")["settings"] == settings:
                _clear(rows_store)  # left over when a run stopped between saving and cleaning up
                return Landscape.load(out, stem)
        except (json.JSONDecodeError, KeyError, OSError, ValueError, TypeError, StoreError):
            pass  # damaged or older store: recompute and overwrite it

    evs = [s.evaluator(cfg.samples, cfg.bn, cfg.seed) for s in sources]
    trajs = [s.trajectory(ev) for s, ev in zip(sources, evs, strict=True)]
    if cfg.directions == "pca" and len(PCA_PLANES.get(cfg.plane)(len(sources))[0]) > 1:
        _check_compatible(sources, trajs)
    # The loss along each path before the (long) grid: a path that ends above its start
    # is said at once.
    path_losses = [_path_losses(t, ev) for t, ev in zip(trajs, evs, strict=True)]
    for s, pl in zip(sources, path_losses, strict=True):
        _warn_if_ends_higher(s, pl)
    axes = DIRECTIONS.get(cfg.directions)(trajs, evs, cfg)
    basis_arrays = {k: v for p, ax in enumerate(axes) for k, v in ax.arrays(p).items()}
    basis_file = out / f"{stem}_basis.npz"
    _atomic_npz(basis_file, basis_arrays)

    # Rows are kept for exactly these settings, inputs and planes (bit for bit).
    key = {"settings": settings, "planes": [hashlib.sha256(ax.origin.tobytes() + ax.basis.tobytes()).hexdigest()
                                            for ax in axes]}
    losses = _grid_losses(axes, sources, basis_file, rows_store, key, cfg, progress)
    planes = [Plane(name=ax.name, origin=ax.origin_label, runs=ax.runs, source=ax.source, alphas=ax.alphas,
                    betas=ax.betas, loss=loss, explained=ax.explained) for ax, loss in zip(axes, losses, strict=True)]
    per_run: dict[str, list[np.ndarray]] = {name: [] for name in Landscape._PER_RUN}
    for r, (t, ev) in enumerate(zip(trajs, evs, strict=True)):
        res = _path_analysis(t, ev, next(a for a in axes if r in a.runs), r, path_losses[r])
        for name in Landscape._PER_RUN:
            per_run[name].append(res[name])

    result = Landscape(settings=settings, run_names=[t.name for t in trajs], run_paths=[s.label for s in sources],
                       planes=planes, interp_alpha=interpolation_alphas(), files=_files(out, stem),
                       samples_used=[ev.n_samples for ev in evs], running_stats=any(ev.running_stats for ev in evs),
                       **per_run)
    result.save(out)
    _clear(rows_store)
    return result
