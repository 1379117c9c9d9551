"""Pass 2: replay the recorded trajectory in reference mode, verified step by step.

Each epoch is a segment that starts from its checkpoint and replays independently, so
segments fan out over workers. Replay is verified, not assumed: every replayed step's
loss must equal the recorded one exactly, and the parameters at the end of the segment
must equal the next checkpoint exactly; otherwise :class:`ReplayMismatchError` names the
first diverging step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gammatrace.engine.session import build_session
from gammatrace.executors import make_executor
from gammatrace.probe import Probe, load_reference
from gammatrace.store.run import Run, RunStore, StoreError


class ReplayMismatchError(RuntimeError):
    """The replayed trajectory differs from the recorded one."""


def reference_source(run: Run, reference: str | None) -> tuple[str, str]:
    """(name, file) of a reference: 'last' -> final.pt, 'continuation' -> reference.pt, else a path."""
    reference = reference or run.config.reference.kind
    if reference == "last":
        return "last", str(run.store.path(RunStore.FINAL))
    if reference == "continuation":
        if not run.store.exists(RunStore.REFERENCE):
            raise StoreError(f"{run.path} has no continuation reference; train with reference.extra_epochs > 0")
        return "continuation", str(run.store.path(RunStore.REFERENCE))
    if reference == "file":
        reference = run.config.reference.path
    path = Path(reference)
    if not path.is_file():
        raise StoreError(f"reference file {path} does not exist")
    return f"file-{path.stem}", str(path.resolve())


def replay_segment(run_path: str, epoch: int, ref_name: str, ref_file: str) -> int:
    """Replay epoch ``epoch`` of a run against θ* from ``ref_file``; write its raw shards.

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
    sess.run_epoch(epoch, probe, check_finite=False)
    steps, tensors, samples = probe.take()
    _verify(store, epoch, steps, sess)
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


def replay(run_path: str | Path, reference: str | None = None, *, workers: int = 1, progress: bool = True) -> str:
    """Replay every epoch of the analysed horizon; returns the reference's name.

    Segments already on disk are kept (an interrupted replay resumes).
    """
    run = Run(run_path)
    if not run.status.finished_training:
        raise StoreError(f"{run.path} is '{run.status}'; only a fully trained run can be replayed")
    ref_name, ref_file = reference_source(run, reference)
    horizon = run.meta.horizon_epochs
    todo = [e for e in range(horizon)
            if not run.store.exists(run.store.shard(run.store.analysis(ref_name, "steps"), e))]
    tasks = [(str(run.path), e, ref_name, ref_file) for e in todo]
    make_executor("local", workers=workers).map(replay_segment, tasks, desc=f"replay {run.name}", progress=progress)
    return ref_name
