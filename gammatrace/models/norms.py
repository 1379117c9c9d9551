"""Normalization layers by name.

``make_norm(name, num_features, dim)`` returns a layer for features of ``num_features``
channels; ``dim`` is 0 for (N, C) features, 1 for (N, C, L) and 2 for (N, C, H, W).
"none" returns ``nn.Identity``.
"""

from __future__ import annotations

from torch import nn

from gammatrace.registry import Registry

NORMS = Registry("norm")


@NORMS.register("none")
def _none(num_features: int, dim: int, **kw) -> nn.Module:
    return nn.Identity()


@NORMS.register("batch")
def _batch(num_features: int, dim: int, **kw) -> nn.Module:
    return (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d)[dim](num_features)


def make_norm(name: str, num_features: int, dim: int = 2, **options) -> nn.Module:
    """A fresh normalization layer, e.g. ``make_norm("batch", 64, dim=2)``."""
    return NORMS.get(name)(num_features=num_features, dim=dim, **options)
