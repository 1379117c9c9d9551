"""The consistency check: is the loss given to ``probe.batch`` ``loss_fn(model, batch)`` at θ_k?

The probe trusts the loop for ℓ_k and recomputes nothing on the training model; a loss
divided by the accumulation steps, computed on another batch, or under an autocast the
probe did not see would silently skew every γ. So at scheduled steps
(:meth:`ConsistencyCheck.due`) the loss is recomputed on a private copy of the model under
the training forward's RNG and autocast state, and a mismatch is diagnosed
(:meth:`ConsistencyCheck.diagnose`): it names the likely cause and the fix.

Example:
    >>> import torch
    >>> from gammatrace.probe.check import ConsistencyCheck
    >>> from gammatrace.probe.errors import ConsistencyError
    >>> from gammatrace.probe.matched import capture
    >>> model = torch.nn.Linear(2, 1)
    >>> loss_fn = lambda m, b: m(b).pow(2).mean()
    >>> check = ConsistencyCheck(3, loss_fn, model)   # step 0, then every 3rd step
    >>> [k for k in range(8) if check.due(k)]
    [0, 3, 6]
    >>> x = torch.ones(4, 2)
    >>> state = capture(("cpu",), None)               # as taken at the training forward
    >>> loss = loss_fn(model, x).detach()              # as probe.batch holds it
    >>> check(loss, x, state)                          # agrees: nothing happens
    >>> try:
    ...     check(loss / 4, x, state)                  # divided by 4 accumulation steps
    ... except ConsistencyError as e:
    ...     print("1/4 of it" in str(e))
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gammatrace.probe.errors import ConsistencyError
from gammatrace.probe.matched import ForwardState, private_copy, replayed_loss

# Relative tolerance of the consistency check. On one machine the recomputation repeats the
# training forward's kernels on the same inputs, so it agrees to a few ulps; a loss divided
# by the accumulation steps, another batch, or float32 against bf16 is off by far more.
CHECK_RTOL = 1e-4
# torch.compile (inductor) fuses differently from the eager copy the probe evaluates and
# draws dropout masks its own way: only gross mismatches are meaningful there, and they warn.
CHECK_RTOL_COMPILED = 1e-2


class ConsistencyCheck:
    """When to recompute ℓ(θ_k; B_k), and what a mismatch means.

    Args:
        check: ``True`` checks the first step, an int N also every N-th step, ``False``
            never (the ``check`` argument of :class:`~gammatrace.probe.Probe`).
        loss_fn: ``loss_fn(model, batch) -> loss``; without it nothing is ever due.
        model: the eager model; each check evaluates a private copy of it as it is then.
        compiled: the trained model is ``torch.compile``-d: a looser tolerance, and a
            mismatch warns instead of raising.
        autocast_types: the device types whose autocast state the forward depends on;
            the last is the model's own.
        cuda_index: the CUDA device whose generator the forward draws from, if any.
    """

    def __init__(
        self,
        check: bool | int,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
        model: nn.Module,
        *,
        compiled: bool = False,
        autocast_types: tuple[str, ...] = ("cpu",),
        cuda_index: int | None = None,
    ):
        if isinstance(check, bool):
            self.every = 0 if check else None
        elif isinstance(check, int) and check >= 1:
            self.every = check
        else:
            raise ValueError(f"check must be True, False or a positive int, got {check!r}")
        self.loss_fn, self.model, self.compiled = loss_fn, model, compiled
        self.autocast_types, self.cuda_index = autocast_types, cuda_index

    def due(self, steps_measured: int) -> bool:
        """Whether the step after ``steps_measured`` measured steps is checked."""
        every = self.every
        if every is None or self.loss_fn is None:
            return False
        return steps_measured == 0 or (every > 0 and steps_measured % every == 0)

    def _loss(self, model: nn.Module, batch: Any, state: ForwardState) -> float:
        return float(replayed_loss(self.loss_fn, model, batch, state, self.cuda_index).mean())

    def __call__(self, loss: torch.Tensor, batch: Any, state: ForwardState) -> None:
        """Recompute the loss of ``batch`` at θ_k under ``state`` and compare it with ``loss``.

        Raises :class:`ConsistencyError` on a mismatch (warns instead for a compiled model).
        """
        given = float(loss)
        if not math.isfinite(given):
            return  # a diverged step is the loop's to report
        twin = private_copy(self.model)  # θ_k, the current buffers and every submodule's mode
        value = self._loss(twin, batch, state)
        rtol = CHECK_RTOL_COMPILED if self.compiled else CHECK_RTOL
        if abs(given - value) <= rtol * max(abs(given), abs(value)) + 1e-12:
            return
        msg = self.diagnose(given, value, twin, batch, state, rtol)
        if self.compiled:
            warnings.warn(
                msg + " (the model is compiled: the probe's eager copy may legitimately differ)",
                RuntimeWarning,
                stacklevel=4,  # the loop's probe.batch call (via Probe._evaluate)
            )
            return
        raise ConsistencyError(msg)

    def diagnose(
        self,
        given: float,
        value: float,
        twin: nn.Module,
        batch: Any,
        state: ForwardState,
        rtol: float,
    ) -> str:
        """The message for ``given`` ≠ ``value``: a divided loss, an autocast outside
        ``loss_fn`` (tried by re-evaluating ``twin`` with autocast toggled), or else the
        batch or the loss function."""
        head = (
            f"probe.batch: the loss given ({given:.6g}) is not loss_fn(model, batch) at θ_k "
            f"({value:.6g}, recomputed on a copy of the model under the training forward's RNG "
            "and autocast state)"
        )
        if value != 0 and given != 0:
            n = round(value / given)
            if 2 <= n <= 256 and abs(given * n - value) <= rtol * abs(value):
                return (
                    f"{head}: it is 1/{n} of it — a loss divided by {n} gradient-accumulation "
                    "steps? Pass each micro-batch's own loss to probe.batch (the probe averages "
                    "micro-batches itself) and divide only what you backpropagate"
                )
        on = any(enabled for _, enabled, _ in state.autocast)
        for autocast in self._autocast_alternatives(state, on):
            alt = ForwardState(state.cpu_rng, state.cuda_rng, autocast)
            other = self._loss(twin, batch, alt)
            if abs(given - other) <= rtol * max(abs(given), abs(other)) + 1e-12:
                what = (
                    "without autocast"
                    if on
                    else f"under autocast ({[d for t, e, d in autocast if e][0]})"
                )
                return (
                    f"{head}, but it is that loss computed {what}: autocast was applied outside "
                    "loss_fn (or the probe saw no forward of this model under it); put the "
                    "autocast block inside loss_fn, or around the loop's whole forward and loss"
                )
        return (
            f"{head}: pass probe.batch the batch this loss was computed on, and a loss_fn that "
            "computes the loop's loss (same model call, reduction, regularisation terms, autocast)"
        )

    def _autocast_alternatives(
        self, state: ForwardState, on: bool
    ) -> list[tuple[tuple[str, bool, torch.dtype], ...]]:
        """The autocast states a loop may have used instead: none if the forward had autocast
        on, else the model's device type under each low precision it supports."""
        if on:
            return [tuple((t, False, d) for t, _, d in state.autocast)]
        device_type = self.autocast_types[-1]
        lows = (torch.bfloat16,) if device_type == "cpu" else (torch.float16, torch.bfloat16)
        return [
            tuple(
                (t, t == device_type, low if t == device_type else d) for t, _, d in state.autocast
            )
            for low in lows
        ]
