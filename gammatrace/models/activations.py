"""Activation functions by name."""

from __future__ import annotations

from torch import nn

from gammatrace.registry import Registry

ACTIVATIONS = Registry("activation")

ACTIVATIONS.register("sigmoid")(lambda **kw: nn.Sigmoid())
ACTIVATIONS.register("tanh")(lambda **kw: nn.Tanh())
ACTIVATIONS.register("relu")(lambda **kw: nn.ReLU())
ACTIVATIONS.register("identity")(lambda **kw: nn.Identity())


@ACTIVATIONS.register("leaky_relu")
def _leaky_relu(negative_slope: float = 0.01, **kw) -> nn.Module:
    return nn.LeakyReLU(negative_slope)


def make_activation(name: str, **options) -> nn.Module:
    """A fresh activation module, e.g. ``make_activation("leaky_relu", negative_slope=0.1)``."""
    return ACTIVATIONS.get(name)(**options)
