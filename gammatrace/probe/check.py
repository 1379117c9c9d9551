"""The consistency check: is the loss given to ``probe.batch`` ``loss_fn(model, batch)`` at θ_k?

The probe trusts the loop for ℓ_k and recomputes nothing on the training model; a loss
divided by the accumulation steps, computed on another batch, or under an autocast the
probe did not see would silently skew every γ. So at scheduled steps
(:meth:`ConsistencyCheck.due`) the loss is recomputed on a private copy of the model under
the training forward's RNG and autocast state, and a mismatch is diagnosed
(:meth:`ConsistencyCheck.diagnose`): it names the likely cause and the fix.

Why not step 0 alone: some mistakes are invisible there. A recurrent model whose hidden
state the loop carries from step to step, with a batch that lacks it, agrees at step 0
(the state starts at zero, as ``loss_fn`` recomputes it) and is wrong from step 1 on. So the
default schedule checks steps 0, 1, 2, 4, 8, … (measured steps, counted from the probe's
first) and, once the probe knows an epoch's length, the first and the last step of every
epoch (a last batch of another size is the other usual place a ``loss_fn`` goes wrong).
Cost, bounded: at most ⌊log₂ T⌋ + 1 + 2·E checks over T steps and E epochs, each one deep
copy of the model and one forward without autograd (``benchmarks/README.md``,
``probe_check_cost.py``).

Example:
    >>> import torch
    >>> from gammatrace.probe.check import ConsistencyCheck
    >>> from gammatrace.probe.errors import ConsistencyError
    >>> from gammatrace.probe.matched import capture
    >>> model = torch.nn.Linear(2, 1)
    >>> loss_fn = lambda m, b: m(b).pow(2).mean()
    >>> check = ConsistencyCheck(True, loss_fn, model)   # the default schedule
    >>> [k for k in range(12) if check.due(k, epoch=0)]
    [0, 1, 2, 4, 8]
    >>> [k for k in range(12, 40) if check.due(k, epoch=k // 12)]  # epochs of 12 steps: first, last
    [12, 16, 23, 24, 32, 35, 36]
    >>> every3 = ConsistencyCheck(3, loss_fn, model)   # the schedule, and every 3rd step
    >>> [k for k in range(12) if every3.due(k, epoch=0)]
    [0, 1, 2, 3, 4, 6, 8, 9]
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
        check: ``True`` checks steps 0, 1, 2, 4, 8, … and the first and last step of every
            epoch (:meth:`due`), an int N also every N-th step, ``False`` never (the
            ``check`` argument of :class:`~gammatrace.probe.Probe`).
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
        # Epoch bookkeeping of :meth:`due`: the epoch of the last step asked about, the
        # measured-step index its first step had, and the length of the epoch before it.
        self._epoch: int | None = None
        self._epoch_start = 0
        self._epoch_len: int | None = None

    def due(self, steps_measured: int, epoch: int | None = None) -> bool:
        """Whether the step after ``steps_measured`` measured steps (in ``epoch``) is checked:
        steps 0, 1, 2, 4, 8, …; the first step of every epoch after the first; the last step
        of an epoch, predicted from the length of the one before; every N-th with ``check=N``.

        Repeated calls with the same arguments give the same answer (the probe asks at the
        forward, at ``probe.batch`` and at the check itself).
        """
        every = self.every
        if every is None or self.loss_fn is None:
            return False
        k = steps_measured
        if epoch is not None and epoch != self._epoch:
            if self._epoch is not None and k > self._epoch_start:
                self._epoch_len = k - self._epoch_start
            self._epoch, self._epoch_start = epoch, k
            if k > 0:
                return True  # the first step of a new epoch
        if k == 0 or k & (k - 1) == 0:  # 0 and the powers of two
            return True
        if k == self._epoch_start and self._epoch is not None:
            return True
        if self._epoch_len is not None and k == self._epoch_start + self._epoch_len - 1:
            return True  # the predicted last step of this epoch
        return every > 0 and k % every == 0

    def _loss(self, model: nn.Module, batch: Any, state: ForwardState) -> float:
        return float(replayed_loss(self.loss_fn, model, batch, state, self.cuda_index).mean())

    def _loss_and_args(
        self, model: nn.Module, batch: Any, state: ForwardState
    ) -> tuple[float, tuple | None]:
        """The loss, and the positional arguments ``loss_fn`` called ``model`` with first."""
        seen: list[tuple] = []

        def grab(_module: nn.Module, args: tuple) -> None:
            if not seen:
                seen.append(args)

        handle = model.register_forward_pre_hook(grab)  # on the private copy only
        try:
            value = self._loss(model, batch, state)
        finally:
            handle.remove()
        return value, seen[0] if seen else None

    def __call__(
        self,
        loss: torch.Tensor,
        batch: Any,
        state: ForwardState,
        forward_args: tuple | None = None,
        step: int = 0,
    ) -> None:
        """Recompute the loss of ``batch`` at θ_k under ``state`` and compare it with ``loss``.

        ``forward_args`` are the positional arguments of the training forward (as the
        probe's forward hook saw them): a mismatch names the argument that differs.
        ``step`` is the measured-step index, for the message. Raises
        :class:`ConsistencyError` on a mismatch (warns instead for a compiled model).
        """
        given = float(loss)
        if not math.isfinite(given):
            return  # a diverged step is the loop's to report
        twin = private_copy(self.model)  # θ_k, the current buffers and every submodule's mode
        value, twin_args = self._loss_and_args(twin, batch, state)
        rtol = CHECK_RTOL_COMPILED if self.compiled else CHECK_RTOL
        if abs(given - value) <= rtol * max(abs(given), abs(value)) + 1e-12:
            return
        msg = self.diagnose(
            given, value, twin, batch, state, rtol,
            forward_args=forward_args, replay_args=twin_args, step=step,
        )
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
        *,
        forward_args: tuple | None = None,
        replay_args: tuple | None = None,
        step: int = 0,
    ) -> str:
        """The message for ``given`` ≠ ``value``, naming what differs: an argument of the
        model's forward (the training forward's ``forward_args`` against what ``loss_fn``
        passed, ``replay_args``: another input, or state the loop carries between steps such
        as a recurrent hidden state), a divided loss, an autocast outside ``loss_fn`` (tried
        by re-evaluating ``twin`` with autocast toggled), or else the batch or the loss
        function."""
        head = (
            f"probe.batch at step {step}: the loss given ({given:.6g}) is not "
            f"loss_fn(model, batch) at θ_k ({value:.6g}, recomputed on a copy of the model "
            "under the training forward's RNG and autocast state)"
        )
        differs = forward_difference(forward_args, replay_args)
        if differs:
            return f"{head}: {differs}"
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
        later = (
            "; earlier checks agreed, so look for what changes from step to step and is "
            "missing from the batch or from loss_fn: state the loop carries between steps "
            "(a recurrent hidden state, a memory, a cache) must travel in the batch"
            if step > 0
            else ""
        )
        return (
            f"{head}: pass probe.batch the batch this loss was computed on, and a loss_fn that "
            "computes the loop's loss (same model call, reduction, regularisation terms, "
            f"autocast){later}"
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


def describe(value: Any) -> str:
    """A short description of a forward argument (for messages).

    Example:
        >>> import torch
        >>> describe(torch.zeros(4, 3)), describe((torch.zeros(1, 2), torch.zeros(1, 2))), describe(None)
        ('a tensor [4, 3]', 'a tuple of 2 tensors [1, 2], [1, 2]', 'None')
    """
    if isinstance(value, torch.Tensor):
        return f"a tensor {list(value.shape)}"
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        shapes = ", ".join(str(list(v.shape)) for v in value[:4]) + (", …" if len(value) > 4 else "")
        return f"a {type(value).__name__} of {len(value)} tensors {shapes}"
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


def _same(a: Any, b: Any) -> bool:
    """Whether two forward arguments are the same values (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(torch.equal(a.detach(), b.detach().to(a.device)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # an object without a usable ==: say nothing about it
        return True


def forward_difference(training: tuple | None, replayed: tuple | None) -> str | None:
    """What differs between the positional arguments of the training forward and those
    ``loss_fn(model, batch)`` passed, in words (``None``: nothing seen differs).

    Example:
        >>> import torch
        >>> x, h = torch.ones(2, 3), torch.ones(1, 2, 4)
        >>> print(forward_difference((x, h), (x,)))  # doctest: +ELLIPSIS
        the training forward got 2 positional arguments (a tensor [2, 3]; a tensor [1, 2, 4])...recurrent hidden state...
        >>> print(forward_difference((x, h), (x, 0 * h)))  # doctest: +ELLIPSIS
        argument 2 of the model's forward (a tensor [1, 2, 4]) is not the value...recurrent hidden state...
        >>> forward_difference((x, h), (x, h)) is None
        True
    """
    if training is None or replayed is None:
        return None

    def listed(args: tuple) -> str:
        return "; ".join(describe(a) for a in args) or "none"

    if len(training) != len(replayed):
        fewer = len(replayed) < len(training)
        return (
            f"the training forward got {len(training)} positional arguments ({listed(training)}), "
            f"loss_fn(model, batch) passes {len(replayed)} ({listed(replayed)})"
            + (
                ": what the loop passes besides the batch is not in the batch given to "
                "probe.batch — state carried from step to step, such as a recurrent hidden "
                "state, agrees at the first step (where it starts from zero) and not after; put it in "
                "the batch as it was at this step's forward (e.g. (x, y, hidden)) and pass it "
                "to the model in loss_fn"
                if fewer
                else ": loss_fn calls the model otherwise than the loop does; make it call "
                "the model as the loop does"
            )
        )
    for i, (a, b) in enumerate(zip(training, replayed, strict=True)):
        if _same(a, b):
            continue
        if i == 0:
            return (
                f"the model's input differs: argument 1 of the training forward ({describe(a)}) "
                f"is not what loss_fn(model, batch) passes ({describe(b)}); pass probe.batch "
                "the batch this loss was computed on"
            )
        return (
            f"argument {i + 1} of the model's forward ({describe(a)}) is not the value "
            f"loss_fn(model, batch) passes ({describe(b)}): state carried in the batch, such "
            "as a recurrent hidden state, must be the value the loop passed at this step's "
            "forward (taken before the forward, not after it)"
        )
    return None
