"""Measure -> store -> analyse: turn a trained run into the per-step table and summaries.

``analyze`` replays the run against a reference (only the segments not yet on disk),
derives the §6 columns, and writes summaries next to them under ``analysis/<ref>/``.
Re-analysing with another ``tail`` or ``ell_inf`` reuses the replay and is an analysis of
its own (``analysis/<ref>/tail=28``, :func:`analysis_name`), never a silent replacement.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from gammatrace import principles as P
from gammatrace.config import RunConfig
from gammatrace.engine.replay import replay, shared_table
from gammatrace.engine.trainer import train_pass
from gammatrace.errors import UserError
from gammatrace.probe.probe import REFERENCE_COLUMNS
from gammatrace.probe.table import FOLDED_COLUMNS, USED_COLUMNS
from gammatrace.store.run import OWN_LOOP, Run, Status, StoreError, jsonable
from gammatrace.store.summary import RunSummary

# What every analysed step shard must hold, with its dtype (a shard without one, or with
# another type, is damaged: never NaN, never truncated to integers).
RAW_STEP_COLUMNS = {"step": "int64", "epoch": "int64", "lr": "float64", **dict.fromkeys(REFERENCE_COLUMNS, "float64")}
# Columns a replay writes where it measures them (the gradient the optimizer received, the
# folded weight decay): a damaged type there is a damaged file too, never a column carried on.
OPTIONAL_STEP_COLUMNS = dict.fromkeys((*USED_COLUMNS, *FOLDED_COLUMNS), "float64")


def analyze(run: str | Path | Run, reference: str | None = None, *, tail: int | None = None,
            ell_inf: float | None = None, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Replay (if needed) and analyse a run; returns the summary dict (also in summary.json).

    Args:
        run: a trained run folder
        reference: last (θ* = θ_T, the papers' choice) | continuation (θ* from epochs trained
            beyond the analysed horizon) | PATH to a state dict; default: the run config's
        tail: ignore the last m steps in the summaries; default: the run config's
        ell_inf: ℓ_inf of the regularity principle; default: the run config's
        workers: processes for replay segments
        progress: show progress bars

    Example:
        >>> import tempfile, gammatrace
        >>> run = gammatrace.train({"name": "demo", "seed": 3, "epochs": 2, "batch_size": 32,
        ...                         "data": {"name": "digits", "n_train": 96, "n_test": 64},
        ...                         "model": {"name": "mlp", "width": 8, "depth": 2},
        ...                         "optim": {"name": "sgd", "lr": 0.2}},
        ...                        out=tempfile.mkdtemp() + "/demo", replay=False, progress=False)
        >>> run.status.value, run.references()  # pass 1 only: nothing measured yet
        ('trained', [])
        >>> summary = gammatrace.analyze(run.path, tail=2, progress=False)
        >>> summary["reference"], summary["n_steps"], summary["gamma_frac_positive"]
        ('last', 4, 1.0)
    """
    run = run if isinstance(run, Run) else Run(run)
    if run.meta.source == OWN_LOOP:
        reference = own_loop_reference(run, reference)
    cfg = run.config
    if run.status == Status.DIVERGED:
        raise StoreError(f"{run.path} diverged at step {run.meta.diverged_at_step}; "
                         "there is no final point to analyse against")
    if reference is None and cfg.reference.kind == "continuation" and run.meta.continuation_error:
        # The horizon is intact: analyse it against θ_T, and say why not the continuation.
        print(f"gammatrace: {run.path}: {run.meta.continuation_error}", file=sys.stderr)
        reference = "last"
    tail = cfg.analysis.tail if tail is None else tail
    ell_inf = cfg.analysis.ell_inf if ell_inf is None else ell_inf
    check_options(run, tail=tail, ell_inf=ell_inf, workers=workers)
    with run.store.lock():
        return _analyze_locked(run, cfg, reference, tail, ell_inf, workers, progress)


def load_hook_table(run: str | Path | Run, name: str, reference: str | None = None) -> pd.DataFrame:
    """A step-hook table as stored, without recomputation: ``analysis/<reference>/<name>/``
    (e.g. ``"curvature"``, one row per measured step; ``"one_point"``). ``reference``: the
    analysis (default: the run's, as :meth:`Run.steps <gammatrace.store.run.Run.steps>`); a
    hook table belongs to the reference's replay, shared by all its analyses (``last/tail=28``
    reads ``last``'s); a table that does not depend on θ* (``curvature``) is measured by one
    reference's replay and read from there for every reference. An empty frame when the run
    has no such table.

    Example:
        >>> import tempfile, gammatrace
        >>> run = gammatrace.train({"name": "demo", "seed": 3, "epochs": 1, "batch_size": 32,
        ...                         "data": {"name": "digits", "n_train": 64, "n_test": 32},
        ...                         "model": {"name": "mlp", "width": 4, "depth": 1},
        ...                         "curvature": {"every": 1, "k": 2}},
        ...                        out=tempfile.mkdtemp() + "/demo", progress=False)
        >>> table = load_hook_table(run, "curvature")
        >>> table["step"].tolist(), table["stability_threshold_kind"].iloc[0]
        ([0, 1], 'sgd')
    """
    run = run if isinstance(run, Run) else Run(run)
    ref = run._ref(reference).split("/")[0]
    table = run.store.read_shards(run.store.analysis(ref, name))
    if not len(table):
        # A table that does not depend on θ* is measured by one reference's replay for all.
        shared = shared_table(run, name, exclude=ref)
        if shared is not None:
            table = run.store.read_shards(run.store.analysis(shared, name))
    return table


