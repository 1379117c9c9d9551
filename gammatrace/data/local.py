"""Readers for standard datasets the user already has on disk: CIFAR-10/100 in the
"python version" format and MNIST / Fashion-MNIST as IDX files.

gammatrace never downloads (DESIGN.md §5): when a file is missing the error names the
folder searched, the files expected and where to get the archive. The folder is the
``data_dir`` option, else ``$GAMMATRACE_DATA``, else ``./data``; either that folder or
the dataset's own subfolder (``cifar-10-batches-py/``, ``mnist/``, ...) may be given.

Example: a folder holding the four MNIST IDX files (here six white 28x28 training images
and two test images, written to a temporary folder) loads as a dataset:

    >>> import struct, tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from gammatrace.data import load_dataset
    >>> folder = Path(tempfile.mkdtemp()) / "mnist"
    >>> folder.mkdir()
    >>> def write_idx(path, a):  # IDX header: 0, 0, type 0x08 (uint8), ndim, then each dim
    ...     header = struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    ...     path.write_bytes(header + a.tobytes())
    >>> for split, n in [("train", 6), ("t10k", 2)]:
    ...     write_idx(folder / f"{split}-images-idx3-ubyte", np.full((n, 28, 28), 255, np.uint8))
    ...     write_idx(folder / f"{split}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8))
    >>> ds = load_dataset("mnist", data_dir=folder.parent)
    >>> tuple(ds.x_train.shape), ds.x_train.max().item(), ds.y_test.tolist()
    ((6, 1, 28, 28), 1.0, [0, 1])

    With the real CIFAR-10 archive unpacked under ``/datasets``:

    >>> ds = load_dataset("cifar10", data_dir="/datasets")  # needs CIFAR-10 in /datasets  # doctest: +SKIP
    >>> tuple(ds.x_train.shape), ds.x_train.dtype, ds.num_classes  # doctest: +SKIP
    ((50000, 3, 32, 32), torch.float32, 10)
"""

from __future__ import annotations

import gc
import gzip
import io
import math
import os
import pickle
import pickletools
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gammatrace.data.base import DATASETS, DataError, Dataset

DATA_ENV = "GAMMATRACE_DATA"


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder local datasets are read from: ``data_dir``, else $GAMMATRACE_DATA, else ./data.

    Example:
        >>> str(data_root("/datasets"))
        '/datasets'
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path("data")


def _locate(name: str, root: Path, subfolders: tuple[str, ...],
            files: dict[str, tuple[str, ...]], hint: str) -> dict[str, Path]:
    """Find the first of ``subfolders`` (then ``root`` itself) holding every required file.

    ``files`` maps a role to its accepted file names (e.g. plain and gzipped). Raises a
    one-line DataError naming what was searched and what is missing.
    """
    root = root.resolve()
    expected = ", ".join(alts[0] for alts in files.values())
    candidates = [root / s for s in subfolders] + [root]
    best: tuple[int, Path, list[str]] | None = None
    for folder in candidates:
        if not folder.is_dir():
            continue
        found, missing = {}, []
        for role, alts in files.items():
            path = next((folder / a for a in alts if (folder / a).is_file()), None)
            if path is None:
                missing.append(alts[0])
            else:
                found[role] = path
        if not missing:
            return found
        if found and (best is None or len(found) > best[0]):
            best = (len(found), folder, missing)
    if not root.is_dir():
        raise DataError(f"{name}: data folder {root} does not exist (expected {expected} there "
                        f"or in {' or '.join(subfolders)}/ under it); gammatrace never downloads: "
                        f"{hint}")
    if best is not None:
        _, folder, missing = best
        raise DataError(f"{name}: {folder} is incomplete, missing {', '.join(missing)} "
                        f"(expected {expected}); gammatrace never downloads: {hint}")
    searched = ", ".join(str(c) for c in candidates)
    raise DataError(f"{name}: no files found in {searched} (expected {expected}); "
                    f"gammatrace never downloads: {hint}")


# --------------------------------------------------------------------------- CIFAR

# The standard CIFAR "python version" is a Python-2 pickle of a dict holding a numpy
# uint8 array; pickle is therefore the only way to read it. It is acceptable here
# because the user points at their own local copy of the authors' archive, and we
# narrow the risk further: the unpickler resolves only the numpy globals an ndarray
# pickle needs, so a tampered file cannot name os.system or the like.
_CIFAR_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),  # written by numpy 1.x (the original files)
    ("numpy._core.multiarray", "_reconstruct"),  # numpy 2.x, protocol < 5
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 re-saves
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR batch never does")
        return super().find_class(module, name)


