"""Optimizers, learning-rate schedules and losses by name.

Schedules are stateless functions step -> multiplier of the base lr, applied by the
trainer before every step: a resumed run or a replay segment needs no scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gammatrace.registry import Registry


class OptimizerFactory(Protocol):
    """``factory(params, lr, **its_own_arguments) -> optimizer``: each optimizer takes only
    the arguments it uses (the config's optimizer variants mirror these signatures)."""

    def __call__(self, params: list[nn.Parameter], lr: float, **kwargs: Any) -> torch.optim.Optimizer: ...


class ScheduleFactory(Protocol):
    """``factory(steps_per_epoch, total_steps, **its_own_options) -> (step -> lr multiplier)``."""

    def __call__(self, steps_per_epoch: int, total_steps: int, **kwargs: Any) -> Callable[[int], float]: ...


class LossFunction(Protocol):
    """``loss(outputs, targets) -> one loss per sample`` (unreduced)."""

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")
SCHEDULES: Registry[ScheduleFactory] = Registry("schedule")
LOSSES: Registry[LossFunction] = Registry("loss")

Betas = tuple[float, float]


@OPTIMIZERS.register("sgd")
def _sgd(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("momentum")
def _momentum(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


@OPTIMIZERS.register("nesterov")
def _nesterov(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)


@OPTIMIZERS.register("adam")
def _adam(params, lr: float, betas: Betas = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register("amsgrad")
def _amsgrad(params, lr: float, betas: Betas = (0.9, 0.999), eps: float = 1e-8,
             weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=True)


@OPTIMIZERS.register("adamw")
def _adamw(params, lr: float, betas: Betas = (0.9, 0.999), eps: float = 1e-8,
           weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register("adagrad")
def _adagrad(params, lr: float, eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, lr=lr, eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register("rmsprop")
def _rmsprop(params, lr: float, alpha: float = 0.99, momentum: float = 0.0, eps: float = 1e-8,
             weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=lr, alpha=alpha, momentum=momentum, eps=eps, weight_decay=weight_decay)


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer by name with its own arguments.

    Example:
        >>> from torch import nn
        >>> opt = make_optimizer(nn.Linear(2, 1).parameters(), "rmsprop", lr=0.01, alpha=0.9, momentum=0.5)
        >>> opt.defaults["alpha"], opt.defaults["momentum"]
        (0.9, 0.5)
    """
    return OPTIMIZERS.get(name)(list(params), lr=lr, **kwargs)


Schedule = Callable[[int], float]


@SCHEDULES.register("constant")
def _constant(steps_per_epoch: int, total_steps: int) -> Schedule:
    return lambda k: 1.0


@SCHEDULES.register("step")
def _step(steps_per_epoch: int, total_steps: int, *, step_epochs: int = 30, factor: float = 0.1) -> Schedule:
    return lambda k: factor ** (k // (step_epochs * steps_per_epoch))


@SCHEDULES.register("cosine")
def _cosine(steps_per_epoch: int, total_steps: int, *, min_lr_ratio: float = 0.0) -> Schedule:
    def f(k: int) -> float:
        t = min(k / max(total_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


@SCHEDULES.register("cyclical")
def _cyclical(steps_per_epoch: int, total_steps: int, *, cycle_epochs: float = 4.0,
              max_ratio: float = 4.0) -> Schedule:
    # Triangular policy (Smith 2017): base -> max_ratio·base -> base over one cycle.
    length = max(cycle_epochs * steps_per_epoch, 2)

    def f(k: int) -> float:
        phase = (k % length) / length
        return 1.0 + (max_ratio - 1.0) * (1.0 - abs(2.0 * phase - 1.0))

    return f


@SCHEDULES.register("inv_sqrt")
def _inv_sqrt(steps_per_epoch: int, total_steps: int) -> Schedule:
    # 1/√t with t counted in epochs, so the decay does not depend on the batch size.
    return lambda k: 1.0 / math.sqrt(1.0 + k / steps_per_epoch)


def make_schedule(name: str, steps_per_epoch: int, total_steps: int, *, warmup_epochs: float = 0.0,
                  **options: Any) -> Schedule:
    """The lr multiplier for step k: the named schedule (with its own ``options``) times a
    linear warm-up.

    Example:
        >>> f = make_schedule("step", steps_per_epoch=10, total_steps=100, step_epochs=2, factor=0.5)
        >>> f(0), f(19), f(20)
        (1.0, 1.0, 0.5)
    """
    base = SCHEDULES.get(name)(steps_per_epoch, total_steps, **options)
    warm = warmup_epochs * steps_per_epoch
    if warm <= 0:
        return base
    return lambda k: base(k) * min(1.0, (k + 1) / warm)


@LOSSES.register("cross_entropy")
def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


@LOSSES.register("mse")
def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Classification targets become one-hot so MSE also trains classifiers.
    if y.dtype in (torch.int64, torch.int32) and out.dim() == 2:
        y = F.one_hot(y, out.shape[1]).to(out.dtype)
    y = y.reshape(out.shape)
    return (out - y).pow(2).reshape(out.shape[0], -1).mean(1)


def per_sample_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Unreduced loss function: (outputs, targets) -> one loss per sample."""
    return LOSSES.get(name)
