"""Pass 1: deterministic training with epoch checkpoints, resume, and the stop criterion.

The run directory's run.json is the commit point: an epoch counts as done only once
its step shard, sample shard, metrics (and the next checkpoint, when one is due) are on
disk *and* run.json says so. Checkpoints are written every ``checkpoint_every`` epochs
and at the horizon; a process killed anywhere resumes from the last checkpoint at or
before the last done epoch and, because data order and RNG are functions of (seed,
epoch), produces the same trajectory as an uninterrupted run.

Example:
    >>> import tempfile
    >>> cfg = {"name": "demo", "seed": 3, "epochs": 2, "batch_size": 32, "data": {"name": "digits", "n_train": 96, "n_test": 64}, "model": {"name": "mlp", "width": 8, "depth": 2}, "optim": {"name": "sgd", "lr": 0.2}}
    >>> out = tempfile.mkdtemp() + "/demo"
    >>> train_pass(cfg, out, progress=False, stop_after=1).meta.epochs_done   # as if killed after epoch 0
    1
    >>> train_pass(cfg, out, progress=False).meta.epochs_done                  # the same command resumes
    2
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from gammatrace.config import RunConfig
from gammatrace.engine.budget import free_bytes, plan_disk
from gammatrace.engine.session import DivergedError, build_session, provenance
from gammatrace.errors import UserError
from gammatrace.machine import OtherMachineError, cross_machine_advice, fingerprint
from gammatrace.probe import Probe
from gammatrace.store.run import Run, RunMeta, RunStore, Status, check_out_folder, params_sha256


class RunConflictError(UserError, RuntimeError):
    """The output directory holds a different run."""


def _coerce(config: RunConfig | dict | str | Path) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return RunConfig.model_validate(config)
    return RunConfig.from_yaml(config)


def _open(store: RunStore, cfg: RunConfig) -> RunMeta:
    """Create run.json, or check that an existing run has the same config (resume)."""
    wanted = cfg.model_dump(mode="json")
    if store.exists(RunStore.META):
        meta = store.read_meta()
        # Compared as typed configs, so a run.json of an older format resumes.
        stored = meta.run_config().model_dump(mode="json")
        if stored != wanted:
            raise RunConflictError(
                f"{store.root} holds a run with a different config ({_first_difference(stored, wanted)}); "
                "choose another --out or remove it"
            )
        if meta.status == Status.RUNNING and meta.machine is not None:
            # A resumed run must equal an uninterrupted one: its epochs cannot come from two kinds.
            advice = cross_machine_advice(meta.machine, fingerprint(cfg.device, cfg.threads), "resuming",
                                          "resume it")
            if advice:
                raise OtherMachineError(f"{store.root}: cannot resume: {advice}")
        return meta
    meta = RunMeta(config=wanted, provenance=provenance(cfg), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    store.write_meta(meta)
    return meta


def _first_difference(stored: Any, wanted: Any, where: str = "") -> str:
    """The first field where two config dicts differ, as 'field: there X, now Y'."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        for k in [*stored, *(k for k in wanted if k not in stored)]:
            if stored.get(k) != wanted.get(k):
                return _first_difference(stored.get(k), wanted.get(k), f"{where}.{k}" if where else k)
    return f"{where or 'config'}: {stored!r:.40} there, {wanted!r:.40} now"


def _progress(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit="epoch", disable=not enabled, leave=False)


def train_pass(config: RunConfig | dict | str | Path, out: str | Path, *, progress: bool = True,
               stop_after: int | None = None) -> Run:
    """Pass 1 only: train (or resume) and record. ``stop_after`` ends the process-local work
    after that many epochs, as a kill would (used by the resume tests)."""
    cfg = _coerce(config)
    cfg.check_names()
    store = RunStore(check_out_folder(out))
    cfg = _resolve_spacing(cfg, store)
    if store.exists(RunStore.META) and store.read_meta().status != Status.RUNNING:
        _open(store, cfg)  # still refuses a different config
        return Run(store.root)
    # Data and model are built before anything is written: a bad dataset path or
    # switch fails with the output folder untouched.
    sess = build_session(cfg)
    with store.lock():
        return _train_locked(store, cfg, sess, progress, stop_after)


