"""Pass 2: replay the recorded trajectory in reference mode, verified step by step.

The trajectory is cut into segments at the checkpoints (every ``checkpoint_every``
epochs, and at the horizon); each segment starts from its checkpoint and replays
independently, so segments fan out over workers (local processes or Ray tasks, which
read and write the run folder through the store: a URL works without a shared file
system). Replay is verified, not assumed: every replayed step's loss must equal the
recorded one exactly, and the parameters at the end of the segment must equal the next
checkpoint exactly; otherwise :class:`ReplayMismatchError` names the first diverging step.

Where the loss of a sample does not depend on its batch, ℓ*_k is looked up from one pass
over the training set at θ* (:mod:`gammatrace.engine.refcache`) instead of a forward per
step; ``analysis/<reference>/reference_cache.json`` records which way it was computed.

Example:
    >>> import tempfile
    >>> from gammatrace.engine.trainer import train_pass
    >>> cfg = {"name": "demo", "seed": 3, "epochs": 2, "batch_size": 32, "data": {"name": "digits", "n_train": 96, "n_test": 64}, "model": {"name": "mlp", "width": 8, "depth": 2}, "optim": {"name": "sgd", "lr": 0.2}}
    >>> run = train_pass(cfg, tempfile.mkdtemp() + "/demo", progress=False)
    >>> reference_source(run, "last")[0], replay(run.path, "last", progress=False)
    ('last', 'last')
    >>> sorted(p.name for p in (run.path / "analysis" / "last" / "steps").iterdir())
    ['epoch_0000.parquet', 'epoch_0001.parquet']
    >>> run.store.read_json("analysis/last/reference_cache.json")["mode"]   # an MLP without dropout
    'cached'
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from gammatrace.engine.hooks import REFERENCE_FREE, config_hooks
from gammatrace.engine.refcache import (
    CachedReference,
    reference_losses,
    segment_checks,
    summarize_checks,
    why_not_cached,
)
from gammatrace.engine.session import StepHookFactory, build_session
from gammatrace.errors import UserError
from gammatrace.executors import make_executor
from gammatrace.machine import cross_machine_advice, fingerprint
from gammatrace.probe import Probe, load_reference
from gammatrace.probe.probe import BadReferenceError
from gammatrace.store.run import Run, RunStore, StoreError, params_sha256

# Below analysis/<reference>/: the per-sample losses at θ* and the record of how ℓ* was computed.
CACHE_FILE = "reference_losses.pt"
CACHE_RECORD = "reference_cache.json"
CACHE_CHECKS = "reference_cache"  # one JSON per cached segment: its checked steps


class ReplayMismatchError(UserError, RuntimeError):
    """The replayed trajectory differs from the recorded one."""


class PrunedRunError(UserError, RuntimeError):
    """The run's checkpoints were pruned, and the work asked for needs them."""


def pruned_error(run: Run, what: str) -> PrunedRunError:
    return PrunedRunError(
        f"{run.path}: {what} needs the epoch checkpoints, which were pruned after its analysis "
        "(--prune-checkpoints / --max-disk); its analyses can still be re-summarised (--tail, --ell-inf). "
        "Retrain the run without pruning (same config, a new --out) for this")


def reference_source(run: Run, reference: str | None) -> tuple[str, str]:
    """(name, source) of a reference: 'last' -> final.pt, 'continuation' -> reference.pt (both
    names inside the run folder), else a file (its absolute path; for a run on object storage,
    its copy inside the run folder, so that workers without the driver's disk can read it).

    A reference is identified by its content (:func:`~gammatrace.store.run.params_sha256`):
    final.pt and reference.pt must still be what pass 1 wrote, and a user file's analysis
    folder carries its hash, so another file — or the same file changed — is a new analysis,
    never the stale numbers of the old one.
    """
    reference = reference or run.config.reference.kind
    if reference == "last":
        _check_recorded(run, RunStore.FINAL, "final_sha256", "θ_T")
        return "last", RunStore.FINAL
    if reference == "continuation":
        if run.meta.continuation_error:
            raise StoreError(f"{run.path} has no continuation reference: {run.meta.continuation_error}")
        if not run.store.exists(RunStore.REFERENCE):
            raise StoreError(f"{run.path} has no continuation reference; train with reference.extra_epochs > 0")
        _check_recorded(run, RunStore.REFERENCE, "reference_sha256", "the continuation θ*")
        return "continuation", RunStore.REFERENCE
    if reference == "file":
        reference = run.config.reference.path
    path = Path(reference)
    if not path.is_file():
        raise StoreError(f"reference file {path} does not exist")
    try:
        state = load_reference(path)
    except BadReferenceError as exc:
        raise StoreError(str(exc).split(":")[0] + " (not a state dict or gammatrace checkpoint saved with "
                         "torch.save)") from None
    name = f"file-{path.stem}-{params_sha256(state)[:16]}"
    if run.store.remote:
        copy = RunStore.analysis(name, "theta_star.pt")
        if not run.store.exists(copy):
            run.store.write_torch(copy, {"model": state})
        return name, copy
    return name, str(path.resolve())


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


