"""What pass 1 (training) and pass 2 (replay) share: the objects built from a config and
the code of one epoch. Both passes run *this* code, so the replayed trajectory is the
recorded one bit for bit (DESIGN.md §2), not a re-implementation of it."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy
import pandas as pd
import torch
from torch import nn

from gammatrace._version import __version__
from gammatrace.config import RunConfig
from gammatrace.data import AUGMENTATIONS, Dataset, load_dataset
from gammatrace.data.loader import epoch_batches, seed_epoch_rng, stream_seed
from gammatrace.errors import ConfigError, UserError
from gammatrace.machine import fingerprint
from gammatrace.models import build
from gammatrace.models.init import apply_init, load_init
from gammatrace.probe import Probe
from gammatrace.store.backend import Location, ObjectFiles, location
from gammatrace.techniques import make_optimizer, make_schedule, per_sample_loss

_INIT_STREAM = 0x1417


class DivergedError(UserError, RuntimeError):
    """The training loss became NaN or infinite (a lower learning rate, another technique, ...).
    The trainer records it as the run's outcome; raised alone, it is one line."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"training diverged at step {step}: loss {loss}")
        self.step, self.loss = step, loss


def configure_determinism(cfg: RunConfig) -> None:
    """Deterministic kernels and the recorded thread count (DESIGN.md §2).

    A different intra-op thread count changes reduction order and so the trajectory;
    the count is part of the run's identity and is set, never inherited.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.set_num_threads(cfg.threads)
    if torch.get_num_threads() != cfg.threads:
        raise RuntimeError(f"could not set {cfg.threads} torch threads (got {torch.get_num_threads()})")


class StepHook(Protocol):
    """An extra measurement at every step of an epoch, made at θ_k: after the backward
    pass, before the probe and the optimizer step (so the model holds θ_k and ``.grad``
    holds g_k). It returns columns for the step's row; the engine adds ``step`` and
    ``epoch``. Values may be device tensors: they are read to the host once per epoch.

    A hook must leave the trajectory alone: no change to parameters, ``.grad`` or buffers
    (the engine forks the RNG around it). Replay checks this: a hook that moved the
    trajectory fails pass 2's verification. Example: :class:`~gammatrace.engine.hooks.OnePointConvexity`.
    """

    name: str  # its table's folder: analysis/<reference>/<name>/ (an identifier)

    # Optional: ``due(step) -> bool``, asked before each step; a hook that has it measures (and
    # gets a row) only at the steps it answers True for (the curvature every N steps).

    def __call__(self, batch: Any) -> Mapping[str, float | bool | str | torch.Tensor]: ...


class StepHookFactory(Protocol):
    """Builds a replay segment's hook from the segment's session and θ* (a picklable
    callable, so segments can run in worker processes; a :class:`StepHook` class whose
    constructor takes ``(session, reference)`` is one). ``name`` is the hook's name."""

    name: str

    def __call__(self, session: Session, reference: Mapping[str, torch.Tensor]) -> StepHook: ...


def provenance(cfg: RunConfig) -> dict[str, Any]:
    """Versions, device, threads and commit: what a trajectory depends on besides the config."""
    commit = None
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    device = cfg.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "gammatrace": __version__, "commit": commit, "torch": torch.__version__,
        "numpy": numpy.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cuda": torch.version.cuda, "device": device, "threads": cfg.threads,
        # What the trajectory's bits belong to (gammatrace.machine): a resume or replay on
        # another kind is refused or explained by it.
        "machine": fingerprint(cfg.device, cfg.threads),
    }