def own_loop_reference(run: Run, reference: str | None) -> str:
    """The stored analysis a run recorded by the user's own loop (:func:`gammatrace.save_run`)
    is re-summarised from: its loop cannot be replayed from a config, so a reference it was
    not measured against is a one-line error pointing to the two-pass.

    Example:
        >>> import tempfile, torch
        >>> from gammatrace.engine.twopass import save_run
        >>> from gammatrace.probe import Probe
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> probe = Probe(model, opt)  # record mode: no θ*
        >>> loss = model(torch.ones(1, 2)).pow(2).mean(); loss.backward(); probe.step(loss)
        >>> run = save_run(probe, tempfile.mkdtemp() + "/mine")
        >>> own_loop_reference(run, "last")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gammatrace.errors.UserError: .../mine was recorded by your own training loop without a reference...
    """
    stored = run.references()
    recorded = (run.meta.own_loop or {}).get("reference")
    if reference is None and (recorded in stored or len(stored) == 1):
        return recorded if recorded in stored else stored[0]
    if reference is not None and reference in stored:
        return reference
    fix = ("gammatrace.TwoPass(build, train, loss_fn=..., seed=..., threads=..., reference=PATH or "
           "continuation=...), then gammatrace.save_run")
    if not stored:
        raise UserError(f"{run.path} was recorded by your own training loop without a reference (record mode); "
                        f"measuring against θ* needs the two-pass: {fix}")
    raise UserError(f"{run.path} was recorded by your own training loop and holds the analysis against "
                    f"{', '.join(repr(r) for r in stored)} only; measuring against '{reference}' needs the two-pass "
                    f"again: {fix}")


def check_options(run: Run, *, tail: int, ell_inf: float, workers: int) -> None:
    """Options that would make every summary NaN, refused before any work (one line each)."""
    n = run.meta.horizon_steps or (run.meta.horizon_epochs or 0) * (run.meta.steps_per_epoch or 0)
    if not isinstance(tail, int) or tail < 0 or (n and tail >= n):
        raise UserError(f"tail={tail} (--tail) must be an integer in 0..{max(n - 1, 0)}: the run has {n} steps "
                        "and the summaries need at least one")
    if not math.isfinite(ell_inf):
        raise UserError(f"ell_inf={ell_inf} (--ell-inf) must be a finite number")
    if workers < 1:
        raise UserError(f"workers={workers} (--workers) must be at least 1")


def analysis_name(reference: str, cfg: RunConfig, tail: int, ell_inf: float) -> str:
    """Where an analysis lives below ``analysis/``: its identity is (reference, tail, ℓ_inf).

    The run config's tail and ℓ_inf keep the reference's own folder (``analysis/last``, as
    every run folder written before had it, so they still load, and what ``train`` writes);
    other options are an analysis of their own beside it, ``analysis/last/tail=28``, so
    re-analysing with another tail never silently replaces the numbers an earlier report
    showed, and a report names which one it read (``--reference last/tail=28``). The
    replay's measurements (raw steps, per-tensor and per-sample shards) depend on θ* alone
    and stay in the reference's folder, shared by all its analyses.

    Example:
        >>> cfg = RunConfig()
        >>> analysis_name("last", cfg, 0, 0.0), analysis_name("last", cfg, 28, 0.0)
        ('last', 'last/tail=28')
        >>> analysis_name("continuation", cfg, 2, 0.5)
        'continuation/tail=2,ell_inf=0.5'
    """
    options = ([f"tail={tail}"] if tail != cfg.analysis.tail else []) + \
        ([f"ell_inf={float(ell_inf)!r}"] if ell_inf != cfg.analysis.ell_inf else [])
    return f"{reference}/{','.join(options)}" if options else reference


