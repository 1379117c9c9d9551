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
A run folder may also live on object storage (``s3://bucket/runs/a``: one PUT per file,
a conditional-create lock; see :mod:`gammatrace.store.backend`).

Example:
    >>> import tempfile, pandas as pd
    >>> store = RunStore(tempfile.mkdtemp())
    >>> store.write_json("run.json", {"status": "running"})
    >>> store.write_parquet("steps/epoch_0000.parquet", pd.DataFrame({"step": [0, 1]}))
    >>> store.read_json("run.json")["status"], len(store.read_shards("steps"))
    ('running', 2)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from gammatrace.config import RunConfig
from gammatrace.errors import RunInUseError, UserError, os_error
from gammatrace.machine import machine_id
from gammatrace.store import integrity
from gammatrace.store.backend import (
    Location,
    ObjectFiles,
    UnsafePathError,
    check_owner,
    confined,
    location,
    remove_inside,
    write_inside,
)
from gammatrace.store.summary import RunSummary

FORMAT_VERSION = 1
# RunMeta.source of a run recorded by the user's own training loop (gammatrace.save_run):
# its analysis is stored, not replayable; a new reference needs the two-pass again.
OWN_LOOP = "own-loop"


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
    # SHA-256 of θ_T and of a continuation θ* as pass 1 wrote them (see params_sha256):
    # every analysis checks final.pt / reference.pt against them before use.
    final_sha256: str | None = None
    reference_sha256: str | None = None
    continuation_error: str | None = None  # why a continuation reference is unavailable
    # Who trained the run: None for the engine (from the config, replayable), OWN_LOOP for a
    # loop gammatrace only watched; ``own_loop`` then describes it (recorded by, reference,
    # D_0², model and optimizer classes, seed, threads, skipped steps).
    source: str | None = None
    own_loop: dict[str, Any] | None = None
    # The epoch checkpoints were removed after a successful analysis (--prune-checkpoints):
    # θ_T, the continuation θ* and their hashes remain; replaying needs a retrained run.
    checkpoints_pruned: bool = False

    @model_validator(mode="after")
    def _complete_when_trained(self) -> RunMeta:
        if self.status.finished_training:
            for name in ("horizon_epochs", "steps_per_epoch", "n_params"):
                if getattr(self, name) is None:
                    raise ValueError(f"a {self.status.value} run needs '{name}', which is missing or null")
        return self

    def run_config(self) -> RunConfig:
        return RunConfig.from_stored(self.config)

    @property
    def machine(self) -> dict[str, Any] | None:
        """The fingerprint of the machine that recorded the run (:mod:`gammatrace.machine`);
        None for runs written before machines were recorded."""
        found = self.provenance.get("machine")
        return found if isinstance(found, dict) and found else None

    @property
    def machine_kind(self) -> str | None:
        """The recorded machine's kind (:func:`gammatrace.machine.machine_id`), or None."""
        return machine_id(self.machine) if self.machine else None


class StoreError(UserError, RuntimeError):
    """A run directory is missing, of another format, or holds a damaged file."""


def damaged(where: str | Path, exc: ValidationError, field: str = "field", fix: str = "") -> StoreError:
    """A stored file that fails its model's validation, as one line naming the file and the
    first offending field (and the ``fix``, when there is one)."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
    return StoreError(f"{where} is damaged: {field} '{loc}': {err['msg']}" + (f"; {fix}" if fix else ""))


def params_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """The identity of a set of parameters: SHA-256 of the sorted (name, dtype, shape,
    bytes) of every floating-point tensor it supplies. Two files with the same numbers
    under the same names have the same identity, whatever else they hold.

    Example:
        >>> a = {"w": torch.ones(2), "b": torch.zeros(1)}
        >>> params_sha256(a) == params_sha256(dict(reversed(a.items()))), len(params_sha256(a))
        (True, 64)
        >>> params_sha256(a) == params_sha256({"w": torch.ones(2), "b": torch.ones(1)})
        False
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _umask() -> int:
    # Read without changing it where Linux allows (os.umask is process-wide and racy).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def check_out_folder(path: str | Path | Location, flag: str = "--out") -> Path | Location:
    """``path`` as an output folder: refused (one line) when it, or a folder above it, is a file
    (a URL: when an object is stored under its very name), or when a symbolic link planted in
    a run or study folder leads there (:func:`~gammatrace.store.backend.check_owner`)."""
    path = location(path)
    if isinstance(path, Location):
        if ObjectFiles(path.parent).is_file(path.name):
            raise UserError(f"{flag} {path} is an object (a file); choose a folder")
        return path
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            where = "is a file" if p == path else f"lies below the file {p}"
            raise UserError(f"{flag} {path} {where}; choose a folder")
    check_owner(path)  # a link planted in a run or study folder (a study cell -> elsewhere)
    return path


