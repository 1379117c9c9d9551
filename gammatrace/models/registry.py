"""The network registry and the one-call builder."""

from __future__ import annotations

from torch import nn

from gammatrace.registry import Registry

MODELS = Registry("model")


def build(name: str, input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10, **switches) -> nn.Module:
    """Build network ``name`` for inputs of ``input_shape`` with ``num_classes`` outputs."""
    return MODELS.get(name)(input_shape=tuple(input_shape), num_classes=num_classes, **switches)


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
