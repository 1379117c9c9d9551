"""The network registry and the one-call builder.

Example:
    >>> from gammatrace.models import MODELS, build, count_params
    >>> "mlp" in MODELS
    True
    >>> net = build("mlp", input_shape=(1, 8, 8), num_classes=10, width=8, depth=2)
    >>> count_params(net)  # 64*8+8 + 8*8+8 + 8*10+10
    682
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from gammatrace.registry import Registry


class ModelFactory(Protocol):
    """``factory(input_shape, num_classes, **its_own_switches) -> nn.Module``; the switches
    (width, depth, activation, norm placement, ...) are the factory's own keyword arguments."""

    def __call__(self, input_shape: tuple[int, ...], num_classes: int, **switches: Any) -> nn.Module: ...


MODELS: Registry[ModelFactory] = Registry("model")


def build(name: str, input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10, **switches) -> nn.Module:
    """Build network ``name`` for inputs of ``input_shape`` with ``num_classes`` outputs."""
    return MODELS.get(name)(input_shape=tuple(input_shape), num_classes=num_classes, **switches)


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters.

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(3, 2)
        >>> _ = layer.bias.requires_grad_(False)
        >>> count_params(layer), count_params(layer, trainable_only=False)
        (6, 8)
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