@dataclass
class Session:
    cfg: RunConfig
    data: Dataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    x: torch.Tensor
    y: torch.Tensor
    schedule: Callable[[int], float]
    steps_per_epoch: int
    augment: Callable[..., torch.Tensor] | None = None  # (x, indices, seed, epoch) -> x
    _test: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def loss_fn(self) -> Callable[[nn.Module, Any], torch.Tensor]:
        """Per-sample losses of a model on a batch (x, y); the probe's ``loss_fn``."""
        per_sample = per_sample_loss(self.cfg.loss)
        return lambda model, batch: per_sample(model(batch[0]), batch[1])

    def batches(self, epoch: int) -> list[torch.Tensor]:
        return epoch_batches(self.data.n_train, self.cfg.batch_size, self.cfg.seed, epoch, self.cfg.drop_last)

    def state(self, epoch: int) -> dict[str, Any]:
        """A checkpoint: everything needed to continue at the start of ``epoch``."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": epoch, "step": epoch * self.steps_per_epoch}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def run_epoch(self, epoch: int, probe: Probe, check_finite: bool,
                  hooks: Sequence[StepHook] = ()) -> dict[str, pd.DataFrame]:
        """One epoch of training, measured by ``probe``. Raises DivergedError on a NaN loss.

        ``hooks`` measure at every θ_k too (:class:`StepHook`); returns their rows, one
        table per hook name (an empty dict without hooks).
        """
        cfg, model, opt = self.cfg, self.model, self.optimizer
        seed_epoch_rng(cfg.seed, epoch)
        # The counters are functions of the epoch, whichever way the process got here.
        probe.epoch, probe.step_index = epoch, epoch * self.steps_per_epoch
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        loss_fn = self.loss_fn
        rows: dict[str, list[tuple[int, Mapping[str, Any]]]] = {h.name: [] for h in hooks}
        rng_devices = [self.device] if self.device.type == "cuda" else []
        for i, idx in enumerate(self.batches(epoch)):
            k = epoch * self.steps_per_epoch + i
            lr = cfg.optim.lr * self.schedule(k)
            for group in opt.param_groups:
                group["lr"] = lr
            idx_dev = idx.to(self.device)
            x = self.x[idx_dev]
            if self.augment is not None:
                x = self.augment(x, idx, cfg.seed, epoch)
            batch = (x, self.y[idx_dev])
            opt.zero_grad(set_to_none=True)
            per = loss_fn(model, batch)
            loss = per.mean()
            loss.backward()
            if cfg.optim.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad_norm)
            due = [h for h in hooks if not hasattr(h, "due") or h.due(k)]
            if due:
                # A forked RNG: a hook's own draws (dropout in an extra forward) must not
                # shift the stream the step itself uses.
                with torch.random.fork_rng(devices=rng_devices):
                    for hook in due:
                        rows[hook.name].append((k, hook(batch)))
            probe.step(loss, batch, indices=idx, sample_losses=per)
            # On the CPU .item() costs nothing; on accelerators the epoch-end check
            # of the flushed rows catches divergence without a sync every step.
            if check_finite and not torch.isfinite(loss).item():
                raise DivergedError(k, loss.item())
        return {name: _hook_table(part, epoch) for name, part in rows.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Full-dataset loss/accuracy in eval mode (the trajectory is not touched)."""
        self.model.eval()
        per_sample = per_sample_loss(self.cfg.loss)
        out: dict[str, float] = {}
        if self._test is None:  # moved to the device once, not every epoch
            self._test = (self.data.x_test.to(self.device), self.data.y_test.to(self.device))
        splits = {"train": (self.x, self.y), "test": self._test}
        for split, (x, y) in splits.items():
            total, correct, n = 0.0, 0, len(x)
            for s in range(0, n, self.cfg.eval_batch_size):
                xb, yb = x[s:s + self.cfg.eval_batch_size], y[s:s + self.cfg.eval_batch_size]
                o = self.model(xb)
                total += per_sample(o, yb).double().sum().item()
                if self.data.task == "classification":
                    correct += int((o.argmax(1) == yb).sum())
            out[f"{split}_loss"] = total / max(n, 1)
            if self.data.task == "classification":
                out[f"{split}_acc"] = correct / max(n, 1)
        self.model.train()
        return out


def _load_init(model: nn.Module, path: Path | Location):
    """:func:`load_init` from a local file or an object (a study's initial point on object
    storage: read by every worker from there, no shared file system needed)."""
    if not isinstance(path, Location):
        return load_init(model, path)
    with tempfile.TemporaryDirectory(prefix="gammatrace-init-") as tmp:
        local = Path(tmp) / path.name
        local.write_bytes(ObjectFiles(path.parent).read_bytes(path.name))
        return load_init(model, local)


def _hook_table(rows: list[tuple[int, Mapping[str, Any]]], epoch: int) -> pd.DataFrame:
    # One host read per value, at the end of the epoch rather than at every step. Numbers
    # are float64; a column of bools or of strings (a label such as a mode) keeps its type.
    columns = list(rows[0][1]) if rows else []

    def column(c: str) -> numpy.ndarray:
        values = [r[c] for _, r in rows]
        if all(isinstance(v, bool | numpy.bool_) for v in values):
            return numpy.array(values, dtype=bool)
        if all(isinstance(v, str) for v in values):
            return numpy.array(values, dtype=object)
        return numpy.array([float(v) for v in values], dtype=numpy.float64)

    return pd.DataFrame({"step": numpy.array([k for k, _ in rows], dtype=numpy.int64),
                         "epoch": numpy.full(len(rows), epoch, dtype=numpy.int64),
                         **{c: column(c) for c in columns}})


def _as_dtype(data: Dataset, dtype: torch.dtype) -> Dataset:
    """The dataset with its floating tensors in ``dtype`` (the same object when they are)."""
    fields = ("x_train", "y_train", "x_test", "y_test")
    cast = {f: getattr(data, f).to(dtype) for f in fields
            if getattr(data, f).is_floating_point() and getattr(data, f).dtype != dtype}
    return dataclasses.replace(data, **cast) if cast else data


DTYPES = {"float32": torch.float32, "float64": torch.float64}


