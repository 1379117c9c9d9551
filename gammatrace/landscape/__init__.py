"""Optimization paths on the loss landscape (Li et al. 2018, as in the γ-principle appendix).

From the checkpoints of one or several paths — gammatrace runs, or plain state_dict
files saved by any training loop — three kinds of picture, side by side in one folder:

- ``directions="pca"``, ``plane="shared"`` (default): the plane of the top-2 principal
  directions of all paths' displacements around the first run's θ_T, the loss on a grid
  over it, every path projected, and at each checkpoint the SGD direction −∇L next to the
  optimizer's actual step — so SGD, momentum and Adam runs from one θ_0 compare on one
  set of axes — plus the 1-D interpolation θ_0 → θ_T.
- ``plane="per_path"``: the same, one plane per path (its own θ_T, its own PCA, its own
  grid), as the γ-principle paper's Figure 12.
- ``directions="random"``, ``dims=1|2``: Li et al.'s filter-normalised random directions
  around each path's θ_T: a curve or contours.

Grids are resumable: finished rows are kept on disk, a rerun computes only the rest.

- :func:`landscape` — compute (or reload, or resume) and draw the figures; returns their paths
- :func:`~gammatrace.landscape.compute.compute_landscape` (its settings a
  :class:`~gammatrace.landscape.compute.LandscapeConfig`), :class:`~gammatrace.landscape.compute.Landscape`,
  :class:`~gammatrace.landscape.compute.Plane`
- :func:`~gammatrace.landscape.pca.path_pca` (pure NumPy),
  :func:`~gammatrace.landscape.directions.filter_normalized_directions`
- :class:`~gammatrace.landscape.evaluate.LossEvaluator`, :func:`~gammatrace.landscape.evaluate.load_trajectory`,
  :class:`~gammatrace.landscape.sources.RunSource`, :class:`~gammatrace.landscape.sources.CheckpointSource`
- :class:`~gammatrace.landscape.sources.LandscapeInputError` (a fixable input, one line),
  :class:`~gammatrace.landscape.sources.LandscapeWarning` (a path of checkpoint files that
  ends higher than it starts: files out of order?)
- :func:`~gammatrace.landscape.plot.figure_landscape`, :func:`~gammatrace.landscape.plot.plot_landscape`,
  :func:`~gammatrace.landscape.plot.plot_interpolation`

Example: SGD and Adam from one θ_0 (same seed) for three epochs on 96 digits (pass 1
only: the landscape needs the checkpoints, not the analysis), then the figures of the
shared plane, of one plane per path, and of one random direction:

    >>> import tempfile
    >>> from pathlib import Path
    >>> import gammatrace
    >>> from gammatrace.landscape import landscape
    >>> root = Path(tempfile.mkdtemp())
    >>> tiny = {"seed": 0, "epochs": 3, "batch_size": 32, "data": {"name": "digits", "n_train": 96, "n_test": 64},
    ...         "model": {"name": "mlp", "width": 8, "depth": 2}}
    >>> optims = {"sgd": {"name": "sgd", "lr": 0.2}, "adam": {"name": "adam", "lr": 0.01}}
    >>> runs = [gammatrace.train({**tiny, "name": name, "optim": optim}, out=root / name,
    ...                          replay=False, progress=False).path for name, optim in optims.items()]
    >>> files = landscape(runs, root / "landscape", grid=5, samples=64, progress=False)
    >>> sorted(files), files["landscape"].name
    (['basis', 'grid', 'interpolation', 'landscape', 'meta'], 'landscape.png')
    >>> landscape(runs, root / "landscape", plane="per_path", grid=5, samples=64, progress=False)["landscape"].name
    'landscape_per_path.png'
    >>> landscape(runs, root / "landscape", directions="random", dims=1, grid=5, samples=64,
    ...           progress=False)["landscape"].name
    'landscape_random_1d.png'
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from gammatrace.landscape.compute import (
    DIRECTIONS,
    PCA_PLANES,
    Landscape,
    LandscapeConfig,
    Plane,
    compute_landscape,
    interpolation_alphas,
    landscape_stem,
)
from gammatrace.landscape.directions import IGNORE, filter_normalized_directions
from gammatrace.landscape.evaluate import BN_MODES, LossEvaluator, load_trajectory
from gammatrace.landscape.pca import PathPCA, path_pca
from gammatrace.landscape.plot import (
    figure_interpolation,
    figure_landscape,
    plot_interpolation,
    plot_landscape,
)
from gammatrace.landscape.sources import (
    CheckpointSource,
    LandscapeInputError,
    LandscapeWarning,
    RunSource,
)
from gammatrace.store.backend import Location, ObjectFiles, inside, location, output_folder
from gammatrace.store.run import RunStore

_PLOTS = {"landscape": plot_landscape, "interpolation": plot_interpolation}


def landscape(runs: list[str | Path] | list[list[str | Path]] | dict[str, list[str | Path]], out: str | Path,
              **options) -> dict[str, Path]:
    """Compute (or reload, or resume) the landscape of ``runs`` into ``out`` and draw its figures.

    ``options`` go to :func:`compute_landscape` (the fields of :class:`LandscapeConfig`):
    ``plane`` (shared / per_path),
    ``directions`` (pca / random), ``dims``, ``grid``, ``extent``, ``span``, ``samples``,
    ``bn``, ``ignore``, ``seed``, ``model``/``data``/``loss`` (checkpoint files),
    ``workers``, ``executor``, ``progress``. Returns the paths of the figures
    (``landscape``; ``interpolation`` for PCA planes) and of the stored arrays
    (``grid``, ``meta``, ``basis``).

    Example:
        >>> landscape(["runs/quickstart/relu"], "out", grid=11)["landscape"]   # needs the README's quickstart run  # doctest: +SKIP
        PosixPath('out/landscape.png')
        >>> landscape(["runs/momentum", "runs/adam"], "out", plane="per_path", grid=15, samples=256)  # doctest: +SKIP
        {'landscape': PosixPath('out/landscape_per_path.png'), 'interpolation': ..., 'grid': ..., ...}
    """
    out = location(out)
    if not isinstance(out, Location):
        # Resolved once (a link planted in a run or study folder is refused); one writer at a time.
        out, note = output_folder(out)
        if note:
            print(f"gammatrace: {note}", file=sys.stderr)
        with RunStore(out).lock(clean=False):
            # The row cache is a folder of its own below out: never a link planted there.
            config = options.get("config")
            pick = {k: options.get(k, getattr(config, k, default))
                    for k, default in (("directions", "pca"), ("plane", "shared"), ("dims", 2))}
            inside(out, landscape_stem(pick["directions"], pick["plane"], pick["dims"]) + "_rows")
            ls = compute_landscape(runs, out, **options)
            return {**{k: _PLOTS[k](ls, out / name) for k, name in ls.figure_names().items()}, **ls.files}
    ls = compute_landscape(runs, out, **options)
    names = ls.figure_names()
    with tempfile.TemporaryDirectory(prefix="gammatrace-landscape-") as tmp:
        # Figures are drawn locally, then uploaded next to the stored arrays.
        for k, name in names.items():
            _PLOTS[k](ls, Path(tmp) / name)
        ObjectFiles(out).upload(Path(tmp), "")
    return {**{k: out / name for k, name in names.items()}, **ls.files}


__all__ = ["BN_MODES", "DIRECTIONS", "IGNORE", "PCA_PLANES", "CheckpointSource", "Landscape", "LandscapeConfig", "LandscapeInputError",
           "LandscapeWarning", "LossEvaluator", "PathPCA", "Plane", "RunSource", "compute_landscape", "figure_interpolation",
           "figure_landscape", "filter_normalized_directions", "interpolation_alphas", "landscape", "landscape_stem",
           "load_trajectory", "path_pca", "plot_interpolation", "plot_landscape"]
