"""Hugging Face ``Trainer``: the smallest correct hook, and a verified two-pass ``train``.

Install with ``pip install 'gammatrace[hf]'``. A ``TrainerCallback`` alone sees neither
the batch nor the loss, so the hook has two parts, both in :class:`GammaTrace`:

* a ``TrainerCallback`` that creates the probe on the optimizer when training begins
  (the torch optimizer inside accelerate's wrapper: its step hooks see the step after
  ``max_grad_norm`` clipping and, under fp16, after unscaling; a GradScaler-skipped step is
  recorded as skipped), closes each epoch, and writes the run folder;
* a wrapper around the Trainer's ``compute_loss`` (:meth:`GammaTrace.attach`, which works
  for any Trainer subclass) that tells the probe every micro-batch, between the forward and
  the step, with the micro-batch's own loss. The end of training restores ``compute_loss``;
  so does the handle ``attach`` returns (``.detach()``, or leaving its ``with`` block), which
  also removes the callback.

Which loss is ℓ_k: the one whose gradient the step follows, Σ_i c_i loss_i over the step's
micro-batches i, as the Trainer (transformers 5) forms it. When the model accepts loss
kwargs (``model_accepts_loss_kwargs``: its ``forward`` takes ``**kwargs``) and the batch has
labels, the Trainer passes ``num_items_in_batch`` (the target count of the whole step) to
the model and does not divide (c_i = 1); otherwise — or when ``loss_is_scaled_for_ga`` is
False — it divides each micro-batch's loss by ``current_gradient_accumulation_steps`` M
(c_i = 1/M; the last step of an epoch may have fewer micro-batches). Whether a model *uses*
``num_items_in_batch`` cannot be read from its signature (BERT's classifiers take
``**kwargs`` and ignore it), so the hook measures it at the first training micro-batch:
the model's loss with ``num_items_in_batch`` = N and = 2N, in eval mode without gradient
(no dropout, no random draw, no statistics updated), halves iff it is used. Then:

* used (a causal or masked LM): loss_i = (summed token loss of i) / N, so ℓ_k is the
  token-weighted mean over the step: the hook hands the probe each micro-batch's per-token
  losses (from the training forward's logits; the probe weights micro-batches by their
  token counts), after checking at the first micro-batch that they sum to the model's loss
  (else it refuses, in one line). For a model whose ``loss_type`` is unset (GPT-2 in
  transformers 5), the Trainer counts the *unshifted* labels, so its objective is that mean
  times a constant (the hook warns once, with the factor); set ``model.loss_type =
  "ForCausalLM"`` and the two agree.
* not used: loss_i is the model's own mean loss of micro-batch i, and ℓ_k = Σ_i c_i loss_i —
  e.g. with accumulation 2 and a model that ignores ``num_items_in_batch``, the *sum* of the
  two micro-batch means, as the Trainer differentiates it. The hook hands the probe M c_i loss_i
  with equal weights (two equal values per micro-batch, whatever its size), so the probe's
  mean over the step is Σ_i c_i loss_i.

Every value is handed over in float64 (per-token losses are computed in float32, as
transformers does, and averaged in float64). ℓ(θ*; B_k) is evaluated the same way on θ*,
under the training forward's generator and autocast state (dropout masks match).

Example (a 2-layer GPT-2 built from a config — nothing is downloaded — trained twice:
pass 1 records, pass 2 measures against θ_T and checks every step's loss):
    >>> import os, tempfile, torch
    >>> os.environ["HF_HUB_OFFLINE"] = "1"
    >>> from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    >>> tokens = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))
    >>> data = [{"input_ids": t, "labels": t} for t in tokens]
    >>> config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8, bos_token_id=0,
    ...                     eos_token_id=0)
    >>> def build():
    ...     model = GPT2LMHeadModel(config)
    ...     model.loss_type = "ForCausalLM"  # so the Trainer counts the shifted targets (see above)
    ...     args = TrainingArguments(tempfile.mkdtemp(), per_device_train_batch_size=4, num_train_epochs=2,
    ...                              learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
    ...                              logging_strategy="no", disable_tqdm=True, log_level="error")
    ...     trainer = Trainer(model=model, args=args, train_dataset=data)
    ...     trainer.remove_callback(transformers.PrinterCallback)  # it prints the final metrics
    ...     return trainer
    >>> result = train(build, seed=0, out=tempfile.mkdtemp() + "/gpt2")
    >>> len(result.steps()), result.reference_name
    (8, 'last')
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gammatrace.engine.twopass import TwoPass, TwoPassResult, check_run_folder, save_run
from gammatrace.errors import IntegrationError
from gammatrace.integrations import ranks as D
from gammatrace.integrations.core import TraceCore
from gammatrace.integrations.loggers import Sink
from gammatrace.probe import Probe

try:  # the optional extra gammatrace[hf]: this module needs it, gammatrace does not
    import transformers
    from transformers import TrainerCallback as _Callback
except ImportError:  # pragma: no cover - only without the extra
    transformers = None
    _Callback = object

IGNORE_INDEX = -100  # the label of a position without a target (padding), as in transformers
_FACTOR = "_gammatrace_loss_factor"  # M c_i, carried in the batch the probe is told (see the module)


def _require() -> None:
    if transformers is None:
        raise IntegrationError("gammatrace.integrations.hf needs transformers and accelerate: "
                               "pip install 'gammatrace[hf]'")


def token_losses(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool) -> torch.Tensor:
    """The per-token cross-entropy of the targeted positions, computed in float32 (as
    transformers upcasts) and returned in float64, so that their mean is taken in float64:
    for a causal LM (``shift``) position i predicts label i+1.

    Example:
        >>> logits = torch.zeros(1, 3, 4)       # uniform over 4 tokens
        >>> token_losses(logits, torch.tensor([[1, 2, -100]]), shift=True)   # one target: label 2
        tensor([1.3863], dtype=torch.float64)
    """
    logits = logits.float()
    if shift:
        labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    labels = labels.reshape(-1).to(logits.device)
    losses = nn.functional.cross_entropy(logits.reshape(labels.numel(), -1), labels, reduction="none",
                                         ignore_index=IGNORE_INDEX)
    return losses[labels != IGNORE_INDEX].to(torch.float64)


def _model_loss(outputs: Any) -> torch.Tensor:
    return outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]


def uses_num_items(model: nn.Module, inputs: Mapping[str, Any], num_items: Any) -> bool:
    """Whether the model's loss depends on ``num_items_in_batch`` (a signature cannot say):
    its loss on ``inputs`` with N and with 2N, in eval mode and without gradient — no dropout,
    no batch-norm statistics updated, the random generators left as they were.

    Example:
        >>> class Mean(nn.Module):
        ...     def forward(self, x, labels, **kwargs):  # accepts num_items_in_batch, ignores it
        ...         return {"loss": (x - labels).pow(2).mean()}
        >>> class Summed(nn.Module):
        ...     def forward(self, x, labels, num_items_in_batch=None, **kwargs):
        ...         return {"loss": (x - labels).pow(2).sum() / num_items_in_batch}
        >>> batch = {"x": torch.ones(3), "labels": torch.zeros(3)}
        >>> uses_num_items(Mean(), batch, 6), uses_num_items(Summed(), batch, 6)
        (False, True)
    """
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    n = num_items if not torch.is_tensor(num_items) else num_items.detach()
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            at_n = float(_model_loss(model(**inputs, num_items_in_batch=n)))
            at_2n = float(_model_loss(model(**inputs, num_items_in_batch=n * 2)))
    finally:
        for module, training in modes:
            module.training = training
    return abs(at_n - at_2n) > 1e-3 * max(abs(at_n), abs(at_2n))


def _shifts_labels(model: nn.Module) -> bool:
    """Whether the model computes the causal-LM loss (targets shifted by one)."""
    from transformers.loss.loss_utils import ForCausalLMLoss  # the extra's own loss function

    config = getattr(model, "config", None)
    return (getattr(model, "loss_function", None) is ForCausalLMLoss
            and not getattr(config, "is_encoder_decoder", False))


class Attached:
    """What :meth:`GammaTrace.attach` returns: :meth:`detach` (also on leaving a ``with``
    block) restores the Trainer's ``compute_loss`` and removes the callback."""

    def __init__(self, callback: GammaTrace, trainer: Any):
        self.callback, self.trainer = callback, trainer

    def detach(self) -> None:
        self.callback._restore()
        if self.callback in self.trainer.callback_handler.callbacks:
            self.trainer.remove_callback(self.callback)

    def __enter__(self) -> Attached:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


