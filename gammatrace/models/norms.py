"""Normalization layers by name.

``make_norm(name, num_features, dim)`` returns a layer for features of ``num_features``
channels; ``dim`` is the number of spatial dimensions: 0 for (N, C) features, 1 for
(N, C, L) and 2 for (N, C, H, W).

=========  ==============================================================  ===========
name       what is normalized (statistics over)                            dims
=========  ==============================================================  ===========
batch      each channel over the batch (and spatial positions)             0, 1, 2
layer      each sample over all its channels (and spatial positions):      0, 1, 2
           ``LayerNorm(C)`` for dim 0, ``GroupNorm(1, C)`` for conv features
           (per-channel affine, as Wu & He 2018 define layer norm for convs)
group      each sample over groups of channels (and spatial positions);    0, 1, 2
           ``num_groups`` defaults to the largest divisor of C up to 32
           (up to C/2 on (N, C) features, see below)
instance   each sample and channel over its spatial positions (affine)     1, 2
weight     nothing: ``nn.Identity``; weight norm reparametrizes the        0, 1, 2
           conv/linear weights instead, see :func:`apply_weight_norm`
none       nothing: ``nn.Identity``                                        0, 1, 2
=========  ==============================================================  ===========

Instance norm on (N, C) features would normalize a single number per channel and
sample, turning every input into the bias; it is refused for dim 0 rather than
built as a layer that silently disconnects the network from its input (so are
one-channel groups of group norm on (N, C) features, for the same reason).

Weight norm (Salimans & Kingma 2016) is a reparametrization w = g·v/‖v‖ of the
conv/linear weights, not a layer between them. A builder places ``make_norm("weight",
...)`` where it would place any norm (it is the identity there), and whoever builds
the network (the builders or the trainer) calls :func:`apply_weight_norm` on the
finished network when :func:`uses_weight_norm` says the chosen norm needs it.

Example:
    >>> from gammatrace.models.norms import make_norm, uses_weight_norm
    >>> make_norm("group", 48, dim=2).num_groups  # largest divisor of 48 up to 32
    24
    >>> type(make_norm("layer", 8, dim=0)).__name__, type(make_norm("layer", 8, dim=2)).__name__
    ('LayerNorm', 'GroupNorm')
    >>> uses_weight_norm("weight"), uses_weight_norm("batch")
    (True, False)
"""

from __future__ import annotations

from typing import Protocol

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from gammatrace.errors import ConfigError
from gammatrace.models.activations import check_options
from gammatrace.registry import Registry


class NormFactory(Protocol):
    """``factory(num_features, dim) -> nn.Module``: a normalization layer for ``dim``-D feature maps."""

    def __call__(self, num_features: int, dim: int) -> nn.Module: ...


NORMS: Registry[NormFactory] = Registry("norm")

# The layers whose weights weight norm reparametrizes (and init.py initializes).
WEIGHTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)

# Norm names that act on the weights of the network instead of inserting a layer.
_REPARAMETRIZATIONS = frozenset({"weight"})


def _check_dim(dim: int, allowed: tuple[int, ...] = (0, 1, 2)) -> None:
    if dim not in allowed:
        raise ConfigError(f"dim must be one of {allowed} (spatial dimensions), got {dim}")


@NORMS.register("none")
def _none(num_features: int, dim: int) -> nn.Module:
    _check_dim(dim)
    return nn.Identity()


@NORMS.register("weight")
def _weight(num_features: int, dim: int) -> nn.Module:
    # The placeholder keeps builders uniform; apply_weight_norm does the real work.
    _check_dim(dim)
    return nn.Identity()


@NORMS.register("batch")
def _batch(num_features: int, dim: int, eps: float = 1e-5, momentum: float = 0.1) -> nn.Module:
    _check_dim(dim)
    # BatchNorm1d accepts both (N, C) and (N, C, L).
    cls = (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d)[dim]
    return cls(num_features, eps=eps, momentum=momentum)


@NORMS.register("layer")
def _layer(num_features: int, dim: int, eps: float = 1e-5) -> nn.Module:
    _check_dim(dim)
    if dim == 0:
        return nn.LayerNorm(num_features, eps=eps)
    # LayerNorm would need the spatial size at build time; GroupNorm(1, C) computes the
    # same per-sample statistics over (C, *spatial) for any input size.
    return nn.GroupNorm(1, num_features, eps=eps)