def _resolve_spacing(cfg: RunConfig, store: RunStore) -> RunConfig:
    """``checkpoint_every: auto`` as a number: the run's own (resuming), or the densest
    spacing whose estimate fits the free space (see :mod:`gammatrace.engine.budget`)."""
    if cfg.checkpoint_every != "auto":
        return cfg
    if store.exists(RunStore.META):
        every = store.read_meta().run_config().checkpoint_every
    elif free_bytes(store.root) is None:
        every = 1  # object storage reports no free space: keep every epoch
    else:
        every = plan_disk({cfg.name: cfg}, store.root).runs[0].checkpoint_every
    return cfg.model_copy(update={"checkpoint_every": every})


def _resume_epoch(store: RunStore, done: int) -> int:
    """The epoch to resume from: ``done``, or the last earlier one whose checkpoint is
    still there (the advice for a damaged checkpoint is to remove it)."""
    e = done
    while e > 0 and not store.exists(store.checkpoint(e)):
        e -= 1
    return e


class _Epochs:
    """What every epoch of pass 1 does, whichever loop runs it: train it under the probe,
    write its tables, count it against ``stop_after``."""

    def __init__(self, store: RunStore, cfg: RunConfig, sess, probe: Probe, epochs: pd.DataFrame, bar: tqdm,
                 stop_after: int | None) -> None:
        self.store, self.cfg, self.sess, self.probe, self.epochs, self.bar = store, cfg, sess, probe, epochs, bar
        self.stop_after = stop_after
        self.ran = 0
        self.check_each_step = sess.device.type == "cpu"

    def train(self, e: int, phase: str) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame] | None:
        """Epoch ``e``'s metrics, steps and samples; None when this process ends before it
        (``stop_after`` epochs ran: it stops here as a kill would, the bar closed); raises
        :class:`DivergedError` at a non-finite loss."""
        if self.stop_after is not None and self.ran >= self.stop_after:
            self.bar.close()
            return None
        t0 = time.perf_counter()
        self.sess.run_epoch(e, self.probe, check_finite=self.check_each_step)
        steps, _, samples = self.probe.take()
        bad = np.flatnonzero(~np.isfinite(steps["loss"].to_numpy()))
        if len(bad):
            raise DivergedError(int(steps["step"].iloc[bad[0]]), float(steps["loss"].iloc[bad[0]]))
        metrics = {"epoch": e, **self.sess.evaluate(), "mean_batch_loss": float(steps["loss"].mean()),
                   "seconds": time.perf_counter() - t0, "phase": phase}
        return metrics, steps, samples

    def write(self, e: int, metrics: dict[str, Any], steps: pd.DataFrame, samples: pd.DataFrame,
              checkpoint: bool) -> None:
        """Epoch ``e``'s tables, and the checkpoint after it when one is due (every
        ``checkpoint_every`` epochs, or ``checkpoint``: the horizon always ends a replay segment)."""
        self.store.write_parquet(self.store.shard(RunStore.STEPS, e), steps)
        if len(samples):
            self.store.write_parquet(self.store.shard(RunStore.SAMPLES, e), samples)
        if (e + 1) % self.cfg.checkpoint_every == 0 or checkpoint:
            self.store.write_torch(self.store.checkpoint(e + 1), self.sess.state(e + 1))
        self.epochs = pd.concat([self.epochs, pd.DataFrame([metrics])], ignore_index=True)
        self.store.write_parquet(RunStore.EPOCHS, self.epochs)
        self.ran += 1

    def done(self, metrics: dict[str, Any], **updates: Any) -> None:
        """run.json commits the epoch (the commit point), then the bar moves."""
        self.store.update_meta(**updates)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")


def _train_horizon(run: _Epochs, start: int) -> int | None:
    """Epochs from ``start`` until the target loss is reached or ``cfg.epochs`` have run;
    the horizon (θ_T is final.pt), or None when this process stopped or the run diverged."""
    store, cfg, sess = run.store, run.cfg, run.sess
    for e in range(start, cfg.epochs):
        try:
            epoch = run.train(e, "main")
        except DivergedError as exc:
            _record_divergence(store, run.probe, e, exc)
            run.bar.close()
            return None
        if epoch is None:
            return None
        metrics, steps, samples = epoch
        reached = cfg.target_loss is not None and metrics["train_loss"] <= cfg.target_loss
        ends = reached or e + 1 == cfg.epochs
        run.write(e, metrics, steps, samples, checkpoint=ends)
        if not ends:
            run.done(metrics, epochs_done=e + 1)
            continue
        final = {"model": sess.model.state_dict()}
        store.write_torch(RunStore.FINAL, final)
        run.bar.total = e + 1 + cfg.reference.extra_epochs
        run.done(metrics, epochs_done=e + 1, horizon_epochs=e + 1, horizon_steps=(e + 1) * sess.steps_per_epoch,
                 reached_target=reached if cfg.target_loss is not None else None,
                 final_sha256=params_sha256(final["model"]))
        return e + 1
    raise AssertionError("unreachable: the horizon ends at cfg.epochs at the latest")