class GammaTrace(TraceCore, _Callback):
    """Measure ``Trainer.train`` with a :class:`gammatrace.Probe` (see the module docstring):
    the Trainer's events translated to the shared :class:`~gammatrace.integrations.core.TraceCore`.

    Use ``GammaTrace(...).attach(trainer)`` before ``trainer.train()`` (or ``with
    GammaTrace(...).attach(trainer): trainer.train()``).

    Args:
        reference: θ* (a state dict or file, e.g. the θ_T of an earlier run) for reference
            mode, or ``None`` to record (pass 1). :func:`train` runs both passes for you.
        out: write the measured run folder here when training ends (:func:`gammatrace.save_run`;
            rank 0 only).
        log_every: log every this many optimizer steps to ``sinks`` (:mod:`.loggers`).
        check, per_tensor, kernel: as for :class:`gammatrace.Probe`.
        probe: a probe made elsewhere (by :func:`train`'s :class:`gammatrace.TwoPass`) on the
            model and the torch optimizer the Trainer will step; its ``loss_fn`` must be
            this callback's :meth:`loss_fn`.
    """

    def __init__(self, reference: Any = None, *, out: str | Path | None = None, log_every: int = 1,
                 sinks: Iterable[Sink] = (), check: bool | int = True, per_tensor: bool = True,
                 kernel: str | None = None, probe: Probe | None = None):
        _require()
        super().__init__(reference, out=out, log_every=log_every, sinks=sinks, check=check, per_tensor=per_tensor,
                         kernel=kernel, probe=probe)
        self._per_token: bool | None = None  # decided by the first training micro-batch (see the module)
        self._shift = False
        self._trainer: Any = None
        self._tokens, self._items, self._count_checked = 0, None, False

    def attach(self, trainer: Any) -> Attached:
        """Add the callback to ``trainer`` and wrap its ``compute_loss`` until training ends;
        returns a handle whose ``detach()`` undoes both (a context manager too)."""
        if self._trainer is not None:
            raise IntegrationError("this GammaTrace is attached to a Trainer already; make one per Trainer")
        self._trainer = trainer
        trainer.add_callback(self)
        original = trainer.compute_loss  # bound: a subclass's own compute_loss is kept

        def compute_loss(model: nn.Module, inputs: Mapping[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            batch = dict(inputs)  # before the Trainer pops the labels (label smoothing, custom losses)
            loss, outputs = original(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            if model.training and torch.is_grad_enabled() and self.probe is not None:
                self._tell(model, batch, outputs, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

        self._patch(trainer, "compute_loss", compute_loss)
        return Attached(self, trainer)

    # ---------------------------------------------------------------- the loss
    def _value(self, outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        """What the probe is told for one forward, in float64: per-token losses (times c_i
        where that is not 1), or M c_i times the model's loss as two equal values (one weight
        per micro-batch, whatever its size)."""
        factor = float(batch.get(_FACTOR, 1.0))
        if self._per_token:
            logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
            value = token_losses(logits.detach(), batch["labels"], shift=self._shift)
        else:
            value = _model_loss(outputs).detach().to(torch.float64)
        if factor != 1.0:
            value = value * factor
        if self._world > 1:
            value = D.global_mean(value)
        return value if self._per_token else value.reshape(1).expand(2)

    def loss_fn(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """ℓ(θ; B) as the hook tells it for a training forward (the probe's ``loss_fn``)."""
        inputs = dict(batch)
        inputs.pop(_FACTOR, None)
        if self._per_token:
            inputs.pop("labels", None)  # the logits are all it needs
        return self._value(model(**inputs), batch)

    def _decide(self, model: nn.Module, batch: dict, outputs: Any, num_items: Any) -> None:
        """At the first training micro-batch: does the Trainer pass ``num_items_in_batch`` to
        the model, and does the model use it (measured)? Per-token losses iff both."""
        trainer = self._trainer
        passed = bool(getattr(trainer, "model_accepts_loss_kwargs", False)) and num_items is not None
        self._per_token = passed and "labels" in batch and uses_num_items(model, batch, num_items)
        if not self._per_token:
            return
        self._shift = _shifts_labels(self.probe.model)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
        loss = float(_model_loss(outputs).detach())
        summed = (float(token_losses(logits.detach(), batch["labels"], shift=self._shift).sum()) / float(num_items)
                  if logits is not None else float("nan"))
        if not abs(summed - loss) <= 1e-4 * max(abs(loss), 1e-12):
            raise IntegrationError(
                f"{type(self.probe.model).__name__} divides its loss by num_items_in_batch, but not as the token "
                f"cross-entropy of its logits (its loss {loss:.6g}, the tokens' {summed:.6g}), so the hook cannot "
                "re-evaluate what the Trainer differentiates; measure it with gammatrace.Probe in your own loop")

    def _factor(self, num_items: Any) -> float:
        """M c_i of this micro-batch: what the Trainer divides it by, relative to 1/M."""
        trainer = self._trainer
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = bool(getattr(trainer, "model_accepts_loss_kwargs", False)) and num_items is not None
        steps = int(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1)
        if self._per_token:  # token-weighted mean already; the Trainer divides it by M again if unscaled
            return 1.0 if scaled else 1.0 / steps
        return float(steps) if scaled else 1.0

    def _tell(self, model: nn.Module, batch: dict, outputs: Any, num_items: Any) -> None:
        if self._per_token is None:
            self._decide(model, batch, outputs, num_items)
        factor = self._factor(num_items)
        if factor != 1.0:
            batch[_FACTOR] = factor
        value = self._value(outputs, batch)
        if self._per_token:
            self._tokens += value.numel()
            self._items = num_items
        self.probe.batch(batch, value)

    # ---------------------------------------------------------------- callback events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if self._trainer is None:
            raise IntegrationError("GammaTrace was added as a callback but not attached: use "
                                   "GammaTrace(...).attach(trainer), which also hooks compute_loss")
        if self._trainer.compute_loss_func is not None or self._trainer.label_smoother is not None:
            raise IntegrationError("the Trainer computes its own loss (compute_loss_func or label smoothing): "
                                   "the hook evaluates ℓ(θ*; B_k) with the model's loss only; measure this "
                                   "training with gammatrace.Probe and your loss function in your own loop")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        if self.probe is not None and self.probe.optimizer is not optimizer:
            raise IntegrationError("the probe given to GammaTrace measures another optimizer than the Trainer "
                                   "steps (create it with trainer.create_optimizer() before train())")
        self._open(model, optimizer, self.loss_fn)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._per_token and not self._count_checked and self._items is not None and self._world == 1:
            self._count_checked = True
            items = int(self._items)
            if items != self._tokens:
                warnings.warn(
                    f"the Trainer divides the step's summed token loss by {items} target tokens, but the "
                    f"step has {self._tokens} (transformers counts unshifted labels when the model's "
                    "loss_type is unset): ℓ_k is the mean token loss, and the Trainer's objective is that "
                    f"times {self._tokens / items:.4g}; set model.loss_type = 'ForCausalLM'",
                    RuntimeWarning, stacklevel=2)
        self._tokens, self._items = 0, None
        self._end_step()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end_epoch()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end_training()


def train(build: Callable[[], Any], *, seed: int, threads: int | None = None, out: str | Path | None = None,
          reference: Any = None, log_every: int = 1, sinks: Iterable[Sink] = (), check: bool | int = True,
          per_tensor: bool = True, kernel: str | None = None) -> TwoPassResult:
    """Two verified passes of ``Trainer.train`` (:class:`gammatrace.TwoPass`): record, then measure
    against θ_T (or ``reference``); returns the result and writes the run folder ``out``.

    ``build()`` returns a fresh ``Trainer`` (model, arguments, data). TwoPass calls it once per
    pass after seeding torch, NumPy and ``random`` with ``seed`` and setting ``threads`` torch
    threads and deterministic algorithms, so both passes train the same trajectory; it
    compares them step by step (loss, update, gradient norm, learning rate, the batch, the
    random state) and θ_T, bit for bit. The optimizer is created in ``build``'s place
    (``trainer.create_optimizer()``) so the probe can be made on it; ``train()`` then uses it.
    ``sinks`` get pass 2's quantities every ``log_every`` steps. ``out`` is checked before
    pass 1: a folder that holds a run is refused before any training.
    """
    _require()
    if out is not None and D.is_writer():
        check_run_folder(out)
    callbacks: list[GammaTrace] = []

    def build_for_two_pass() -> tuple:
        trainer = build()
        callback = GammaTrace(log_every=log_every, sinks=sinks if callbacks else ())
        callbacks.append(callback)
        return trainer.model, trainer.create_optimizer(), trainer, callback

    def run(model: nn.Module, optimizer: Any, probe: Probe, trainer: Any, callback: GammaTrace) -> None:
        callback.probe, callback._given = probe, True
        with callback.attach(trainer):
            trainer.train()

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        return callbacks[-1].loss_fn(model, batch)  # this pass's callback decides what ℓ is

    result = TwoPass(build_for_two_pass, run, loss_fn=loss_fn, seed=seed, threads=threads or torch.get_num_threads(),
                     reference=reference, check=check, per_tensor=per_tensor, kernel=kernel).run()
    if out is not None and D.is_writer():
        save_run(result, out)
    return result