def _load(store: RunStore, source: str, device: torch.device) -> dict[str, torch.Tensor]:
    """θ* from a file inside the run folder (a store-relative name) or a local path."""
    if source.startswith("/") or Path(source).is_absolute():
        return load_reference(source, device)
    state = store.read_torch(source, map_location=device)
    return load_reference(state["model"] if isinstance(state, dict) and isinstance(state.get("model"), dict) else state,
                          device)


# Folders below analysis/<reference>/ that the engine itself writes; a hook cannot take them.
_OWN_TABLES = frozenset({"steps", "tensors", "samples", CACHE_CHECKS})


def _check_hooks(hooks: Sequence[StepHookFactory]) -> None:
    names = [h.name for h in hooks]
    bad = [n for n in names if not n.isidentifier() or n in _OWN_TABLES]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"hook names must be distinct identifiers other than {sorted(_OWN_TABLES)}, got {names}")


def segments(run: Run) -> list[tuple[int, int]]:
    """The replay segments [start, end) of the analysed horizon: from each checkpoint to
    the next (every ``checkpoint_every`` epochs; the last one ends at the horizon).

    Example:
        >>> import tempfile
        >>> from gammatrace.store.run import RunMeta
        >>> from gammatrace.config import RunConfig
        >>> folder = tempfile.mkdtemp()
        >>> RunStore(folder).write_meta(RunMeta(config=RunConfig(checkpoint_every=3).model_dump(mode="json"),
        ...                                     horizon_epochs=7))
        >>> segments(Run(folder))
        [(0, 3), (3, 6), (6, 7)]
    """
    every = run.config.checkpoint_every
    every = every if isinstance(every, int) else 1
    horizon = run.meta.horizon_epochs or 0
    return [(s, min(s + every, horizon)) for s in range(0, horizon, every)]


def replay_segment(run_path: str, epoch: int, ref_name: str, ref_file: str,
                   hooks: Sequence[StepHookFactory] = (), end: int | None = None,
                   cached: bool = False) -> dict[str, Any]:
    """Replay epochs ``epoch`` … ``end − 1`` (default: one epoch) of a run against θ* from
    ``ref_file`` (see :func:`reference_source`); write their raw shards and, for each hook,
    its table ``analysis/<ref_name>/<hook name>/``. ``cached``: ℓ*_k from the per-sample
    cache ``analysis/<ref_name>/reference_losses.pt``.

    Returns the number of steps replayed and, when cached, the segment's checks.
    Top-level so it can run in worker processes (or Ray tasks: it reads and writes the
    run folder through the store only).
    """
    end = epoch + 1 if end is None else end
    run = Run(run_path)
    store = run.store
    cfg = run.config
    sess = build_session(cfg)
    sess.load_state(store.read_torch(store.checkpoint(epoch), map_location=sess.device,
                                     advice="retrain the run (pass 1) to rewrite it"))
    reference = _load(store, ref_file, sess.device)
    lookup = None
    if cached:
        saved = store.read_torch(store.analysis(ref_name, CACHE_FILE), map_location=sess.device,
                                 advice=f"remove it to recompute it (it is analysis/{ref_name}/{CACHE_FILE})")
        if saved.get("reference_sha256") != params_sha256(reference):
            raise StoreError(f"{store.path(store.analysis(ref_name, CACHE_FILE))} was computed for another θ*; "
                             "remove it and rerun the same command to recompute it")
        batches = [b for e in range(epoch, end) for b in sess.batches(e)]
        lookup = CachedReference(sess.loss_fn, saved["losses"], batches, sess.y, epoch * sess.steps_per_epoch)
    probe = Probe(sess.model, sess.optimizer, lookup or sess.loss_fn, reference=reference,
                  per_tensor=cfg.analysis.per_tensor, step=epoch * sess.steps_per_epoch, epoch=epoch,
                  # The lookup is called for θ* only; replay's own bitwise check of every
                  # loss against the recording replaces the probe's check of θ_k.
                  **({"check": False} if lookup is not None else {}))
    made = [make(sess, reference) for make in hooks]
    done = []
    try:
        for e in range(epoch, end):
            tables = sess.run_epoch(e, probe, check_finite=False, hooks=made)
            steps, tensors, samples = probe.take()
            _verify_losses(store, e, steps)
            done.append((e, tables, steps, tensors, samples))
        _verify_state(store, run, end, sess, int(done[-1][2]["step"].iloc[-1]) if len(done[-1][2]) else -1)
    except ReplayMismatchError as exc:
        # The usual cause of a divergence on a run moved between machines: name it. The
        # fingerprint is taken here, in the process (or Ray node) that replayed.
        advice = cross_machine_advice(run.meta.machine, fingerprint(cfg.device, cfg.threads))
        if advice:
            raise ReplayMismatchError(f"{exc}; {advice}") from None
        raise
    out: dict[str, Any] = {"steps": sum(len(d[2]) for d in done)}
    if lookup is not None:
        out["cache"] = segment_checks(lookup, pd.concat([d[2] for d in done], ignore_index=True))
        store.write_json(store.analysis(ref_name, CACHE_CHECKS, f"segment_{epoch:04d}.json"), out["cache"])
    for e, tables, steps, tensors, samples in done:
        for name, table in tables.items():
            store.write_parquet(store.shard(store.analysis(ref_name, name), e), table)
        if len(tensors):
            store.write_parquet(store.shard(store.analysis(ref_name, "tensors"), e), tensors)
        if cfg.analysis.per_sample and len(samples):
            store.write_parquet(store.shard(store.analysis(ref_name, "samples"), e), samples)
        # The steps shard goes last: its presence marks the epoch as done.
        store.write_parquet(store.shard(store.analysis(ref_name, "steps"), e), steps)
    return out


