"""PyTorch Lightning: a ``Callback`` that measures ``Trainer.fit``, and a verified two-pass ``fit``.

Install with ``pip install 'gammatrace[lightning]'``. Lightning's automatic optimization
hides three things from a naive probe, and :class:`GammaTrace` handles each:

* **The loss is divided by** ``accumulate_grad_batches`` before Lightning returns it or
  hands it to any hook (γ would come out NaN or off by the factor). The callback reads the
  loss where ``training_step`` returns it — it wraps the module's ``training_step`` for the
  duration of ``fit`` — and tells the probe every micro-batch with its true loss
  (``probe.batch``), so ℓ_k is the sample-weighted mean over the step's micro-batches.
* **Every step runs a closure** (``optimizer.step(closure=...)``), and Lightning clips
  gradients (``gradient_clip_val``) and calls ``on_before_optimizer_step`` *inside* it, after
  the backward of the last micro-batch. The callback leaves that order alone: it wraps the
  optimizer's ``step`` so that a closure is evaluated first, exactly as the optimizer would
  evaluate it (forward, zero-grad, backward, clipping), and the optimizer then steps on the
  gradient it produced — the clipped one, which is what the probe reads. torch's optimizers
  evaluate a closure once, before they move θ, so the trajectory is the same bit for bit
  (the tests check it against a Trainer without the callback). LBFGS (many closure
  evaluations per step) is refused.
* **Precision plugins** wrap ``training_step`` in autocast (``bf16-mixed``) or scale the
  loss (``16-mixed``: a GradScaler, which skips steps on overflow). The probe records the
  autocast state and generator state at the start of each ``training_step``, so ℓ(θ*; B_k)
  is evaluated under the same autocast dtype and dropout masks; the gradient is read after
  unscaling; a skipped step gets no row and is counted (``skipped``).

Logging goes through ``pl_module.log`` (so every Lightning logger — TensorBoard, W&B, CSV —
gets it), every ``log_every`` optimizer steps: in pass 1 ``gammatrace/loss``, ``update_sq``,
``grad_sq``, ``skipped``; in pass 2 ``gammatrace/gamma``, ``gamma_rp``, ``dist_ratio``
(d_k/D_0), ``cos_align``, ``loss``, ``loss_ref``. Set the Trainer's ``log_every_n_steps``
to match: Lightning writes only every ``log_every_n_steps`` steps.

ℓ(θ*; B_k) needs the loss as a function of the module: by default the callback calls the
module's own ``training_step(batch, batch_idx)`` on a private copy (``self.log`` there is a
no-op); pass ``loss_fn(module, batch)`` when ``training_step`` needs the Trainer (e.g.
reads ``self.trainer``) or does more than compute the loss.

Under DDP (``strategy="ddp"``) every rank measures the same θ and gradient; the loss and
ℓ(θ*; B_k) are the means over ranks (all-reduced, :mod:`gammatrace.integrations.distributed`),
and only rank 0 writes the run folder. (The DDP arithmetic is tested on the plain loop; a
Lightning ``strategy="ddp"`` fit is not run by the tests.)

Example (a tiny model, two epochs; pass 1 records, pass 2 measures against θ_T and checks
every step's loss against pass 1):
    >>> import tempfile, torch, lightning as L
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> class Lit(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Linear(4, 1)
    ...     def training_step(self, batch, batch_idx):
    ...         return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    >>> def build():
    ...     trainer = L.Trainer(max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=1.0, **QUIET)
    ...     return trainer, Lit(), {"train_dataloaders": DataLoader(data, batch_size=8)}
    >>> result = fit(build, seed=0, out=tempfile.mkdtemp() + "/lit")
    >>> len(result.steps()), result.reference_name
    (4, 'last')
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gammatrace.engine.twopass import (
    PendingProbe,
    TwoPass,
    TwoPassResult,
    check_run_folder,
    save_run,
)
from gammatrace.errors import IntegrationError
from gammatrace.integrations import ranks as D
from gammatrace.integrations.core import TraceCore
from gammatrace.integrations.loggers import Sink
from gammatrace.probe import Probe
from gammatrace.probe.matched import COMPILED_PREFIX

try:  # the optional extra gammatrace[lightning]: this module needs it, gammatrace does not
    import lightning.pytorch as pl

    _Callback: type = pl.Callback
except ImportError:  # pragma: no cover - only without the extra
    pl = None
    _Callback = object

# Trainer options that keep a small fit quiet and fast (no progress bar, logger, checkpoint).
QUIET = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
         "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
         "deterministic": True}


def _require() -> None:
    if pl is None:
        raise IntegrationError("gammatrace.integrations.lightning needs PyTorch Lightning: "
                               "pip install 'gammatrace[lightning]'")


def training_loss(output: Any) -> torch.Tensor | None:
    """The loss in what ``training_step`` returned (a tensor, or a mapping with ``"loss"``).

    Example:
        >>> training_loss({"loss": torch.tensor(0.5), "acc": 1.0})
        tensor(0.5000)
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output.get("loss")
    return None