@dataclass(frozen=True)
class CifarFormat:
    """Where one CIFAR variant lives on disk and which labels it carries."""

    title: str
    subfolder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    labels: dict[str, tuple[bytes, int]]  # label_mode -> (pickle key, number of classes)
    archive: str

    def hint(self, root: Path) -> str:
        return (f"download {self.archive} and unpack it into {root.resolve()} "
                f"(or pass data_dir= / set ${DATA_ENV} to the folder holding {self.subfolder}/)")


CIFAR_FORMATS = {
    "cifar10": CifarFormat(
        "CIFAR-10", "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
        {"fine": (b"labels", 10)},
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": CifarFormat(
        "CIFAR-100", "cifar-100-python", ("train",), ("test",),
        {"fine": (b"fine_labels", 100), "coarse": (b"coarse_labels", 20)},
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def read_cifar_batch(path: str | os.PathLike, label_key: bytes = b"labels") -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR "python version" batch file as (uint8 images (N, 3, 32, 32), int64 labels (N,)).

    Example: a batch of two black images, pickled the way the archive's files are:

        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "test_batch"
        >>> _ = path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 8]}))
        >>> x, y = read_cifar_batch(path)
        >>> x.shape, x.dtype, y
        ((2, 3, 32, 32), dtype('uint8'), array([3, 8]))

        The archive's own test batch:

        >>> x, y = read_cifar_batch("data/cifar-10-batches-py/test_batch")  # needs CIFAR-10 in ./data  # doctest: +SKIP
        >>> x.shape, y[:3]  # doctest: +SKIP
        ((10000, 3, 32, 32), array([3, 8, 8]))
    """
    path = Path(path)
    fix = "re-extract it from the original archive"
    raw = path.read_bytes()
    problem = _pickle_problem(raw)
    if problem is None:
        batch, problem = _unpickle(raw)
    if problem is not None:
        raise DataError(f"{path} is not a readable CIFAR python-version batch ({problem}); {fix}")
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path} lacks the keys b'data' and {label_key!r} of a CIFAR batch "
                        f"(has {keys}); is it the python version of the archive?")
    data, labels = batch[b"data"], _labels(batch[label_key])
    if labels is None:
        raise DataError(f"{path}: field {label_key!r} is not a list of integer labels "
                        f"(got {type(batch[label_key]).__name__}); {fix}")
    if not (type(data) is np.ndarray and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32 and len(labels) == len(data)):
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: expected field b'data' as uint8 (N, 3072) with N labels, got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {shape} and {len(labels)} labels; {fix}")
    if not data.flags.c_contiguous:  # a damaged header's order flag: the same bytes, other images
        raise DataError(f"{path}: field b'data' is stored column-major (Fortran order), which a CIFAR "
                        f"batch never is; {fix}")
    # Rows are 1024 red, 1024 green, 1024 blue values, each plane row-major: channels first.
    return data.reshape(-1, 3, 32, 32), labels


def _unpickle(raw: bytes):
    """(the batch, None), or (None, why it cannot be read): any error while rebuilding the
    objects (UnpicklingError, SystemError, OverflowError, MemoryError from a damaged
    header's sizes, ...) means a damaged file, never a bug of ours, as only numpy's globals
    are resolved. numpy reports the failed clean-up of a half-built array through
    ``sys.unraisablehook`` (a traceback on stderr, after the fact): the file is refused
    anyway, so that report is kept off the one-line error."""
    ignored: list = []
    hook = sys.unraisablehook
    sys.unraisablehook = ignored.append
    try:
        try:
            # encoding="bytes": the files were written by Python 2, whose str must stay bytes
            # (the array payload); hence the keys are b"data", b"labels".
            return _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load(), None
        except Exception as e:  # noqa: BLE001 - see above
            problem = f"{e.__class__.__name__}: {' '.join(str(e).split())[:160]}"
        gc.collect(0)  # refcounting frees them here; a young cycle too (a full collection costs ~0.1 s)
        return None, problem
    finally:
        sys.unraisablehook = hook


def _pickle_problem(raw: bytes) -> str | None:
    """What makes ``raw`` no well-formed pickle (a truncated opcode, a length beyond the end
    of the file, an unknown opcode, no STOP), found before any object is built, so a
    damaged header's sizes are never allocated. None when the opcode stream is well formed.

    Example:
        >>> _pickle_problem(pickle.dumps([1, 2])) is None
        True
        >>> _pickle_problem(b"\\x80\\x03B\\xff\\xff\\xff\\x7f")
        'damaged after byte 0: expected 2147483647 bytes in a bytes4, but only 0 remain'
    """
    pos = 0
    try:
        for _, _, pos in pickletools.genops(io.BytesIO(raw)):  # noqa: B007 - pos: where it stopped
            pass
    except Exception as e:  # noqa: BLE001 - genops reports every malformation as some exception
        return f"damaged after byte {pos}: {' '.join(str(e).split())[:160]}"
    return None


def _labels(value) -> np.ndarray | None:
    """A batch's labels as int64 (N,), or None when they are not a flat list of integers."""
    if isinstance(value, np.ndarray):
        ok = value.ndim == 1 and (value.dtype.kind in "iu" or value.size == 0)
    elif isinstance(value, (list, tuple)):
        ok = all(type(v) is int for v in value)  # not bool, not float: what the archive holds
    else:
        ok = False
    if not ok:
        return None
    try:
        return np.asarray(value, dtype=np.int64)
    except (OverflowError, ValueError):
        return None


def _to_unit_float(images: np.ndarray) -> torch.Tensor:
    x = images.astype(np.float32)
    x /= 255.0
    return torch.from_numpy(x)


def _load_cifar(name: str, data_dir, label_mode: str) -> Dataset:
    fmt = CIFAR_FORMATS[name]
    if label_mode not in fmt.labels:
        raise DataError(f"{name}: label_mode={label_mode!r} is unknown; choose one of: "
                        f"{', '.join(fmt.labels)}")
    key, num_classes = fmt.labels[label_mode]
    root = data_root(data_dir)
    files = {f: (f,) for f in fmt.train_files + fmt.test_files}
    paths = _locate(name, root, (fmt.subfolder,), files, fmt.hint(root))

    def split(names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [read_cifar_batch(paths[f], key) for f in names]
        y = np.concatenate([p[1] for p in parts])
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{name}: labels outside 0..{num_classes - 1} in {paths[names[0]].parent}; "
                            "the files do not match the dataset name")
        return _to_unit_float(np.concatenate([p[0] for p in parts])), torch.from_numpy(y)

    x_train, y_train = split(fmt.train_files)
    x_test, y_test = split(fmt.test_files)
    return Dataset(name, x_train, y_train, x_test, y_test, task="classification", num_classes=num_classes)


@DATASETS.register("cifar10")
def cifar10(data_dir: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-10 from a local copy of cifar-10-python.tar.gz, unpacked.

    ``data_dir`` holds ``cifar-10-batches-py/`` or is that folder. Inputs (N, 3, 32, 32)
    in [0, 1]; 50,000 train / 10,000 test; 10 classes.
    """
    return _load_cifar("cifar10", data_dir, "fine")


@DATASETS.register("cifar100")
def cifar100(data_dir: str | os.PathLike | None = None, label_mode: str = "fine") -> Dataset:
    """CIFAR-100 from a local copy of cifar-100-python.tar.gz, unpacked.

    ``data_dir`` holds ``cifar-100-python/`` or is that folder. ``label_mode`` "fine"
    (100 classes) or "coarse" (20 superclasses). Inputs (N, 3, 32, 32) in [0, 1].
    """
    return _load_cifar("cifar100", data_dir, label_mode)


# --------------------------------------------------------------------------- IDX / MNIST

# IDX type byte -> numpy dtype; every multi-byte IDX value is big-endian.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (plain or gzipped) as a numpy array, with its header validated.

    The header is two zero bytes, a type byte, the number of dimensions, then one
    big-endian uint32 per dimension; the payload must have exactly the size it declares.

    Example: a gzipped 2x3 uint8 array (type byte 0x08, two dimensions):

        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "tiny-idx2-ubyte.gz"
        >>> header = bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 2, 3)
        >>> _ = path.write_bytes(gzip.compress(header + bytes(range(6))))
        >>> read_idx(path)
        array([[0, 1, 2],
               [3, 4, 5]], dtype=uint8)

        The MNIST test images:

        >>> x = read_idx("data/mnist/t10k-images-idx3-ubyte.gz")  # needs MNIST in ./data/mnist  # doctest: +SKIP
        >>> x.shape, x.dtype  # doctest: +SKIP
        ((10000, 28, 28), dtype('uint8'))
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by the file name
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path} is a damaged gzip file ({e}); download or copy it again") from None
    if len(raw) < 4:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than an IDX header; "
                        "download or copy it again")
    if raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file: magic number 0x{raw[:4].hex()} "
                        "(expected 0x0000TTNN, e.g. 0x00000803 for images, 0x00000801 for labels); "
                        "point data_dir at the original (optionally .gz) IDX files")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header ({len(raw)} of {header} bytes); "
                        "download or copy it again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: header declares dims {list(dims)} = {expected} data bytes "
                        f"but the file has {len(raw) - header}; download or copy it again")
    arr = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header).reshape(dims)
    # Native byte order: torch.from_numpy refuses big-endian arrays.
    return arr.astype(dtype.newbyteorder("="), copy=False)


# The same four file names for every MNIST-format dataset; Kaggle copies spell the
# extension with a dot ("train-images.idx3-ubyte"), so both spellings are accepted.
IDX_STEMS = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


@dataclass(frozen=True)
class IdxFormat:
    """Where one MNIST-style dataset lives on disk."""

    title: str
    subfolders: tuple[str, ...]
    num_classes: int
    source: str

    def files(self) -> dict[str, tuple[str, ...]]:
        out = {}
        for role, stem in IDX_STEMS.items():
            dotted = stem.replace("-idx", ".idx")
            out[role] = (stem, stem + ".gz", dotted, dotted + ".gz")
        return out

    def hint(self, root: Path) -> str:
        names = ", ".join(s + ".gz" for s in IDX_STEMS.values())
        return (f"get {names} from {self.source} and put them in "
                f"{(root / self.subfolders[0]).resolve()} (or pass data_dir= / set ${DATA_ENV})")


IDX_FORMATS = {
    "mnist": IdxFormat("MNIST", ("mnist", "MNIST/raw", "MNIST"), 10,
                       "https://ossci-datasets.s3.amazonaws.com/mnist/ (a mirror of LeCun's files)"),
    "fashion_mnist": IdxFormat("Fashion-MNIST", ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw",
                                                 "FashionMNIST"), 10,
                               "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)"),
}


def _load_idx_dataset(name: str, data_dir) -> Dataset:
    fmt = IDX_FORMATS[name]
    root = data_root(data_dir)
    paths = _locate(name, root, fmt.subfolders, fmt.files(), fmt.hint(root))

    def split(images_role: str, labels_role: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = read_idx(paths[images_role]), read_idx(paths[labels_role])
        if images.dtype != np.uint8 or images.ndim != 3:
            raise DataError(f"{paths[images_role]}: expected uint8 images (N, H, W), got "
                            f"{images.dtype} {images.shape}; are the image and label files swapped?")
        if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{paths[labels_role]}: expected {len(images)} uint8 labels to match "
                            f"{paths[images_role].name}, got {labels.dtype} {labels.shape}")
        if len(labels) and labels.max() >= fmt.num_classes:
            raise DataError(f"{paths[labels_role]}: label {labels.max()} is outside 0..{fmt.num_classes - 1}")
        return _to_unit_float(images)[:, None], torch.from_numpy(labels.astype(np.int64))

    x_train, y_train = split("train_images", "train_labels")
    x_test, y_test = split("test_images", "test_labels")
    return Dataset(name, x_train, y_train, x_test, y_test, task="classification",
                   num_classes=fmt.num_classes)


@DATASETS.register("mnist")
def mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """MNIST from its four IDX files (plain or .gz) in ``data_dir/mnist`` (or ``MNIST/raw``,
    or ``data_dir`` itself). Inputs (N, 1, 28, 28) in [0, 1]; 60,000 / 10,000; 10 classes."""
    return _load_idx_dataset("mnist", data_dir)


@DATASETS.register("fashion_mnist")
def fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST, same file format and layout as MNIST, in ``data_dir/fashion_mnist``
    (or ``fashion-mnist``, ``FashionMNIST/raw``, or ``data_dir`` itself)."""
    return _load_idx_dataset("fashion_mnist", data_dir)
