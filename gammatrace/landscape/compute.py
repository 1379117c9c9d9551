"""Compute (or reload) the loss surface on the plane of one or several paths.

What is computed, for runs R_1 … R_m that share a model (and usually θ_0):

* the **origin** of the plane: θ_T of the *first* run. Every run's displacements
  θ_e − origin (its epoch checkpoints and its θ_T) are stacked into one matrix whose
  top-2 principal directions u, v span the plane (:func:`~gammatrace.landscape.pca.path_pca`);
  with one run this is exactly Li et al. (2018). Runs that share θ_0 then start from
  the same projected point.
* the **loss grid** L(origin + a·u + b·v) over a ∈ [−A, A], b ∈ [−B, B] where A (B) is
  ``extent`` times the largest |coordinate| of any path point on u (v); grid rows are
  independent tasks for :func:`~gammatrace.executors.make_executor`.
  Grid points use the origin's buffers (batch-norm running statistics).
* at every checkpoint θ_e (e < E) of every run: the plain gradient-descent direction
  −∇L(θ_e) on the evaluation subset and the optimizer's actual epoch step
  θ_{e+1} − θ_e, both projected onto the plane, and their cosine in the full space.
  Each checkpoint is evaluated with its own buffers.
* the **1-D interpolation** θ(α) = (1 − α)·θ_0 + α·θ_T of each run, α ∈ [−0.25, 1.25]
  (floating buffers interpolated alike), which is exactly θ_0 at α = 0 and θ_T at α = 1.

Everything lands in ``out/landscape.npz`` (arrays) and ``out/landscape.json`` (settings,
runs, explained variance, a fingerprint of the inputs); the basis u, v and the origin
in ``out/landscape_basis.npz``. A second call with the same settings on the same run
files loads them instead of recomputing. Runs and ``out`` may be URLs (``s3://…``): every
file goes through the store, so grid tasks on Ray nodes need no shared file system.
With ``checkpoint_every: k`` the path points are the stored checkpoints (every k epochs);
a run whose checkpoints were pruned has no path and is refused.

Example (a full run from training to figures is :mod:`gammatrace.landscape`'s example):
    >>> ls = compute_landscape(["runs/sgd", "runs/adam"], "out/ls", grid=11)  # needs trained runs in runs/  # doctest: +SKIP
    >>> ls.loss.shape, ls.explained.round(2)                                  # doctest: +SKIP
    ((11, 11), array([0.83, 0.09]))

    What it stores, on the synthetic :func:`example_landscape` (no run needed):

    >>> ls = example_landscape()
    >>> ls.loss.shape, ls.coords[0].shape, ls.step_proj[0].shape
    ((7, 7), (3, 2), (2, 2))
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gammatrace.engine.replay import pruned_error
from gammatrace.executors import make_executor
from gammatrace.landscape.evaluate import BN_MODES, LossEvaluator, Trajectory, load_trajectory
from gammatrace.landscape.pca import path_pca
from gammatrace.store.backend import Location, location
from gammatrace.store.run import Run, RunStore, StoreError

LANDSCAPE_VERSION = 1
GRID_FILE, META_FILE, BASIS_FILE = "landscape.npz", "landscape.json", "landscape_basis.npz"


@dataclass
class Landscape:
    """The stored result of :func:`compute_landscape` (per-run lists in run order).

    ``loss[j, i]`` is the loss at (``alphas[i]``, ``betas[j]``), the layout
    ``contour(alphas, betas, loss)`` expects. ``coords[r]`` (E_r+1, 2) is run r's path on
    the plane; ``step_proj[r]`` / ``grad_proj[r]`` (E_r, 2) the projected actual epoch
    step and −∇L at each checkpoint; ``cos_full[r]`` their cosine in the full space;
    ``path_loss[r]`` the loss at each checkpoint; ``interp_loss[r]`` the loss along
    ``interp_alpha``.
    """

    settings: dict[str, Any]
    run_names: list[str]
    run_paths: list[str]
    explained: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    coords: list[np.ndarray]
    step_proj: list[np.ndarray]
    grad_proj: list[np.ndarray]
    cos_full: list[np.ndarray]
    path_loss: list[np.ndarray]
    interp_alpha: np.ndarray
    interp_loss: list[np.ndarray]
    reused: bool = False
    files: dict[str, Path | Location] = field(default_factory=dict)

    _PER_RUN = ("coords", "step_proj", "grad_proj", "cos_full", "path_loss", "interp_loss")

    def save(self, out: Path | Location) -> None:
        arrays = {"explained": self.explained, "alphas": self.alphas, "betas": self.betas, "loss": self.loss,
                  "interp_alpha": self.interp_alpha}
        for name in self._PER_RUN:
            arrays.update({f"{name}_{r}": a for r, a in enumerate(getattr(self, name))})
        _atomic_npz(out / GRID_FILE, arrays)
        meta = {"settings": self.settings, "runs": self.run_names, "run_paths": self.run_paths,
                "explained": self.explained.tolist()}
        RunStore(out).write_json(META_FILE, meta)

    @classmethod
    def load(cls, out: Path | Location) -> Landscape:
        store = RunStore(out)
        meta = store.read_json(META_FILE)
        arrays = _read_npz(out / GRID_FILE)
        n = len(meta["runs"])
        per_run = {name: [arrays[f"{name}_{r}"] for r in range(n)] for name in cls._PER_RUN}
        return cls(settings=meta["settings"], run_names=meta["runs"], run_paths=meta["run_paths"],
                   explained=arrays["explained"], alphas=arrays["alphas"], betas=arrays["betas"],
                   loss=arrays["loss"], interp_alpha=arrays["interp_alpha"], reused=True,
                   files=_files(out), **per_run)


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
    settings = {"version": LANDSCAPE_VERSION, "grid": len(alphas), "extent": 1.2, "samples": 0, "bn": "train",
                "seed": 0, "origin": "theta_T of demo", "inputs": []}
    return Landscape(settings=settings, run_names=["demo"], run_paths=[""], explained=np.array([0.9, 0.1]),
                     alphas=alphas, betas=betas, loss=bowl(np.stack(np.meshgrid(alphas, betas), axis=-1)),
                     coords=[coords], step_proj=[steps], grad_proj=[grads],
                     cos_full=[np.array([_cos(g, s) for g, s in zip(grads, steps, strict=True)])],
                     path_loss=[bowl(coords)], interp_alpha=interp_alpha, interp_loss=[bowl(line)])


def _files(out: Path | Location) -> dict[str, Path | Location]:
    return {"grid": out / GRID_FILE, "meta": out / META_FILE, "basis": out / BASIS_FILE}


def _atomic_npz(path: Path | Location, arrays: dict[str, np.ndarray]) -> None:
    # Through the store: a killed process leaves the old file or the new one, locally
    # (temporary file + rename) or on object storage (one PUT).
    buf = io.BytesIO()  # a file object: np.savez would append ".npz" to a name
    np.savez(buf, **arrays)
    RunStore(path.parent).write_bytes(path.name, buf.getvalue())


def _read_npz(path: str | Path | Location) -> dict[str, np.ndarray]:
    path = location(path)
    with np.load(io.BytesIO(RunStore(path.parent).read_bytes(path.name))) as z:
        return {k: z[k] for k in z.files}


def _fingerprint(runs: list[Run]) -> list[dict[str, Any]]:
    # The path's end points pin the trajectory down: a retrained or resumed-differently
    # run changes final.pt or checkpoint 0 (the rest is a deterministic function of them
    # and the config, which is part of the fingerprint too).
    return [{"path": str(r.path.resolve()), "horizon": r.meta.horizon_epochs, "config": r.meta.config,
             "final": hashlib.sha256(r.store.read_bytes("final.pt")).hexdigest(),
             "start": hashlib.sha256(r.store.read_bytes(r.store.checkpoint(0))).hexdigest()}
            for r in runs]


def _evaluator(run_path: str, samples: int, bn: str, seed: int) -> LossEvaluator:
    # The run's config is part of the key: a run directory retrained with another
    # config in the same process must not get the old data and model.
    config = json.dumps(Run(run_path).meta.config, sort_keys=True)
    return _cached_evaluator(run_path, samples, bn, seed, config)


@functools.lru_cache(maxsize=4)
def _cached_evaluator(run_path: str, samples: int, bn: str, seed: int, config: str) -> LossEvaluator:
    # One evaluator per process and setting: grid tasks that land in the same worker
    # (or in this process when workers = 1) share the loaded data and model.
    return LossEvaluator(run_path, samples=samples, bn=bn, seed=seed)


def grid_rows_task(basis_file: str, run_path: str, samples: int, bn: str, seed: int,
                   alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """Loss at origin + a·u + b·v for every a in ``alphas`` and b in ``betas``: (len(betas), len(alphas)).

    A top-level function with picklable arguments (the basis travels as a file name,
    not as d-sized arrays), so rows can go to any executor.

    Example:
        >>> grid_rows_task("out/landscape_basis.npz", "runs/sgd", 512, "train", 0,
        ...                np.linspace(-1, 1, 5), np.array([0.0])).shape  # needs a computed landscape of runs/sgd  # doctest: +SKIP
        (1, 5)
    """
    ev = _evaluator(run_path, samples, bn, seed)
    z = _read_npz(basis_file)  # a path or a URL: grid tasks read it wherever they run
    origin, u, v = z["origin"], z["basis"][0], z["basis"][1]
    buffers = _buffers_of(Run(run_path).store.read_torch("final.pt")["model"], ev.names)
    out = np.empty((len(betas), len(alphas)))
    for j, b in enumerate(betas):
        for i, a in enumerate(alphas):
            out[j, i] = ev.loss(origin + a * u + b * v, buffers)
    return out


def _buffers_of(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    keep = set(names)
    return {k: v for k, v in state.items() if k not in keep}


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


def _check_compatible(runs: list[Run], trajs: list[Trajectory]) -> None:
    first = runs[0].config
    for run, traj in zip(runs[1:], trajs[1:], strict=True):
        cfg = run.config
        if (cfg.data, cfg.loss) != (first.data, first.loss):
            raise ValueError(f"{run.path} trains on other data or another loss than {runs[0].path}; "
                             "one plane shows one loss surface")
        if (cfg.model.name, cfg.model.switches()) != (first.model.name, first.model.switches()):
            raise ValueError(f"{run.path} trains another network than {runs[0].path}; "
                             "paths of different models share no plane")
        if traj.points.shape[1] != trajs[0].points.shape[1]:
            raise ValueError(f"{run.path} has {traj.points.shape[1]} parameters, {runs[0].path} "
                             f"{trajs[0].points.shape[1]}: paths of different models share no plane")


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def compute_landscape(runs: list[str | Path], out: str | Path, *, grid: int = 21, extent: float = 1.2,
                      samples: int = 512, bn: str = "train", seed: int = 0, workers: int = 1,
                      executor: str = "local", address: str | None = None, progress: bool = True) -> Landscape:
    """Loss surface, projected paths, gradient/step directions and interpolations (see module doc).

    Reuses ``out/landscape.npz`` when it was computed with the same settings from the
    same run files (``Landscape.reused`` says which happened).

    Args:
        runs: trained run directories; the first run's θ_T is the plane's origin
        out: output folder (figures and the stored grid)
        grid: grid points per axis
        extent: half-width of the grid / the path's reach on each axis
        samples: size of the fixed training subset the loss is evaluated on
        bn: module mode of every evaluation
        seed: seed of the evaluation subset (and of dropout)
        workers: processes for the grid rows
        executor: where the grid rows run (local processes or Ray)
        address: Ray cluster address (executor ray); default: a local instance
        progress: show a progress bar

    Example:
        >>> ls = compute_landscape(["runs/quickstart/relu"], "out", grid=5, samples=64)  # needs a trained run  # doctest: +SKIP
        >>> ls.loss.shape, ls.reused                                                  # doctest: +SKIP
        ((5, 5), False)
        >>> compute_landscape(["runs/quickstart/relu"], "out", grid=5, samples=64).reused  # doctest: +SKIP
        True
    """
    if not runs:
        raise ValueError("give at least one run")
    if grid < 2:
        raise ValueError(f"grid must be >= 2 points per axis, got {grid}")
    if not extent > 0:
        raise ValueError(f"extent must be > 0, got {extent}")
    BN_MODES.get(bn)  # an unknown mode fails before any work
    out = location(out)
    run_objs = [Run(r) for r in runs]
    for r in run_objs:
        if r.meta.checkpoints_pruned:
            raise pruned_error(r, "a landscape")
    settings = {"version": LANDSCAPE_VERSION, "grid": grid, "extent": extent, "samples": samples, "bn": bn,
                "seed": seed, "origin": f"theta_T of {run_objs[0].name}",
                "inputs": _fingerprint(run_objs)}
    store = RunStore(out)
    if store.exists(META_FILE) and store.exists(GRID_FILE):
        try:
            if store.read_json(META_FILE)["settings"] == json.loads(json.dumps(settings)):
                return Landscape.load(out)
        except (json.JSONDecodeError, KeyError, OSError, ValueError, TypeError, StoreError):
            pass  # damaged or older store: recompute and overwrite it

    ev = _evaluator(str(run_objs[0].path), samples, bn, seed)
    trajs = [load_trajectory(r, ev.names) for r in run_objs]
    _check_compatible(run_objs, trajs)
    origin = trajs[0].points[-1]
    pca = path_pca(np.vstack([t.points - origin for t in trajs]))
    _atomic_npz(out / BASIS_FILE, {"origin": origin, "basis": pca.basis, "explained": pca.explained,
                                   "singular_values": pca.singular_values})
    coords, start = [], 0
    for t in trajs:
        coords.append(pca.coords[start:start + len(t.points)])
        start += len(t.points)
    reach = np.abs(np.vstack(coords)).max(axis=0)
    half = extent * np.where(reach > 0, reach, reach.max() if reach.max() > 0 else 1.0)
    alphas, betas = np.linspace(-half[0], half[0], grid), np.linspace(-half[1], half[1], grid)

    n_tasks = 1 if workers <= 1 else min(grid, 2 * workers)
    tasks = [(str(out / BASIS_FILE), str(run_objs[0].path), samples, bn, seed, alphas, rows)
             for rows in np.array_split(betas, n_tasks)]
    loss = np.vstack(make_executor(executor, workers=workers, address=address).map(
        grid_rows_task, tasks, desc="landscape grid", progress=progress))

    step_proj, grad_proj, cos_full, path_loss, interp_loss = [], [], [], [], []
    alpha_1d = interpolation_alphas()
    for t in trajs:
        steps = np.diff(t.points, axis=0)
        grads = np.stack([-ev.gradient(t.points[e], t.buffers[e]) for e in range(len(steps))]) \
            if len(steps) else np.zeros((0, t.points.shape[1]))
        step_proj.append(pca.project(steps))
        grad_proj.append(pca.project(grads))
        cos_full.append(np.array([_cos(g, s) for g, s in zip(grads, steps, strict=True)]))
        path_loss.append(np.array([ev.loss(p, b) for p, b in zip(t.points, t.buffers, strict=True)]))
        interp_loss.append(np.array([
            ev.loss(*interpolate_state(t.points[0], t.points[-1], t.buffers[0], t.buffers[-1], a))
            for a in alpha_1d]))

    result = Landscape(settings=settings, run_names=[t.name for t in trajs], run_paths=[str(t.path) for t in trajs],
                       explained=pca.explained, alphas=alphas, betas=betas, loss=loss, coords=coords,
                       step_proj=step_proj, grad_proj=grad_proj, cos_full=cos_full, path_loss=path_loss,
                       interp_alpha=alpha_1d, interp_loss=interp_loss, files=_files(out))
    result.save(out)
    return result