class _Steps(nn.Module):
    """The LightningModule seen by the probe: calling it runs the module's ``training_step``.

    Held under torch.compile's attribute name, so the probe's canonical parameter names
    are the LightningModule's own (``net.weight``, not ``module.net.weight``) and θ_T files
    fit ``pl_module.state_dict()``. Calling it (instead of ``training_step`` directly) fires
    the probe's forward hook at the start of every training step: the generator and
    autocast state the step's loss is drawn under.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        setattr(self, COMPILED_PREFIX, module)

    def forward(self, args: tuple, kwargs: dict) -> Any:
        module = getattr(self, COMPILED_PREFIX)
        # The class's method: the live module's training_step attribute is the callback's wrapper.
        return type(module).training_step(module, *args, **kwargs)


def _default_loss_fn(steps: nn.Module, item: tuple) -> torch.Tensor:
    """ℓ(θ; B) by the module's own ``training_step`` (on the probe's private copy)."""
    args, kwargs = item
    with warnings.catch_warnings():
        # self.log(...) on a copy without a Trainer is a documented no-op that warns.
        warnings.filterwarnings("ignore", message=".*self.log.*")
        loss = training_loss(steps(args, kwargs))
    if loss is None:
        raise IntegrationError("training_step returned no loss on the probe's copy of the module; pass "
                               "GammaTrace(loss_fn=...)")
    return loss


class GammaTrace(TraceCore, _Callback):
    """Measure a Lightning ``Trainer.fit`` with a :class:`gammatrace.Probe` (see the module docstring):
    Lightning's events translated to the shared :class:`~gammatrace.integrations.core.TraceCore`.

    Args:
        reference: θ* (a state dict or file; e.g. the θ_T of an earlier fit) for reference
            mode, or ``None`` to record (pass 1). :func:`fit` runs both passes for you.
        out: write the measured run folder here when the fit ends (:func:`gammatrace.save_run`;
            rank 0 only).
        loss_fn: ``loss_fn(module, batch) -> loss`` for ℓ(θ*; B_k) and the first-step check
            (default: the module's ``training_step`` on the probe's private copy).
        log_every: log to ``pl_module.log`` every this many optimizer steps (0: never).
        sinks: more places to log to (:mod:`gammatrace.integrations.loggers`).
        check, per_tensor, kernel: as for :class:`gammatrace.Probe`.
        probe: a probe made elsewhere (by :func:`fit`'s :class:`gammatrace.TwoPass`) on
            :func:`probe_model` of the module and the optimizer the fit will use, or a
            :class:`gammatrace.engine.twopass.PendingProbe` (made on :func:`probe_model` of the
            module), attached when training starts to the optimizer Lightning configured.
    """

    def __init__(self, reference: Any = None, *, out: str | Path | None = None,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, log_every: int = 1,
                 sinks: Iterable[Sink] = (), check: bool | int = True, per_tensor: bool = True,
                 kernel: str | None = None, probe: Probe | PendingProbe | None = None):
        _require()
        pending = probe if isinstance(probe, PendingProbe) else None
        super().__init__(reference, out=out, log_every=log_every, sinks=sinks, check=check, per_tensor=per_tensor,
                         kernel=kernel, probe=None if pending is not None else probe)
        self.loss_fn = loss_fn
        self._pending = pending
        self._given = self._given or pending is not None

    # ---------------------------------------------------------------- set-up
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not pl_module.automatic_optimization:
            raise IntegrationError("manual optimization: the training_step steps the optimizer itself, so call "
                                   "gammatrace.Probe's probe.batch(batch, loss) there, before optimizer.step()")
        if len(trainer.optimizers) != 1:
            raise IntegrationError(f"GammaTrace measures one optimizer; this fit has {len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        if isinstance(optimizer, torch.optim.LBFGS):
            raise IntegrationError("LBFGS evaluates its closure many times per step; measure it with "
                                   "gammatrace.Probe in your own loop (probe.batch(batch), then step(closure))")
        if self._pending is not None and self.probe is None:
            # Lightning has configured the optimizers itself (with estimated_stepping_batches
            # known): the probe is made on what the fit steps, before its first step.
            self.probe = self._pending.attach(optimizer)
        if self.probe is not None and (self.probe.optimizer is not optimizer
                                       or getattr(self.probe.model, COMPILED_PREFIX, None) is not pl_module):
            raise IntegrationError("the probe given to GammaTrace measures another module or optimizer than this fit "
                                   "(make it on probe_model(module) and the optimizer configure_optimizers returns)")
        sinks = list(self.sinks)
        if self.log_every:
            # float64 tensors: a Python float would be logged as float32
            sinks.append(lambda step, values: pl_module.log_dict(
                {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}, on_step=True,
                on_epoch=False, batch_size=1))
        probe = self._open(probe_model(pl_module), optimizer, loss_function(self.loss_fn), sinks)
        self._install(pl_module, optimizer, probe.model)

    def _install(self, pl_module: Any, optimizer: torch.optim.Optimizer, steps: nn.Module) -> None:
        """Wrap ``training_step`` (the true loss, every micro-batch) and ``optimizer.step``
        (a closure evaluated before the step); the end of training restores both."""
        probe = self.probe
        world = self._world

        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = steps(args, kwargs)
            loss = training_loss(out)
            if loss is not None:
                loss = loss.detach()
                probe.batch((args, kwargs), D.global_mean(loss) if world > 1 else loss)
            return out

        self._patch(pl_module, "training_step", training_step)
        original = optimizer.step  # the bound method: torch's hooks (the probe's) run inside it

        def step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
            if closure is None:
                return original(**kwargs)
            # The optimizer would evaluate the closure first thing, before moving θ; so do we,
            # and the step then uses the gradient it left (clipped, unscaled) as it would have.
            with torch.enable_grad():
                loss = closure()
            original(**kwargs)
            return loss

        self._patch(optimizer, "step", step)

    # ---------------------------------------------------------------- hooks
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._end_step()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._end_epoch()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._end_training()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._abort()


def probe_model(module: nn.Module) -> nn.Module:
    """The module as the probe sees it: calling it runs ``training_step`` (see :class:`_Steps`)."""
    return _Steps(module)


def loss_function(loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
                  ) -> Callable[[nn.Module, Any], torch.Tensor]:
    """The probe's ``loss_fn`` over :func:`probe_model`: ``loss_fn(module, batch)`` on the module
    and the training step's batch, or the module's own ``training_step``; under DDP its value
    is the mean over ranks."""
    if loss_fn is None:
        fn = _default_loss_fn
    else:
        def fn(steps: nn.Module, item: tuple) -> torch.Tensor:
            return loss_fn(getattr(steps, COMPILED_PREFIX), item[0][0])
    return D.global_loss_fn(fn) if D.world_size() > 1 else fn


def fit(build: Callable[[], tuple[Any, Any, Mapping[str, Any]]], *, seed: int, threads: int | None = None,
        out: str | Path | None = None, loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        log_every: int = 0, reference: Any = None, check: bool | int = True, per_tensor: bool = True,
        kernel: str | None = None) -> TwoPassResult:
    """Two verified passes of ``Trainer.fit`` (:class:`gammatrace.TwoPass`): record, then measure
    against θ_T (or ``reference``); returns the result and writes the run folder ``out``.

    ``build()`` returns ``(trainer, module, fit_kwargs)``: a fresh Trainer, a fresh
    LightningModule and the keyword arguments of ``trainer.fit`` (dataloaders or a
    datamodule). TwoPass calls it once per pass after seeding torch, NumPy and ``random``
    with ``seed`` and setting ``threads`` torch threads and deterministic algorithms, so both
    passes train the same trajectory; then it compares them step by step (loss, update,
    gradient norm, learning rate, the batch, the random state) and θ_T, bit for bit, and
    names the first difference and its likely cause.

    Lightning configures the optimizers itself, as in a plain fit (``configure_optimizers``
    sees the same ``trainer.estimated_stepping_batches``, so a schedule written with it is the
    same); the probe is made on the optimizer when training starts, before its first step.
    ``out`` is checked before pass 1: a folder that holds a run is refused before any training.
    """
    _require()
    if out is not None and D.is_writer():
        check_run_folder(out)

    def build_for_two_pass() -> tuple:
        trainer, module, fit_kwargs = build()
        return probe_model(module), None, trainer, module, dict(fit_kwargs)

    def train(steps: nn.Module, _optimizer: None, pending: PendingProbe, trainer: Any, module: Any,
              fit_kwargs: dict) -> None:
        trainer.callbacks.append(GammaTrace(probe=pending, log_every=log_every))
        trainer.fit(module, **fit_kwargs)

    result = TwoPass(build_for_two_pass, train, loss_fn=loss_function(loss_fn), seed=seed,
                     threads=threads or torch.get_num_threads(),
                     reference=reference, check=check, per_tensor=per_tensor, kernel=kernel).run()
    if out is not None and D.is_writer():
        save_run(result, out)
    return result