def _train_continuation(run: _Epochs, epochs: range) -> bool:
    """The ``extra_epochs`` past the horizon, whose end is the reference θ* (reference.pt);
    False when this process stopped. A divergence here keeps the horizon: it is noted and
    ends the continuation."""
    for e in epochs:
        try:
            epoch = run.train(e, "continuation")
        except DivergedError as exc:
            # The analysed horizon is intact: only the continuation reference is lost.
            run.store.update_meta(continuation_error=(
                f"the continuation beyond the horizon diverged at step {exc.step} (loss {exc.loss}); "
                "analyse against θ_T ('last'), or retrain with a smaller lr or fewer extra_epochs"))
            break
        if epoch is None:
            return False
        run.write(e, *epoch, checkpoint=False)
        run.done(epoch[0], epochs_done=e + 1)
    run.bar.close()
    return True


def _train_locked(store: RunStore, cfg: RunConfig, sess, progress: bool, stop_after: int | None) -> Run:
    meta = _open(store, cfg)
    if meta.status != Status.RUNNING:  # finished by another process while we waited
        return Run(store.root)
    if meta.n_params is None:
        meta = store.update_meta(n_params=sum(p.numel() for p in sess.model.parameters() if p.requires_grad))
    done = _resume_epoch(store, meta.epochs_done)
    if done < meta.epochs_done:
        rollback: dict[str, Any] = {"epochs_done": done}
        if meta.horizon_epochs is not None and meta.horizon_epochs > done:
            rollback.update(horizon_epochs=None, horizon_steps=None, reached_target=None, final_sha256=None)
        meta = store.update_meta(**rollback)
    advice = "remove it and rerun the same command to resume from the checkpoint before it"
    if done == 0:
        store.write_torch(store.checkpoint(0), sess.state(0))
    else:
        sess.load_state(store.read_torch(store.checkpoint(done), map_location=sess.device, advice=advice))
    origin = store.read_torch(store.checkpoint(0), map_location=sess.device)["model"]
    probe = Probe(sess.model, sess.optimizer, per_tensor=False, step=done * sess.steps_per_epoch,
                  epoch=done, origin=origin)
    epochs = store.read_parquet(RunStore.EPOCHS) if store.exists(RunStore.EPOCHS) and done else pd.DataFrame()
    epochs = epochs[epochs["epoch"] < done] if len(epochs) else epochs
    horizon = meta.horizon_epochs  # known when resuming past it
    extra = cfg.reference.extra_epochs
    bar = _progress((horizon if horizon is not None else cfg.epochs) + extra, done, cfg.name, progress)
    run = _Epochs(store, cfg, sess, probe, epochs, bar, stop_after)

    if horizon is None:
        horizon = _train_horizon(run, done)
        if horizon is None:  # stopped (as a kill would) or diverged
            return Run(store.root)
    if not _train_continuation(run, range(max(done, horizon), horizon + extra)):
        return Run(store.root)
    if extra and not store.read_meta().continuation_error:
        reference = {"model": sess.model.state_dict()}
        store.write_torch(RunStore.REFERENCE, reference)
        store.update_meta(reference_sha256=params_sha256(reference["model"]))
    store.update_meta(status=Status.TRAINED, steps_per_epoch=sess.steps_per_epoch,
                      displacement=_displacement(store))
    return Run(store.root)


def _displacement(store: RunStore) -> float:
    """‖θ_0 − θ_T‖ in float64, from the first checkpoint and final.pt."""
    a = store.read_torch(store.checkpoint(0))["model"]
    b = store.read_torch(RunStore.FINAL)["model"]
    total = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b if b[k].is_floating_point()
                and k in a and not k.endswith(("running_mean", "running_var")))
    return math.sqrt(total)


def _record_divergence(store: RunStore, probe: Probe, epoch: int, exc: DivergedError) -> None:
    """Keep every step up to and including the first non-finite one; mark the run diverged."""
    steps, _, samples = probe.take()
    steps = steps[steps["step"] <= exc.step]
    if len(steps):
        store.write_parquet(store.shard(RunStore.STEPS, epoch), steps)
    if len(samples):
        store.write_parquet(store.shard(RunStore.SAMPLES, epoch), samples[samples["step"] <= exc.step])
    store.update_meta(status=Status.DIVERGED, diverged_at_step=exc.step,
                      error=str(exc))
