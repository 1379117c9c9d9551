"""Activation functions by name.

Each entry is a factory taking only the options that activation has, so a typo or an
option meant for another activation (``make_activation("relu", negative_slope=0.1)``)
is an error instead of being silently ignored: a study comparing activations must
not quietly run the same network twice.

Example:
    >>> from gammatrace.models.activations import ACTIVATIONS, make_activation
    >>> make_activation("leaky_relu")
    LeakyReLU(negative_slope=0.01)
    >>> make_activation("prelu", num_parameters=4, init=0.1).weight.shape
    torch.Size([4])
    >>> "gelu" in ACTIVATIONS
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from torch import nn

from gammatrace.errors import OptionError
from gammatrace.registry import Registry


class ActivationFactory(Protocol):
    """``factory(**its_own_options) -> nn.Module`` (e.g. leaky ReLU's ``negative_slope``)."""

    def __call__(self, **options: Any) -> nn.Module: ...


ACTIVATIONS: Registry[ActivationFactory] = Registry("activation")


@ACTIVATIONS.register("sigmoid")
def _sigmoid() -> nn.Module:
    return nn.Sigmoid()


@ACTIVATIONS.register("tanh")
def _tanh() -> nn.Module:
    return nn.Tanh()


@ACTIVATIONS.register("relu")
def _relu() -> nn.Module:
    return nn.ReLU()


@ACTIVATIONS.register("leaky_relu")
def _leaky_relu(negative_slope: float = 0.01) -> nn.Module:
    return nn.LeakyReLU(negative_slope)


@ACTIVATIONS.register("prelu")
def _prelu(num_parameters: int = 1, init: float = 0.25) -> nn.Module:
    # num_parameters=1 shares one learnable slope across channels (He et al. 2015's
    # "channel-shared" variant); num_parameters=C learns one per channel (dim 1).
    return nn.PReLU(num_parameters=num_parameters, init=init)


@ACTIVATIONS.register("elu")
def _elu(alpha: float = 1.0) -> nn.Module:
    return nn.ELU(alpha=alpha)


@ACTIVATIONS.register("gelu")
def _gelu(approximate: str = "none") -> nn.Module:
    return nn.GELU(approximate=approximate)


@ACTIVATIONS.register("silu")
def _silu() -> nn.Module:
    return nn.SiLU()


@ACTIVATIONS.register("softplus")
def _softplus(beta: float = 1.0, threshold: float = 20.0) -> nn.Module:
    return nn.Softplus(beta=beta, threshold=threshold)


@ACTIVATIONS.register("identity")
def _identity() -> nn.Module:
    return nn.Identity()


def check_options(kind: str, name: str, factory: Callable, options: dict, fixed: Iterable[str] = ()) -> None:
    """Raise ``TypeError`` naming the entry if ``options`` has a key ``factory`` does not take.

    Checked against the signature up front rather than by catching ``TypeError`` from
    the call, which would also swallow genuine errors raised inside the factory.
    ``fixed`` are the arguments the caller supplies itself (not user options).

    Example:
        >>> check_options("activation", "elu", ACTIVATIONS.get("elu"), {"alpha": 0.5})
        >>> check_options("activation", "elu", ACTIVATIONS.get("elu"), {"beta": 1})
        Traceback (most recent call last):
        ...
        gammatrace.errors.OptionError: activation 'elu' does not take option(s) beta; it takes: alpha
    """
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    takes = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and n not in set(fixed)]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise OptionError(f"{kind} '{name}' does not take option(s) {', '.join(unknown)}; "
                         f"it takes: {', '.join(takes) or 'no options'}")


def make_activation(name: str, **options) -> nn.Module:
    """A fresh activation module; ``options`` are that activation's own arguments.

    Raises ``UnknownNameError`` for an unknown name and ``TypeError`` naming the
    activation for an option it does not take.

    Example:
        >>> make_activation("leaky_relu", negative_slope=0.1)
        LeakyReLU(negative_slope=0.1)
        >>> make_activation("relu", negative_slope=0.1)
        Traceback (most recent call last):
        ...
        gammatrace.errors.OptionError: activation 'relu' does not take option(s) negative_slope; it takes: no options
    """
    factory = ACTIVATIONS.get(name)
    check_options("activation", name, factory, options)
    return factory(**options)