def default_num_groups(num_channels: int, max_groups: int = 32) -> int:
    """The largest group count ≤ ``max_groups`` that divides ``num_channels``.

    32 is Wu & He's (2018) default; channel counts it does not divide (48, 100) fall
    back to the nearest smaller divisor instead of failing.

    Example:
        >>> default_num_groups(64), default_num_groups(48), default_num_groups(7)
        (32, 24, 7)
    """
    return next(g for g in range(min(max_groups, num_channels), 0, -1) if num_channels % g == 0)


@NORMS.register("group")
def _group(num_features: int, dim: int, num_groups: int | None = None, eps: float = 1e-5) -> nn.Module:
    _check_dim(dim)
    if num_groups is None:
        # On (N, C) features a group of one channel is a single number (the instance-
        # norm degeneracy), so the default keeps at least two channels per group there.
        cap = 32 if dim else min(32, num_features // 2)
        if cap < 1:
            raise ConfigError(f"group norm on (N, C) features needs num_features >= 2, got {num_features}")
        num_groups = default_num_groups(num_features, cap)
    if num_groups <= 0 or num_features % num_groups:
        raise ConfigError(f"num_groups={num_groups} must divide num_features={num_features}")
    if dim == 0 and num_groups == num_features:
        raise ConfigError("group norm with one channel per group on (N, C) features normalizes "
                          "single numbers (output = bias); use fewer groups")
    return nn.GroupNorm(num_groups, num_features, eps=eps)


@NORMS.register("instance")
def _instance(num_features: int, dim: int, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    _check_dim(dim, allowed=(1, 2))
    cls = (None, nn.InstanceNorm1d, nn.InstanceNorm2d)[dim]
    return cls(num_features, eps=eps, affine=affine)


def make_norm(name: str, num_features: int, dim: int = 2, **options) -> nn.Module:
    """A fresh normalization layer for ``num_features`` channels with ``dim`` spatial dims.

    Example:
        >>> type(make_norm("batch", 64, dim=2)).__name__
        'BatchNorm2d'
        >>> make_norm("instance", 16, dim=1).affine
        True
        >>> make_norm("instance", 16, dim=0)
        Traceback (most recent call last):
        ...
        gammatrace.errors.ConfigError: dim must be one of (1, 2) (spatial dimensions), got 0
    """
    factory = NORMS.get(name)
    check_options("norm", name, factory, options, fixed=("num_features", "dim"))
    return factory(num_features=num_features, dim=dim, **options)


def uses_weight_norm(name: str) -> bool:
    """Whether norm ``name`` is applied by :func:`apply_weight_norm` on the built network.

    Example:
        >>> uses_weight_norm("weight")
        True
    """
    NORMS.get(name)  # unknown names fail here, not later as a silent False
    return name in _REPARAMETRIZATIONS


def apply_weight_norm(model: nn.Module) -> nn.Module:
    """Reparametrize every Conv/Linear weight of ``model`` as w = g · v / ‖v‖, in place.

    Uses ``torch.nn.utils.parametrizations.weight_norm`` (one g per output unit, the
    norm over the other axes; transposed convs included). It starts at g = ‖v‖, so
    the network computes the same function right after the call; ``apply_init``
    writes through the parametrization, so init may come before or after.
    The parameters become ``<layer>.parametrizations.weight.original0`` (g) and
    ``.original1`` (v). Layers already parametrized are left alone, so the call is
    idempotent. Returns ``model``.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x = torch.randn(5, 3); before = net(x)
        >>> sorted(n for n, _ in apply_weight_norm(net).named_parameters())[:2]
        ['0.bias', '0.parametrizations.weight.original0']
        >>> torch.allclose(net(x), before, atol=1e-6)
        True
    """
    for module in model.modules():
        if isinstance(module, WEIGHTED_LAYERS) and not parametrize.is_parametrized(module, "weight"):
            # g is one scale per output unit; a transposed conv stores its weight as
            # (in, out, *k), so its output axis is 1.
            out_axis = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
            weight_norm(module, name="weight", dim=out_axis)
    return model