def _analyze_locked(run: Run, cfg: RunConfig, reference: str | None, tail: int, ell_inf: float, workers: int,
                    progress: bool) -> dict[str, Any]:
    # An own loop's run holds its measured tables; only an engine run can be replayed.
    ref_name = reference if run.meta.source == OWN_LOOP else replay(run.path, reference, workers=workers,
                                                                    progress=progress)
    run = Run(run.path)  # replay may have recorded a hash in run.json
    store = run.store
    name = analysis_name(ref_name, cfg, tail, ell_inf)
    if name != ref_name:
        print(f"gammatrace: {run.path}: tail {tail} and ℓ_inf {ell_inf:g} are not the run config's "
              f"({cfg.analysis.tail}, {cfg.analysis.ell_inf:g}): this analysis is stored as analysis/{name}, "
              f"beside analysis/{ref_name}; report it with `gammatrace report {run.path} --reference {name}`",
              file=sys.stderr)

    def at(*parts: str) -> str:  # what depends on the options
        return store.analysis(name, *parts)

    def measured(*parts: str) -> str:  # what the replay measured: θ* alone
        return store.analysis(ref_name, *parts)

    raw = store.read_shards(measured("steps"), required=RAW_STEP_COLUMNS, optional=OPTIONAL_STEP_COLUMNS)
    steps = P.derive(raw, ell_inf=ell_inf, eps=cfg.analysis.eps)
    for epoch, frame in steps.groupby("epoch", sort=True):
        store.write_parquet(store.shard(at("steps"), int(epoch)), frame)

    summary: dict[str, Any] = {"reference": ref_name, "analysis": name, "ell_inf": ell_inf}
    summary.update(P.summarize(steps, tail=tail, ell_inf=ell_inf, displacement=run.meta.displacement,
                               eps=cfg.analysis.eps))
    summary["cos_null_scale"] = P.null_cos_scale(int(run.meta.n_params))

    per_epoch = pd.concat({c: P.per_epoch(steps, c, tail=tail) for c in ("gamma", "gamma_rp", "gamma_rc")},
                          axis=1)
    per_epoch.columns = [f"{a}_{b}" for a, b in per_epoch.columns]
    store.write_parquet(at("per_epoch.parquet"), per_epoch.reset_index())

    # γ_hi of the certified interval (the largest γ meeting every step); no bound when it is empty.
    rate = P.rate_bound(steps.iloc[: len(steps) - tail] if tail else steps,
                        gamma=summary["gamma_hi"] if summary["gamma_certified"] and summary["gamma_hi"] is not None
                        else math.nan)
    store.write_parquet(at("rate.parquet"), rate["table"])

    tensors = store.read_shards(measured("tensors"))
    if len(tensors):
        store.write_parquet(measured("layers.parquet"), P.layer_shares(tensors).reset_index())
        store.write_parquet(measured("modules.parquet"), P.module_shares(tensors).reset_index())
    samples = store.read_shards(measured("samples"))
    if len(samples):
        sample_summary, sample_epochs = P.per_sample_convergence(samples)
        summary.update({f"sample_{k}": v for k, v in sample_summary.items()})
        store.write_parquet(measured("samples_per_epoch.parquet"), sample_epochs.reset_index())

    epochs = run.epochs()
    main = epochs[epochs["epoch"] < run.meta.horizon_epochs] if len(epochs) else epochs
    if len(main):
        last = main.iloc[-1]
        summary.update({k: float(last[k]) for k in ("train_loss", "train_acc", "test_loss", "test_acc") if k in last})
    summary["reached_target"] = run.meta.reached_target
    summary["epochs"] = run.meta.horizon_epochs
    RunSummary.model_validate(jsonable(summary))  # the contract with every reader (store/summary.py)
    store.write_json(at("summary.json"), summary)
    store.update_meta(status=Status.COMPLETE)
    return summary


# train() lives here, not in the engine: it is pass 1 *and* the analysis, and the analysis
# layer sits above the engine.
def train(config: RunConfig | dict | str | Path, out: str | Path, *, replay: bool = True,
          workers: int = 1, progress: bool = True) -> Run:
    """Train a run deterministically, then replay it to measure the principles exactly.

    Pass 1 trains and checkpoints every epoch; pass 2 replays each epoch in reference
    mode with θ* from ``config.reference`` (default: the last iterate θ_T), verifying
    every step against the recording, and writes the analysis. Rerunning the same
    command resumes whatever was interrupted.

    Args:
        config: a RunConfig, its dict, or a YAML file
        out: the run folder
        replay: run pass 2 and the analysis after training
        workers: processes for replay segments
        progress: show progress bars

    Example:
        >>> import tempfile, gammatrace
        >>> run = gammatrace.train({"name": "demo", "seed": 3, "epochs": 2, "batch_size": 32,
        ...                         "data": {"name": "digits", "n_train": 96, "n_test": 64},
        ...                         "model": {"name": "mlp", "width": 8, "depth": 2},
        ...                         "optim": {"name": "sgd", "lr": 0.2}},
        ...                        out=tempfile.mkdtemp() + "/demo", progress=False)
        >>> run.status.value, run.meta.steps_per_epoch, run.references()
        ('complete', 3, ['last'])
        >>> steps = run.steps()  # one row per step, measured against θ* = θ_T
        >>> len(steps), bool((steps["dist_sq"].diff().dropna() < 0).all())
        (6, True)
        >>> run.summary()["gamma_frac_positive"]
        1.0
    """
    run = train_pass(config, out, progress=progress)
    if replay and run.status.finished_training:
        analyze(run.path, workers=workers, progress=progress)
        run = Run(run.path)
    return run
