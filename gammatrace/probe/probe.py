"""Exact per-step trajectory measurements with O(model size) memory.

The probe measures the update the optimizer actually made, Δ_k = θ_k − θ_{k+1},
whatever the optimizer (DESIGN.md §1), and every inner product the principles need:

* record mode (no reference): loss, ‖Δ_k‖², ‖g_k‖², ‖θ_k − θ_0‖²;
* reference mode (θ* known): additionally ℓ*_k = ℓ(θ*; B_k) from one extra forward,
  P_k = ⟨θ_k − θ*, Δ_k⟩ − ½‖Δ_k‖², d_k² = ‖θ_k − θ*‖², ⟨θ_k − θ*, g_k⟩, and P_k per
  parameter tensor.

How it attaches to a loop (DESIGN §6): the user tells it the batch and the loss with
:meth:`Probe.batch`, once per micro-batch, and keeps calling the optimizer as before.
The measurement runs in the optimizer's own step hooks, so whatever calls
``optimizer.step()`` — the loop, ``GradScaler.step``, a framework — is measured.

Which gradient: g_k of DESIGN §1 is the *raw* mini-batch gradient of ℓ_k — accumulated over
the step's micro-batches (after DDP's all-reduce), divided by the GradScaler's scale, before
clipping. By the optimizer's pre-hook a loop has usually clipped it already
(``clip_grad_norm_`` runs between the last backward and ``optimizer.step()``), so the raw
gradient is read earlier: at the end of every backward (a callback queued from the sentinel
tensor's post-accumulate-grad hook, re-queued once so that it runs after DDP's own
end-of-backward callback has written the all-reduced gradients), the last one before the
step being the step's. It is read in the units the backward produced; the scale of the
GradScaler whose ``step`` calls the optimizer (the scale in force during the step's
backwards: ``update()`` runs after the step) divides it, exactly (a power of two). The
gradient the optimizer received (clipped, unscaled, or otherwise changed by the loop) is
read at the pre-hook as before and kept in its own columns, ``grad_dot_used`` and
``grad_sq_used``; ``grad_dot``, ``grad_sq`` and ``star`` are the raw ones. A step with no
backward the probe saw (gradients set by hand, a sharded probe fed at the pre-hook) has
raw = used.

Why the arithmetic looks the way it does:

* A float32 value is exact in float64 and so is the difference of two float32 values, so
  Δ_k and θ_k − θ* carry no rounding; inner products accumulate in float64. P_k is formed
  from Δ_k, never as ½(d_k² − d_{k+1}²), which cancels catastrophically when steps are
  small. The arithmetic is a kernel (:mod:`gammatrace.probe.kernels`): a fused Numba loop
  on CPU, which holds only θ_k and the anchor in the parameters' dtype, and float64
  torch buffers elsewhere; both yield the same per-tensor inner products.
* Per-step values stay where the kernel made them (a list of device tensors on GPU) and
  are moved to the host once per :meth:`Probe.flush` (the trainer flushes once per
  epoch), so a CUDA run is not synchronised every step.
* The reference forward runs on a private copy of the model, without autograd, under
  the generator and autocast state captured at the training forward
  (:mod:`gammatrace.probe.matched`), and inside ``fork_rng``: batch-norm statistics and
  random streams of the trained model are untouched, so probing never changes the
  trajectory it measures.

The parts, one job each: this module attaches the hooks and runs the step state machine
(:class:`Probe`, the public face); :mod:`~gammatrace.probe.state` holds the step in
progress; :mod:`~gammatrace.probe.kernels` measures a step; :mod:`~gammatrace.probe.table`
assembles the tables (:class:`~gammatrace.probe.table.StepTable`);
:mod:`~gammatrace.probe.check` schedules and diagnoses the consistency check.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from itertools import pairwise
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from gammatrace.curvature import CurvatureConfig, CurvatureMonitor
from gammatrace.probe.check import ConsistencyCheck
from gammatrace.probe.decay import WeightDecayFold
from gammatrace.probe.errors import BadReferenceError, ConsistencyError, ProbeUsageError
from gammatrace.probe.kernels import make_kernel
from gammatrace.probe.matched import (
    ForwardState,
    autocast_device_types,
    batch_size,
    canonical_name,
    canonical_state,
    capture,
    copy_modes,
    is_compiled,
    module_pairs,
    private_copy,
    replayed_loss,
    unwrap,
)
from gammatrace.probe.state import (
    ActiveStep,
    MicroBatch,
    as_loss,
    either,
    step_starts,
    weighted_mean,
)
from gammatrace.probe.table import REFERENCE_COLUMNS, USED_COLUMNS, StepTable

# Also what other modules import from here: the errors and the reference-mode columns
# live in the parts below the probe now (errors, table).
__all__ = [
    "REFERENCE_COLUMNS",
    "USED_COLUMNS",
    "BadReferenceError",
    "ConsistencyError",
    "Probe",
    "ProbeUsageError",
    "load_reference",
]

# Consecutive skipped steps before the probe warns (a GradScaler skips a few at the start
# while its scale settles; ten in a row means something else is wrong).
SKIP_WARN = 10


def load_reference(
    reference: str | Path | Mapping[str, torch.Tensor], device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """A reference state dict from a mapping or a file (loaded with ``weights_only=True``).

    Files may hold a plain state dict or a gammatrace checkpoint (``{"model": state_dict, ...}``).
    """
    if isinstance(reference, (str, Path)):
        path = Path(reference)
        if not path.is_file():
            raise BadReferenceError(f"reference file {path} does not exist")
        try:
            obj = torch.load(path, map_location=device or "cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for damaged files
            raise BadReferenceError(
                f"cannot read reference file {path}: {exc.__class__.__name__}: {exc}"
            ) from None
        if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
            obj = obj["model"]
        reference = obj
    if not isinstance(reference, Mapping):
        raise BadReferenceError(
            f"a reference must be a state dict or a path, got {type(reference).__name__}"
        )
    return dict(reference)


# --------------------------------------------------------------------------- hooks
def _noop(*_args: Any) -> None:
    return None


def _dead_hook() -> Callable[..., None]:
    return _noop


class _Hook:
    """Calls one of the probe's methods while the probe lives.

    It holds the probe weakly, so a probe the loop dropped stops measuring (and stops
    refusing unmeasured steps) instead of being kept alive by the model; a deep copy of the
    hooked model or optimizer shares it (the probe's methods ignore objects that are not
    its own), and a pickled model carries a no-op in its place.
    """

    __slots__ = ("_probe", "_method")

    def __init__(self, probe: Probe, method: str):
        self._probe = weakref.ref(probe)
        self._method = method

    def __call__(self, *args: Any) -> Any:
        probe = self._probe()
        return None if probe is None else getattr(probe, self._method)(*args)

    def __deepcopy__(self, memo: dict) -> _Hook:
        return self

    def __reduce__(self) -> tuple:
        return (_dead_hook, ())


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()


# ------------------------------------------------------------ the forward hook
# The probe needs to see the training forward (to capture its RNG and autocast state, and
# the arguments the consistency check compares). A hook registered on the user's model would
# be pickled with it: ``torch.save(model)`` would then carry a gammatrace object, and
# ``torch.load`` (weights_only, or without gammatrace installed) would fail. So the probe's
# forward hook lives in torch's *global* forward pre-hook table, which no pickle of a module
# includes, and is filtered to the probed models by identity. The price: every module call
# of the process takes the hooked path while a probe with a loss_fn lives (about a
# microsecond per module call: benchmarks/README.md, probe_hooks_cost.py); the hook is
# removed when the last such probe closes. Under torch.compile the hook returns at once while
# Dynamo traces (torch.compiler.is_compiling()), so compiled graphs contain no trace of it; a
# compiled model's own call (the OptimizedModule, called eagerly) is seen as usual.
_WATCHED: dict[int, tuple[weakref.ref, list[weakref.ref]]] = {}
_GLOBAL_HOOK: list = []  # the handle of the global hook while _WATCHED is not empty


def _global_forward_pre_hook(module: nn.Module, args: tuple) -> None:
    if torch.compiler.is_compiling():
        return None
    entry = _WATCHED.get(id(module))
    if entry is None or entry[0]() is not module:
        return None
    for ref in entry[1]:
        probe = ref()
        if probe is not None:
            probe._on_forward(module, args)
    return None


class _ForwardWatch:
    """A probe's entry in the global forward hook; ``remove()`` like a hook handle."""

    __slots__ = ("_key", "_ref")

    def __init__(self, model: nn.Module, probe: Probe):
        self._key, self._ref = id(model), weakref.ref(probe)
        entry = _WATCHED.get(self._key)
        if entry is None or entry[0]() is not model:
            entry = _WATCHED[self._key] = (weakref.ref(model), [])
        entry[1].append(self._ref)
        if not _GLOBAL_HOOK:
            _GLOBAL_HOOK.append(
                torch.nn.modules.module.register_module_forward_pre_hook(_global_forward_pre_hook)
            )

    def remove(self) -> None:
        entry = _WATCHED.get(self._key)
        if entry is not None and self._ref in entry[1]:
            entry[1].remove(self._ref)
            if not entry[1]:
                del _WATCHED[self._key]
        if not _WATCHED and _GLOBAL_HOOK:
            _GLOBAL_HOOK.pop().remove()


