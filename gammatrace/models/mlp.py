"""Fully connected network with switchable activation."""

from __future__ import annotations

import math

from torch import nn

from gammatrace.errors import ConfigError
from gammatrace.models.activations import make_activation
from gammatrace.models.registry import MODELS


@MODELS.register("mlp")
def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    width: int = 256,
    depth: int = 3,
    activation: str = "relu",
    activation_options: dict | None = None,
    batchnorm: bool = False,
) -> nn.Module:
    """``depth`` hidden layers of ``width`` units: Linear -> [BatchNorm1d] -> activation.

    Example:
        >>> net = mlp((1, 4), num_classes=3, width=5, depth=1, activation="tanh", batchnorm=True)
        >>> [type(m).__name__ for m in net]
        ['Flatten', 'Linear', 'BatchNorm1d', 'Tanh', 'Linear']
        >>> net[1].in_features, net[-1].out_features
        (4, 3)
    """
    if depth < 0 or width <= 0:
        raise ConfigError(f"mlp needs depth >= 0 and width > 0, got depth={depth}, width={width}")
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for _ in range(depth):
        layers.append(nn.Linear(fan_in, width))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(make_activation(activation, **(activation_options or {})))
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)
