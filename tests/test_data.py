"""Datasets, transforms and augmentation: real on-disk formats written in tmp_path,
brute-force checks of the transforms, and determinism of everything seeded."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gammatrace import train
from gammatrace.config import RunConfig
from gammatrace.data import (
    DATASETS,
    DataError,
    Dataset,
    apply_options,
    apply_task,
    augment_batch,
    augment_params,
    load_dataset,
)
from gammatrace.data.augment import AUGMENTATIONS
from gammatrace.data.local import IDX_STEMS, read_idx
from gammatrace.data.synthetic import make_teacher
from gammatrace.engine.budget import data_shape
from gammatrace.errors import UserError
from gammatrace.registry import UnknownNameError

# --------------------------------------------------------------------------- file writers


def _cifar_pickle(batch: dict, protocol: int = 3) -> bytes:
    # The original files were written by numpy 1.x, whose pickles name numpy.core;
    # numpy 2 writes numpy._core. Protocol 3 uses the text GLOBAL opcode, so renaming the
    # module reproduces the original files' globals (and bytes payloads, no _codecs).
    raw = pickle.dumps(batch, protocol=protocol)
    return raw.replace(b"numpy._core", b"numpy.core") if protocol <= 3 else raw


def _cifar_batch(rng: np.random.Generator, n: int, labels: dict[bytes, int]) -> dict:
    batch = {b"batch_label": b"training batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [b"img_%d.png" % i for i in range(n)]}
    for key, k in labels.items():
        batch[key] = rng.integers(0, k, n).tolist()
    return batch


def write_cifar(root: Path, variant: str, protocol: int = 3) -> dict[str, list[dict]]:
    """A tiny CIFAR-10 or CIFAR-100 tree in the python-version format; returns the batches."""
    rng = np.random.default_rng(0)
    if variant == "cifar10":
        folder, train, test, labels = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], {b"labels": 10}
        meta = ("batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
    else:
        folder, train, test, labels = root / "cifar-100-python", ["train"], ["test"], {b"fine_labels": 100, b"coarse_labels": 20}
        meta = ("meta", {b"fine_label_names": [], b"coarse_label_names": []})
    folder.mkdir(parents=True)
    out = {"train": [], "test": []}
    for split, names, n in (("train", train, 4), ("test", test, 3)):
        for name in names:
            batch = _cifar_batch(rng, n if variant == "cifar10" else 5 * n, labels)
            (folder / name).write_bytes(_cifar_pickle(batch, protocol))
            out[split].append(batch)
    (folder / meta[0]).write_bytes(_cifar_pickle(meta[1], protocol))
    return out


def idx_bytes(arr: np.ndarray, type_byte: int = 0x08) -> bytes:
    return bytes([0, 0, type_byte, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_mnist(folder: Path, gz: bool, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
              "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8)}
    folder.mkdir(parents=True, exist_ok=True)
    for role, arr in arrays.items():
        raw = idx_bytes(arr)
        (folder / (IDX_STEMS[role] + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("layout", ["parent", "subfolder"])
def test_cifar10_reads_the_python_format_from_either_folder(tmp_path, layout):
    batches = write_cifar(tmp_path, "cifar10")
    data_dir = tmp_path if layout == "parent" else tmp_path / "cifar-10-batches-py"
    ds = load_dataset("cifar10", data_dir=str(data_dir))
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and ds.task == "classification"
    data = np.concatenate([b[b"data"] for b in batches["train"]])
    # channel-first planes: row 0 of sample 0's red plane is data[0, :32], of green data[0, 1024:1056]
    assert torch.equal(ds.x_train[0, 1, 0], torch.from_numpy(data[0, 1024:1056] / np.float32(255)))
    assert torch.allclose(ds.x_train, torch.from_numpy(data.reshape(-1, 3, 32, 32) / np.float32(255)))
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.y_train.tolist() == sum((b[b"labels"] for b in batches["train"]), [])
    assert ds.y_test.tolist() == batches["test"][0][b"labels"]


@pytest.mark.parametrize("mode,key,k", [("fine", b"fine_labels", 100), ("coarse", b"coarse_labels", 20)])
def test_cifar100_label_modes(tmp_path, mode, key, k):
    batches = write_cifar(tmp_path, "cifar100")
    ds = load_dataset("cifar100", data_dir=tmp_path, label_mode=mode)
    assert ds.num_classes == k and ds.x_train.shape == (20, 3, 32, 32)
    assert ds.y_train.tolist() == batches["train"][0][key]
    assert ds.y_test.tolist() == batches["test"][0][key]
    with pytest.raises(DataError, match="label_mode='medium'.*fine, coarse"):
        load_dataset("cifar100", data_dir=tmp_path, label_mode="medium")


def test_cifar_default_folder_is_env_var_then_dot_data(tmp_path, monkeypatch):
    write_cifar(tmp_path / "env", "cifar10")
    write_cifar(tmp_path / "data", "cifar100")
    monkeypatch.setenv("GAMMATRACE_DATA", str(tmp_path / "env"))
    assert load_dataset("cifar10").n_train == 20
    monkeypatch.delenv("GAMMATRACE_DATA")
    monkeypatch.chdir(tmp_path)
    assert load_dataset("cifar100").n_train == 20


def test_cifar_reads_numpy2_protocol5_copies(tmp_path):
    write_cifar(tmp_path, "cifar10", protocol=5)
    assert load_dataset("cifar10", data_dir=tmp_path).n_train == 20


def test_cifar_missing_folder_says_where_and_what_and_never_downloads(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=missing)
    msg = str(e.value)
    assert "\n" not in msg
    for part in (str(missing), "does not exist", "data_batch_1", "test_batch", "cifar-10-batches-py",
                 "never downloads", "cifar-10-python.tar.gz", "GAMMATRACE_DATA"):
        assert part in msg
    (missing).mkdir()
    with pytest.raises(DataError, match=r"no files found in .*cifar-100-python.*expected train, test.*never downloads.*cifar-100-python.tar.gz"):
        load_dataset("cifar100", data_dir=missing)


def test_cifar_missing_file_names_it(tmp_path):
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=tmp_path)
    msg = str(e.value)
    assert "cifar-10-batches-py is incomplete, missing data_batch_3" in msg and "never downloads" in msg


def test_cifar_refuses_foreign_pickles_and_bad_contents(tmp_path):
    write_cifar(tmp_path, "cifar10")
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({b"data": OrderedDict(), b"labels": []}, protocol=3))
    with pytest.raises(DataError, match="not a readable CIFAR.*collections.OrderedDict"):
        load_dataset("cifar10", data_dir=tmp_path)
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}, protocol=3))
    with pytest.raises(DataError, match=r"uint8 \(N, 3072\)"):
        load_dataset("cifar10", data_dir=tmp_path)
    batch.write_bytes(b"\x80\x03}q\x00")  # cut short
    with pytest.raises(DataError, match="not a readable CIFAR"):
        load_dataset("cifar10", data_dir=tmp_path)


# --------------------------------------------------------------------------- MNIST / IDX


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name,sub", [("mnist", "mnist"), ("mnist", "MNIST/raw"), ("mnist", ""),
                                      ("fashion_mnist", "fashion_mnist")])
def test_mnist_idx_plain_and_gzipped(tmp_path, gz, name, sub):
    arrays = write_mnist(tmp_path / sub, gz)
    ds = load_dataset(name, data_dir=tmp_path)
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64 and ds.num_classes == 10
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(arrays["train_images"] / np.float32(255)))
    assert torch.equal(ds.x_test[:, 0] * 255, torch.from_numpy(arrays["test_images"].astype(np.float32)))
    assert ds.y_train.tolist() == arrays["train_labels"].tolist()
    assert ds.y_test.tolist() == arrays["test_labels"].tolist()


def test_read_idx_other_types_and_dotted_names(tmp_path):
    arr = (np.arange(24) - 5).astype(">i4").reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(arr, 0x0C))
    back = read_idx(tmp_path / "a.idx")
    assert np.array_equal(back, arr) and back.dtype == np.int32 and back.dtype.isnative
    arrays = write_mnist(tmp_path / "kaggle", gz=False)
    for stem in IDX_STEMS.values():  # the Kaggle spelling train-images.idx3-ubyte
        (tmp_path / "kaggle" / stem).rename(tmp_path / "kaggle" / stem.replace("-idx", ".idx"))
    assert load_dataset("mnist", data_dir=tmp_path / "kaggle").y_test.tolist() == arrays["test_labels"].tolist()


def _damage(tmp_path: Path, how: str) -> Path:
    write_mnist(tmp_path / "mnist", gz=how == "bad_gzip")
    name = IDX_STEMS["train_images"] + (".gz" if how == "bad_gzip" else "")
    path = tmp_path / "mnist" / name
    raw = path.read_bytes()
    path.write_bytes({"bad_magic": b"\x00\x01\x08\x03" + raw[4:],
                      "bad_type": b"\x00\x00\x07\x03" + raw[4:],
                      "truncated": raw[:-10],
                      "too_long": raw + b"\x00",
                      "short_header": raw[:9],
                      "tiny": raw[:2],
                      "bad_gzip": raw[: len(raw) // 2]}[how])
    return path


@pytest.mark.parametrize("how,pattern", [
    ("bad_magic", "not an IDX file: magic number 0x00010803"),
    ("bad_type", "not an IDX file"),
    ("truncated", r"is truncated: header declares dims \[6, 28, 28\] = 4704 data bytes but the file has 4694"),
    ("too_long", "longer than its header says"),
    ("short_header", "truncated inside its header"),
    ("tiny", "shorter than an IDX header"),
    ("bad_gzip", "damaged gzip file"),
])
def test_damaged_idx_files_raise_one_clear_line(tmp_path, how, pattern):
    path = _damage(tmp_path, how)
    with pytest.raises(DataError, match=pattern) as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_mnist_mismatched_files_and_missing_files(tmp_path):
    write_mnist(tmp_path / "mnist", gz=False)
    labels = tmp_path / "mnist" / IDX_STEMS["test_labels"]
    labels.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="expected 4 uint8 labels"):
        load_dataset("mnist", data_dir=tmp_path)
    labels.write_bytes(idx_bytes(np.full(4, 10, np.uint8)))
    with pytest.raises(DataError, match=r"label 10 is outside 0..9"):
        load_dataset("mnist", data_dir=tmp_path)
    labels.unlink()
    with pytest.raises(DataError, match=r"mnist is incomplete, missing t10k-labels-idx1-ubyte .*never downloads"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", data_dir=tmp_path / "empty")
    for part in ("train-images-idx3-ubyte.gz", "fashion_mnist", "never downloads", "zalandoresearch"):
        assert part in str(e.value)


# --------------------------------------------------------------------------- synthetic

SYNTHETIC = {
    "teacher": dict(num_train=32, num_test=8, dim=6, out_dim=2, teacher="mlp", noise=0.1),
    "synthetic_images": dict(num_train=30, num_test=10, size=8),
    "synthetic_denoise": dict(num_train=30, num_test=10, size=8),
}


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_is_a_pure_function_of_the_seed(name):
    state = torch.get_rng_state()
    a, b = (load_dataset(name, seed=3, **SYNTHETIC[name]) for _ in range(2))
    c = load_dataset(name, seed=4, **SYNTHETIC[name])
    assert torch.equal(torch.get_rng_state(), state)  # generation leaves the global RNG alone
    for t in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, t), getattr(b, t))
    assert not torch.equal(a.x_train, c.x_train) and not torch.equal(a.x_train, a.x_test[:1].expand_as(a.x_train))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_teacher_targets_are_the_teacher_applied_to_x(kind):
    opts = dict(num_train=200, num_test=50, dim=5, out_dim=3, teacher=kind, hidden=7, seed=2)
    ds = load_dataset("teacher", **opts)
    f = make_teacher(kind, dim=5, out_dim=3, hidden=7, seed=2)
    assert ds.task == "regression" and ds.num_classes == 3 and ds.x_train.shape == (200, 1, 5)
    assert torch.allclose(ds.y_train, f(ds.x_train)) and torch.allclose(ds.y_test, f(ds.x_test))
    if kind == "mlp":  # brute force: tanh(x W1ᵀ) W2ᵀ
        w1, w2 = f.weights
        assert torch.allclose(ds.y_train, torch.tanh(ds.x_train[:, 0] @ w1.T) @ w2.T)
    noisy = load_dataset("teacher", noise=0.5, **opts)
    assert torch.equal(noisy.x_train, ds.x_train)  # the noise has its own stream
    assert abs(float((noisy.y_train - ds.y_train).std()) - 0.5) < 0.06
    assert torch.equal(load_dataset("teacher", **{**opts, "teacher": "linear"}).x_train, ds.x_train)
    with pytest.raises(DataError, match="unknown teacher 'deep'"):
        load_dataset("teacher", teacher="deep")


def test_synthetic_images_shapes_balance_and_denoise_target():
    ds = load_dataset("synthetic_images", num_train=40, num_test=20, channels=1, size=(8, 12), num_classes=4)
    assert ds.x_train.shape == (40, 1, 8, 12) and ds.num_classes == 4
    assert ds.y_train.bincount().tolist() == [10] * 4
    opts = dict(num_train=400, num_test=20, size=8, noise=0.3, seed=5)
    cls, den = load_dataset("synthetic_images", **opts), load_dataset("synthetic_denoise", **opts)
    assert den.task == "regression" and den.num_classes == 3 and den.y_train.shape == den.x_train.shape
    assert torch.equal(cls.x_train, den.x_train)  # same noisy inputs, only the target differs
    assert 0 < den.y_train.min() and den.y_train.max() < 1  # the clean image
    assert abs(float((den.x_train - den.y_train).std()) - 0.3) < 0.01
    with pytest.raises(DataError, match="unknown synthetic image target 'edges'"):
        load_dataset("synthetic_images", target="edges")


# --------------------------------------------------------------------------- transforms


def _toy(shape=(5, 2, 6, 4), task="classification", seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * torch.tensor([1.0, 5.0]).view(1, 2, *[1] * (len(shape) - 2)) + 3
    xt = torch.rand((3, *shape[1:]), generator=g)
    if task == "classification":
        return Dataset("toy", x, torch.arange(5) % 2, xt, torch.arange(3) % 2, task, 2)
    return Dataset("toy", x, x * 2, xt, xt * 2, task, shape[1])


def test_downscale_by_factor_and_target_size_is_block_averaging():
    ds = _toy()
    out = apply_options(ds, downscale=2)
    assert out.x_train.shape == (5, 2, 3, 2) and out.x_test.shape == (3, 2, 3, 2)
    for n in range(5):
        for c in range(2):
            for i in range(3):
                for j in range(2):
                    block = ds.x_train[n, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                    assert torch.isclose(out.x_train[n, c, i, j], block.mean())
    assert torch.allclose(apply_options(ds, downscale=[3, 2]).x_train, out.x_train)
    assert torch.equal(out.y_train, ds.y_train)
    odd = apply_options(ds, downscale=(2, 3))  # not a divisor: adaptive (overlapping) areas
    assert torch.isclose(odd.x_train[0, 0, 1, 1], ds.x_train[0, 0, 3:6, 1:3].mean())
    one_d = apply_options(_toy((5, 2, 6)), downscale=3)
    assert torch.allclose(one_d.x_train[:, :, 1], _toy((5, 2, 6)).x_train[:, :, 3:6].mean(-1))
    reg = apply_options(_toy(task="regression"), downscale=2)  # image targets follow the inputs
    assert torch.allclose(reg.y_train, reg.x_train * 2)
    for bad in (4, 0, True, [7, 2], [2], "2x2"):
        with pytest.raises(DataError, match="downscale"):
            apply_options(ds, downscale=bad)


def test_normalize_standard_uses_train_statistics_per_channel():
    ds = _toy()
    out = apply_options(ds, normalize="standard")
    for c in range(2):
        vals = ds.x_train[:, c].double().flatten()
        mean, std = vals.mean(), vals.std(unbiased=False)
        assert torch.allclose(out.x_train[:, c].double(), (ds.x_train[:, c].double() - mean) / std, atol=1e-5)
        assert torch.allclose(out.x_test[:, c].double(), (ds.x_test[:, c].double() - mean) / std, atol=1e-5)
        assert abs(float(out.x_train[:, c].mean())) < 1e-5 and abs(float(out.x_train[:, c].std(unbiased=False)) - 1) < 1e-5
    assert apply_options(ds, normalize="none") is ds and apply_options(ds) is ds
    const = Dataset("c", torch.ones(4, 1, 2, 2), torch.zeros(4, dtype=torch.long), torch.ones(2, 1, 2, 2),
                    torch.zeros(2, dtype=torch.long), "classification", 1)
    assert torch.equal(apply_options(const, normalize="standard").x_train, torch.zeros(4, 1, 2, 2))
    down_then_norm = apply_options(ds, downscale=2, normalize="standard")
    assert abs(float(down_then_norm.x_train[:, 1].std(unbiased=False)) - 1) < 1e-5
    with pytest.raises(DataError, match="unknown normalization 'zca'; choose one of: none, standard"):
        apply_options(ds, normalize="zca")


# --------------------------------------------------------------------------- augmentation


def test_augmentation_depends_only_on_seed_epoch_index():
    x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    idx = torch.arange(100, 112)
    state = torch.get_rng_state()
    full = augment_batch(x, idx, seed=7, epoch=2)
    assert torch.equal(torch.get_rng_state(), state)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(augment_batch(x[perm], idx[perm], seed=7, epoch=2), full[perm])
    assert torch.equal(augment_batch(x[3:5], idx[3:5].tolist(), seed=7, epoch=2), full[3:5])
    assert torch.equal(augment_batch(x[5:6], np.array([105]), seed=7, epoch=2), full[5:6])
    assert not torch.equal(augment_batch(x, idx, seed=7, epoch=3), full)
    assert not torch.equal(augment_batch(x, idx, seed=8, epoch=2), full)


def test_flip_and_crop_are_what_they_claim():
    x = torch.rand(400, 2, 5, 6, generator=torch.Generator().manual_seed(0))
    idx = torch.arange(400)
    flip, dy, dx = augment_params(idx, seed=1, epoch=0, crop_pad=2)
    out = augment_batch(x, idx, seed=1, epoch=0, crop_pad=2)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        crop = padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 6]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)
    # every offset and both flip values occur, roughly uniformly
    assert set(dy.tolist()) == set(range(5)) == set(dx.tolist()) and 0.4 < flip.float().mean() < 0.6
    # centred crop and no flip is the identity; crop only keeps the same offsets
    assert torch.equal(out[(dy == 2) & (dx == 2) & ~flip], x[(dy == 2) & (dx == 2) & ~flip])
    crop_only = augment_batch(x, idx, seed=1, epoch=0, flip=False, crop_pad=2)
    assert torch.equal(crop_only[flip], out[flip].flip(-1))
    flip_only = augment_batch(x, idx, seed=1, epoch=0, crop_pad=0)
    assert torch.equal(flip_only[flip], x[flip].flip(-1)) and torch.equal(flip_only[~flip], x[~flip])
    assert augment_batch(x, idx, seed=1, epoch=0, flip=False, crop_pad=0) is x


def test_augmentation_registry_and_errors():
    x = torch.rand(3, 1, 4, 4)
    assert not AUGMENTATIONS.get("none")().active
    assert torch.equal(AUGMENTATIONS.get("flip_crop")()(x, [0, 1, 2], 0, 0), augment_batch(x, [0, 1, 2], 0, 0))
    assert AUGMENTATIONS.get("crop")(crop_pad=1).crop_pad == 1
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        augment_batch(torch.rand(3, 1, 4), [0, 1, 2], 0, 0)
    with pytest.raises(DataError, match="2 indices for a batch of 3"):
        augment_batch(x, [0, 1], 0, 0)
    with pytest.raises(DataError, match="non-negative"):
        augment_batch(x, [0, -1, 2], 0, 0)


# --------------------------------------------------------------------------- tasks


def test_reconstruct_targets_the_clean_image_and_adds_fixed_seeded_noise():
    clean = load_dataset("digits")
    state = torch.get_rng_state()
    ds = load_dataset("digits", task="reconstruct", noise_std=0.2, noise_seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # its own generator, never the global RNG
    assert ds.task == "regression" and ds.num_classes == 1 and ds.name == "digits-reconstruct"
    assert torch.equal(ds.y_train, clean.x_train) and torch.equal(ds.y_test, clean.x_test)
    noise, noise_test = ds.x_train - ds.y_train, ds.x_test - ds.y_test
    # Brute force over the 92k training values: N(0, 0.2²), unclipped, independent of the pixel.
    assert abs(float(noise.mean())) < 0.003 and abs(float(noise.std()) - 0.2) < 0.003
    assert float(noise.min()) < -0.6 and float((ds.x_train < 0).float().mean()) > 0.1
    assert abs(float(torch.corrcoef(torch.stack([noise.flatten(), clean.x_train.flatten()]))[0, 1])) < 0.02
    # Fixed per sample: the same on every load, the same whatever n_train / n_test keep.
    again = load_dataset("digits", task="reconstruct", noise_std=0.2, noise_seed=7, n_train=100, n_test=10)
    assert torch.equal(again.x_train, ds.x_train[:100]) and torch.equal(again.x_test, ds.x_test[:10])
    # Train and test from different streams; another seed, other noise; std scales it.
    assert not torch.allclose(noise_test, noise[: len(noise_test)])
    other = load_dataset("digits", task="reconstruct", noise_std=0.2, noise_seed=8)
    assert not torch.allclose(other.x_train, ds.x_train)
    half = load_dataset("digits", task="reconstruct", noise_std=0.1, noise_seed=7)
    assert torch.allclose(half.x_train - half.y_train, noise / 2, atol=1e-6)


def test_reconstruct_without_noise_is_the_image_itself_and_keeps_through_transforms():
    ds = load_dataset("digits", task="reconstruct", n_train=50)
    assert torch.equal(ds.x_train, ds.y_train) and torch.equal(ds.x_test, ds.y_test)
    assert load_dataset("digits", task="labels").task == "classification"
    noisy = load_dataset("digits", task="reconstruct", noise_std=0.3, normalize="standard", downscale=2)
    plain = load_dataset("digits", task="reconstruct", noise_std=0.3)
    # The transforms map input and target alike: target = the clean image under the input's map.
    pooled_x, pooled_y = F.avg_pool2d(plain.x_train, 2), F.avg_pool2d(plain.y_train, 2)
    mean, std = pooled_x.double().mean(), pooled_x.double().std(unbiased=False)
    assert noisy.x_train.shape == (1438, 1, 4, 4)
    assert torch.allclose(noisy.x_train.double(), (pooled_x.double() - mean) / std, atol=1e-5)
    assert torch.allclose(noisy.y_train.double(), (pooled_y.double() - mean) / std, atol=1e-5)


@pytest.mark.parametrize("options,pattern", [
    (dict(task="denoise"), r"digits: task: unknown data task 'denoise'; choose one of: labels, reconstruct"),
    (dict(noise_std=0.1), "noise_std applies with task: reconstruct, not with task: labels"),
    (dict(task="labels", noise_seed=1), "noise_seed applies with task: reconstruct"),
    (dict(task="reconstruct", noise_std=-0.1), "noise_std must be a finite number >= 0, got -0.1"),
    (dict(task="reconstruct", noise_std=True), "noise_std must be a finite number >= 0, got True"),
    (dict(task="reconstruct", noise_std="0.1"), "noise_std must be a finite number >= 0"),
    (dict(task="reconstruct", noise_std=float("nan")), "noise_std must be a finite number >= 0"),
    (dict(task="reconstruct", noise_seed=1.5), "noise_seed must be an integer"),
    (dict(task="reconstruct", noise_seed=-1), "noise_seed must be an integer in 0..2\\*\\*63-1"),
])
def test_task_options_are_validated_in_one_line(options, pattern):
    with pytest.raises(DataError, match=pattern) as e:
        load_dataset("digits", **options)
    assert "\n" not in str(e.value)


def test_reconstruct_needs_float_images():
    flat = Dataset("flat", torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), torch.zeros(2, 5),
                   torch.zeros(2, dtype=torch.long), "classification", 2)
    with pytest.raises(DataError, match="flat: task reconstruct needs float images"):
        apply_task(flat, "reconstruct")


def test_task_options_pass_config_validation_and_unet_depth_limits():
    from gammatrace.config import RunConfig
    from gammatrace.engine.session import build_session

    cfg = RunConfig.model_validate({"loss": "mse", "batch_size": 16,
                                    "data": {"name": "digits", "task": "reconstruct", "noise_std": 0.1, "n_train": 32},
                                    "model": {"name": "unet", "width": 0.125, "depth": 3}})
    cfg.check_names()
    sess = build_session(cfg)  # digits are 1×8×8: depth ≤ 3 (8 = 2³), no padding needed
    assert sess.model(sess.x[:2]).shape == sess.y[:2].shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="depth 4 needs spatial sizes divisible by 16"):
        build_session(cfg.with_overrides({"model": {"depth": 4}}))
    with pytest.raises(UnknownNameError, match="has no switch 'noise_sdt'"):
        RunConfig.model_validate({"data": {"name": "digits", "noise_sdt": 0.1}}).check_names()


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_registered_dataset_reconstructs(tmp_path, name):
    files = _files_for(name, tmp_path)
    plain = load_dataset(name, **files)
    ds = load_dataset(name, task="reconstruct", noise_std=0.05, **files)
    assert ds.task == "regression" and ds.num_classes == plain.x_train.shape[1]
    assert torch.equal(ds.y_train, plain.x_train) and torch.equal(ds.y_test, plain.x_test)
    assert abs(float((ds.x_train - ds.y_train).std()) - 0.05) < 0.01  # ≥ 192 values: 4 standard errors


# --------------------------------------------------------------------------- every dataset


def _files_for(name: str, root: Path) -> dict:
    """Options that make ``name`` loadable in this test: tiny files for the local readers,
    small sizes for generators; other datasets load with their defaults."""
    writers = {"cifar10": lambda: write_cifar(root, "cifar10"),
               "cifar100": lambda: write_cifar(root, "cifar100"),
               "mnist": lambda: write_mnist(root / "mnist", gz=True),
               "fashion_mnist": lambda: write_mnist(root / "fashion_mnist", gz=False)}
    if name in writers:
        writers[name]()
        return {"data_dir": root}
    return SYNTHETIC.get(name, {})


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_registered_dataset_loads(tmp_path, name):
    ds = load_dataset(name, **_files_for(name, tmp_path))
    assert ds.x_train.dtype == ds.x_test.dtype == torch.float32 and ds.x_train.ndim >= 3
    assert ds.x_train.shape[1:] == ds.x_test.shape[1:] and len(ds.x_train) == len(ds.y_train) > 0
    assert torch.isfinite(ds.x_train).all() and torch.isfinite(ds.x_test).all()
    if ds.task == "classification":
        assert ds.y_train.dtype == ds.y_test.dtype == torch.int64
        for y in (ds.y_train, ds.y_test):
            assert 0 <= int(y.min()) and int(y.max()) < ds.num_classes
    else:
        assert ds.task == "regression" and ds.y_train.is_floating_point() and torch.isfinite(ds.y_train).all()
        assert ds.y_train.shape[1] == ds.num_classes
    normed = apply_options(ds, normalize="standard")
    assert torch.isfinite(normed.x_train).all() and torch.isfinite(normed.x_test).all()


# ------------------------------------------------- image targets meet the rest of the engine
def test_augmentation_of_image_targets_is_refused_before_training(tmp_path):
    """An augmentation moves the inputs only: with task: reconstruct the target would no longer
    be the input's clean image, so the run is refused with one line."""
    cfg = {"epochs": 1, "batch_size": 16, "loss": "mse", "model": {"name": "unet", "width": 0.125, "depth": 2},
           "data": {"name": "digits", "n_train": 32, "n_test": 16, "task": "reconstruct", "augment": "flip"}}
    with pytest.raises(UserError, match="moves the inputs only"):
        train(cfg, out=tmp_path / "run", progress=False)


def test_disk_estimate_sees_the_reconstruction_task_without_the_folder():
    shape = data_shape(RunConfig.model_validate({"data": {"name": "cifar100", "data_dir": "/nowhere",
                                                          "task": "reconstruct", "n_train": 64}}))
    assert (shape.input_shape, shape.num_classes, shape.n_train, shape.task) == ((3, 32, 32), 3, 64, "regression")


@pytest.mark.parametrize("over,match", [
    ({"loss": "cross_entropy"}, "needs class labels, and digits with task: reconstruct is a regression"),
    ({"model": {"name": "mlp", "width": 8, "depth": 1}}, r"model mlp outputs \(1,\) per sample, but digits's "
                                                          r"targets are \(1, 8, 8\)"),
])
def test_a_model_or_loss_that_does_not_fit_the_task_is_refused_before_anything_is_written(tmp_path, over, match):
    cfg = {"epochs": 1, "batch_size": 16, "loss": "mse", "model": {"name": "unet", "width": 0.125, "depth": 2},
           "data": {"name": "digits", "n_train": 32, "n_test": 16, "task": "reconstruct"}, **over}
    with pytest.raises(UserError, match=match):
        train(cfg, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "run.json").exists()
