"""Disk budget: what runs will write, estimated before they start; checkpoint spacing chosen
from a budget; pruning of checkpoints after a successful analysis.

A run writes one checkpoint (model + optimizer state) every ``checkpoint_every`` epochs
and at the horizon, θ_T (and a continuation θ*), per-epoch step and per-sample tables
(pass 1) and, per reference analysed, the pass-2 tables (steps, per-tensor, per-sample) and
summaries. The estimate builds the network on the CPU (no data is read: shapes of the
local-folder datasets are known, generated ones are generated at a tiny size), serialises
a checkpoint of the real state, and writes tables of the real schema and row counts, so
its sizes are those of the files the run will write; ``du`` adds each file's rounding to
whole blocks (4 KiB), which the estimate counts too. With ``target_loss`` a run may stop
early: the estimate is then an upper bound.

Pruning (:func:`prune_checkpoints`) keeps θ_T, the continuation θ* and their hashes, so
an analysis can be re-summarised (``--tail``, ``--ell-inf``); a new reference or a landscape
needs the checkpoints and is refused on a pruned run.

Example:
    >>> from gammatrace.config import RunConfig
    >>> cfg = RunConfig.model_validate({"epochs": 4, "batch_size": 32, "data": {"name": "digits", "n_train": 96},
    ...                                 "model": {"name": "mlp", "width": 8, "depth": 2}})
    >>> est = estimate_run(cfg)
    >>> est.n_checkpoints, est.checkpoint_every, est.total > est.pruned > 0
    (5, 1, True)
    >>> estimate_run(cfg.model_copy(update={"checkpoint_every": 2})).n_checkpoints   # epochs 0, 2, 4
    3
    >>> plan = plan_disk({"a": cfg}, "runs/a", max_disk=1.0)
    >>> plan.fits, plan.prune   # 1 GiB holds it; a budget implies pruning
    (True, True)
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from gammatrace import principles as P
from gammatrace.config import RunConfig
from gammatrace.data import DATASETS, Dataset, apply_options, load_dataset
from gammatrace.data.tasks import TASK_OPTIONS, apply_task
from gammatrace.engine.refcache import why_not_cached
from gammatrace.engine.session import DTYPES
from gammatrace.errors import UserError
from gammatrace.models import build
from gammatrace.probe import Probe
from gammatrace.store import integrity
from gammatrace.store.backend import Location, is_remote, location
from gammatrace.store.run import Run, RunStore, Status
from gammatrace.techniques import make_optimizer

GiB = float(1 << 30)
BLOCK = 4096  # du counts whole blocks of the file system

# Datasets read from a local folder: shape, classes and size without reading it.
_FOLDER_DATASETS: dict[str, tuple[tuple[int, ...], dict[str, int] | int, int, int]] = {
    # name: (input shape, classes (by label_mode), training samples, test samples)
    "cifar10": ((3, 32, 32), 10, 50000, 10000),
    "cifar100": ((3, 32, 32), {"fine": 100, "coarse": 20}, 50000, 10000),
    "mnist": ((1, 28, 28), 10, 60000, 10000),
    "fashion_mnist": ((1, 28, 28), 10, 60000, 10000),
}


class BudgetError(UserError):
    """The estimated disk use exceeds the free space or the ``--max-disk`` budget."""


# ------------------------------------------------------------------ what a run looks like
@dataclass(frozen=True)
class DataShape:
    input_shape: tuple[int, ...]
    num_classes: int
    n_train: int
    task: str = "classification"


def data_shape(cfg: RunConfig) -> DataShape:
    """Input shape, classes and training-set size of a run's data, without its data folder.

    Example:
        >>> data_shape(RunConfig.model_validate({"data": {"name": "cifar100", "data_dir": "/nowhere", "n_train": 256}}))
        DataShape(input_shape=(3, 32, 32), num_classes=100, n_train=256, task='classification')
    """
    d = cfg.data
    switches = d.switches()
    transforms = {k: switches.pop(k) for k in ("downscale", "normalize") if k in switches}
    if d.name in _FOLDER_DATASETS:
        shape, classes, n, n_test = _FOLDER_DATASETS[d.name]
        k = classes[switches.get("label_mode", "fine")] if isinstance(classes, dict) else classes
        if d.classes:
            n, k = n * len(d.classes) // k, len(d.classes)
        proxy = Dataset(d.name, torch.zeros(2, *shape), torch.zeros(2, dtype=torch.long), torch.zeros(1, *shape),
                        torch.zeros(1, dtype=torch.long), "classification", k)
        # The task (task: reconstruct makes it an image regression) and transforms, as the real set gets them.
        proxy = apply_options(apply_task(proxy, **{o: switches[o] for o in TASK_OPTIONS if o in switches}),
                              downscale=transforms.get("downscale"))
        return DataShape(proxy.input_shape, proxy.num_classes, min(n, d.n_train or n), proxy.task)
    factory = DATASETS.get(d.name)
    params = inspect.signature(factory).parameters
    takes = "num_train" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    default = params["num_train"].default if "num_train" in params else None
    n_full = switches.get("num_train", default)
    if takes and isinstance(n_full, int):
        # Generated at a tiny size: the shapes are those of the full set.
        small = load_dataset(d.name, classes=d.classes, **{**switches, "num_train": min(n_full, 16),
                                                           "num_test": 4}, downscale=transforms.get("downscale"))
        n = n_full if not d.classes else n_full * small.n_train // max(min(n_full, 16), 1)
        return DataShape(small.input_shape, small.num_classes, min(n, d.n_train or n), small.task)
    ds = load_dataset(d.name, n_train=d.n_train, n_test=1, classes=d.classes, **switches,
                      downscale=transforms.get("downscale"))
    return DataShape(ds.input_shape, ds.num_classes, ds.n_train, ds.task)


class _Counter(io.RawIOBase):
    """A write-only file that only counts bytes (torch.save of a large state, no copy)."""

    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        self.n += n
        return n


def saved_size(obj: Any) -> int:
    """Bytes ``torch.save`` writes for ``obj`` (as RunStore.write_torch writes it).

    Example:
        >>> saved_size({"w": torch.zeros(1000)}) > 4000
        True
    """
    counter = _Counter()
    torch.save(obj, counter)
    return counter.n


def _parquet_size(frame: pd.DataFrame) -> int:
    with tempfile.TemporaryDirectory(prefix="gammatrace-estimate-") as tmp:
        path = os.path.join(tmp, "t.parquet")
        integrity.write_parquet(frame, path)
        return os.path.getsize(path)


def _du(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


@functools.cache
def _schemas() -> dict[str, dict[str, Any]]:
    """Column names and dtypes of the tables the probe writes (record and reference mode),
    read off a probe on a tiny model, so the estimate follows the real schema."""
    torch.manual_seed(0)
    x, y, idx = torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.arange(4)

    def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    out: dict[str, dict[str, Any]] = {}
    for mode in ("record", "reference"):
        model = nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ref = {k: v.clone() for k, v in model.state_dict().items()} if mode == "reference" else None
        probe = Probe(model, opt, loss_fn if ref else None, reference=ref, per_tensor=mode == "reference")
        for _ in range(2):
            opt.zero_grad()
            per = loss_fn(model, (x, y))
            per.mean().backward()
            probe.step(per.mean(), (x, y), indices=idx, sample_losses=per)
        steps, tensors, samples = probe.take()
        if mode == "reference":
            steps = P.derive(steps, d0_sq=1.0)
        for name, frame in (("steps", steps), ("tensors", tensors), ("samples", samples)):
            out[f"{mode}_{name}"] = {c: frame[c].dtype for c in frame.columns}
    return out


def _synthetic(schema: dict[str, Any], rows: int, *, per_step: int = 1, tensor_names: list[str] | None = None,
               n_train: int = 1) -> pd.DataFrame:
    """A table of the schema with ``rows`` rows (``per_step`` rows per step) of realistic
    entropy: counters and the lr compress as the real ones do, measured values are random."""
    rng = np.random.default_rng(0)
    cols: dict[str, Any] = {}
    for c, dtype in schema.items():
        if c in ("step", "next_step"):
            cols[c] = np.arange(rows, dtype=np.int64) // max(per_step, 1)
        elif c == "epoch":
            cols[c] = np.zeros(rows, dtype=np.int64)
        elif c == "lr":
            cols[c] = np.full(rows, 0.05)
        elif c == "index":
            cols[c] = (rng.permutation(max(rows, 1))[:rows] % max(n_train, 1)).astype(dtype)
        elif c == "tensor":
            names = tensor_names or ["t"]
            cols[c] = [names[i % len(names)] for i in range(rows)]
        elif np.issubdtype(dtype, np.integer):
            cols[c] = np.arange(rows, dtype=dtype)
        else:
            cols[c] = rng.standard_normal(rows).astype(np.float32).astype(dtype)
    return pd.DataFrame(cols)


# ------------------------------------------------------------------------ the estimate
@dataclass
class RunEstimate:
    """What one run writes (bytes as the files will hold them; ``du``: rounded to blocks)."""

    name: str
    network: str
    epochs: int  # the analysed horizon (an upper bound with target_loss)
    extra_epochs: int  # continuation epochs
    checkpoint_every: int
    n_checkpoints: int
    checkpoint_bytes: int  # one checkpoint: model + optimizer state
    final_bytes: int  # θ_T (+ the continuation θ*)
    record_bytes: int  # pass-1 step and per-sample tables, epochs.parquet, run.json
    analysis_bytes: int  # pass-2 tables and summaries, every reference
    files: int
    bound: bool = False  # target_loss may stop it earlier
    first_checkpoint_bytes: int = 0  # checkpoint 0: before the first step, no optimizer state yet

    @property
    def checkpoints(self) -> int:
        return (self.n_checkpoints - 1) * _du(self.checkpoint_bytes) + _du(self.first_checkpoint_bytes
                                                                            or self.checkpoint_bytes)

    @property
    def total(self) -> int:
        """Bytes on disk (du) once the run is analysed."""
        return self.checkpoints + self.final_bytes + self.record_bytes + self.analysis_bytes

    @property
    def pruned(self) -> int:
        """Bytes on disk after :func:`prune_checkpoints`."""
        return self.total - self.checkpoints


def _key(cfg: RunConfig) -> str:
    # Runs that differ only in name, seed or starting point write files of the same sizes.
    data = cfg.model_dump(mode="json", exclude={"name", "seed", "checkpoint_every"})
    data["model"].pop("init_from", None)
    return json.dumps(data, sort_keys=True)


def _spacing(cfg: RunConfig, every: int | None) -> int:
    if every is not None:
        return every
    return cfg.checkpoint_every if isinstance(cfg.checkpoint_every, int) else 1


def checkpoint_epochs(horizon: int, extra: int, every: int) -> list[int]:
    """Epochs whose start state pass 1 keeps: multiples of ``every`` and the horizon.

    Example:
        >>> checkpoint_epochs(7, 2, 3)
        [0, 3, 6, 7, 9]
    """
    return sorted({e for e in range(horizon + extra + 1) if e % every == 0} | {horizon})


@functools.lru_cache(maxsize=64)
def _measure(key: str) -> tuple:
    """The sizes of a run's files (everything but the number of checkpoints)."""
    cfg = RunConfig.model_validate(json.loads(key))
    shape = data_shape(cfg)
    dtype = DTYPES[cfg.dtype]
    torch.manual_seed(0)
    model = build(cfg.model.name, input_shape=shape.input_shape, num_classes=shape.num_classes,
                  **cfg.model.switches()).to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg.optim.name, **cfg.optim.optimizer_kwargs())
    # Checkpoint 0 is written before the first step: the optimizer has no state yet.
    first = saved_size({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0, "step": 0})
    for p in params:  # one step with zero gradients creates the optimizer's state
        p.grad = torch.zeros_like(p)
    opt.step()
    horizon, extra = cfg.epochs, cfg.reference.extra_epochs
    spe = shape.n_train // cfg.batch_size if cfg.drop_last else -(-shape.n_train // cfg.batch_size)
    visits = spe * cfg.batch_size if cfg.drop_last else shape.n_train
    step = (horizon + extra) * spe
    ckpt = saved_size({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": horizon + extra,
                       "step": step})
    final = saved_size({"model": model.state_dict()})
    schemas = _schemas()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    files = 2  # final.pt, run.json
    # pass 1: one step shard and one per-sample shard per epoch trained, epochs.parquet
    rec_steps = _du(_parquet_size(_synthetic(schemas["record_steps"], spe)))
    rec_samples = _du(_parquet_size(_synthetic(schemas["record_samples"], visits, per_step=cfg.batch_size,
                                               n_train=shape.n_train)))
    epochs_trained = horizon + extra
    # + epochs.parquet, run.json and the .lock file
    record = epochs_trained * (rec_steps + rec_samples) + _du(8 * 1024 * (1 + epochs_trained // 64)) + 2 * BLOCK
    files += 2 * epochs_trained + 1
    # pass 2, per reference: steps (with derived columns), per-tensor and per-sample shards
    refs = 1 + (1 if extra else 0)
    a_steps = _du(_parquet_size(_synthetic(schemas["reference_steps"], spe)))
    per_epoch = a_steps
    files_per_epoch = 1
    if cfg.analysis.per_tensor:
        per_epoch += _du(_parquet_size(_synthetic(schemas["reference_tensors"], spe * len(names),
                                                  per_step=len(names), tensor_names=names)))
        files_per_epoch += 1
    if cfg.analysis.per_sample:
        per_epoch += _du(_parquet_size(_synthetic(schemas["reference_samples"], visits, per_step=cfg.batch_size,
                                                  n_train=shape.n_train)))
        files_per_epoch += 1
    # summaries, per-epoch/rate/layer tables, the per-sample reference losses and records
    # summary.json, reference_cache.json, samples_per_epoch, layers/modules, per_epoch and rate
    # tables (sizes measured on runs: a few KiB, growing with the tensors and the epochs) and,
    # when the reference losses are cached, their file
    cached = why_not_cached(cfg, model) is None
    small = 3 * BLOCK + 2 * _du(6144 + 48 * len(names)) + _du(12288 + 96 * horizon) + _du(4096 + 64 * horizon) \
        + (_du(shape.n_train * dtype.itemsize + 1536) if cached else 0)
    analysis = refs * (horizon * per_epoch + small)
    files += refs * (horizon * files_per_epoch + 8)
    final_total = _du(final) * (1 + (1 if extra else 0))
    return (cfg.model.name, horizon, extra, ckpt, final_total, record, analysis, files, cfg.target_loss is not None,
            _du(final), first, refs if cached else 0)


def estimate_run(cfg: RunConfig, name: str | None = None, every: int | None = None) -> RunEstimate:
    """The disk use of one run (``every``: another checkpoint spacing than the config's)."""
    k = _spacing(cfg, every)
    network, horizon, extra, ckpt, final, record, analysis, files, bound, _, first, cached_refs = _measure(_key(cfg))
    n_ckpt = len(checkpoint_epochs(horizon, extra, k))
    # a cached replay records the check of each segment (one small JSON per segment)
    analysis += cached_refs * -(-horizon // k) * BLOCK
    return RunEstimate(name or cfg.name, network, horizon, extra, k, n_ckpt, ckpt, final, record, analysis,
                       files + n_ckpt, bound, first)


def saved_size_of_model(cfg: RunConfig) -> int:
    """Bytes of the model's state as a file (a shared initial point)."""
    return _measure(_key(cfg))[-3]


# --------------------------------------------------------------------------- the plan
def free_bytes(out: str | Path | Location) -> int | None:
    """Free bytes on the file system of ``out`` (its nearest existing folder); None for
    object storage, which reports none."""
    loc = location(out)
    if isinstance(loc, Location):
        return None
    p = Path(loc).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def used_bytes(out: str | Path | Location) -> int:
    """What ``out`` holds already (a resumed run or study counts it against its estimate)."""
    loc = location(out)
    if isinstance(loc, Location):
        return RunStore(loc).usage()
    if not Path(loc).exists():
        return 0
    return sum(p.stat().st_blocks * 512 for p in Path(loc).rglob("*") if p.is_file())


@dataclass
class DiskPlan:
    """The estimate of a set of runs against the budget (see :func:`plan_disk`)."""

    out: str
    runs: list[RunEstimate]
    init_bytes: int = 0
    workers: int = 1
    prune: bool = False
    max_disk: float | None = None  # GiB
    free: int | None = None
    used: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Bytes on disk when every run is analysed and nothing is pruned."""
        return sum(r.total for r in self.runs) + self.init_bytes

    @property
    def peak(self) -> int:
        """The most the folder holds at once: with pruning, every run pruned except the
        ``workers`` largest still holding their checkpoints."""
        if not self.prune:
            return self.total
        held = sorted((r.checkpoints for r in self.runs), reverse=True)[: max(self.workers, 1)]
        return sum(r.pruned for r in self.runs) + sum(held) + self.init_bytes

    @property
    def final(self) -> int:
        """Bytes left when the work is done (after pruning, if on)."""
        return (sum(r.pruned for r in self.runs) if self.prune else sum(r.total for r in self.runs)) + self.init_bytes

    @property
    def problem(self) -> str | None:
        """Why the plan does not fit (None: it fits)."""
        if self.max_disk is not None and self.peak > self.max_disk * GiB:
            return (f"the estimated disk use, {self.peak / GiB:.3g} GiB at its peak, exceeds --max-disk "
                    f"{self.max_disk:g} GiB")
        if self.free is not None and self.peak - self.used > self.free:
            return (f"the estimated disk use, {self.peak / GiB:.3g} GiB at its peak ({self.used / GiB:.3g} GiB "
                    f"already there), exceeds the {self.free / GiB:.3g} GiB free at {self.out}")
        return None

    @property
    def fits(self) -> bool:
        return self.problem is None

    def check(self) -> None:
        """Raise :class:`BudgetError` (one line, with the ways out) when it does not fit."""
        problem = self.problem
        if problem is None:
            return
        ways = ["set checkpoint_every (e.g. 'auto') to keep fewer checkpoints"]
        if not self.prune:
            ways.append("add --prune-checkpoints")
        ways.append("free some space or choose another --out")
        raise BudgetError(f"{problem}; {', or '.join(ways)} (see --dry-run)")

    def table(self) -> str:
        """The plan as text: one line per run, then the totals."""
        def gib(b: int) -> str:
            return f"{b / GiB:.3f}"

        head = (f"{'run':<24} {'network':<14} {'epochs':>8} {'ckpt every':>10} {'checkpoints':>18} "
                f"{'GiB':>8} {'pruned GiB':>10}")
        lines = [f"disk plan for {self.out}", head]
        for r in self.runs:
            epochs = f"{r.epochs}+{r.extra_epochs}" if r.extra_epochs else str(r.epochs)
            ckpts = f"{r.n_checkpoints} x {r.checkpoint_bytes / 2**20:.1f} MiB"
            lines.append(f"{r.name[:24]:<24} {r.network[:14]:<14} {epochs:>8} {r.checkpoint_every:>10} {ckpts:>18} "
                         f"{gib(r.total):>8} {gib(r.pruned):>10}")
        if self.init_bytes:
            lines.append(f"{'initial points':<24} {'':<14} {'':>8} {'':>10} {'':>18} {gib(self.init_bytes):>8} "
                         f"{gib(self.init_bytes):>10}")
        lines.append(f"total: {gib(self.total)} GiB without pruning; "
                     + (f"with pruning {gib(self.peak)} GiB at the peak ({self.workers} run(s) at a time), "
                        f"{gib(self.final)} GiB at the end" if self.prune else "pruning off (--prune-checkpoints)"))
        budget = [f"free {gib(self.free)} GiB" if self.free is not None
                  else "free space: not reported (object storage)" if is_remote(self.out)
                  else "free space: not checked (--no-check-free)"]
        if self.used:
            budget.append(f"{gib(self.used)} GiB already there")
        if self.max_disk is not None:
            budget.append(f"budget --max-disk {self.max_disk:g} GiB")
        lines.append("; ".join(budget))
        if any(r.bound for r in self.runs):
            lines.append("runs with target_loss may stop earlier: their figures are upper bounds")
        lines.extend(self.notes)
        lines.append("fits" if self.fits else f"does not fit: {self.problem}")
        return "\n".join(lines)


def plan_disk(configs: dict[str, RunConfig], out: str | Path | Location, *, max_disk: float | None = None,
              prune_checkpoints: bool = False, dry_run: bool = False, check_free: bool = True, workers: int = 1,
              init_points: dict[str, RunConfig] | None = None) -> DiskPlan:
    """The disk plan of ``configs`` (run name -> config) written below ``out``; checkpoint
    spacings of ``"auto"`` are chosen here: the densest one that fits the budget.

    Args:
        configs: run name -> config
        out: the output folder
        max_disk: disk budget in GiB for everything written below --out; implies
            --prune-checkpoints; refused before training when the estimate exceeds it
        prune_checkpoints: delete a run's epoch checkpoints once its analysis succeeded
            (keeps θ_T, the continuation θ* and their hashes: --tail/--ell-inf re-analysis works,
            a new reference or a landscape does not)
        dry_run: print the plan and the disk estimate, then stop (no training; no data folder needed)
        check_free: refuse to start when the estimate exceeds the free space (--no-check-free: start
            anyway, e.g. when space is freed meanwhile; a full disk then stops the run, which resumes)
        workers: runs trained at the same time (each holds its checkpoints until pruned)
        init_points: shared initial points written (name -> a config of its network)
    """
    prune = prune_checkpoints or max_disk is not None
    if max_disk is not None and not max_disk > 0:
        raise UserError(f"--max-disk must be a positive number of GiB, got {max_disk}")
    free = free_bytes(out) if check_free else None
    plan = DiskPlan(str(out), [], workers=workers, prune=prune, max_disk=max_disk, free=free,
                    used=used_bytes(out))
    plan.init_bytes = sum(saved_size_of_model(c) for c in (init_points or {}).values())
    auto = [n for n, c in configs.items() if c.checkpoint_every == "auto"]
    fixed = {n: estimate_run(c, n) for n, c in configs.items() if n not in auto}
    chosen = 1
    if auto:
        horizon = max(configs[n].epochs + configs[n].reference.extra_epochs for n in auto)
        for k in _candidates(horizon):
            chosen = k
            plan.runs = [fixed[n] if n in fixed else estimate_run(c, n, every=k) for n, c in configs.items()]
            if plan.fits:
                break
        plan.notes.append(f"checkpoint_every 'auto' -> {chosen} (the densest spacing that fits)")
    else:
        plan.runs = list(fixed.values())
    return plan


def _candidates(horizon: int) -> list[int]:
    return sorted({k for k in range(1, max(horizon, 1) + 1) if k <= 8 or horizon // k != horizon // (k - 1)})


def resolved(configs: dict[str, RunConfig], plan: DiskPlan) -> dict[str, RunConfig]:
    """``configs`` with ``checkpoint_every: auto`` replaced by the plan's choice."""
    spacing = {r.name: r.checkpoint_every for r in plan.runs}
    return {n: c.model_copy(update={"checkpoint_every": spacing[n]}) if c.checkpoint_every == "auto" else c
            for n, c in configs.items()}


def announce(plan: DiskPlan, *, dry_run: bool, quiet: bool = False) -> None:
    """Print the plan (stdout for a dry run, stderr before real work) and refuse when it
    does not fit (not for a dry run, whose output says so)."""
    if dry_run:
        print(plan.table())
        return
    if not quiet:
        est = f"estimated disk use: {plan.total / GiB:.3f} GiB for {len(plan.runs)} run(s)"
        if plan.prune:
            est += f", {plan.peak / GiB:.3f} GiB at the peak with pruning"
        per = ", ".join(f"{r.name} {r.total / GiB:.3f}" for r in plan.runs[:6]) + (", …" if len(plan.runs) > 6 else "")
        print(f"gammatrace: {est} (GiB per run: {per})", file=sys.stderr)
    plan.check()


# ------------------------------------------------------------------------------ pruning
def prune_checkpoints(run_path: str | Path | Location) -> int:
    """Delete the epoch checkpoints of an analysed run; returns the bytes freed.

    Kept: θ_T (final.pt), the continuation θ* (reference.pt), their hashes in run.json and
    every analysis. Refused (one line) for a run not analysed yet.

    Example:
        >>> import tempfile, gammatrace
        >>> run = gammatrace.train({"name": "demo", "seed": 3, "epochs": 2, "batch_size": 32,
        ...                         "data": {"name": "digits", "n_train": 96, "n_test": 64},
        ...                         "model": {"name": "mlp", "width": 8, "depth": 2}}, out=tempfile.mkdtemp() + "/d",
        ...                        progress=False)
        >>> prune_checkpoints(run.path) > 0, run.store.files("checkpoints"), Run(run.path).meta.checkpoints_pruned
        (True, [], True)
    """
    run = Run(run_path)
    if run.status != Status.COMPLETE:
        raise UserError(f"{run.path} is '{run.status}'; checkpoints are pruned only after a successful analysis")
    store = run.store
    with store.lock():
        names = [n for n in store.files("checkpoints") if n.startswith("epoch_") and n.endswith(".pt")]
        freed = store.usage("checkpoints")
        store.update_meta(checkpoints_pruned=True)  # first: a pruned run must never look replayable
        for n in names:
            store.remove(f"checkpoints/{n}")
    return freed
