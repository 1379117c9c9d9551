"""Synthetic datasets generated from a seed: Gaussian teacher–student regression problems
(``teacher``: a random linear or tanh network, where the global minimum is known to be
interpolating; ``teacher_student``: Li & Yuan's two-layer network at a planted W*, where
the minimizer itself is known) and small image tasks so the CIFAR-shaped networks (and
the U-Net) run on CPU without any files.

Every random draw comes from its own ``torch.Generator`` seeded through
:func:`~gammatrace.data.loader.stream_seed`, so generation never touches the global
RNG, and e.g. the inputs do not change when only the teacher kind changes.

Example:
    >>> from gammatrace.data import load_dataset
    >>> ds = load_dataset("teacher", dim=8, out_dim=2, num_train=64, num_test=16)
    >>> tuple(ds.x_train.shape), tuple(ds.y_train.shape), ds.task
    ((64, 1, 8), (64, 2), 'regression')
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gammatrace.data.base import DATASETS, DataError, Dataset
from gammatrace.data.loader import stream_seed
from gammatrace.registry import Registry, UnknownNameError

# One stream per independent draw (the "epoch" slot of stream_seed carries the split).
_TEACHER_STREAM = 0x5EED_7EAC
_INPUT_STREAM = 0x5EED_1A9E
_NOISE_STREAM = 0x5EED_0153
_PATTERN_STREAM = 0x5EED_9A77
_PLANTED_INPUT_STREAM = 0x1D_0A7A
_SPLITS = {"train": 0, "test": 1}


def _generator(seed: int, stream: int, split: str = "train") -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, _SPLITS[split], stream))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise DataError(message)


# --------------------------------------------------------------------------- teacher


@dataclass(frozen=True)
class Teacher:
    """A fixed random network: linear maps (out, in) with tanh between them.

    Plain tensors rather than ``nn.Module`` because ``nn.Linear`` initialises from the
    global RNG, which data generation must not touch.
    """

    weights: tuple[torch.Tensor, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(len(x), -1)
        for i, w in enumerate(self.weights):
            h = (torch.tanh(h) if i else h) @ w.T
        return h


TEACHERS: Registry[Callable[[int, int, int, torch.Generator], Teacher]] = Registry("teacher")


def _gaussian(shape: tuple[int, ...], fan_in: int, g: torch.Generator) -> torch.Tensor:
    # Variance 1/fan_in keeps every layer's output O(1) whatever the dimensions.
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


@TEACHERS.register("linear")
def _linear_teacher(dim: int, out_dim: int, hidden: int, g: torch.Generator) -> Teacher:
    return Teacher((_gaussian((out_dim, dim), dim, g),))


@TEACHERS.register("mlp")
def _mlp_teacher(dim: int, out_dim: int, hidden: int, g: torch.Generator) -> Teacher:
    return Teacher((_gaussian((hidden, dim), dim, g), _gaussian((out_dim, hidden), hidden, g)))


def make_teacher(kind: str = "linear", dim: int = 32, out_dim: int = 1, hidden: int = 64,
                 seed: int = 0) -> Teacher:
    """The teacher the ``teacher`` dataset uses for these options (a pure function of them).

    Example:
        >>> f = make_teacher("mlp", dim=4, out_dim=3, hidden=8, seed=1)
        >>> tuple(f(torch.zeros(5, 1, 4)).shape)
        (5, 3)
    """
    try:
        factory = TEACHERS.get(kind)
    except UnknownNameError as e:
        raise DataError(str(e)) from None
    _check(dim > 0 and out_dim > 0 and hidden > 0,
           f"teacher: dim, out_dim and hidden must be positive, got {dim}, {out_dim}, {hidden}")
    return factory(dim, out_dim, hidden, _generator(seed, _TEACHER_STREAM))


@DATASETS.register("teacher")
def teacher(num_train: int = 1024, num_test: int = 256, dim: int = 32, out_dim: int = 1,
            teacher: str = "linear", hidden: int = 64, noise: float = 0.0, seed: int = 0) -> Dataset:
    """Gaussian teacher–student regression: x ~ N(0, I_dim), y = teacher(x) + noise·N(0, I).

    ``teacher`` is "linear" or "mlp" (one tanh hidden layer of ``hidden`` units); see
    :func:`make_teacher`. Inputs (N, 1, dim), targets (N, out_dim); ``num_classes`` is
    ``out_dim``. With ``noise=0`` (default) a wide enough student can interpolate.
    """
    _check(num_train > 0 and num_test > 0, f"teacher: num_train and num_test must be positive, "
                                           f"got {num_train}, {num_test}")
    _check(noise >= 0, f"teacher: noise must be >= 0, got {noise}")
    f = make_teacher(teacher, dim, out_dim, hidden, seed)

    def split(n: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn((n, 1, dim), generator=_generator(seed, _INPUT_STREAM, name))
        y = f(x)
        if noise:
            y = y + noise * torch.randn(y.shape, generator=_generator(seed, _NOISE_STREAM, name))
        return x, y

    x_train, y_train = split(num_train, "train")
    x_test, y_test = split(num_test, "test")
    return Dataset("teacher", x_train, y_train, x_test, y_test, task="regression", num_classes=out_dim)


# --------------------------------------------------------------------------- planted teacher

# How the planted Δ is scaled: the matrix norm set to ``norm_bound``.
TEACHER_NORMS = {"spectral": 2, "frobenius": "fro"}  # kind -> torch.linalg.matrix_norm's ord
# The teacher's output y = OUT(σ(z)) over the hidden units z (see teacher_student_targets).
TEACHER_OUTPUTS = ("sum", "abs")


def planted_teacher(dim: int, norm_bound: float, seed: int, identity: bool = True,
                    norm: str = "spectral") -> torch.Tensor:
    """The planted W* of the ``teacher_student`` problem, for the student parametrization
    chosen by ``identity`` (the ``teacher_student`` model's switch of the same name).

    The teacher function is f*(x) = Σ_i σ((I + Δ) x)_i with Δ Gaussian, rescaled to
    ``norm`` ‖Δ‖ = ``norm_bound``: ``"spectral"`` ‖Δ‖₂ (Li & Yuan bound the spectral norm) or
    ``"frobenius"`` ‖Δ‖_F (the CS260 report's unbounded teacher, ‖w*‖_F = 1), drawn from its
    own generator seeded by ``seed`` (the global RNG is untouched). ``identity=True``
    returns W* = Δ; ``identity=False`` returns W* = I + Δ, the same teacher function written
    for a student without the identity mapping — so on/off runs with one seed learn the
    same target. Returned in float32, which float32 and float64 runs both represent exactly
    (the norm is therefore exact to float32 round-off).

    Example:
        >>> a, b = planted_teacher(4, 0.3, seed=1), planted_teacher(4, 0.3, seed=1, identity=False)
        >>> torch.allclose(b - a, torch.eye(4)), round(torch.linalg.matrix_norm(a.double(), ord=2).item(), 4)
        (True, 0.3)
        >>> round(planted_teacher(10, 1.0, seed=0, norm="frobenius").double().norm().item(), 5)
        1.0
    """
    if norm_bound < 0:
        raise DataError(f"norm_bound must be >= 0, got {norm_bound}")
    _check(dim > 0, f"teacher_student: dim must be positive, got {dim}")
    _check(norm in TEACHER_NORMS, f"teacher_student: norm must be one of {sorted(TEACHER_NORMS)}, got {norm!r}")
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    delta *= norm_bound / torch.linalg.matrix_norm(delta, ord=TEACHER_NORMS[norm])
    W_star = delta if identity else delta + torch.eye(dim, dtype=torch.float64)
    return W_star.to(torch.float32)


def teacher_student_targets(x: torch.Tensor, W_star: torch.Tensor, identity: bool = True,
                            negative_slope: float = 0.0, output: str = "sum") -> torch.Tensor:
    """y = Σ_i σ(W* x + x)_i (``identity``) or Σ_i σ(W* x)_i as an (N, 1) tensor in ``x``'s
    dtype, σ the leaky ReLU of slope ``negative_slope`` (0: ReLU, Li & Yuan's; a PReLU
    student's teacher uses its initial slope, 0.25).

    ``output="sum"`` (default) is the report's eq. (4), L(W) = E[(Σ_i(σ(⟨w_i + e_i, x⟩) −
    σ(⟨w*_i + e_i, x⟩)))²]; its eq. (1) writes ‖σ(Wx + x)‖₁ but defines ‖·‖₁ as "the sum of
    all elements", and its gradient, eq. (5)–(6), carries the PReLU's own derivative
    (1 on ⟨e_j + w_j, x⟩ ≥ 0, α below) — the derivative of Σσ, not of Σ|σ|.
    ``output="abs"`` is ‖·‖₁ taken literally, Σ_i |σ(·)_i|: equal for ReLU, different for a
    PReLU output below zero. The same operations as the ``teacher_student`` model's
    forward pass, so that model at W* reproduces the targets bit for bit.

    Example:
        >>> x = torch.tensor([[1.0, -1.0]])
        >>> teacher_student_targets(x, torch.zeros(2, 2)), teacher_student_targets(x, torch.zeros(2, 2), negative_slope=0.25)
        (tensor([[1.]]), tensor([[0.7500]]))
        >>> teacher_student_targets(x, torch.zeros(2, 2), negative_slope=0.25, output="abs")
        tensor([[1.2500]])
    """
    _check(output in TEACHER_OUTPUTS, f"teacher_student: output must be one of {list(TEACHER_OUTPUTS)}, got {output!r}")
    x = x.flatten(1)
    z = F.linear(x, W_star.to(x.dtype))
    if identity:
        z = z + x
    h = F.leaky_relu(z, negative_slope)
    return (h.abs() if output == "abs" else h).sum(dim=1, keepdim=True)


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@DATASETS.register("teacher_student")
def teacher_student(num_train: int = 1000, num_test: int = 200, dim: int = 10, norm_bound: float = 0.5,
                    identity: bool = True, negative_slope: float = 0.0, seed: int = 0,
                    dtype: str = "float32", norm: str = "spectral", output: str = "sum") -> Dataset:
    """Li & Yuan's teacher–student problem: x ~ N(0, I_dim), y = the ``teacher_student``
    network at the planted W* of :func:`planted_teacher` (the minimizer is known).

    ``norm`` is the matrix norm ``norm_bound`` sets (``"spectral"`` or ``"frobenius"``);
    ``output`` the teacher's output, Σσ (``"sum"``, the report's eq. (4)) or Σ|σ| (``"abs"``),
    see :func:`teacher_student_targets`. Generated in float64 and returned in ``dtype``.
    The problem is realizable: with ``dtype="float64"`` (for a run with ``RunConfig.dtype``
    float64) the targets are exact, computed in the student parametrization ``identity`` so
    that the student at W* has loss exactly 0. Inputs (N, 1, dim), targets (N, 1).

    Example:
        >>> ds = teacher_student(num_train=8, num_test=2, dim=3, negative_slope=0.25, dtype="float64")
        >>> tuple(ds.x_train.shape), tuple(ds.y_train.shape), ds.x_train.dtype, ds.task
        ((8, 1, 3), (8, 1), torch.float64, 'regression')
    """
    _check(num_train > 0 and num_test > 0, f"teacher_student: num_train and num_test must be positive, "
                                           f"got {num_train}, {num_test}")
    _check(dtype in _DTYPES, f"teacher_student: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    _check(output in TEACHER_OUTPUTS, f"teacher_student: output must be one of {list(TEACHER_OUTPUTS)}, got {output!r}")
    W_star = planted_teacher(dim, norm_bound, seed, identity, norm)

    def split(n: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn((n, 1, dim), generator=_generator(seed, _PLANTED_INPUT_STREAM, name), dtype=torch.float64)
        y = teacher_student_targets(x, W_star, identity, negative_slope, output)
        return x.to(_DTYPES[dtype]), y.to(_DTYPES[dtype])

    x_train, y_train = split(num_train, "train")
    x_test, y_test = split(num_test, "test")
    return Dataset("teacher_student", x_train, y_train, x_test, y_test, task="regression", num_classes=1)


# --------------------------------------------------------------------------- images

@dataclass(frozen=True)
class ImageTarget:
    """What a synthetic image sample is asked to predict."""

    task: str
    pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (clean, labels) -> targets
    outputs: Callable[[int, int], int]  # (channels, num_classes) -> Dataset.num_classes


IMAGE_TARGETS: Registry[ImageTarget] = Registry("synthetic image target")
IMAGE_TARGETS.register("class")(ImageTarget("classification", lambda clean, labels: labels, lambda ch, k: k))
IMAGE_TARGETS.register("denoise")(ImageTarget("regression", lambda clean, labels: clean, lambda ch, k: ch))


def _smooth_images(labels: torch.Tensor, freqs: torch.Tensor, phases: torch.Tensor,
                   amps: torch.Tensor, height: int, width: int, max_shift: float,
                   g: torch.Generator) -> torch.Tensor:
    """Clean images in (0, 1): each class is a sum of low-frequency plane waves, seen at a
    random sub-pixel translation per sample so that the task needs more than a template."""
    n, k = len(labels), freqs.shape[1]
    shift = (torch.rand((n, 2), generator=g) * 2 - 1) * max_shift  # (dy, dx) in pixels
    f, ph, a = freqs[labels], phases[labels], amps[labels]  # (n,k,2), (n,k), (n,k,ch)
    rows = torch.arange(height, dtype=torch.float32)[None, None, :, None] + shift[:, 0, None, None, None]
    cols = torch.arange(width, dtype=torch.float32)[None, None, None, :] + shift[:, 1, None, None, None]
    # Integer frequencies make each wave periodic on the grid, so a shift is a translation.
    arg = 2 * math.pi * (f[..., 0, None, None] * rows / height + f[..., 1, None, None] * cols / width)
    waves = torch.cos(arg + ph[..., None, None])  # (n, k, h, w)
    pattern = torch.einsum("nkc,nkhw->nchw", a, waves) / math.sqrt(k)
    return torch.sigmoid(2 * pattern)


@DATASETS.register("synthetic_images")
def synthetic_images(num_train: int = 2048, num_test: int = 512, channels: int = 3,
                     size: int | tuple[int, int] = 16, num_classes: int = 10, noise: float = 0.25,
                     max_shift: float = 2.0, components: int = 4, seed: int = 0,
                     target: str = "class") -> Dataset:
    """Small seeded image task, CIFAR-shaped by default (3×16×16, 10 balanced classes).

    Each class is a smooth random pattern (``components`` low-frequency plane waves per
    channel); a sample is its class pattern translated by up to ``max_shift`` pixels plus
    Gaussian pixel noise of std ``noise``. ``target="class"`` predicts the label;
    ``target="denoise"`` predicts the clean image from the noisy one (regression with
    ``num_classes`` = channels, for the U-Net).

    Example:
        >>> ds = synthetic_images(num_train=20, num_test=10, size=8)
        >>> tuple(ds.x_train.shape), ds.num_classes, int(ds.y_train.max()) < 10
        ((20, 3, 8, 8), 10, True)
    """
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    _check(min(num_train, num_test, channels, height, width, num_classes, components) > 0,
           "synthetic_images: sizes, channels, num_classes and components must be positive")
    _check(noise >= 0 and max_shift >= 0, "synthetic_images: noise and max_shift must be >= 0")
    try:
        spec: ImageTarget = IMAGE_TARGETS.get(target)
    except UnknownNameError as e:
        raise DataError(str(e)) from None
    g = _generator(seed, _PATTERN_STREAM)
    # Frequencies in -3..3 cycles per image keep the patterns smooth at any resolution.
    freqs = torch.randint(-3, 4, (num_classes, components, 2), generator=g).float()
    phases = torch.rand((num_classes, components), generator=g) * 2 * math.pi
    amps = torch.randn((num_classes, components, channels), generator=g)

    def split(n: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator(seed, _INPUT_STREAM, name)
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        clean = _smooth_images(labels, freqs, phases, amps, height, width, max_shift, g)
        noisy = clean + noise * torch.randn(clean.shape, generator=_generator(seed, _NOISE_STREAM, name))
        return noisy, spec.pick(clean, labels)

    x_train, y_train = split(num_train, "train")
    x_test, y_test = split(num_test, "test")
    name = "synthetic_images" if target == "class" else f"synthetic_{target}"
    return Dataset(name, x_train, y_train, x_test, y_test, task=spec.task,
                   num_classes=spec.outputs(channels, num_classes))


@DATASETS.register("synthetic_denoise")
def synthetic_denoise(**options) -> Dataset:
    """:func:`synthetic_images` with ``target="denoise"``: input noisy image, target clean image.

    Example:
        >>> ds = synthetic_denoise(num_train=4, num_test=2, size=8)
        >>> ds.task, ds.y_train.shape == ds.x_train.shape
        ('regression', True)
    """
    return synthetic_images(**{"target": "denoise", **options})

