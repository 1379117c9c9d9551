"""The step in progress: what the probe holds between ``probe.batch`` and the step's hooks.

A step is a group of micro-batches (one :meth:`Probe.batch` call each) closed by the
optimizer's step; :class:`ActiveStep` is that group while the step runs. Which
micro-batches belong to one step follows from whether each backward began from reset
gradients (:func:`step_starts`): a group followed by a reset with no step between was a
step the optimizer never made.

Example:
    >>> import torch
    >>> from gammatrace.probe.state import MicroBatch, step_starts, weighted_mean
    >>> told = [MicroBatch(torch.tensor(1.0), 2, 0, reset=True),
    ...         MicroBatch(torch.tensor(4.0), 6, 0, reset=False),   # accumulates
    ...         MicroBatch(torch.tensor(2.0), 8, 0, reset=True)]    # a new step begins
    >>> step_starts(told, resolve=True)
    [0, 2]
    >>> float(weighted_mean([mb.loss for mb in told[:2]], [mb.n for mb in told[:2]]))
    3.25
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch

from gammatrace.probe.errors import ProbeUsageError


@dataclass(eq=False, slots=True)
class MicroBatch:
    """One :meth:`Probe.batch` call."""

    loss: torch.Tensor | None
    n: int
    epoch: int
    batch: Any = None  # kept only until a closure's first evaluation
    curvature_batch: Any = None  # kept only for a step the curvature measures (Santurkar's line)
    loss_ref: torch.Tensor | None = None
    ref_samples: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    sample_losses: torch.Tensor | None = None
    # Whether the gradients were reset (None or zero) when this micro-batch's backward began:
    # None until a backward is attributed to it; a lazy bool tensor on accelerators.
    reset: bool | torch.Tensor | None = None
    backward_seen: bool = False


@dataclass(eq=False, slots=True)
class ActiveStep:
    """The step between the optimizer's pre- and post-hook."""

    group: list[MicroBatch]
    lr: float
    # The scale of the gradients the optimizer receives (a fused optimizer under GradScaler).
    grad_scale: torch.Tensor | None = None
    # The raw gradient's per-tensor (⟨θ_k − a, g⟩, ‖g‖²), read at the end of the step's last
    # backward (None: no backward seen), and the GradScaler scale it is to be divided by.
    raw: Any = None
    raw_scale: torch.Tensor | None = None
    closure: bool = False
    measured: bool = False


def either(a: bool | torch.Tensor | None, b: bool | torch.Tensor) -> bool | torch.Tensor:
    """``a or b`` for flags that may be lazy device booleans (no sync where avoidable)."""
    if a is None or a is False:
        return b
    if a is True or b is True:
        return True
    if b is False:
        return a
    return a | b


def step_starts(micro: list[MicroBatch], resolve: bool) -> list[int]:
    """Indices of the micro-batches that start a step (0 always): those whose backward
    began from reset gradients. ``resolve=False`` stops at the first micro-batch whose
    reset is not known without a device sync or a backward still to come; ``resolve=True``
    syncs (and stores the resolved flags)."""
    starts = [0]
    for i in range(1, len(micro)):
        reset = micro[i].reset
        if reset is None and not resolve:
            break  # its backward is still to come
        if isinstance(reset, torch.Tensor):
            if not resolve:
                break
            reset = micro[i].reset = bool(reset)
        if reset:
            starts.append(i)
    return starts


def weighted_mean(values: list[torch.Tensor], weights: list[int]) -> torch.Tensor:
    """Σ n_i v_i / Σ n_i in float64 (one micro-batch: the value itself, untouched)."""
    if len(values) == 1:
        return values[0]
    total = sum(weights)
    acc = values[0].to(torch.float64) * weights[0]
    for v, n in zip(values[1:], weights[1:], strict=True):
        acc = acc + v.to(torch.float64).to(acc.device) * n
    return acc / total


def as_loss(loss: Any, device: torch.device, what: str) -> tuple[torch.Tensor, int | None]:
    """A detached scalar loss and, for per-sample losses, their number."""
    if isinstance(loss, torch.Tensor):
        value = loss.detach()
        if value.numel() == 1:
            return value.reshape(()), None
        if value.numel() == 0:
            raise ProbeUsageError(
                f"{what}: the loss is an empty tensor; pass the micro-batch's loss"
            )
        return value.mean(), value.numel()
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        # A Python float is the loss's value already; float64 keeps it exact.
        return torch.tensor(float(loss), dtype=torch.float64, device=device), None
    raise ProbeUsageError(
        f"{what}: the loss must be a tensor or a float, got {type(loss).__name__}; "
        "pass the value loss_fn returned (before .backward())"
    )
