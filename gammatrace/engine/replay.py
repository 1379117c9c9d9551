"""Pass 2: replay the recorded trajectory in reference mode, verified step by step.

Each epoch is a segment that starts from its checkpoint and replays independently, so
segments fan out over workers. Replay is verified, not assumed: every replayed step's
loss must equal the recorded one exactly, and the parameters at the end of the segment
must equal the next checkpoint exactly; otherwise :class:`ReplayMismatchError` names the
first diverging step.

Example:
    >>> import tempfile
    >>> from gammatrace.engine.trainer import train_pass
    >>> cfg = {"name": "demo", "seed": 3, "epochs": 2, "batch_size": 32, "data": {"name": "digits", "n_train": 96, "n_test": 64}, "model": {"name": "mlp", "width": 8, "depth": 2}, "optim": {"name": "sgd", "lr": 0.2}}
    >>> run = train_pass(cfg, tempfile.mkdtemp() + "/demo", progress=False)
    >>> reference_source(run, "last")[0], replay(run.path, "last", progress=False)
    ('last', 'last')
    >>> sorted(p.name for p in (run.path / "analysis" / "last" / "steps").iterdir())
    ['epoch_0000.parquet', 'epoch_0001.parquet']
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gammatrace.engine.session import StepHookFactory, build_session
from gammatrace.errors import UserError
from gammatrace.executors import make_executor
from gammatrace.probe import Probe, load_reference
from gammatrace.probe.probe import ReferenceError_
from gammatrace.store.run import Run, RunStore, StoreError, params_sha256


class ReplayMismatchError(UserError, RuntimeError):
    """The replayed trajectory differs from the recorded one."""


def reference_source(run: Run, reference: str | None) -> tuple[str, str]:
    """(name, file) of a reference: 'last' -> final.pt, 'continuation' -> reference.pt, else a path.

    A reference is identified by its content (:func:`~gammatrace.store.run.params_sha256`):
    final.pt and reference.pt must still be what pass 1 wrote, and a user file's analysis
    folder carries its hash, so another file — or the same file changed — is a new analysis,
    never the stale numbers of the old one.
    """
    reference = reference or run.config.reference.kind
    if reference == "last":
        _check_recorded(run, RunStore.FINAL, "final_sha256", "θ_T")
        return "last", str(run.store.path(RunStore.FINAL))
    if reference == "continuation":
        if run.meta.continuation_error:
            raise StoreError(f"{run.path} has no continuation reference: {run.meta.continuation_error}")
        if not run.store.exists(RunStore.REFERENCE):
            raise StoreError(f"{run.path} has no continuation reference; train with reference.extra_epochs > 0")
        _check_recorded(run, RunStore.REFERENCE, "reference_sha256", "the continuation θ*")
        return "continuation", str(run.store.path(RunStore.REFERENCE))
    if reference == "file":
        reference = run.config.reference.path
    path = Path(reference)
    if not path.is_file():
        raise StoreError(f"reference file {path} does not exist")
    try:
        state = load_reference(path)
    except ReferenceError_ as exc:
        raise StoreError(str(exc).split(":")[0] + " (not a state dict or gammatrace checkpoint saved with "
                         "torch.save)") from None
    return f"file-{path.stem}-{params_sha256(state)[:16]}", str(path.resolve())


def _check_recorded(run: Run, rel: str, field: str, what: str) -> None:
    """``rel`` must hold the parameters pass 1 recorded under ``field`` (DESIGN §2)."""
    state = run.store.read_torch(rel, advice="retrain the run (pass 1) to rewrite it")
    state = state.get("model", state) if isinstance(state, dict) else state
    found = params_sha256(state)
    recorded = getattr(run.meta, field)
    if recorded is None:
        # Runs written before hashes were recorded: trust on first use, check from now on.
        run.store.update_meta(**{field: found})
    elif found != recorded:
        raise StoreError(
            f"{run.store.path(rel)} is not the {what} pass 1 recorded (SHA-256 {found[:12]}… instead of "
            f"{recorded[:12]}…): it was replaced or damaged; restore it, or retrain the run")


# Folders below analysis/<reference>/ that the engine itself writes; a hook cannot take them.
_OWN_TABLES = frozenset({"steps", "tensors", "samples"})


def _check_hooks(hooks: Sequence[StepHookFactory]) -> None:
    names = [h.name for h in hooks]
    bad = [n for n in names if not n.isidentifier() or n in _OWN_TABLES]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"hook names must be distinct identifiers other than {sorted(_OWN_TABLES)}, got {names}")


def replay_segment(run_path: str, epoch: int, ref_name: str, ref_file: str,
                   hooks: Sequence[StepHookFactory] = ()) -> int:
    """Replay epoch ``epoch`` of a run against θ* from ``ref_file``; write its raw shards
    and, for each hook, its table ``analysis/<ref_name>/<hook name>/``.

    Returns the number of steps replayed. Top-level so it can run in worker processes.
    """
    run = Run(run_path)
    store = run.store
    cfg = run.config
    sess = build_session(cfg)
    sess.load_state(store.read_torch(store.checkpoint(epoch), map_location=sess.device))
    reference = load_reference(ref_file, sess.device)
    probe = Probe(sess.model, sess.optimizer, sess.loss_fn, reference=reference,
                  per_tensor=cfg.analysis.per_tensor, step=epoch * sess.steps_per_epoch, epoch=epoch)
    tables = sess.run_epoch(epoch, probe, check_finite=False, hooks=[make(sess, reference) for make in hooks])
    steps, tensors, samples = probe.take()
    _verify(store, epoch, steps, sess)
    for name, table in tables.items():
        store.write_parquet(store.shard(store.analysis(ref_name, name), epoch), table)
    if len(tensors):
        store.write_parquet(store.shard(store.analysis(ref_name, "tensors"), epoch), tensors)
    if cfg.analysis.per_sample and len(samples):
        store.write_parquet(store.shard(store.analysis(ref_name, "samples"), epoch), samples)
    # The steps shard goes last: its presence marks the segment as done.
    store.write_parquet(store.shard(store.analysis(ref_name, "steps"), epoch), steps)
    return len(steps)


def _verify(store: RunStore, epoch: int, steps, sess) -> None:
    recorded = store.read_parquet(store.shard(RunStore.STEPS, epoch))
    a, b = recorded["loss"].to_numpy(), steps["loss"].to_numpy()
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    if len(differ) or len(a) != len(b):
        i = int(differ[0]) if len(differ) else n
        k = int(recorded["step"].iloc[i]) if i < len(a) else int(steps["step"].iloc[i])
        raise ReplayMismatchError(
            f"replay diverged from the recording at step {k} (epoch {epoch}): recorded loss "
            f"{a[i] if i < len(a) else 'none'!r}, replayed {b[i] if i < len(b) else 'none'!r}. "
            "Same config, seed and thread count are required; was the run or the code changed?"
        )
    expected = store.read_torch(store.checkpoint(epoch + 1), map_location=sess.device)["model"]
    for name, value in sess.model.state_dict().items():
        if not torch.equal(value, expected[name]):
            diff = (value.double() - expected[name].double()).abs().max().item()
            raise ReplayMismatchError(
                f"replay diverged from the recording at step {int(steps['step'].iloc[-1])} (end of epoch {epoch}): "
                f"'{name}' differs from checkpoint {epoch + 1} by up to {diff:.3g}, although every loss matched"
            )


def replay(run_path: str | Path, reference: str | None = None, *, workers: int = 1, progress: bool = True,
           hooks: Sequence[StepHookFactory] = ()) -> str:
    """Replay every epoch of the analysed horizon; returns the reference's name.

    Segments already on disk are kept (an interrupted replay resumes); a segment lacking
    the table of one of ``hooks`` (per-step measurements besides the probe's, e.g.
    :class:`~gammatrace.engine.hooks.OnePointConvexity`) is replayed again.
    """
    _check_hooks(hooks)
    run = Run(run_path)
    if not run.status.finished_training:
        raise StoreError(f"{run.path} is '{run.status}'; only a fully trained run can be replayed")
    ref_name, ref_file = reference_source(run, reference)
    horizon = run.meta.horizon_epochs
    tables = ["steps", *(h.name for h in hooks)]
    todo = [e for e in range(horizon)
            if not all(run.store.exists(run.store.shard(run.store.analysis(ref_name, t), e)) for t in tables)]
    tasks = [(str(run.path), e, ref_name, ref_file, tuple(hooks)) for e in todo]
    make_executor("local", workers=workers).map(replay_segment, tasks, desc=f"replay {run.name}", progress=progress)
    return ref_name
