"""Datasets that are generated or shipped inside installed packages: they work offline
on a fresh machine.

Example:
    >>> from gammatrace.data.embedded import digits
    >>> ds = digits(test_fraction=0.2, seed=0)
    >>> tuple(ds.x_train.shape), tuple(ds.x_test.shape), float(ds.x_train.max()), ds.num_classes
    ((1438, 1, 8, 8), (359, 1, 8, 8), 1.0, 10)
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from gammatrace.data.base import DATASETS, DataError, Dataset


@DATASETS.register("mnist1d")
def mnist1d(num_samples: int = 5000, seed: int = 42, train_split: float = 0.8) -> Dataset:
    """MNIST-1D (Greydanus 2020), generated offline with ``mnist1d.data.make_dataset``.

    Never touches the package's download path. Inputs (N, 1, 40), 10 classes.
    """
    d = _mnist1d_arrays(num_samples, seed, train_split)
    to_x = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32)).unsqueeze(1)  # noqa: E731
    to_y = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
    if len(d["y_test"]) == 0:
        raise DataError("mnist1d: train_split leaves no test samples")
    return Dataset("mnist1d", to_x(d["x"]), to_y(d["y"]), to_x(d["x_test"]), to_y(d["y_test"]),
                   task="classification", num_classes=10)


def cache_dir() -> Path:
    """Where generated datasets are cached ($GAMMATRACE_CACHE, else ~/.cache/gammatrace)."""
    return Path(os.environ.get("GAMMATRACE_CACHE", Path.home() / ".cache" / "gammatrace"))


def _mnist1d_arrays(num_samples: int, seed: int, train_split: float) -> dict:
    # Generation costs seconds; the result is a pure function of the arguments (and the
    # mnist1d version), so it is cached on disk, written atomically.
    import mnist1d

    # mnist1d's generator (and its scipy) load only when MNIST-1D is built
    from mnist1d.data import get_dataset_args, make_dataset

    version = getattr(mnist1d, "__version__", "0")
    path = cache_dir() / f"mnist1d-{version}-{num_samples}-{seed}-{train_split}.npz"
    args = get_dataset_args()
    key = np.array([num_samples, seed, train_split], dtype=np.float64)
    if path.exists():
        d, why = _read_cache(path, key, args.final_seq_length)
        if why is None:
            return d
        # Never trained on: a damaged or foreign entry is regenerated (and replaced) below.
        print(f"gammatrace: the MNIST-1D cache {path} {why}; regenerating it", file=sys.stderr)
    args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
    # make_dataset reseeds the global numpy/random generators; keep the caller's streams.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    d = {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, key=key, **d)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs the regeneration next time
    return d


def _read_cache(path: Path, key: np.ndarray, length: int) -> tuple[dict | None, str | None]:
    """A cached MNIST-1D entry, checked against what ``make_dataset`` returns for ``key``
    (num_samples, seed, train_split): (arrays, None), or (None, what is wrong with it).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "entry.npz"
        >>> key = np.array([20, 0, 0.8])
        >>> np.savez(path, key=key, x=np.zeros((16, 40)), y=np.zeros(16, int), x_test=np.zeros((4, 40)), y_test=np.zeros(4, int))
        >>> _read_cache(path, key, 40)[1] is None
        True
        >>> np.savez(path, key=key, x=np.zeros((5, 40)), y=np.zeros(5, int), x_test=np.zeros((4, 40)), y_test=np.zeros(4, int))
        >>> _read_cache(path, key, 40)[1]
        'holds 5 training and 4 test samples, not 16 and 4'
        >>> _ = path.write_bytes(path.read_bytes()[:100])
        >>> _read_cache(path, key, 40)[1]  # doctest: +ELLIPSIS
        'is unreadable (BadZipFile: ...)'
    """
    num_samples, _, train_split = key
    total = int(num_samples) // 10 * 10  # make_dataset draws num_samples // 10 per class
    n_train = int(total * train_split)
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in ("key", "x", "y", "x_test", "y_test")}
    except Exception as exc:  # noqa: BLE001 - BadZipFile, a bad CRC, a missing array, ...: all damage
        return None, f"is unreadable ({exc.__class__.__name__}: {' '.join(str(exc).split())[:120]})"
    if d["key"].shape != key.shape or not np.array_equal(d["key"], key):
        return None, "was made for other arguments"
    x, y, xt, yt = d["x"], d["y"], d["x_test"], d["y_test"]
    if (len(x), len(xt)) != (n_train, total - n_train) or len(y) != len(x) or len(yt) != len(xt):
        return None, f"holds {len(x)} training and {len(xt)} test samples, not {n_train} and {total - n_train}"
    if x.shape[1:] != (length,) or xt.shape[1:] != (length,) or y.ndim != 1 or yt.ndim != 1:
        return None, f"holds arrays of shapes {x.shape}, {y.shape}, not (N, {length}) and (N,)"
    if (x.dtype.kind != "f" or xt.dtype.kind != "f" or y.dtype.kind not in "iu" or yt.dtype.kind not in "iu"
            or not (np.isfinite(x).all() and np.isfinite(xt).all())
            or (len(y) and not (0 <= y.min() and y.max() < 10)) or (len(yt) and not (0 <= yt.min() and yt.max() < 10))):
        return None, "holds values that are not finite inputs and labels 0..9"
    return {k: d[k] for k in ("x", "y", "x_test", "y_test")}, None


@DATASETS.register("digits")
def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images shipped with the package).

    Pixels scaled to [0, 1]; a seeded shuffle splits train/test. Inputs (N, 1, 8, 8).
    """
    # scikit-learn loads only when digits is built
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = int(round(len(y) * test_fraction))
    if not 0 < n_test < len(y):
        raise DataError(f"digits: test_fraction={test_fraction} leaves an empty split")
    return Dataset("digits", x[n_test:], y[n_test:], x[:n_test], y[:n_test],
                   task="classification", num_classes=10)