def warn_other_machine(run: Run, recorded: dict[str, Any] | None, device: str, threads: int) -> None:
    """Before a replay starts here: say when the run was recorded on another machine kind
    (its bitwise check will then most likely fail; it is still tried, since some kinds agree)."""
    here = fingerprint(device, threads)
    advice = cross_machine_advice(recorded, here, "replaying")
    if advice:
        print(f"gammatrace: warning: {run.path} was {advice} (if its bits differ here, the replay stops at "
              "the first diverging step)", file=sys.stderr)


def _verify_losses(store: RunStore, epoch: int, steps: pd.DataFrame) -> None:
    # the recording's columns the check reads, with their types (a damaged shard is named, never a KeyError)
    recorded = store.read_parquet(store.shard(RunStore.STEPS, epoch), required={"step": "int64", "loss": "float64"})
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


def _verify_state(store: RunStore, run: Run, end: int, sess, last_step: int) -> None:
    """The parameters (and buffers) after the segment must be checkpoint ``end``'s."""
    rel = store.checkpoint(end)
    if not store.exists(rel) and end == run.meta.horizon_epochs:
        rel = RunStore.FINAL  # θ_T holds the same state (runs of a version without a horizon checkpoint)
    expected = store.read_torch(rel, map_location=sess.device)["model"]
    for name, value in sess.model.state_dict().items():
        if not torch.equal(value, expected[name]):
            diff = (value.double() - expected[name].double()).abs().max().item()
            raise ReplayMismatchError(
                f"replay diverged from the recording at step {last_step} (end of epoch {end - 1}): "
                f"'{name}' differs from {rel} by up to {diff:.3g}, although every loss matched"
            )


def _cache_mode(run: Run, ref_name: str, ref_file: str, reference_cache: str | None) -> tuple[str, str | None]:
    """("cached" | "direct", why not cached); computes and stores the per-sample losses at θ*
    when they are to be used and are not stored yet (one pass over the training set)."""
    cfg = run.config
    if reference_cache is not None:
        cfg = cfg.with_overrides({"analysis": {"reference_cache": reference_cache}})
    if cfg.analysis.reference_cache == "off":
        return "direct", "analysis.reference_cache is off"
    sess = build_session(cfg)
    why = why_not_cached(cfg, sess.model)
    if why is not None:
        return "direct", why
    store = run.store
    reference = _load(store, ref_file, sess.device)
    sha = params_sha256(reference)
    rel = store.analysis(ref_name, CACHE_FILE)
    if store.exists(rel):
        saved = store.read_torch(rel, advice=f"remove it to recompute it (analysis/{ref_name}/{CACHE_FILE})")
        if saved.get("reference_sha256") == sha and len(saved.get("losses", ())) == len(sess.x):
            return "cached", None
    store.write_torch(rel, {"losses": reference_losses(sess, reference).cpu(), "reference_sha256": sha,
                            "batch_size": cfg.batch_size})
    return "cached", None


