"""Optimizers, learning-rate schedules and losses by name.

Schedules are stateless functions step -> multiplier of the base lr, applied by the
trainer before every step: a resumed run or a replay segment needs no scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from gammatrace.config import OptimConfig, ScheduleConfig
from gammatrace.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")
LOSSES = Registry("loss")

_O = OptimConfig

OPTIMIZERS.register("sgd")(lambda p, c: torch.optim.SGD(p, lr=c.lr, weight_decay=c.weight_decay))
OPTIMIZERS.register("momentum")(lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay))
OPTIMIZERS.register("nesterov")(
    lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, nesterov=True, weight_decay=c.weight_decay)
)
OPTIMIZERS.register("adam")(lambda p, c: torch.optim.Adam(p, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay))
OPTIMIZERS.register("amsgrad")(
    lambda p, c: torch.optim.Adam(p, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay, amsgrad=True)
)
OPTIMIZERS.register("adamw")(lambda p, c: torch.optim.AdamW(p, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay))
OPTIMIZERS.register("adagrad")(lambda p, c: torch.optim.Adagrad(p, lr=c.lr, eps=c.eps, weight_decay=c.weight_decay))
OPTIMIZERS.register("rmsprop")(
    lambda p, c: torch.optim.RMSprop(p, lr=c.lr, alpha=c.betas[1], eps=c.eps, weight_decay=c.weight_decay)
)


def make_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """An optimizer from its config, e.g. ``make_optimizer(model.parameters(), OptimConfig(name="adam", lr=1e-3))``."""
    return OPTIMIZERS.get(cfg.name)(list(params), cfg)


Schedule = Callable[[int], float]


@SCHEDULES.register("constant")
def _constant(c: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> Schedule:
    return lambda k: 1.0


@SCHEDULES.register("step")
def _step(c: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> Schedule:
    return lambda k: c.factor ** (k // (c.step_epochs * steps_per_epoch))


@SCHEDULES.register("cosine")
def _cosine(c: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> Schedule:
    def f(k: int) -> float:
        t = min(k / max(total_steps, 1), 1.0)
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


@SCHEDULES.register("cyclical")
def _cyclical(c: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> Schedule:
    # Triangular policy (Smith 2017): base -> max_ratio·base -> base over one cycle.
    length = max(c.cycle_epochs * steps_per_epoch, 2)

    def f(k: int) -> float:
        phase = (k % length) / length
        return 1.0 + (c.max_ratio - 1.0) * (1.0 - abs(2.0 * phase - 1.0))

    return f


@SCHEDULES.register("inv_sqrt")
def _inv_sqrt(c: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> Schedule:
    # 1/√t with t counted in epochs, so the decay does not depend on the batch size.
    return lambda k: 1.0 / math.sqrt(1.0 + k / steps_per_epoch)


def make_schedule(cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> Schedule:
    """The lr multiplier for step k: the named schedule times a linear warm-up."""
    base = SCHEDULES.get(cfg.name)(cfg, steps_per_epoch, total_steps)
    warm = cfg.warmup_epochs * steps_per_epoch
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
