"""Pieces shared by the convolutional zoo: technique placements and layers that work
for 1-D and 2-D inputs alike.

A *placement* decides, for the i-th of n candidate sites in a group, whether a
technique is kept there. The groups are the norm layers of a VGG stage or of a
residual block, the shortcuts of a ResNet stage, the skips of the U-Net decoder. One
table serves norm and skip placement, so "first" means the same for every network
and a new placement is one registry row.

The spatial dimension of a network is read off ``input_shape`` (``(C, L)`` -> 1-D,
``(C, H, W)`` -> 2-D), so the MNIST-1D and CIFAR versions of a network are one
implementation, not two copies.

Example:
    >>> from gammatrace.models.layers import placement
    >>> [placement("first2")(i, 4) for i in range(4)]
    [True, True, False, False]
    >>> [placement("last1")(i, 4) for i in range(4)]
    [False, False, False, True]
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from gammatrace.errors import ConfigError
from gammatrace.models.activations import make_activation
from gammatrace.models.norms import apply_weight_norm, make_norm, uses_weight_norm
from gammatrace.registry import Registry

PLACEMENTS: Registry[Callable[[int, int], bool]] = Registry("placement")
"""name -> ``keep(i, n) -> bool`` for site i (0-based, in forward order) of n sites."""


def _first(k: int) -> Callable[[int, int], bool]:
    return lambda i, n: i < k


def _last(k: int) -> Callable[[int, int], bool]:
    return lambda i, n: i >= n - k


PLACEMENTS.register("all")(lambda i, n: True)
PLACEMENTS.register("none")(lambda i, n: False)
PLACEMENTS.register("first")(_first(1))
PLACEMENTS.register("first2")(_first(2))
PLACEMENTS.register("last1")(_last(1))
PLACEMENTS.register("last2")(_last(2))
PLACEMENTS.register("last3")(_last(3))


def placement(name: str) -> Callable[[int, int], bool]:
    """The ``keep(i, n)`` predicate of placement ``name`` (see the module example)."""
    return PLACEMENTS.get(name)


CONV = {1: nn.Conv1d, 2: nn.Conv2d}
CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
GLOBAL_AVG_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}


def spatial_dim(input_shape: tuple[int, ...]) -> int:
    """1 for ``(C, L)`` inputs, 2 for ``(C, H, W)``; anything else is an error."""
    dim = len(input_shape) - 1
    if dim not in CONV:
        raise ConfigError(
            f"expected a channels-first (C, L) or (C, H, W) input_shape, got {input_shape}"
        )
    return dim


def scaled(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, at least one channel."""
    if width <= 0:
        raise ConfigError(f"width multiplier must be > 0, got {width}")
    return max(1, round(channels * width))


def activation_factory(activation: str, activation_options: dict | None) -> Callable[[], nn.Module]:
    """A zero-argument factory, so every site gets its own (possibly stateful) module."""
    return partial(make_activation, activation, **(activation_options or {}))


def conv_norm(
    dim: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    norm_type: str = "batch",
    keep_norm: bool = True,
    conv_bias: bool | str = "auto",
) -> tuple[nn.Module, nn.Module]:
    """A "same"-padded convolution and the norm layer that follows it (``Identity`` if none).

    ``conv_bias="auto"`` gives the convolution a bias exactly when no norm layer follows
    it. Under batch norm a conv bias is dead weight: the mean subtraction cancels it, so
    its gradient is exactly zero in train mode and β already provides the shift. When
    a norm is removed (by placement or ``norm_type="none"``) the bias comes back, so
    the norm-free network loses the normalization and nothing else — in particular not
    its per-channel affine shift. ``True`` / ``False`` force the choice everywhere.

    A reparametrizing norm (``norm_type="weight"``) is applied to this conv's weight
    where the placement keeps the norm, so placement means the same for it as for
    batch norm (layers outside any norm site — heads, U-Net upsampling — stay plain).
    Its placeholder layer is the identity, so such a conv keeps its bias under "auto",
    as weight norm intends.
    """
    if conv_bias not in (True, False, "auto"):
        raise ConfigError(f"conv_bias must be True, False or 'auto', got {conv_bias!r}")
    norm = make_norm(norm_type, out_channels, dim) if keep_norm else nn.Identity()
    bias = isinstance(norm, nn.Identity) if conv_bias == "auto" else conv_bias
    conv = CONV[dim](
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias
    )
    if keep_norm and uses_weight_norm(norm_type):
        apply_weight_norm(conv)
    return conv, norm
