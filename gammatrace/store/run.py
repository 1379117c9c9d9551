"""Reading and writing a run directory.

    runs/<name>/
      run.json                 config, seeds, versions, device, threads, status
      epochs.parquet           one row per epoch: full train/test loss and accuracy
      steps/epoch_0000.parquet pass-1 (record mode) rows, one per step
      samples/epoch_0000.parquet per-sample losses at each visit (pass 1)
      checkpoints/epoch_0000.pt state at the *start* of epoch e (weights_only-loadable)
      final.pt                 θ_T, the parameters at the end of the analysed horizon
      reference.pt             θ* of a continuation reference (θ_{T+E})
      analysis/<ref>/          pass-2 tables (steps/, tensors/, samples/) and summary.json

Every write goes to a temporary file in the same folder and is renamed into place, so
a run killed at any moment leaves either the old file or the new one, never a torn one.

Example:
    >>> import tempfile, pandas as pd
    >>> store = RunStore(tempfile.mkdtemp())
    >>> store.write_json("run.json", {"status": "running"})
    >>> store.write_parquet("steps/epoch_0000.parquet", pd.DataFrame({"step": [0, 1]}))
    >>> store.read_json("run.json")["status"], len(store.read_shards("steps"))
    ('running', 2)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from gammatrace.config import RunConfig

FORMAT_VERSION = 1


class Status(StrEnum):
    """Where a run is in its life; a str, so it compares equal to the name in run.json."""

    RUNNING = "running"  # pass 1 in progress (or interrupted: rerun to resume)
    TRAINED = "trained"  # pass 1 done: horizon (and continuation) trained, final.pt written
    COMPLETE = "complete"  # analysed at least once
    DIVERGED = "diverged"  # the loss became NaN/inf during pass 1

    @property
    def finished_training(self) -> bool:
        return self in (Status.TRAINED, Status.COMPLETE)


class RunMeta(BaseModel):
    """run.json: a run's identity (config, provenance) and progress, typed.

    Example:
        >>> meta = RunMeta(config=RunConfig().model_dump(mode="json"))
        >>> meta.status, meta.status == "running", meta.epochs_done
        (<Status.RUNNING: 'running'>, True, 0)
    """

    # Fields written by later versions are kept, not lost, when an older one rewrites the file.
    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    config: dict[str, Any]  # as stored; :meth:`run_config` gives the typed (upgraded) config
    status: Status = Status.RUNNING
    provenance: dict[str, Any] = {}
    created: str | None = None
    epochs_done: int = 0
    horizon_epochs: int | None = None  # epochs in the analysed horizon, once reached
    horizon_steps: int | None = None
    reached_target: bool | None = None
    steps_per_epoch: int | None = None
    n_params: int | None = None
    displacement: float | None = None  # ‖θ_0 − θ_T‖
    diverged_at_step: int | None = None
    error: str | None = None

    def run_config(self) -> RunConfig:
        return RunConfig.from_stored(self.config)


class StoreError(RuntimeError):
    """A run directory is missing, of another format, or holds a damaged file."""


def _jsonable(obj: Any) -> Any:
    # NaN/inf are not JSON; store them as null so any JSON reader can load run files.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


class RunStore:
    """Atomic file access below one run directory, and where each file lives (DESIGN §4):
    every module asks the store for a path instead of spelling it.

    Example:
        >>> store = RunStore("runs/a")
        >>> store.checkpoint(3), store.analysis("last", "steps"), store.shard("steps", 2)
        ('checkpoints/epoch_0003.pt', 'analysis/last/steps', 'steps/epoch_0002.parquet')
    """

    META = "run.json"
    EPOCHS = "epochs.parquet"
    FINAL = "final.pt"  # θ_T
    REFERENCE = "reference.pt"  # θ* of a continuation reference
    STEPS = "steps"  # pass-1 step shards
    SAMPLES = "samples"  # pass-1 per-sample shards

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def shard(folder: str, epoch: int, suffix: str = "parquet") -> str:
        return shard(folder, epoch, suffix)

    @staticmethod
    def checkpoint(epoch: int) -> str:
        """The state at the *start* of ``epoch``."""
        return shard("checkpoints", epoch, "pt")

    @staticmethod
    def analysis(reference: str, *parts: str) -> str:
        """A path below the analysis of one reference, e.g. ``analysis("last", "summary.json")``."""
        return "/".join(("analysis", reference, *parts))

    # ---------------------------------------------------------------- run.json
    def read_meta(self) -> RunMeta:
        data = self.read_json(self.META)
        if not isinstance(data, dict):
            raise StoreError(f"{self.path(self.META)} is damaged: expected a JSON object, got {type(data).__name__}")
        try:
            return RunMeta.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "(top level)"
            raise StoreError(f"{self.path(self.META)} is damaged: field '{field}': {err['msg']}") from None

    def write_meta(self, meta: RunMeta) -> None:
        self.write_json(self.META, meta.model_dump(mode="json"))

    def update_meta(self, **fields: Any) -> RunMeta:
        meta = self.read_meta().model_copy(update=fields)
        self.write_meta(RunMeta.model_validate(meta.model_dump()))  # validate the update too
        return self.read_meta()

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def _atomic(self, rel: str, write) -> None:
        target = self.path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            # No fsync: rename is atomic against a killed process (the failure resume
            # handles); fsync per file would cost more than a small run's training.
            write(tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ---------------------------------------------------------------- JSON
    def write_json(self, rel: str, obj: Any) -> None:
        text = json.dumps(_jsonable(obj), indent=2, sort_keys=False, allow_nan=False)
        self._atomic(rel, lambda p: Path(p).write_text(text + "\n"))

    def read_json(self, rel: str) -> Any:
        path = self.path(rel)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise StoreError(f"{path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path} is damaged ({exc})") from None

    def update_json(self, rel: str, **fields: Any) -> dict:
        data = self.read_json(rel) if self.exists(rel) else {}
        data.update(fields)
        self.write_json(rel, data)
        return data

    # ------------------------------------------------------------- Parquet
    def write_parquet(self, rel: str, frame: pd.DataFrame) -> None:
        self._atomic(rel, lambda p: frame.to_parquet(p, index=False))

    def read_parquet(self, rel: str) -> pd.DataFrame:
        try:
            return pd.read_parquet(self.path(rel))
        except FileNotFoundError:
            raise StoreError(f"{self.path(rel)} does not exist") from None
        except Exception as exc:
            raise StoreError(f"{self.path(rel)} is damaged ({exc.__class__.__name__}: {exc})") from None

    def shard_paths(self, folder: str) -> list[str]:
        d = self.path(folder)
        return sorted(f"{folder}/{p.name}" for p in d.glob("epoch_*.parquet")) if d.is_dir() else []

    def read_shards(self, folder: str) -> pd.DataFrame:
        """Concatenate the per-epoch shards of a folder in epoch order."""
        frames = [self.read_parquet(rel) for rel in self.shard_paths(folder)]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    # --------------------------------------------------------------- torch
    def write_torch(self, rel: str, obj: Any) -> None:
        self._atomic(rel, lambda p: torch.save(obj, p))

    def read_torch(self, rel: str, map_location: Any = "cpu") -> Any:
        path = self.path(rel)
        if not path.is_file():
            raise StoreError(f"{path} does not exist")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise StoreError(
                f"{path} is corrupt or truncated ({exc.__class__.__name__}); "
                "nothing was changed - remove it to resume from the previous epoch"
            ) from None


def shard(folder: str, epoch: int, suffix: str = "parquet") -> str:
    return f"{folder}/epoch_{epoch:04d}.{suffix}"


class Run:
    """A run on disk, read-only: config, status, and the measured tables.

    Example:
        >>> run = load_run("runs/quickstart/relu")            # doctest: +SKIP
        >>> run.steps()[["step", "gamma", "dist_sq"]].head()  # doctest: +SKIP
    """

    def __init__(self, path: str | Path):
        self.store = RunStore(path)
        self.path = self.store.root
        if not self.store.exists(RunStore.META):
            raise StoreError(f"{self.path} is not a gammatrace run (no run.json)")
        raw = self.store.read_json(RunStore.META)
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if version != FORMAT_VERSION:
            raise StoreError(f"{self.path}: run format {version} is not supported (expected {FORMAT_VERSION})")
        self.meta = self.store.read_meta()

    @property
    def name(self) -> str:
        return self.meta.config.get("name") or self.path.name

    @property
    def config(self) -> RunConfig:
        try:
            return self.meta.run_config()
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"])
            raise StoreError(f"{self.store.path(RunStore.META)} is damaged: config field '{field}': {err['msg']}") from None

    @property
    def status(self) -> Status:
        return self.meta.status

    def record_steps(self) -> pd.DataFrame:
        """Pass-1 rows (record mode): step, epoch, lr, loss, update_sq, grad_sq, dist0_sq."""
        return self.store.read_shards(RunStore.STEPS)

    def epochs(self) -> pd.DataFrame:
        """One row per epoch: full-dataset train/test loss and accuracy after the epoch."""
        return self.store.read_parquet(RunStore.EPOCHS) if self.store.exists(RunStore.EPOCHS) else pd.DataFrame()

    def references(self) -> list[str]:
        d = self.path / "analysis"
        return sorted(p.name for p in d.iterdir() if (p / "summary.json").exists()) if d.is_dir() else []

    def _ref(self, reference: str | None) -> str:
        refs = self.references()
        if reference is None:
            if not refs:
                raise StoreError(f"{self.path} has no analysis yet; run `gammatrace analyze {self.path}`")
            return "last" if "last" in refs else refs[0]
        if reference not in refs:
            raise StoreError(f"{self.path} has no analysis for reference '{reference}' (has: {refs or 'none'})")
        return reference

    def steps(self, reference: str | None = None) -> pd.DataFrame:
        """The DESIGN.md §6 per-step table for a reference (default: 'last')."""
        return self.store.read_shards(RunStore.analysis(self._ref(reference), "steps"))

    def tensor_steps(self, reference: str | None = None) -> pd.DataFrame:
        return self.store.read_shards(RunStore.analysis(self._ref(reference), "tensors"))

    def sample_steps(self, reference: str | None = None) -> pd.DataFrame:
        return self.store.read_shards(RunStore.analysis(self._ref(reference), "samples"))

    def summary(self, reference: str | None = None) -> dict:
        return self.store.read_json(RunStore.analysis(self._ref(reference), "summary.json"))


def load_run(path: str | Path) -> Run:
    """Open a run directory for reading (see :class:`Run`)."""
    return Run(path)
