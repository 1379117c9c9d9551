"""Measure -> store -> analyse: turn a trained run into the per-step table and summaries.

``analyze`` replays the run against a reference (only the segments not yet on disk),
derives the §6 columns, and writes summaries next to them under ``analysis/<ref>/``.
Re-analysing with another ``tail`` or ``ell_inf`` reuses the replay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from gammatrace import principles as P
from gammatrace.store.run import Run, StoreError, shard


def analyze(run: str | Path | Run, reference: str | None = None, *, tail: int | None = None,
            ell_inf: float | None = None, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Replay (if needed) and analyse a run; returns the summary dict (also in summary.json).

    ``reference`` is 'last' (θ* = θ_T, the papers' choice), 'continuation' (θ* from
    epochs trained beyond the analysed horizon) or a path to a state dict; default:
    the run config's. ``tail`` ignores the last m steps in the summaries.

    Example:
        >>> summary = gammatrace.analyze("runs/quickstart/relu", tail=50)  # doctest: +SKIP
        >>> summary["gamma_min"], summary["gamma_frac_positive"]           # doctest: +SKIP
    """
    from gammatrace.train.replay import replay

    run = run if isinstance(run, Run) else Run(run)
    cfg = run.config
    if run.status == "diverged":
        raise StoreError(f"{run.path} diverged at step {run.meta.get('diverged_at_step')}; "
                         "there is no final point to analyse against")
    tail = cfg.analysis.tail if tail is None else tail
    ell_inf = cfg.analysis.ell_inf if ell_inf is None else ell_inf
    ref_name = replay(run.path, reference, workers=workers, progress=progress)
    store, base = run.store, f"analysis/{ref_name}"

    raw = store.read_shards(f"{base}/steps")
    steps = P.derive(raw, ell_inf=ell_inf, eps=cfg.analysis.eps)
    for epoch, frame in steps.groupby("epoch", sort=True):
        store.write_parquet(shard(f"{base}/steps", int(epoch)), frame)

    summary: dict[str, Any] = {"reference": ref_name, "ell_inf": ell_inf}
    summary.update(P.summarize(steps, tail=tail, ell_inf=ell_inf, displacement=run.meta.get("displacement"),
                               eps=cfg.analysis.eps))
    summary["cos_null_scale"] = P.null_cos_scale(int(run.meta["n_params"]))

    per_epoch = pd.concat({c: P.per_epoch(steps, c, tail=tail) for c in ("gamma", "gamma_rp", "gamma_rc")},
                          axis=1)
    per_epoch.columns = [f"{a}_{b}" for a, b in per_epoch.columns]
    store.write_parquet(f"{base}/per_epoch.parquet", per_epoch.reset_index())

    rate = P.rate_bound(steps.iloc[: len(steps) - tail] if tail else steps, gamma=summary["gamma_min"])
    store.write_parquet(f"{base}/rate.parquet", rate["table"])

    tensors = store.read_shards(f"{base}/tensors")
    if len(tensors):
        store.write_parquet(f"{base}/layers.parquet", P.layer_shares(tensors).reset_index())
        store.write_parquet(f"{base}/modules.parquet", P.module_shares(tensors).reset_index())
    samples = store.read_shards(f"{base}/samples")
    if len(samples):
        sample_summary, sample_epochs = P.per_sample_convergence(samples)
        summary.update({f"sample_{k}": v for k, v in sample_summary.items()})
        store.write_parquet(f"{base}/samples_per_epoch.parquet", sample_epochs.reset_index())

    epochs = run.epochs()
    main = epochs[epochs["epoch"] < run.meta["horizon_epochs"]] if len(epochs) else epochs
    if len(main):
        last = main.iloc[-1]
        summary.update({k: float(last[k]) for k in ("train_loss", "train_acc", "test_loss", "test_acc") if k in last})
    summary["reached_target"] = run.meta.get("reached_target")
    summary["epochs"] = run.meta["horizon_epochs"]
    store.write_json(f"{base}/summary.json", summary)
    store.update_json("run.json", status="complete")
    return summary
