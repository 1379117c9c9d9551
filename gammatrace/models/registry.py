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

import math
from typing import Any, Protocol

import torch
from torch import nn

from gammatrace.errors import ConfigError
from gammatrace.registry import Registry

# The most parameters a network may have: checked on the meta device (shapes, no memory)
# before the real build, so a width of 10**9 is one line naming the ceiling, not torch's
# allocation error. 2**31 float32 parameters are 8 GiB, and training holds several copies
# (gradients, optimizer state, checkpoints).
MAX_PARAMETERS = 2**31


class ModelFactory(Protocol):
    """``factory(input_shape, num_classes, **its_own_switches) -> nn.Module``; the switches
    (width, depth, activation, norm placement, ...) are the factory's own keyword arguments."""

    def __call__(self, input_shape: tuple[int, ...], num_classes: int, **switches: Any) -> nn.Module: ...


MODELS: Registry[ModelFactory] = Registry("model")


def build(name: str, input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10, **switches) -> nn.Module:
    """Build network ``name`` for inputs of ``input_shape`` with ``num_classes`` outputs.

    A network beyond :data:`MAX_PARAMETERS` is refused before anything is allocated.

    Example:
        >>> build("mlp", input_shape=(64,), num_classes=10, width=10**9)
        Traceback (most recent call last):
        ...
        gammatrace.errors.ConfigError: model 'mlp' with switches {'width': 1000000000} has 2,000,000,077,000,000,010 parameters, beyond the ceiling of 2,147,483,648 (MAX_PARAMETERS): choose a smaller width or depth
    """
    factory = MODELS.get(name)
    # Only where a switch or the input is large: the first build on the meta device in a
    # process can cost a second (torch loads its meta kernels), and small values cannot
    # reach the ceiling.
    large = any(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > 512 for v in switches.values())
    n = _meta_params(factory, tuple(input_shape), num_classes, switches) \
        if large or math.prod(input_shape) > 10**6 or num_classes > 10**5 else None
    if n is not None and n > MAX_PARAMETERS:
        raise ConfigError(f"model {name!r} with switches {switches!r:.200} has {n:,} parameters, beyond the ceiling "
                          f"of {MAX_PARAMETERS:,} (MAX_PARAMETERS): choose a smaller width or depth")
    return factory(input_shape=tuple(input_shape), num_classes=num_classes, **switches)


def _meta_params(factory: ModelFactory, input_shape: tuple[int, ...], num_classes: int,
                 switches: dict[str, Any]) -> int | None:
    """The parameter count of the network built on the meta device (no memory, no
    random numbers drawn: the generator's state is restored), or None where the factory
    cannot build there (the real build then reports its own error)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = factory(input_shape=input_shape, num_classes=num_classes, **switches)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - not buildable on meta: the real build says why
        return None


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