# Locks this process holds, by lock-file path: POSIX record locks never conflict inside one
# process, so re-entry (train -> analyze on one run) is counted here instead.
_HELD: dict[str, list] = {}


def jsonable(obj: Any) -> Any:
    # NaN/inf are not JSON; store them as null so any JSON reader can load run files.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return jsonable(obj.item())
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
    SKIPPED = "skipped.parquet"  # an own loop's steps the optimizer never made

    def __init__(self, root: str | Path | Location):
        self.root = location(root)
        # A URL's files go through fsspec (backend.py); a local folder keeps the code below.
        self.remote = ObjectFiles(self.root) if isinstance(self.root, Location) else None
        self._lock = None  # the held lock object of a remote folder

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
        self.check_seal(data)
        data.pop(integrity.CHECKSUMS, None)
        try:
            return RunMeta.model_validate(data)
        except ValidationError as exc:
            raise damaged(self.path(self.META), exc) from None

    def check_seal(self, data: dict[str, Any]) -> None:
        """Refuse a run.json dict whose sealed fields differ from what was written, naming
        the first (see :mod:`gammatrace.store.integrity`); a run.json without a seal (written
        before there was one) is read unverified."""
        sums = data.get(integrity.CHECKSUMS)
        if sums is None:
            return
        rest = {k: v for k, v in data.items() if k != integrity.CHECKSUMS}
        changed = integrity.changed_fields(rest, sums) if isinstance(sums, dict) else [integrity.CHECKSUMS]
        if changed:
            more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
            raise StoreError(
                f"{self.path(self.META)} is damaged: field '{changed[0]}'{more} differs from what gammatrace "
                "wrote (checksum); restore the file from a copy or retrain the run (to analyse with other "
                "options, pass --tail/--ell-inf to analyze instead of editing the file)")

    def write_meta(self, meta: RunMeta) -> None:
        data = jsonable(meta.model_dump(mode="json"))
        data.pop(integrity.CHECKSUMS, None)
        self.write_json(self.META, {**data, integrity.CHECKSUMS: integrity.seal(data)})

    def update_meta(self, **fields: Any) -> RunMeta:
        meta = self.read_meta().model_copy(update=fields)
        self.write_meta(RunMeta.model_validate(meta.model_dump()))  # validate the update too
        return self.read_meta()

    def path(self, rel: str) -> Path | Location:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        return self.remote.exists(rel) if self.remote else self.path(rel).exists()

    def files(self, folder: str = "") -> list[str]:
        """Names of the files directly in ``folder`` (none when it does not exist)."""
        if self.remote:
            return self.remote.list(folder)
        d = self.path(folder)
        return sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []

    def remove(self, rel: str) -> None:
        """Delete one file (nothing when it is absent)."""
        target = self._inside(rel)
        if self.remote:
            self.remote.remove(str(confined(rel)))
            return
        try:
            remove_inside(self.root, rel, what="the run folder")
        except OSError as exc:
            raise (os_error(exc, f"removing {target}") or exc) from None

    def usage(self, rel: str = "") -> int:
        """Bytes the files below ``rel`` occupy (local: allocated blocks, as ``du``; remote:
        object sizes)."""
        if self.remote:
            return self.remote.usage(rel)
        base = self.path(rel)
        paths = [base] if base.is_file() else (p for p in base.rglob("*") if p.is_file()) if base.is_dir() else []
        return sum(p.stat().st_blocks * 512 for p in paths)

    def _read_bytes(self, rel: str) -> bytes:
        """A remote file's bytes; StoreError when it does not exist."""
        try:
            return self.remote.read_bytes(rel)
        except FileNotFoundError:
            raise StoreError(f"{self.path(rel)} does not exist") from None

    def _inside(self, rel: str) -> Path | Location:
        """The path of ``rel``, refused when it resolves (symlinks included) outside the root."""
        target = self.path(rel)
        if self.remote:
            if confined(rel) is None:  # a URL prefix: a name below the root stays below it
                raise StoreError(f"{rel!r} lies outside the run folder {self.root}; refusing to write there")
            return target
        root = self.root.resolve()
        if not target.resolve().is_relative_to(root):
            raise StoreError(f"{target} lies outside the run folder {self.root}; refusing to write there")
        return target

    def _atomic(self, rel: str, write) -> None:
        target = self._inside(rel)
        if self.remote:
            if self._lock is not None:
                self._lock.check()
            # One PUT of the complete file: readers see the old object or the new one.
            self.remote.write(str(confined(rel)), write)
            return
        try:
            # A temporary file in the target's folder, renamed into place; no folder or file
            # below the root may be a symbolic link (backend.write_inside). No fsync: rename
            # is atomic against a killed process (the failure resume handles); fsync per file
            # would cost more than a small run's training.
            write_inside(self.root, rel, write, what="the run folder")
        except OSError as exc:
            if os_error(exc, f"writing {target}") is not None:
                raise os_error(exc, f"writing {target}") from None
            raise
        except RuntimeError as exc:
            if "unexpected pos" in str(exc):
                # torch.save reports a short write (a full disk) this way
                raise StoreError(f"writing {target}: the write was cut short (no space left on device?); "
                                 "free some space and rerun the same command to resume") from None
            raise

    # ---------------------------------------------------------------- lock
    @contextlib.contextmanager
    def lock(self, clean: bool = True) -> Iterator[None]:
        """Hold the run folder's lock (``.lock``, an ``fcntl`` lock that dies with its process).

        A second writer is refused while a live holder exists, with the holder's PID; the
        lock is released when the holder exits, however it exits. Temporary files left
        by a killed writer are removed once the lock is held (``clean``; False for a folder
        the tool does not own, as a report's ``--out``: it may hold the user's own files).

        Example:
            >>> import tempfile
            >>> store = RunStore(tempfile.mkdtemp())
            >>> with store.lock():
            ...     with store.lock():   # re-entrant within one process
            ...         "held"
            'held'
        """
        key = str(self._inside(".lock").resolve())
        if self.remote:
            yield from self._remote_lock(key)
            return
        if key in _HELD:
            _HELD[key][1] += 1
            try:
                yield
            finally:
                _HELD[key][1] -= 1
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # Never through a link planted as .lock (its target would be truncated).
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            f = os.fdopen(fd, "r+")
        except OSError as exc:
            if (self.root / ".lock").is_symlink():
                raise UnsafePathError(f"{self.root / '.lock'} is a symbolic link inside the folder {self.root}; "
                                      "refusing to write through it (remove the link)") from None
            raise (os_error(exc, f"locking {self.root}") or exc) from None
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise RunInUseError(
                    f"{self.root} is in use by process {holder}; wait for it to finish, or stop it "
                    f"(kill {holder}) and rerun the same command to resume") from None
            raise
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _HELD[key] = [f, 1]
        try:
            if clean:
                self._remove_stale_temporaries()
            yield
        finally:
            del _HELD[key]
            f.close()  # releases the lock

    def _remote_lock(self, key: str) -> Iterator[None]:
        # A conditional-create lock object with holder and expiry (backend.ObjectLock).
        if key in _HELD:
            _HELD[key][1] += 1
            self._lock = _HELD[key][0]
            try:
                yield
            finally:
                _HELD[key][1] -= 1
            return
        with self.remote.lock() as held:
            _HELD[key] = [held, 1]
            self._lock = held
            try:
                yield
            finally:
                del _HELD[key]
                self._lock = None

    def _remove_stale_temporaries(self) -> None:
        # Only under the lock: no live writer of this folder can own one of these.
        for tmp in self.root.rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    # --------------------------------------------------------------- bytes
    def write_bytes(self, rel: str, data: bytes) -> None:
        """A file of any format, written atomically like every other."""
        self._atomic(rel, lambda p: Path(p).write_bytes(data))

    def read_bytes(self, rel: str) -> bytes:
        if self.remote:
            return self._read_bytes(rel)
        try:
            return self.path(rel).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{self.path(rel)} does not exist") from None

    # ---------------------------------------------------------------- JSON
    def write_json(self, rel: str, obj: Any) -> None:
        text = json.dumps(jsonable(obj), indent=2, sort_keys=False, allow_nan=False)
        self._atomic(rel, lambda p: Path(p).write_text(text + "\n"))

    def read_json(self, rel: str) -> Any:
        path = self.path(rel)
        try:
            return json.loads(self._read_bytes(rel).decode() if self.remote else path.read_text())
        except FileNotFoundError:
            raise StoreError(f"{path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else " ".join(str(exc).split())
            raise StoreError(f"{path} is damaged ({why}); restore it from a copy") from None

    def update_json(self, rel: str, **fields: Any) -> dict:
        data = self.read_json(rel) if self.exists(rel) else {}
        data.update(fields)
        self.write_json(rel, data)
        return data

    # ------------------------------------------------------------- Parquet
    def write_parquet(self, rel: str, frame: pd.DataFrame) -> None:
        """``frame`` without its index, with page CRCs and per-column checksums (see
        :mod:`gammatrace.store.integrity`)."""
        self._atomic(rel, lambda p: integrity.write_parquet(frame, p))

    def read_parquet(self, rel: str, required: Iterable[str] | Mapping[str, str] = (),
                     optional: Mapping[str, str] | None = None) -> pd.DataFrame:
        """A table, verified against the checksums written with it. ``required`` columns
        (a mapping: with their dtypes; names alone: of a real-number dtype) that are missing
        or of another type make it a damaged file, never a NaN or truncated column; so do
        ``optional`` columns (name: dtype) that are present with another type."""
        path = self.path(rel)
        # An analysis table is recomputed from the run; a pass-1 table only by retraining.
        fix = ("remove it and rerun the same command to recompute it" if rel.startswith("analysis/")
               else "restore it from a copy, or retrain the run in a new folder")
        if not (self.remote.is_file(rel) if self.remote else path.is_file()):
            raise StoreError(f"{path} does not exist")
        try:
            frame = integrity.read_parquet(io.BytesIO(self._read_bytes(rel)) if self.remote else str(path))
        except integrity.DamagedTable as exc:
            raise StoreError(f"{path} is damaged ({exc}); {fix}") from None
        missing = [c for c in required if c not in frame.columns]
        if missing:
            raise StoreError(f"{path} is damaged: column(s) {', '.join(missing)} missing; {fix}")
        wrong = [f"{c} is {frame[c].dtype}" for c in required
                 if (str(frame[c].dtype) != required[c] if isinstance(required, Mapping)
                     else frame[c].dtype.kind not in "iuf")]
        if wrong:
            expected = ", ".join(f"{c} {required[c]}" for c in required) if isinstance(required, Mapping) else "numbers"
            raise StoreError(f"{path} is damaged: column {wrong[0]} (expected {expected}); {fix}")
        odd = [c for c, dtype in (optional or {}).items() if c in frame.columns and str(frame[c].dtype) != dtype]
        if odd:
            raise StoreError(f"{path} is damaged: column {odd[0]} is {frame[odd[0]].dtype} "
                             f"(expected {optional[odd[0]]}); {fix}")  # type: ignore[index]
        return frame

    def shard_paths(self, folder: str) -> list[str]:
        if self.remote:
            return [f"{folder}/{n}" for n in self.remote.list(folder) if n.startswith("epoch_") and n.endswith(".parquet")]
        d = self.path(folder)
        return sorted(f"{folder}/{p.name}" for p in d.glob("epoch_*.parquet")) if d.is_dir() else []

    def read_shards(self, folder: str, required: Iterable[str] | Mapping[str, str] = (),
                    optional: Mapping[str, str] | None = None) -> pd.DataFrame:
        """Concatenate the per-epoch shards of a folder in epoch order (columns checked as
        :meth:`read_parquet` does)."""
        required = dict(required) if isinstance(required, Mapping) else tuple(required)
        frames = [self.read_parquet(rel, required, optional) for rel in self.shard_paths(folder)]
        frames = [f for f in frames if len(f)]
        if not frames:
            return pd.DataFrame()
        out = pd.concat(frames, ignore_index=True)
        # In the layout of the widest shard: a shard lacking a column recomputed from the
        # others must not reorder the columns of every shard rewritten after it.
        widest = list(max(frames, key=lambda f: f.shape[1]).columns)
        return out[widest + [c for c in out.columns if c not in widest]]

    # --------------------------------------------------------------- torch
    def write_torch(self, rel: str, obj: Any) -> None:
        def save(tmp: str) -> None:
            # Through a file object: torch.save names the archive inside after a *path*
            # (here a random temporary name), which would make equal states differ in bytes.
            with open(tmp, "wb") as f:
                torch.save(obj, f)

        self._atomic(rel, save)

    def read_torch(self, rel: str, map_location: Any = "cpu", *, advice: str = "") -> Any:
        """A file saved by :meth:`write_torch`, loaded with ``weights_only=True`` (no
        arbitrary objects are ever unpickled). ``advice`` ends the message of a damaged file."""
        path = self.path(rel)
        if self.remote:
            source: Any = io.BytesIO(self._read_bytes(rel))
        elif not path.is_file():
            raise StoreError(f"{path} does not exist")
        else:
            source = path
        try:
            with warnings.catch_warnings():  # a file of another pickle protocol: refused or read, not warned about
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                return torch.load(source, map_location=map_location, weights_only=True)
        except Exception as exc:
            # torch's own message suggests weights_only=False: never pass that on.
            raise StoreError(f"{path} is corrupt, truncated or not a tensor file ({exc.__class__.__name__})"
                             + (f"; {advice}" if advice else "")) from None


def shard(folder: str, epoch: int, suffix: str = "parquet") -> str:
    return f"{folder}/epoch_{epoch:04d}.{suffix}"


class Run:
    """A run on disk, read-only: config, status, and the measured tables.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> RunStore(folder).write_meta(RunMeta(config=RunConfig(name="demo").model_dump(mode="json")))
        >>> run = load_run(folder)
        >>> run.name, run.status.value, run.config.epochs
        ('demo', 'running', 10)
        >>> run.summary()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gammatrace.store.run.StoreError: ... has no analysis yet; run `gammatrace analyze ...`

    A trained and analysed run (:func:`gammatrace.train`) has the measured tables:
    ``run.steps()[["step", "gamma", "dist_sq"]]``, one row per step.
    """

    def __init__(self, path: str | Path):
        self.store = RunStore(path)
        self.path = self.store.root
        if not self.store.exists(RunStore.META):
            raise StoreError(f"{self.path} is not a gammatrace run (no run.json)")
        raw = self.store.read_json(RunStore.META)
        if not isinstance(raw, dict):
            raise StoreError(f"{self.store.path(RunStore.META)} is damaged: expected a JSON object, "
                             f"got {type(raw).__name__}")
        self.store.check_seal(raw)
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{self.store.path(RunStore.META)}: field 'format_version' is {version!r}; this "
                             f"gammatrace reads run format {FORMAT_VERSION} (a newer gammatrace wrote it?)")
        self.meta = self.store.read_meta()

    @property
    def name(self) -> str:
        return self.meta.config.get("name") or self.path.name

    @property
    def config(self) -> RunConfig:
        try:
            return self.meta.run_config()
        except ValidationError as exc:
            raise damaged(self.store.path(RunStore.META), exc, field="config field") from None
        except UserError as exc:  # the config's own checks (a number out of range, an unknown optimizer)
            raise StoreError(f"{self.store.path(RunStore.META)} is damaged: {str(exc).removeprefix('invalid config: ')}"
                             ) from None

    @property
    def status(self) -> Status:
        return self.meta.status

    def record_steps(self) -> pd.DataFrame:
        """Pass-1 rows (record mode): step, epoch, lr, loss, update_sq, grad_sq, dist0_sq."""
        return self.store.read_shards(RunStore.STEPS)

    def epochs(self) -> pd.DataFrame:
        """One row per epoch: full-dataset train/test loss and accuracy after the epoch."""
        return self.store.read_parquet(RunStore.EPOCHS) if self.store.exists(RunStore.EPOCHS) else pd.DataFrame()

    def analyses(self) -> list[str]:
        """Every stored analysis: ``<reference>`` (the run config's tail and ℓ_inf) and
        ``<reference>/<options>`` (another tail or ℓ_inf, e.g. ``last/tail=28``; see
        :func:`gammatrace.analysis.analysis_name`)."""
        def has_summary(rel: str) -> bool:
            return self.store.exists(f"analysis/{rel}/summary.json")

        if self.store.remote:
            def folders(rel: str) -> list[str]:
                return self.store.remote.folders(rel)
        else:
            def folders(rel: str) -> list[str]:
                d = self.path / rel
                return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
        out = []
        for ref in folders("analysis"):
            out += [ref] if has_summary(ref) else []
            out += [f"{ref}/{o}" for o in folders(f"analysis/{ref}") if "=" in o and has_summary(f"{ref}/{o}")]
        return out

    def references(self) -> list[str]:
        """The reference points θ* with an analysis (its replay's measurements are shared by
        every analysis of that reference)."""
        return sorted({a.split("/")[0] for a in self.analyses()})

    def _ref(self, reference: str | None) -> str:
        names = self.analyses()
        if reference is None:
            if not names:
                raise StoreError(f"{self.path} has no analysis yet; run `gammatrace analyze {self.path}`")
            plain = [n for n in names if "/" not in n]
            return "last" if "last" in names else (plain or names)[0]
        if reference not in names:
            raise StoreError(f"{self.path} has no analysis for reference '{reference}' (has: {names or 'none'})")
        return reference

    def steps(self, reference: str | None = None) -> pd.DataFrame:
        """The DESIGN.md §6 per-step table for a reference (default: 'last'), or for an
        analysis of it with other options (e.g. 'last/tail=28': its derived columns)."""
        return self.store.read_shards(RunStore.analysis(self._ref(reference), "steps"))

    def tensor_steps(self, reference: str | None = None) -> pd.DataFrame:
        # Measured by the reference's replay: the same for every analysis of it.
        return self.store.read_shards(RunStore.analysis(self._ref(reference).split("/")[0], "tensors"))

    def sample_steps(self, reference: str | None = None) -> pd.DataFrame:
        return self.store.read_shards(RunStore.analysis(self._ref(reference).split("/")[0], "samples"))

    def summary(self, reference: str | None = None) -> dict:
        """summary.json of a reference as a dict (see :meth:`summary_model` for the typed form)."""
        return self.store.read_json(RunStore.analysis(self._ref(reference), "summary.json"))

    def summary_model(self, reference: str | None = None) -> RunSummary:
        """The typed summary; a damaged summary.json is a StoreError naming the file and field."""
        rel = RunStore.analysis(self._ref(reference), "summary.json")
        try:
            return RunSummary.model_validate(self.store.read_json(rel))
        except ValidationError as exc:
            raise damaged(self.store.path(rel), exc, fix="rerun `gammatrace analyze` to rewrite it") from None


def recorded_kind(path: str | Path | Location) -> str | None:
    """The machine kind a run folder's run.json records; None where there is no run yet,
    no recorded machine, or a run.json the run's own task will report as damaged."""
    store = RunStore(path)
    try:
        return store.read_meta().machine_kind if store.exists(RunStore.META) else None
    except StoreError:
        return None


def load_run(path: str | Path) -> Run:
    """Open a run directory for reading (see :class:`Run`)."""
    return Run(path)