# Losses that need class labels as targets: a regression (task: reconstruct, the teachers)
# would fail inside the first step with a shape or dtype error.
_LABEL_LOSSES = frozenset({"cross_entropy"})


def _check_fits(cfg: RunConfig, data: Dataset, model: torch.nn.Module) -> None:
    """Refuse, before anything is written, a loss that needs labels on a regression and a
    model whose output does not have the targets' shape (an MLP on task: reconstruct)."""
    if data.task == "regression" and cfg.loss in _LABEL_LOSSES:
        raise UserError(f"loss '{cfg.loss}' needs class labels, and {cfg.data.name}"
                        + (" with task: reconstruct" if cfg.data.switches().get("task") == "reconstruct" else "")
                        + " is a regression: use loss: mse")
    if data.task != "regression":
        return
    was = model.training
    # Eval mode and no autograd: batch-norm statistics, the RNG and the parameters stay as they are.
    with torch.no_grad():
        out = model.eval()(data.x_train[:2])
    model.train(was)
    if tuple(out.shape[1:]) != tuple(data.y_train.shape[1:]):
        raise UserError(f"model {cfg.model.name} outputs {tuple(out.shape[1:])} per sample, but {cfg.data.name}'s "
                        f"targets are {tuple(data.y_train.shape[1:])}"
                        + (" (task: reconstruct wants an image-to-image model such as unet)"
                           if data.y_train.dim() > 2 else ""))


def build_session(cfg: RunConfig, data: Dataset | None = None) -> Session:
    """Data, model (seeded initialization), optimizer and schedule for a config.

    Model and data are in ``cfg.dtype``; integer targets (class labels) stay integers.

    Example:
        >>> cfg = RunConfig.model_validate({"dtype": "float64", "batch_size": 32,
        ...                                 "data": {"name": "digits", "n_train": 64, "n_test": 32},
        ...                                 "model": {"name": "mlp", "width": 8, "depth": 1}})
        >>> sess = build_session(cfg)
        >>> next(sess.model.parameters()).dtype, sess.x.dtype, sess.y.dtype, sess.steps_per_epoch
        (torch.float64, torch.float64, torch.int64, 2)
    """
    configure_determinism(cfg)
    if data is None:
        data = load_dataset(cfg.data.name, n_train=cfg.data.n_train, n_test=cfg.data.n_test,
                            classes=cfg.data.classes, **cfg.data.switches())
    dtype = DTYPES[cfg.dtype]
    data = _as_dtype(data, dtype)
    augment = AUGMENTATIONS.get(cfg.data.augment)()
    if augment.active and data.y_train.dim() > 2:
        # An augmentation moves the inputs only: image targets (task: reconstruct,
        # synthetic_denoise) would no longer match them.
        raise UserError(f"data.augment '{cfg.data.augment}' moves the inputs only, and {cfg.data.name}'s targets "
                        "are images (task: reconstruct?); use augment: none")
    device = torch.device(cfg.device)
    torch.manual_seed(stream_seed(cfg.seed, 0, _INIT_STREAM))
    model = build(cfg.model.name, input_shape=data.input_shape, num_classes=data.num_classes, **cfg.model.switches())
    # Cast before any data-dependent initialization (LSUV) runs on the data in this dtype;
    # the random draws above are the same in every dtype.
    model.to(dtype=dtype)
    if cfg.model.init != "default":
        apply_init(model, cfg.model.init, x=data.x_train[: cfg.batch_size])
    if cfg.model.init_from is not None:
        # The papers compare techniques from one saved initial point where shapes allow.
        path = location(cfg.model.init_from)
        exists = ObjectFiles(path.parent).is_file(path.name) if isinstance(path, Location) else path.is_file()
        if not exists:
            raise UserError(f"initial point {path} (model.init_from) does not exist")
        try:
            loaded = _load_init(model, path).loaded
        except Exception as exc:  # torch raises several types for damaged or unsafe files
            raise UserError(f"initial point {path} (model.init_from) cannot be read as a tensor file "
                            f"({exc.__class__.__name__}); save it with gammatrace's save_init or torch.save of a "
                            "state dict") from None
        if not loaded:
            raise UserError(f"initial point {path} (model.init_from) shares no tensor of matching name and shape with the model")
    _check_fits(cfg, data, model)
    model.to(device)
    optimizer = make_optimizer((p for p in model.parameters() if p.requires_grad), cfg.optim.name,
                               **cfg.optim.optimizer_kwargs())
    n = data.n_train
    spe = n // cfg.batch_size if cfg.drop_last else -(-n // cfg.batch_size)
    if spe == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} with drop_last leaves no batch of {n} samples")
    schedule = make_schedule(cfg.schedule.name, spe, cfg.epochs * spe, warmup_epochs=cfg.schedule.warmup_epochs,
                             **cfg.schedule.options())
    return Session(cfg, data, model, optimizer, device, data.x_train.to(device), data.y_train.to(device), schedule,
                   spe, augment if augment.active else None)