def replay(run_path: str | Path, reference: str | None = None, *, workers: int = 1, progress: bool = True,
           hooks: Sequence[StepHookFactory] = (), executor: str = "local", address: str | None = None,
           reference_cache: str | None = None) -> str:
    """Replay every segment of the analysed horizon; returns the reference's name.

    Segments already on disk are kept (an interrupted replay resumes); a segment lacking
    the table of one of ``hooks`` (per-step measurements besides the probe's, e.g.
    :class:`~gammatrace.engine.hooks.OnePointConvexity`) is replayed again, and so is every
    segment when the way ℓ* is computed changed (``reference_cache``: "auto" | "off"
    overrides the run config's ``analysis.reference_cache``). ``executor`` / ``address``:
    where segments run (local processes, or Ray tasks at ``address``).
    """
    run = Run(run_path)
    if not run.status.finished_training:
        raise StoreError(f"{run.path} is '{run.status}'; only a fully trained run can be replayed")
    ref_name, ref_file = reference_source(run, reference)
    store = run.store
    # The hooks the run's config asks for (its curvature block) are part of its replay, except a
    # table that does not depend on θ* and another reference's replay already holds whole.
    asked = {h.name for h in hooks}
    hooks = (*(h for h in config_hooks(run.config) if h.name not in asked
               and shared_table(run, h.name, exclude=ref_name) is None), *hooks)
    _check_hooks(hooks)
    tables = ["steps", *(h.name for h in hooks)]
    record_rel = store.analysis(ref_name, CACHE_RECORD)
    before = store.read_json(record_rel) if store.exists(record_rel) else None

    def missing(segs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(s, e) for s, e in segs
                if not all(store.exists(store.shard(store.analysis(ref_name, t), x)) for t in tables for x in range(s, e))]

    segs = segments(run)
    todo = missing(segs)
    if not todo and (reference_cache is None or before is None):
        return _finalise(run, ref_name, record_rel, before)
    if todo and run.meta.checkpoints_pruned:
        raise pruned_error(run, f"replaying against '{ref_name}'")
    if before is None and len(todo) < len(segs):
        mode, why = "direct", "segments of this analysis were replayed before the cache existed"
    else:
        mode, why = _cache_mode(run, ref_name, ref_file, reference_cache)
    if before is not None and before.get("mode") != mode:
        todo = segs  # the analysis on disk computed ℓ* the other way: one identity per analysis
        if run.meta.checkpoints_pruned:
            raise pruned_error(run, f"replaying against '{ref_name}' with reference losses computed another way")
        for name in store.files(store.analysis(ref_name, CACHE_CHECKS)):
            store.remove(store.analysis(ref_name, CACHE_CHECKS, name))
    if not todo:
        return _finalise(run, ref_name, record_rel, before)
    if executor == "local":
        warn_other_machine(run, run.meta.machine, run.config.device, run.config.threads)
    store.write_json(record_rel, {"mode": mode, "reason": why, "complete": False})
    tasks = [(str(run.path), s, ref_name, ref_file, tuple(hooks), e, mode == "cached") for s, e in todo]
    # On Ray every segment asks for a node of the recording's machine kind (refused in one
    # line where the cluster has none); a run that names no machine may go anywhere.
    kind = run.meta.machine_kind
    make_executor(executor, workers=workers, address=address).map(
        replay_segment, tasks, desc=f"replay {run.name}", progress=progress, machines=[kind] * len(tasks))
    return _finalise(run, ref_name, record_rel, {"mode": mode, "reason": why, "complete": False})


def shared_table(run: Run, name: str, exclude: str | None = None) -> str | None:
    """The reference whose replay holds the whole table ``name`` (every epoch of the horizon)
    when that table does not depend on θ* (:data:`~gammatrace.engine.hooks.REFERENCE_FREE`),
    other than ``exclude``; None otherwise."""
    if name not in REFERENCE_FREE:
        return None
    store, horizon = run.store, run.meta.horizon_epochs or 0
    for ref in run.references():
        if ref != exclude and horizon and all(store.exists(store.shard(store.analysis(ref, name), e))
                                              for e in range(horizon)):
            return ref
    return None


def _finalise(run: Run, ref_name: str, record_rel: str, record: dict[str, Any] | None) -> str:
    """Complete the record ``reference_cache.json`` once every segment is on disk (the
    cached segments' checks summarised, and the warning when they may move γ_k), whether
    the segments were replayed now or by a run interrupted before it could finish the
    record; a complete record (or none: an analysis older than the record) is kept."""
    if record is None or record.get("complete"):
        return ref_name
    store = run.store
    record = {"mode": record.get("mode"), "reason": record.get("reason"), "complete": True}
    if record["mode"] == "cached":
        checks = [store.read_json(store.analysis(ref_name, CACHE_CHECKS, n))
                  for n in store.files(store.analysis(ref_name, CACHE_CHECKS))]
        record.update(summarize_checks(checks))
        if record["flagged"]:
            print(f"gammatrace: {run.path}: cached reference losses may move γ_k by up to "
                  f"{record['implied_gamma_change']:.2g} (relative); see {store.path(record_rel)}, or set "
                  "analysis.reference_cache: off", file=sys.stderr)
    store.write_json(record_rel, record)
    return ref_name
