"""Which process this is in a ``torch.distributed`` job, and the loss averaged over ranks.

The small part of :mod:`gammatrace.integrations.distributed` that the Lightning and Hugging
Face integrations use under DDP (it imports nothing beyond ``torch.distributed``).

Example:
    >>> world_size(), is_writer()
    (1, True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (1 when torch.distributed is not initialised).

    Example:
        >>> world_size()
        1
    """
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_writer(group: Any = None) -> bool:
    """Whether this rank writes files (rank 0, or the only process).

    Example:
        >>> is_writer()
        True
    """
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank(group) == 0


def global_mean(loss: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The mean over ranks of each rank's mean loss, in float64 (a collective: every rank calls it).

    This is the objective a DDP step differentiates (the gradient is averaged over ranks).

    Example:
        >>> global_mean(torch.tensor([1.0, 2.0]))  # one process: its own mean
        tensor(1.5000, dtype=torch.float64)
    """
    value = loss.detach().to(torch.float64).mean()
    n = world_size(group)
    if n == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value / n


def global_loss_fn(loss_fn: Callable[[nn.Module, Any], torch.Tensor], group: Any = None
                   ) -> Callable[[nn.Module, Any], torch.Tensor]:
    """``loss_fn`` whose value is :func:`global_mean` over ranks (the probe calls it on every rank).

    Example:
        >>> global_loss_fn(lambda m, b: m(b).mean())(torch.nn.Identity(), torch.ones(2))
        tensor(1., dtype=torch.float64)
    """
    def mean_over_ranks(model: nn.Module, batch: Any) -> torch.Tensor:
        return global_mean(loss_fn(model, batch), group)

    return mean_over_ranks
