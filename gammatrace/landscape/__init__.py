"""Optimization paths on the loss landscape (Li et al. 2018, as in the γ-principle appendix).

From a run's epoch checkpoints and θ_T: the plane of the top-2 principal directions of
the path's displacements, the loss on a grid over it, the path(s) projected onto it,
and at each checkpoint the plain gradient direction next to the optimizer's actual
step — so SGD, momentum and Adam runs from one θ_0 compare on one figure — plus the
1-D interpolation θ_0 → θ_T.

- :func:`landscape` — compute (or reload) and draw both figures
- :func:`~gammatrace.landscape.compute.compute_landscape`, :class:`~gammatrace.landscape.compute.Landscape`
- :func:`~gammatrace.landscape.pca.path_pca` (pure NumPy)
- :class:`~gammatrace.landscape.evaluate.LossEvaluator`, :func:`~gammatrace.landscape.evaluate.load_trajectory`
- :func:`~gammatrace.landscape.plot.plot_landscape`, :func:`~gammatrace.landscape.plot.plot_interpolation`

Example: SGD and Adam from one θ_0 (same seed) for three epochs on 96 digits (pass 1
only: the landscape needs the checkpoints, not the analysis), then both figures:

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
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from gammatrace.landscape.compute import Landscape, compute_landscape, interpolation_alphas
from gammatrace.landscape.evaluate import BN_MODES, LossEvaluator, load_trajectory
from gammatrace.landscape.pca import PathPCA, path_pca
from gammatrace.landscape.plot import plot_interpolation, plot_landscape
from gammatrace.store.backend import Location, ObjectFiles, location


def landscape(runs: list[str | Path], out: str | Path, **options) -> dict[str, Path]:
    """Compute (or reload) the landscape of ``runs`` into ``out`` and draw its figures.

    ``options`` go to :func:`compute_landscape` (grid, extent, samples, bn, seed,
    workers, executor, progress). Returns the paths of ``landscape.png``,
    ``interpolation.png`` and the stored arrays.

    Example:
        >>> landscape(["runs/quickstart/relu"], "out", grid=11)["landscape"]   # needs the README's quickstart run  # doctest: +SKIP
        PosixPath('out/landscape.png')
    """
    out = location(out)
    ls = compute_landscape(runs, out, **options)
    if not isinstance(out, Location):
        return {"landscape": plot_landscape(ls, out / "landscape.png"),
                "interpolation": plot_interpolation(ls, out / "interpolation.png"), **ls.files}
    with tempfile.TemporaryDirectory(prefix="gammatrace-landscape-") as tmp:
        # Figures are drawn locally, then uploaded next to the stored arrays.
        figures = {"landscape": plot_landscape(ls, Path(tmp) / "landscape.png"),
                   "interpolation": plot_interpolation(ls, Path(tmp) / "interpolation.png")}
        ObjectFiles(out).upload(Path(tmp), "")
    return {**{k: out / Path(v).name for k, v in figures.items()}, **ls.files}


__all__ = ["BN_MODES", "Landscape", "LossEvaluator", "PathPCA", "compute_landscape", "interpolation_alphas",
           "landscape", "load_trajectory", "path_pca", "plot_interpolation", "plot_landscape"]