def _scaler_scale() -> torch.Tensor | None:
    """The scale of the GradScaler whose ``step`` is calling the optimizer now, if any (a copy:
    ``update()`` changes it in place after the step)."""
    f = sys._getframe(2)
    for _ in range(40):
        if f is None:
            return None
        if f.f_code is _GRADSCALER_STEP:
            scaler = f.f_locals.get("self")
            scale = getattr(scaler, "_scale", None)
            if not getattr(scaler, "_enabled", False) or not isinstance(scale, torch.Tensor):
                return None
            return scale.detach().clone()
        f = f.f_back
    return None


_GRADSCALER_STEP = torch.amp.GradScaler.step.__code__


# Which probe measures an optimizer: a second probe on one optimizer replaces the first
# (two would each demand their own probe.batch for every step).
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _on_stack(frame: FrameType | None) -> bool:
    f = sys._getframe(1)
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False


def _requires_closure(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether the optimizer's ``step`` has a ``closure`` argument without default (LBFGS)."""
    if optimizer is None:
        return False
    try:
        param = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


class Probe:
    """Measure the trajectory principles of a training loop, exactly and online.

    Attach it to the model and optimizer, tell it each micro-batch with :meth:`batch`
    (between the forward and the step), and step as usual: ``optimizer.step()``,
    ``optimizer.step(closure)``, ``scaler.step(optimizer)`` are measured through the
    optimizer's step hooks. :meth:`step` is shorthand for ``batch`` + ``optimizer.step()``.

    Args:
        model: the module being trained (a ``torch.compile``-d one too). Its trainable
            parameters (``requires_grad`` when the probe is created) define θ; buffers
            (batch-norm statistics) are not parameters. Changing ``requires_grad`` later
            is refused at the next step.
        optimizer: any ``torch.optim`` optimizer; the probe registers step hooks on it
            (until :meth:`close`, or until the probe is garbage-collected). ``None`` for a loop
            that updates the parameters itself: it marks each update with :meth:`update`.
        loss_fn: ``loss_fn(model, batch) -> loss``, the same loss the loop minimises;
            needed in reference mode to evaluate ℓ(θ*; B_k), and for the consistency
            check. It may return per-sample losses (a vector); their mean is the batch
            loss. It is evaluated under the generator and autocast state captured at the
            model's training forward, so dropout masks and autocast dtype match.
        reference: θ* as a state dict or a path; ``None`` selects record mode. Names with
            or without torch.compile's ``_orig_mod.`` prefix are accepted.
        per_tensor: also record P_k per parameter tensor (reference mode).
        lr_group: the parameter group whose learning rate is η_k. Updates are measured,
            not re-derived, so this only sets the normalisation of γ.
        step, epoch: the counters of the first step (a resumed run or a replay segment).
        origin: θ_0 for the record-mode distance ‖θ_k − θ_0‖² (default: the current
            parameters, i.e. the probe is attached before the first step).
        kernel: the arithmetic, ``"fused"`` (CPU float32/float64) or ``"torch"`` (any
            device); ``None`` picks ``fused`` where it applies. Both give the same
            numbers to float64 round-off.
        check: recompute ℓ(θ_k; B_k) with ``loss_fn`` on a private copy of the model (never
            the model itself) and compare it with the loss given to :meth:`batch`:
            ``True`` at steps 0, 1, 2, 4, 8, … and at the first and last step of every
            epoch (:meth:`ConsistencyCheck.due <gammatrace.probe.check.ConsistencyCheck.due>`),
            an int N also every N-th step, ``False`` never. A mismatch raises
            :class:`ConsistencyError` naming what differs (the loss, the batch, an argument of
            the model's forward such as a recurrent hidden state the batch lacks). Needs
            ``loss_fn``; costs one copy of the model and one forward per checked step, at
            most ⌊log₂ T⌋ + 1 + 2 per epoch of them.
        curvature: a :class:`~gammatrace.curvature.CurvatureConfig` (or its dict) to measure the
            curvature every ``every`` steps (step % every == 0) at θ_k, before the step: the
            columns of :class:`~gammatrace.curvature.CurvatureMonitor` — λ_1 … λ_k, trace and
            the stability ratio on ``curvature_batch``, Santurkar's quantities on the step's own
            micro-batches — read with :meth:`curvature_table`. Needs ``loss_fn``. The probe does
            not know an epoch's last step in advance, so ``at_epoch_end`` is never asked here
            (the column is False); ``subset`` applies to the engine only.
        curvature_batch: the fixed evaluation batch of the curvature (what ``loss_fn`` takes);
            default: the first micro-batch of the first measured step, kept.
        curvature_seed: seeds the curvature's draws (with the step index).

    The probe stores no hook on the model's modules (its forward hook is a global one,
    filtered to this model), so ``torch.save(model)`` pickles no gammatrace object, with the
    probe attached or closed.

    Gradient accumulation: call :meth:`batch` once per micro-batch; ℓ_k and ℓ*_k are the
    sample-weighted means over the micro-batches of the step. A step that never happens
    (GradScaler skipping an overflow) is recognised when the next micro-batch starts
    from reset gradients: it gets no step index and no row, and is listed by
    :meth:`skipped`.

    With ``torch.compile``'s default (inductor) backend the reference forward runs on an
    eager copy, whose dropout masks and rounding differ from the compiled forward's
    (``torch._inductor.config.fallback_random = True`` makes the masks match).

    Example:
        >>> import torch, gammatrace
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> target = {k: v.clone() for k, v in model.state_dict().items()}  # any θ*
        >>> probe = gammatrace.Probe(model, opt, loss_fn, reference=target)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     loss = loss_fn(model, (x, y))
        ...     loss.backward()
        ...     probe.batch((x, y), loss)
        ...     opt.step()
        >>> list(probe.steps().columns[:6])
        ['step', 'epoch', 'lr', 'loss', 'loss_ref', 'progress']
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        reference: str | Path | Mapping[str, torch.Tensor] | None = None,
        *,
        per_tensor: bool = True,
        lr_group: int = 0,
        step: int = 0,
        epoch: int = 0,
        origin: Mapping[str, torch.Tensor] | None = None,
        kernel: str | None = None,
        check: bool | int = True,
        curvature: CurvatureConfig | Mapping[str, Any] | None = None,
        curvature_batch: Any = None,
        curvature_seed: int = 0,
    ):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self._curvature: CurvatureMonitor | None = None
        self._curvature_rows: list[dict[str, Any]] = []
        if curvature is not None:
            if loss_fn is None:
                raise ValueError("Probe(curvature=...) needs loss_fn(model, batch) to evaluate the curvature")
            self._curvature = CurvatureMonitor(curvature, loss_fn, curvature_batch, seed=curvature_seed)
        self.per_tensor, self.lr_group = per_tensor, lr_group
        named = [(canonical_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._frozen = [
            (canonical_name(n), p) for n, p in model.named_parameters() if not p.requires_grad
        ]
        self.device = self.params[0].device
        self.step_index, self.epoch = step, epoch
        self._eager = unwrap(model)
        self._autocast_types = autocast_device_types(self.device)
        self._cuda_index = (
            (self.device.index if self.device.index is not None else torch.cuda.current_device())
            if self.device.type == "cuda"
            else None
        )
        self._consistency = ConsistencyCheck(
            check,
            loss_fn,
            self._eager,
            compiled=any(is_compiled(m) for m in model.modules()),
            autocast_types=self._autocast_types,
            cuda_index=self._cuda_index,
        )
        anchor = self._anchor(reference, origin)
        self.kernel = make_kernel(kernel, self.params, anchor)
        # Weight decay folded into g_k for RSI/EB (gammatrace.probe.decay): only where a group decays.
        self._fold = (WeightDecayFold(self.params, optimizer, anchor)
                      if self.mode == "reference" and WeightDecayFold.needed(optimizer) else None)
        self._table = StepTable(self.mode, self.names, per_tensor=per_tensor, start_step=step)
        # Hook-side state: micro-batches told since the last step, the forward state of the
        # current micro-batch, the step in progress.
        self._micro: list[MicroBatch] = []
        self._skip_streak = 0
        self._steps_measured = 0
        self._fwd: ForwardState | None = None
        self._fwd_args: tuple | None = None  # the training forward's arguments, when checked
        self._fwd_stale = False
        # The raw gradient's products (⟨θ_k − a, g⟩, ‖g‖² per tensor) read at the end of the
        # last backward, and whether the end-of-backward callback is queued.
        self._raw: np.ndarray | torch.Tensor | None = None
        self._raw_queued = -1  # the id of the backward whose end is awaited
        self._closure_first = False
        self._reset_since_batch: bool | torch.Tensor | None = None
        self._fresh_now: bool | torch.Tensor | None = None
        self._active: ActiveStep | None = None
        self._depth = 0
        self._step_frame: FrameType | None = None
        self._warned_no_forward = False
        self._updating = False  # inside ``with probe.update(...)``
        self._needs_closure = _requires_closure(optimizer)
        self._attach()

    # ------------------------------------------------------------------ set-up
    def _anchor(
        self,
        reference: str | Path | Mapping[str, torch.Tensor] | None,
        origin: Mapping[str, torch.Tensor] | None,
    ) -> list[torch.Tensor]:
        """Set the mode; the anchor a of the kernel: θ_0 in record mode, θ* in reference mode."""
        self._ref_model: nn.Module | None = None
        self._ref_pairs: list[tuple[nn.Module, nn.Module]] = []
        if reference is None:
            self.mode = "record"
            if origin is None:
                return [p.detach() for p in self.params]
            return self._pick(canonical_state(origin), "origin")
        self.mode = "reference"
        if self.loss_fn is None:
            raise ValueError(
                "reference mode needs loss_fn(model, batch) to evaluate the reference loss"
            )
        return self._set_reference(canonical_state(load_reference(reference, self.device)))

    def _pick(self, state: dict[str, torch.Tensor], what: str) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise BadReferenceError(
                f"{what} lacks {len(missing)} trainable tensor(s), e.g. {missing[:3]}"
            )
        bad = [
            n
            for n, p in zip(self.names, self.params, strict=True)
            if tuple(state[n].shape) != tuple(p.shape)
        ]
        if bad:
            raise BadReferenceError(f"{what} shapes differ from the model for {bad[:3]}")
        return [state[n].to(self.device) for n in self.names]

    def _set_reference(self, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        anchor = self._pick(state, "reference")
        ref = private_copy(self._eager)
        # Buffers the reference file does not carry (e.g. θ* given as parameters only)
        # keep the model's current values; in train mode they do not affect the loss.
        ref.load_state_dict(
            {k: state.get(canonical_name(k), v) for k, v in ref.state_dict().items()}
        )
        self._ref_model = ref
        self._ref_pairs = module_pairs(self._eager, ref)
        return anchor

    def _attach(self) -> None:
        opt = self.optimizer
        previous = _ATTACHED.get(opt) if opt is not None else None
        previous = previous() if previous is not None else None
        if previous is not None:
            warnings.warn(
                "this optimizer already had a gammatrace Probe; the earlier one is detached",
                stacklevel=3,
            )
            previous.close()
        handles = (
            []
            if opt is None  # manual updates: the steps are marked with probe.update
            else [
                opt.register_step_pre_hook(_Hook(self, "_before_step")),
                opt.register_step_post_hook(_Hook(self, "_after_step")),
            ]
        )
        if self.loss_fn is not None:
            # Not model.register_forward_pre_hook: see _ForwardWatch.
            handles.append(_ForwardWatch(self.model, self))
            if is_compiled(self.model):
                # torch warns that global hooks fire "an extra time" for the OptimizedModule: that
                # call is the one the probe watches (the inner one it skips while Dynamo traces).
                warnings.filterwarnings(
                    "ignore",
                    message=r"Using `torch.compile\(module\)` when there are global hooks",
                    category=UserWarning,
                )
        self._handles = handles
        self._finalizer = weakref.finalize(self, _remove, handles)
        self._sentinel_handles: list = []
        self._set_sentinel(self.params[-1])
        self._sentinel_confirmed = False
        if opt is not None:
            _ATTACHED[opt] = weakref.ref(self)

    def _set_sentinel(self, param: torch.Tensor) -> None:
        """Watch ``param``'s gradient: it tells whether a backward starts from reset gradients
        (a new step) or accumulates (another micro-batch of the same step); see _seal."""
        for handle in self._sentinel_handles:
            handle.remove()
            self._handles.remove(handle)
        self._sentinel = param
        self._sentinel_handles = [
            param.register_hook(_Hook(self, "_on_grad")),
            param.register_post_accumulate_grad_hook(_Hook(self, "_on_accumulated")),
        ]
        self._handles.extend(self._sentinel_handles)

    def _confirm_sentinel(self) -> None:
        # The last trainable tensor is usually the output layer's, which every loss reaches;
        # if the first step shows it unreached (an unused branch), watch the last one reached.
        self._sentinel_confirmed = True
        if self._sentinel.grad is None:
            reached = [p for p in self.params if p.grad is not None]
            if reached:
                self._set_sentinel(reached[-1])

    def close(self) -> None:
        """Remove the probe's hooks: the optimizer and model behave as if it never existed.

        Measurements taken so far stay readable (:meth:`steps`, :meth:`skipped`).

        Example:
            >>> import torch, gammatrace
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> probe = gammatrace.Probe(model, opt)
            >>> probe.close()
            >>> model(torch.ones(1, 2)).sum().backward(); opt.step()  # unmeasured, allowed
        """
        self._finalizer()
        if self.optimizer is None:
            return
        if _ATTACHED.get(self.optimizer) is not None and _ATTACHED[self.optimizer]() is self:
            del _ATTACHED[self.optimizer]

    # ------------------------------------------------------------- hook bodies
    def _on_forward(self, module: nn.Module, args: tuple) -> None:
        # The first forward since the last probe.batch, step or backward is the one whose
        # state ℓ(θ_k; B_k) was drawn in: a loss that calls the model twice (two views,
        # R-Drop) replays from its first call, and a forward whose backward already ran
        # (a diagnostic gradient) gives way to the next one. Under no_grad it cannot be
        # a training forward (evaluation, the probe's own copies).
        if (
            module is self.model
            and torch.is_grad_enabled()
            and (self._fwd is None or self._fwd_stale)
            and (self._ref_model is not None or self._check_due())
        ):
            self._fwd = capture(self._autocast_types, self._cuda_index)
            self._fwd_args = args if self._check_due() else None
            self._fwd_stale = False

    def _check_due(self) -> bool:
        return self._consistency.due(self._steps_measured, self.epoch)

    def _on_grad(self, grad: torch.Tensor) -> None:
        # Runs during backward, before the sentinel's gradient is accumulated: .grad still
        # shows whether the loop reset the gradients since the last backward.
        if self._depth:
            return  # a closure's evaluations inside the step
        self._fwd_stale = True
        g = self._sentinel.grad
        if g is None:
            self._fresh_now = True
        elif g.is_sparse:
            self._fresh_now = g._nnz() == 0 or not bool(g._values().any())
        elif g.device.type == "cpu":
            self._fresh_now = not bool(g.any())
        else:
            self._fresh_now = ~g.any()  # resolved when needed: no device sync in backward
        return None

    def _on_accumulated(self, _param: torch.Tensor) -> None:
        # Only a backward that accumulates into .grad counts (torch.autograd.grad does not).
        fresh, self._fresh_now = self._fresh_now, None
        if not self._depth or self._closure_first:
            # The raw gradient is read when this backward has finished (see the module doc):
            # one callback per backward (a backward that raised never ran its callbacks, so
            # the flag is the backward's id, not a bool).
            task = torch._C._current_graph_task_id()
            if task != -1 and task != self._raw_queued:
                self._raw_queued = task
                torch.autograd.Variable._execution_engine.queue_callback(
                    _Hook(self, "_backward_done")
                )
        if self._depth or fresh is None:
            return
        last = self._micro[-1] if self._micro else None
        if last is not None and not last.backward_seen:
            last.reset, last.backward_seen = (
                either(last.reset, fresh),
                True,
            )  # probe.batch came before backward
        else:
            self._reset_since_batch = either(self._reset_since_batch, fresh)

    def _backward_done(self) -> None:
        # Queued while the backward ran, so it runs after the callbacks queued before it; DDP
        # queues its end-of-backward callback (which writes the all-reduced gradients) at its
        # last bucket, possibly after this one was queued: go to the back of the queue once.
        torch.autograd.Variable._execution_engine.queue_callback(_Hook(self, "_read_raw"))

    def _read_raw(self) -> None:
        """The raw gradient's products at the end of a backward: every micro-batch's
        gradient accumulated so far, before anything the loop does between backward and step."""
        self._raw_queued = -1
        grads = [p.grad for p in self.params]
        self._raw = self._with_fold(self.kernel.raw(self.params, grads), grads)

    def _with_fold(self, raw: np.ndarray | torch.Tensor, grads: list) -> np.ndarray | torch.Tensor:
        """``raw`` (⟨θ − a, g⟩, ‖g‖² per tensor) with the three folded-decay products appended
        (:mod:`gammatrace.probe.decay`): computed where a group decays, 0 where none does, NaN
        without an optimizer (λ unknown)."""
        if self._fold is not None:
            extra = self._fold.products(self.params, grads)
        else:
            extra = torch.full((len(self.params), 3), math.nan if self.optimizer is None else 0.0,
                               dtype=torch.float64)
        if isinstance(raw, torch.Tensor):
            return torch.cat([raw, extra.to(raw.device)], dim=1)
        return np.concatenate([raw, extra.cpu().numpy()], axis=1)

    def _seal(self, resolve: bool) -> None:
        """Record the micro-batches of steps that never happened as skipped.

        The rule: a micro-batch whose backward began from reset gradients (the sentinel's
        .grad None or zero) starts a new step; accumulation never resets between its
        micro-batches, and every loop resets after a step, taken or skipped (a skipped
        overflow's inf gradients would poison the next step otherwise). So when micro-batches
        are pending and a later one starts from reset gradients with no step hook between,
        the earlier ones were a step the optimizer never made (GradScaler found an inf, or
        the loop chose not to step). ``resolve=False`` decides only what is known without a
        device sync and without waiting for a backward still to come.

        Assumed: the loss reaches the sentinel tensor in every micro-batch (a micro-batch that
        misses it tells nothing and counts as accumulation).
        """
        micro = self._micro
        if len(micro) < 2:
            return
        starts = step_starts(micro, resolve)
        last = starts[-1]
        if last == 0:
            return
        if self.optimizer is None:
            self._micro = micro[last:]  # refused once: the pending step cannot be measured now
            raise ProbeUsageError(
                "probe.batch found the gradients reset since the previous probe.batch with no "
                "`with probe.update(lr=...)` between: a Probe(model, None) measures only updates "
                "made inside that block; put the parameter update in it"
            )
        for a, b in pairwise(starts):
            self._record_skip(micro[a:b])
        self._micro = micro[last:]

    def _record_skip(self, group: list[MicroBatch]) -> None:
        losses = [mb.loss for mb in group if mb.loss is not None]
        loss = (
            weighted_mean(losses, [mb.n for mb in group if mb.loss is not None])
            if losses
            else None
        )
        self._table.skip(self.step_index, group[0].epoch, len(group), loss)
        self._skip_streak += 1
        if self._skip_streak == SKIP_WARN:
            warnings.warn(
                f"{SKIP_WARN} optimizer steps in a row were skipped (probe.batch calls with reset "
                "gradients and no optimizer.step() between): a GradScaler overflowing every step "
                "(inf/NaN gradients), or a loop that no longer steps",
                RuntimeWarning,
                stacklevel=4,
            )

    def _discard_failed_step(self) -> None:
        # The previous step raised before its post-hook: nothing of it is measured.
        self._depth, self._step_frame, self._active = 0, None, None

    def _check_parameters(self) -> None:
        if all(p.requires_grad for p in self.params) and not any(
            p.requires_grad for _, p in self._frozen
        ):
            return
        name, now = next(
            (
                (n, "stopped")
                for n, p in zip(self.names, self.params, strict=True)
                if not p.requires_grad
            ),
            None,
        ) or next((n, "started") for n, p in self._frozen if p.requires_grad)
        raise ProbeUsageError(
            f"parameter '{name}' {now} requiring grad after the Probe was created; θ is the set "
            "of trainable tensors at Probe(...): create a new Probe (step=, origin= or "
            "reference=) after changing requires_grad"
        )

    def _before_step(
        self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict
    ) -> tuple | None:
        if optimizer is not self.optimizer:
            return None
        if self._depth:
            if _on_stack(self._step_frame):
                self._depth += 1  # an optimizer subclass whose step() calls super().step()
                return None
            self._discard_failed_step()
        self._check_parameters()
        closure = kwargs["closure"] if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None and self._needs_closure:
            raise ProbeUsageError(
                f"{type(optimizer).__name__}.step() needs a closure and was called without one "
                "(GradScaler.step cannot pass one: PyTorch does not support closures with "
                "GradScaler); call probe.batch(batch) and then optimizer.step(closure)"
            )
        self._seal(resolve=True)
        active = self._take_step(optimizer, closure)
        new_call = None
        if closure is not None:
            active.closure = True
            wrapped = self._measured_closure(closure, active)
            new_call = (
                (args, {**kwargs, "closure": wrapped})
                if "closure" in kwargs
                else ((*args[:1], wrapped, *args[2:]), kwargs)
            )
        else:
            found_inf = getattr(optimizer, "found_inf", None)
            # An optimizer that handles AMP scaling itself (fused Adam/AdamW/SGD) is stepped by
            # GradScaler even on overflow and skips internally; its grads arrive still scaled.
            if found_inf is not None and bool(found_inf.sum() > 0):
                self._record_skip(active.group)
                active = None
            else:
                self._measure_before(optimizer, active)
        self._active = active
        # The frame of torch's step wrapper (1 is _Hook.__call__): it stays on the stack exactly
        # while this step runs, which tells a nested super().step() from a step that raised.
        self._depth, self._step_frame = 1, sys._getframe(2)
        return new_call

    def _take_step(
        self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None
    ) -> ActiveStep:
        """The micro-batches told since the last step, as the step now starting; refuses a
        step the probe cannot measure (none told, a loss where the closure computes it, ...)."""
        group = self._micro
        if not group:
            fix = (
                "call probe.batch(batch, loss) between the forward and the step "
                "(or probe.step(loss, batch) instead of both)"
            )
            if self._steps_measured or self._table.skips:
                raise ProbeUsageError(
                    "optimizer.step() was called again with no probe.batch since the last step "
                    f"(probe.step already steps: do not also call optimizer.step()); {fix}"
                )
            raise ProbeUsageError(
                f"optimizer.step() was called with no probe.batch for this step; {fix}"
            )
        lr = float(optimizer.param_groups[self.lr_group]["lr"])
        if closure is not None:
            if len(group) > 1:
                raise ProbeUsageError(
                    f"optimizer.step(closure) after {len(group)} probe.batch calls: with a closure "
                    "the step's loss and gradient are the closure's, so gradient accumulation "
                    "cannot be measured (nor done: PyTorch re-evaluates the closure); call "
                    "probe.batch(batch) once per step"
                )
            if group[0].loss is not None:
                raise ProbeUsageError(
                    "probe.batch was given a loss, but the step has a closure whose first "
                    "evaluation computes it: call probe.batch(batch) with loss=None before "
                    "optimizer.step(closure)"
                )
        elif any(mb.loss is None for mb in group):
            raise ProbeUsageError(
                "probe.batch(batch) was called without a loss, but optimizer.step() has no "
                "closure to compute it: pass the loss, probe.batch(batch, loss)"
            )
        self._micro = []
        return ActiveStep(group, lr)

    def _measure_before(self, optimizer: torch.optim.Optimizer, active: ActiveStep) -> None:
        """The kernel's first pass, at θ_k with the gradients the optimizer receives; the raw
        gradient's products were read at the end of the last backward."""
        if not self._sentinel_confirmed:
            self._confirm_sentinel()
        scale = getattr(optimizer, "grad_scale", None)
        active.grad_scale = scale if isinstance(scale, torch.Tensor) else None
        active.raw, self._raw = self._raw, None
        active.raw_scale = _scaler_scale()
        self.kernel.before(self.params, [p.grad for p in self.params])
        active.measured = True
        self._measure_curvature(active)

    def _measured_closure(
        self, closure: Callable[[], Any], active: ActiveStep
    ) -> Callable[[], Any]:
        def measured() -> Any:
            if active.measured:
                return closure()
            # ℓ_k and g_k are the first evaluation's: optimizers evaluate the closure before
            # they move θ, so θ_k is still in place here.
            before = capture(self._autocast_types, self._cuda_index)
            self._fwd, self._fwd_args, self._fwd_stale = None, None, False
            self._raw, self._closure_first = None, True
            try:
                out = closure()
            finally:
                self._closure_first = False
            fwd, self._fwd = self._fwd, None
            fwd_args, self._fwd_args = self._fwd_args, None
            # The raw gradient of the first evaluation, read at the end of its backward (a
            # framework may clip inside the closure, after the backward: Lightning does).
            active.raw, self._raw = self._raw, None
            mb = active.group[0]
            if out is None:
                raise ProbeUsageError(
                    "the closure returned None; return the loss from it (as LBFGS requires)"
                )
            mb.loss, n = as_loss(out, self.device, "closure")
            mb.n = n or mb.n
            self.kernel.before(self.params, [p.grad for p in self.params])
            active.measured = True
            self._measure_curvature(active)
            if not self._sentinel_confirmed:
                self._confirm_sentinel()
            if self.loss_fn is not None:
                self._evaluate(mb, mb.batch, fwd or before, fwd_args if fwd else None)
            mb.batch = None
            return out

        return measured

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if optimizer is not self.optimizer or not self._depth:
            return
        self._depth -= 1
        if self._depth:
            return
        active, self._active, self._step_frame = self._active, None, None
        self._fwd, self._fwd_args, self._reset_since_batch, self._raw = None, None, None, None
        if active is None:
            return  # skipped inside the optimizer (fused AMP optimizer, inf found)
        if not active.measured:
            raise ProbeUsageError(
                f"{type(optimizer).__name__}.step(closure) never called the closure, so the "
                "step's loss and gradient are unknown; pass the loss to probe.batch and step "
                "without a closure"
            )
        self._record_step(active)

    def _record_step(self, active: ActiveStep) -> None:
        """The step's row, at θ_{k+1} (after the optimizer's step or the update block)."""
        parts = self._measure_after(active)
        group = active.group
        weights = [mb.n for mb in group]
        loss = weighted_mean([mb.loss for mb in group], weights)
        loss_ref = (
            None
            if self.mode == "record"
            else weighted_mean([mb.loss_ref for mb in group], weights)
        )
        self._table.append(
            self.step_index,
            self.epoch,
            active.lr,
            loss,
            loss_ref,
            parts,
            [
                (mb.indices, mb.sample_losses, mb.ref_samples)
                for mb in group
                if mb.indices is not None and mb.sample_losses is not None
            ],
        )
        self.step_index += 1
        self._steps_measured += 1
        self._skip_streak = 0

    def _measure_after(self, active: ActiveStep) -> np.ndarray | torch.Tensor:
        """The kernel's second pass, at θ_{k+1}: the step's ``(n_tensors, 7)`` products
        (:data:`~gammatrace.probe.table.STEP_QUANTITIES`: the raw gradient's in columns 1-2,
        the used gradient's in 5-6)."""
        parts = self.kernel.after(self.params)
        on_device = isinstance(parts, torch.Tensor)

        def divide(values: np.ndarray | torch.Tensor, scale: torch.Tensor) -> None:
            # GradScaler's scales are powers of two, so the division is exact.
            s = scale.to(device=values.device, dtype=torch.float64) if on_device else float(scale)
            values[:, 0] /= s
            values[:, 1] /= s * s
            if values.shape[1] > 3:  # 2λ⟨g, θ⟩ of the folded decay is linear in g
                values[:, 3] /= s

        used = parts[:, 1:3].clone() if on_device else parts[:, 1:3].copy()
        if active.grad_scale is not None:
            divide(used, active.grad_scale)  # the fused AMP path: the optimizer got grad · s
        if active.raw is None:
            # No backward seen since the last step: the optimizer's is all there is (its
            # folded-decay products are not measured: NaN).
            nan = torch.full((len(self.params), 3), math.nan, dtype=torch.float64)
            raw = torch.cat([used, nan.to(used.device)], dim=1) if on_device else np.concatenate(
                [used, nan.numpy()], axis=1)
        else:
            raw = active.raw
            if active.raw_scale is not None:
                divide(raw, active.raw_scale)
        # STEP_QUANTITIES: ee, eg, gg, ed, dd, eg_used, gg_used, then the three folded-decay products.
        if on_device:
            raw = raw.to(parts.device)
            return torch.cat([parts[:, :1], raw[:, :2], parts[:, 3:5], used, raw[:, 2:]], dim=1)
        return np.concatenate([parts[:, :1], raw[:, :2], parts[:, 3:5], used, raw[:, 2:]], axis=1)

    def _measure_curvature(self, active: ActiveStep) -> None:
        """The curvature row of this step, at θ_k (before the update), when it is due."""
        monitor = self._curvature
        if monitor is None or not monitor.due(self.step_index):
            return
        batches = [(mb.curvature_batch, float(mb.n)) for mb in active.group if mb.curvature_batch is not None]
        for mb in active.group:
            mb.curvature_batch = None
        if not batches:
            raise ProbeUsageError(
                "Probe(curvature=...) measures on the step's batch, and this step was told "
                "probe.batch(None, ...): pass the batch loss_fn takes"
            )
        if monitor.eval_batch is None:
            monitor.eval_batch = batches[0][0]
        # The monitor works on copies of the model under a forked, seeded random stream.
        row = monitor.measure(self._eager, self.optimizer, step=self.step_index, lr=active.lr,
                              at_epoch_end=False, step_batches=batches, lr_group=self.lr_group)
        self._curvature_rows.append({"step": self.step_index, "epoch": self.epoch, **row})

    def curvature_table(self) -> pd.DataFrame:
        """The curvature rows measured so far (``Probe(curvature=...)``), one per measured step:
        ``step``, ``epoch`` and the columns of :class:`~gammatrace.curvature.CurvatureMonitor`.

        Example:
            >>> import torch, gammatrace
            >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
            <torch._C.Generator object at ...>
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
            >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
            >>> probe = gammatrace.Probe(model, opt, loss_fn, curvature={"every": 2, "k": 2})
            >>> for _ in range(3):
            ...     opt.zero_grad(); loss = loss_fn(model, batch); loss.backward()
            ...     probe.batch(batch, loss); opt.step()
            >>> table = probe.curvature_table()
            >>> table["step"].tolist(), table["stability_threshold_kind"].tolist()
            ([0, 2], ['sgd', 'sgd'])
        """
        if self._curvature is None:
            return pd.DataFrame()
        cols = ["step", "epoch", *self._curvature.columns()]
        return pd.DataFrame(self._curvature_rows, columns=cols).astype({"step": "int64", "epoch": "int64"})

    # --------------------------------------------------------- reference side
    def _evaluate(
        self, mb: MicroBatch, batch: Any, state: ForwardState, forward_args: tuple | None = None
    ) -> None:
        """ℓ(θ*; B) for this micro-batch (reference mode) and, when due, the consistency check."""
        if self._ref_model is not None:
            copy_modes(self._ref_pairs)
            out = replayed_loss(self.loss_fn, self._ref_model, batch, state, self._cuda_index)
            if out.dim() > 0:
                mb.ref_samples, mb.loss_ref = out, out.mean()
            else:
                mb.loss_ref = out
        if self._check_due():
            self._consistency(mb.loss, batch, state, forward_args, step=self.step_index)

    # ------------------------------------------------------------- the loop
    def batch(
        self,
        batch: Any,
        loss: torch.Tensor | float | None = None,
        *,
        indices: torch.Tensor | None = None,
        sample_losses: torch.Tensor | None = None,
    ) -> None:
        """Tell the probe this micro-batch: ``batch`` is what ``loss_fn`` takes, ``loss`` its loss.

        Call it anywhere between the forward and the optimizer step (before or after
        ``backward``, inside or outside autocast), once per micro-batch when gradients
        are accumulated. The step itself is measured when the optimizer steps. With a
        closure (``optimizer.step(closure)``, LBFGS, Lightning) pass ``loss=None``: the
        loss and gradient come from the closure's first evaluation.

        ``indices``/``sample_losses`` (dataset indices of the batch and the unreduced
        losses) additionally record per-sample losses at each visit, for the per-sample
        convergence check of Theorem 1.

        Example:
            >>> import torch, gammatrace
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = torch.optim.AdamW(model.parameters(), lr=0.01)
            >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
            >>> probe = gammatrace.Probe(model, opt, loss_fn)
            >>> batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(4)]
            >>> for i, b in enumerate(batches):  # two micro-batches per step
            ...     if i % 2 == 0:
            ...         opt.zero_grad()
            ...     loss = loss_fn(model, b)
            ...     (loss / 2).backward()
            ...     probe.batch(b, loss)
            ...     if i % 2 == 1:
            ...         opt.step()
            >>> len(probe.steps())
            2
        """
        if self._updating:
            raise ProbeUsageError(
                "probe.batch was called inside `with probe.update(...)`: tell the probe the "
                "micro-batch before the update block (the block is the step)"
            )
        if self._depth:
            if _on_stack(self._step_frame):
                raise ProbeUsageError(
                    "probe.batch was called inside optimizer.step() (from the closure?); "
                    "call probe.batch(batch) before optimizer.step(closure)"
                )
            self._discard_failed_step()
        fwd, self._fwd = self._fwd, None
        fwd_args, self._fwd_args = self._fwd_args, None
        n_loss = None
        loss_t = None
        if loss is not None:
            loss_t, n_loss = as_loss(loss, self.device, "probe.batch")
        reset = self._reset_since_batch
        self._reset_since_batch = None
        mb = MicroBatch(
            loss_t,
            n_loss or batch_size(batch) or 1,
            self.epoch,
            reset=reset,
            backward_seen=reset is not None,
        )
        if indices is not None and sample_losses is not None:
            mb.indices, mb.sample_losses = indices.detach(), sample_losses.detach()
        if self._curvature is not None and self._curvature.due(self.step_index):
            mb.curvature_batch = batch
        if loss is None:
            mb.batch = batch  # evaluated when the closure first runs
        elif self.loss_fn is not None and (self._ref_model is not None or self._check_due()):
            if fwd is None:
                fwd_args = None
                if not self._warned_no_forward:
                    self._warned_no_forward = True
                    warnings.warn(
                        "the probe saw no forward of its model before probe.batch: the "
                        "reference forward uses the RNG/autocast state of now, so dropout masks "
                        "will not match; give Probe the module the loop calls",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                fwd = capture(self._autocast_types, self._cuda_index)
            self._evaluate(mb, batch, fwd, fwd_args)
        self._micro.append(mb)
        self._seal(resolve=False)

    def step(
        self,
        loss: torch.Tensor | float | None,
        batch: Any = None,
        *,
        closure: Callable[[], Any] | None = None,
        indices: torch.Tensor | None = None,
        sample_losses: torch.Tensor | None = None,
    ) -> Any:
        """``probe.batch(batch, loss)``, then ``optimizer.step()``; returns what the step returns.

        Call after ``loss.backward()``. With ``closure``, pass ``loss=None``:
        ``probe.batch(batch)`` then ``optimizer.step(closure)``.

        Example:
            >>> import torch, gammatrace
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> probe = gammatrace.Probe(model, opt)
            >>> loss = model(torch.ones(2, 3)).pow(2).mean()
            >>> loss.backward()
            >>> probe.step(loss)
            >>> probe.steps()["step"].tolist()
            [0]
        """
        if self.optimizer is None:
            raise ProbeUsageError(
                "probe.step steps the optimizer, and this Probe has none (Probe(model, None)): "
                "call probe.batch(batch, loss), then update the parameters inside "
                "`with probe.update(lr=...):`"
            )
        self.batch(batch, loss, indices=indices, sample_losses=sample_losses)
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    @contextlib.contextmanager
    def update(self, lr: float) -> Iterator[None]:
        """Mark a parameter update the loop makes itself (a probe made with ``optimizer=None``).

        Δ_k is measured around the block: θ_k as the block is entered, θ_{k+1} as it is left;
        η_k is ``lr`` (it sets only γ's normalisation). ℓ_k and the raw g_k are the
        micro-batches told with :meth:`batch` since the last update, as for an optimizer
        step; the gradient "used" is ``.grad`` as the block is entered (after any clipping).
        A block that raises is no step (nothing is recorded); the exception propagates.

        Example:
            >>> import torch, gammatrace
            >>> model = torch.nn.Linear(3, 1)
            >>> probe = gammatrace.Probe(model, None)
            >>> for _ in range(2):
            ...     model.zero_grad()
            ...     loss = model(torch.ones(2, 3)).pow(2).mean()
            ...     loss.backward()
            ...     probe.batch(None, loss)
            ...     with probe.update(lr=0.1), torch.no_grad():
            ...         for p in model.parameters():
            ...             _ = p.add_(p.grad, alpha=-0.1)
            >>> probe.steps()["lr"].tolist()
            [0.1, 0.1]
        """
        if self.optimizer is not None:
            raise ProbeUsageError(
                f"probe.update marks manual parameter updates, but this Probe measures the steps "
                f"of its {type(self.optimizer).__name__} already; use Probe(model, None, ...) "
                "for a loop that updates the parameters itself"
            )
        if self._updating:
            raise ProbeUsageError("`with probe.update(...)` blocks cannot be nested")
        self._check_parameters()
        self._seal(resolve=True)
        if not self._micro:
            raise ProbeUsageError(
                "`with probe.update(...)` was entered with no probe.batch since the last update: "
                "call probe.batch(batch, loss) after the backward and before the update block"
            )
        if any(mb.loss is None for mb in self._micro):
            raise ProbeUsageError(
                "probe.batch(batch) was called without a loss, and a manual update has no closure "
                "to compute it: pass the loss, probe.batch(batch, loss)"
            )
        active = ActiveStep(self._micro, float(lr))
        self._micro = []
        if not self._sentinel_confirmed:
            self._confirm_sentinel()
        active.raw, self._raw = self._raw, None
        self.kernel.before(self.params, [p.grad for p in self.params])
        active.measured = True
        self._measure_curvature(active)
        self._updating = True
        try:
            yield
        finally:
            self._updating = False
            self._fwd, self._fwd_args, self._reset_since_batch = None, None, None
        self._record_step(active)

    # ------------------------------------------------------------ host side
    def end_epoch(
        self, *, derived: bool = True, ell_inf: float = 0.0, d0_sq: float | None = None
    ) -> pd.DataFrame:
        """Flush, then count following steps in the next epoch. Returns the epoch's rows.

        In reference mode the rows carry the derived columns (gamma, gamma_rp, gamma_rc,
        star, cos_align) normalised by D_0² as in :meth:`steps`, so a loop can print the
        epoch's γ_k as it trains; ``derived=False`` returns the raw measured columns only.

        Example:
            >>> import torch, gammatrace
            >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
            <torch._C.Generator object at ...>
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
            >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
            >>> probe = gammatrace.Probe(model, opt, loss_fn, reference={"weight": torch.zeros(1, 3),
            ...                                                          "bias": torch.zeros(1)})
            >>> for epoch in range(2):
            ...     for _ in range(3):
            ...         opt.zero_grad()
            ...         loss = loss_fn(model, batch)
            ...         loss.backward()
            ...         probe.batch(batch, loss)
            ...         opt.step()
            ...     rows = probe.end_epoch()
            >>> rows["step"].tolist(), "gamma" in rows, bool(probe.d0_sq == probe.steps()["dist_sq"][0])
            ([3, 4, 5], True, True)
        """
        frame = self._table.flush()
        self.epoch += 1
        if not derived:
            return frame
        return self._table.derived(frame, ell_inf=ell_inf, d0_sq=d0_sq)

    def flush(self) -> pd.DataFrame:
        """Move pending per-step values to the host (one synchronisation) and return them raw."""
        return self._table.flush()

    @property
    def d0_sq(self) -> float | None:
        """D_0² = ‖θ_0 − θ*‖², measured at the first step when the probe counts from step 0."""
        return self._table.d0_sq

    @d0_sq.setter
    def d0_sq(self, value: float | None) -> None:
        self._table.d0_sq = value

    @property
    def columns(self) -> list[str]:
        """Raw measured columns of this mode (besides step, epoch, lr)."""
        return self._table.columns

    def raw_steps(self) -> pd.DataFrame:
        """All measured rows so far, without derived columns."""
        return self._table.raw_steps()

    def steps(self, ell_inf: float = 0.0, d0_sq: float | None = None) -> pd.DataFrame:
        """The per-step table of DESIGN.md §6 (reference mode) or the record-mode table.

        Derived columns (gamma, gamma_rp, gamma_rc, star, cos_align) are computed by
        :func:`gammatrace.principles.derive`. D_0² is ``d0_sq`` if given, else the probe's
        own measurement :attr:`d0_sq` — d_0² at its first step, when it counts from step 0
        (the default ``step=0``: attach it before the first step) — and it stays known after
        :meth:`take` hands the early rows over. A probe started later (``step=k``) warns and
        uses its first step's d_k². Skipped steps have no row (see :meth:`skipped`).
        """
        return self._table.derived(self._table.raw_steps(), ell_inf=ell_inf, d0_sq=d0_sq)

    def skipped(self) -> pd.DataFrame:
        """Steps the optimizer never made (a GradScaler overflow, a loop that chose not to step).

        One row per skipped step: ``next_step`` (the index the next real step got: skips
        take none), ``epoch``, ``micro_batches``, ``loss`` (their sample-weighted mean).
        A skip is known once the next micro-batch starts from reset gradients.

        Example:
            >>> import torch, gammatrace
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> probe = gammatrace.Probe(model, opt)
            >>> for i in range(3):
            ...     opt.zero_grad()
            ...     loss = model(torch.ones(2, 3)).pow(2).mean()
            ...     loss.backward()
            ...     probe.batch(None, loss)
            ...     if i != 1:  # step 1 skipped, as GradScaler does on an overflow
            ...         opt.step()
            >>> probe.skipped()[["next_step", "micro_batches"]].values.tolist()
            [[1, 1]]
            >>> probe.steps()["step"].tolist()
            [0, 1]
        """
        if not self._depth:
            self._seal(resolve=True)
        return self._table.skipped()

    def tensor_steps(self) -> pd.DataFrame:
        """Per-tensor progress P_k,i as a long table (step, epoch, tensor, progress)."""
        return self._table.tensor_steps()

    def sample_steps(self) -> pd.DataFrame:
        """Per-sample losses at each visit (step, epoch, index, loss[, loss_ref])."""
        return self._table.sample_steps()

    def take(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """Flush and hand over (raw steps, tensor steps, sample steps), clearing host memory.

        The trainer writes each epoch's frames to disk and drops them, so host memory
        stays O(steps per epoch).
        """
        return self._table.take()
