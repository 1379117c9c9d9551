"""``gammatrace twopass``: any training script measured exactly, as two fresh processes.

The runner (:func:`run_twopass`) starts the user's command twice — ``python train.py ...`` or
``torchrun ... train.py`` — with the same environment: ``PYTHONHASHSEED``, the thread count
(``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and ``torch.set_num_threads``),
``CUBLAS_WORKSPACE_CONFIG``, deterministic algorithms and seeds for Python, NumPy and torch,
applied before the script's first line by a ``sitecustomize`` module the runner puts first
on ``PYTHONPATH`` (:mod:`gammatrace.engine._site.sitecustomize`; torchrun's ranks inherit
it). ``GAMMATRACE_PASS`` (1 or 2) tells the script which pass it is in: everything the script
does besides training — its checkpoints, its logger, resuming from its own output folder —
happens twice, and a script that resumes from what pass 1 wrote is another trajectory.

Inside the script, ``gammatrace.attach(model, optimizer, loss_fn=...)`` makes the pass's
probe (:class:`ScriptPass` here does the pass's bookkeeping). Pass 1 records θ_0, every
step's loss, ‖Δ_k‖², ‖g_k‖², learning rate, the fingerprint of every batch and the thread
count, deterministic switch and random state at every step, and θ_T: a snapshot of the model
after its last measured step, written when the process exits normally (``atexit``). Pass 2
measures every step against θ* = θ_T (or ``--reference``) and is checked against pass 1 as it
goes, with :class:`~gammatrace.engine.twopass.PassVerifier` (the machinery of
:class:`~gammatrace.engine.twopass.TwoPass`): the first step that differs stops pass 2 with a
:class:`~gammatrace.engine.twopass.TwoPassMismatchError` naming the step and the likely cause.
The runner then verifies the whole of both records once more (the step count, the skipped
steps, θ_T) and writes the run folder (:func:`gammatrace.save_run`'s layout, ``source:
own-loop``) that ``gammatrace analyze``, ``report`` and ``landscape`` read.

Under torchrun each rank records its own batches and setups and checks them in pass 2; rank 0
writes θ_0, θ_T and the tables. Nothing at exit is a collective (the script may have called
``destroy_process_group()``). Every rank reads θ_T from ``DIR/.twopass/pass1/final.pt``: on
several machines DIR must be on a file system they share.

Example (the environment a pass runs in; :func:`run_twopass` starts the command with it):
    >>> env = pass_environment(1, "/tmp/state", seed=3, threads=2, deterministic="on", base={})
    >>> env["GAMMATRACE_PASS"], env["PYTHONHASHSEED"], env["OMP_NUM_THREADS"], env["CUBLAS_WORKSPACE_CONFIG"]
    ('1', '3', '2', ':4096:8')
    >>> env["PYTHONPATH"] == SITE_DIR
    True
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from gammatrace.config import RunConfig
from gammatrace.engine.session import provenance
from gammatrace.engine.twopass import (
    PassVerifier,
    StepSetup,
    TwoPassMismatchError,
    TwoPassResult,
    _first_difference,
    _PassProbe,
    _save_two_pass,
    _state,
    check_run_folder,
)
from gammatrace.errors import UserError
from gammatrace.probe import load_reference
from gammatrace.probe.matched import canonical_state
from gammatrace.store.backend import is_remote
from gammatrace.store.run import Run, params_sha256

SITE_DIR = str(Path(__file__).resolve().parent / "_site")
# What the runner tells each pass (read by gammatrace.attach and by the sitecustomize).
ENV_PASS, ENV_DIR = "GAMMATRACE_PASS", "GAMMATRACE_TWOPASS_DIR"
ENV_SEED, ENV_THREADS, ENV_DETERMINISTIC = "GAMMATRACE_SEED", "GAMMATRACE_THREADS", "GAMMATRACE_DETERMINISTIC"
ENV_REFERENCE = "GAMMATRACE_REFERENCE"
STATE = ".twopass"  # the runner's working folder inside DIR, removed once the run is written
MARK = "gammatrace-twopass"  # a file that says the working folder is the runner's own
DETERMINISTIC = ("on", "warn", "off")

SCRIPT_HINTS = {
    "threads": "leave the thread count to `gammatrace twopass --threads {threads}` (do not set it in one pass only)",
    "deterministic": "leave it to `gammatrace twopass --deterministic` (do not switch it in one pass only)",
    "carried_head": ("something pass 1 left behind: both passes began from the same θ_0 and random state, yet "
                     "differ at their first step, so the script reads a file pass 1 wrote (resuming from its own "
                     "checkpoint or output folder, a cache)"),
    "carried_fix": "; let the script skip it when GAMMATRACE_PASS=2, or give each pass its own folder",
    "batch": ("draw the data order and augmentation from torch's, NumPy's or Python's global generators (the "
              "runner seeds them) or from generators seeded from a fixed seed, not from the clock, os.urandom "
              "or an unseeded generator"),
    "outside": ("something the script reads that differs between the processes (the clock, os.urandom, a file "
                "that changed, an unseeded generator)"),
    "final": "the script changes the parameters outside the measured steps in one pass only",
}


def pass_environment(number: int, state: str | Path, *, seed: int, threads: int, deterministic: str,
                     reference: str | Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment pass ``number`` runs in: ``base`` (default: this process's) plus what
    determinism needs before the script's first line (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    env.update({ENV_PASS: str(number), ENV_DIR: str(state), ENV_SEED: str(seed), ENV_THREADS: str(threads),
                ENV_DETERMINISTIC: deterministic, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    env.setdefault("PYTHONHASHSEED", str(seed))  # one the user set stays (the same in both passes)
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    env.pop(ENV_REFERENCE, None)
    if reference is not None:
        env[ENV_REFERENCE] = str(Path(reference).resolve())
    env["PYTHONPATH"] = os.pathsep.join([SITE_DIR, *[p for p in [env.get("PYTHONPATH")] if p]])
    return env


@dataclass(frozen=True)
class PassContext:
    """What the runner told this process: which pass, its working folder and settings."""

    number: int
    state: Path
    seed: int
    threads: int
    deterministic: str
    reference: str | None

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> PassContext | None:
        """The pass this process belongs to, or None outside ``gammatrace twopass``.

        Example:
            >>> PassContext.from_environment({}) is None
            True
            >>> PassContext.from_environment({"GAMMATRACE_PASS": "2", "GAMMATRACE_TWOPASS_DIR": "/s"}).number
            2
        """
        env = os.environ if env is None else env
        if not env.get(ENV_DIR) or env.get(ENV_PASS) not in ("1", "2"):
            return None
        return cls(int(env[ENV_PASS]), Path(env[ENV_DIR]), int(env.get(ENV_SEED, "0")),
                   int(env.get(ENV_THREADS, "1")), env.get(ENV_DETERMINISTIC, "on"), env.get(ENV_REFERENCE))

    def folder(self, number: int | None = None) -> Path:
        return self.state / f"pass{self.number if number is None else number}"


# --------------------------------------------------------------------------- records on disk
def _frame_to_obj(frame: pd.DataFrame) -> dict[str, Any]:
    """A table as plain tensors and strings (loadable with ``weights_only=True``)."""
    data: dict[str, Any] = {}
    for c in frame.columns:
        values = frame[c].to_numpy()
        data[str(c)] = [str(v) for v in values] if values.dtype == object else torch.from_numpy(values.copy())
    return {"columns": [str(c) for c in frame.columns], "data": data}


def _obj_to_frame(obj: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame({c: (np.asarray(obj["data"][c], dtype=object) if isinstance(obj["data"][c], list)
                             else obj["data"][c].numpy()) for c in obj["columns"]}, columns=obj["columns"])


def _fingerprint_obj(fp: Any) -> list:
    return [fp, None] if isinstance(fp, str) else [fp[0], fp[1].detach().cpu()]


def _fingerprint_from(obj: Sequence) -> Any:
    return obj[0] if obj[1] is None else (obj[0], obj[1])


@dataclass
class PassRecord:
    """One rank's record of one pass, read back from disk: what :class:`PassVerifier` compares
    (``raw_steps()``, ``skipped()``, ``batches``, ``setups``) and what the run folder is written
    from (``tensor_steps()``, ``sample_steps()``, ``d0_sq``; rank 0)."""

    rank: int
    steps: pd.DataFrame
    skips: pd.DataFrame
    batches: list[tuple[int, Any]]
    setups: dict[int, StepSetup]
    meta: dict[str, Any]
    tensors: pd.DataFrame = field(default_factory=pd.DataFrame)
    samples: pd.DataFrame = field(default_factory=pd.DataFrame)
    d0_sq: float | None = None
    curvature: pd.DataFrame = field(default_factory=pd.DataFrame)

    def raw_steps(self) -> pd.DataFrame:
        return self.steps

    def curvature_table(self) -> pd.DataFrame:
        return self.curvature

    def skipped(self) -> pd.DataFrame:
        return self.skips

    def tensor_steps(self) -> pd.DataFrame:
        return self.tensors

    def sample_steps(self) -> pd.DataFrame:
        return self.samples

    @classmethod
    def load(cls, path: Path) -> PassRecord:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return cls(rank=int(obj["rank"]), steps=_obj_to_frame(obj["steps"]), skips=_obj_to_frame(obj["skipped"]),
                   batches=[(int(k), _fingerprint_from(fp)) for k, *fp in obj["batches"]],
                   setups={int(k): StepSetup(int(t), bool(d), str(r)) for k, t, d, r in obj["setups"]},
                   meta=json.loads(obj["meta"]),
                   tensors=_obj_to_frame(obj["tensors"]) if obj.get("tensors") else pd.DataFrame(),
                   samples=_obj_to_frame(obj["samples"]) if obj.get("samples") else pd.DataFrame(),
                   d0_sq=obj.get("d0_sq"),
                   curvature=_obj_to_frame(obj["curvature"]) if obj.get("curvature") else pd.DataFrame())


def _rank_world() -> tuple[int, int]:
    # torchrun's variables (set before the script runs), else an initialised process group.
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------- the pass side
class ScriptPass:
    """The bookkeeping of one pass inside the script's process: what :func:`gammatrace.attach`
    does besides making the probe. See the module docstring.

    ``make_probe(reference, **pass_probe_options)`` makes the probe the script gets (a
    :class:`~gammatrace.engine.twopass._PassProbe` or a wrapper holding one as ``.probe``).
    """

    def __init__(self, ctx: PassContext):
        self.ctx = ctx
        self.rank, self.world = _rank_world()
        self.folder = ctx.folder()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.probe: _PassProbe | None = None
        self.mismatch: TwoPassMismatchError | None = None
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._first: PassRecord | None = None
        self._theta_T: dict[str, torch.Tensor] | None = None
        self._checked_batches = 0
        self._checked_rows = 0
        self._first_rows: dict[str, np.ndarray] = {}
        self._verifier = PassVerifier(ctx.threads, SCRIPT_HINTS)

    # ------------------------------------------------------------------ set-up
    def reference(self) -> dict[str, torch.Tensor] | None:
        """θ* for pass 2: ``--reference``, else pass 1's θ_T; None in pass 1."""
        if self.ctx.number == 1:
            return None
        if self.ctx.reference is not None:
            return canonical_state(load_reference(self.ctx.reference))
        return self.theta_T()

    def theta_T(self) -> dict[str, torch.Tensor]:
        if self._theta_T is None:
            path = self.ctx.folder(1) / "final.pt"
            if not path.is_file():
                raise UserError(f"pass 2 found no θ_T of pass 1 at {path}: run the script with `gammatrace twopass`, "
                                "which runs pass 1 first (and, under torchrun on several machines, put --out on a "
                                "file system every rank can read)")
            self._theta_T = torch.load(path, map_location="cpu", weights_only=True)
        return self._theta_T

    def start(self, probe: _PassProbe, model: nn.Module, optimizer: Any, rng: str) -> None:
        """The probe is made: note θ_0, arm the snapshot, the online check and the record at exit.
        ``rng``: the random state as attach was called (:func:`~gammatrace.engine.twopass._rng_digest`)."""
        self.probe = probe
        probe.on_step = self._on_step
        theta_0 = _state(model)
        self.meta = {"rank": self.rank, "world": self.world, "rng_at_attach": rng,
                     "theta_0_sha256": params_sha256(theta_0), "model": type(model).__qualname__,
                     "optimizer": type(optimizer).__qualname__ if optimizer is not None else "manual update",
                     "device": str(probe.device), "threads": torch.get_num_threads(),
                     "deterministic": torch.are_deterministic_algorithms_enabled(), "names": list(probe.names),
                     "n_params": int(sum(p.numel() for p in probe.params))}
        if self.rank == 0:
            torch.save(theta_0, self.folder / "theta_0.pt")
        (self.folder / f"started-rank{self.rank}").write_text(str(os.getpid()))
        atexit.register(self._at_exit)
        if self.ctx.number == 2:
            self._first = PassRecord.load(self.ctx.folder(1) / f"rank{self.rank}.pt")
            self._first_rows = {c: self._first.steps[c].to_numpy() for c in ("loss", "grad_sq", "update_sq")}
            self._check_start(theta_0)

    def _check_start(self, theta_0: dict[str, torch.Tensor]) -> None:
        first = self._first
        assert first is not None
        if self.meta["theta_0_sha256"] == first.meta["theta_0_sha256"] and \
                self.meta["rng_at_attach"] == first.meta["rng_at_attach"]:
            return
        what = "the random generators were in another state"
        if self.meta["theta_0_sha256"] != first.meta["theta_0_sha256"]:
            what = "θ_0 differs"
            if self.rank == 0:
                diff = _first_difference(torch.load(self.ctx.folder(1) / "theta_0.pt", weights_only=True), theta_0)
                if diff is not None:
                    what = f"'{diff[0]}' differs by up to {diff[1]:.3g}"
        self._stop(TwoPassMismatchError(
            f"pass 2 did not start where pass 1 did: at gammatrace.attach ({what}); the model and everything drawn "
            "before attach must come from the seeded generators (no checkpoint pass 1 wrote, no unseeded draw)",
            None, "init"))

    # ------------------------------------------------------------------ every step
    def _on_step(self, probe: _PassProbe) -> None:
        self._snap(probe)
        if self._first is not None and self.mismatch is None:
            self._check(probe)

    def _snap(self, probe: _PassProbe) -> None:
        # θ after the last measured step, whatever the script does to the model afterwards.
        state = [v for v in canonical_state(probe.model.state_dict()).items() if isinstance(v[1], torch.Tensor)]
        if self._snapshot is None or list(self._snapshot) != [k for k, _ in state] or any(
                a.shape != b.shape or a.dtype != b.dtype for a, (_, b) in zip(self._snapshot.values(), state,
                                                                               strict=True)):
            self._snapshot = {k: v.detach().clone() for k, v in state}
            return
        with torch.no_grad():
            torch._foreach_copy_(list(self._snapshot.values()), [v.detach() for _, v in state])

    def _check(self, probe: _PassProbe) -> None:
        """Pass 2, after each step: this step's setup and batches, and (on CPU, where reading them
        costs no synchronisation) its loss, ‖Δ_k‖² and ‖g_k‖², against pass 1's. A difference
        hands both records to the verifier, which names the first differing step and its cause
        and stops the pass; these quick reads only decide when to ask it."""
        first = self._first
        assert first is not None
        k = probe.step_index - 1
        differs = k in first.setups and k in probe.setups and first.setups[k] != probe.setups[k]
        mine, theirs = probe.batches, first.batches
        for i in range(self._checked_batches, len(mine)):
            if i >= len(theirs) or mine[i][0] != theirs[i][0] or _hex(mine[i][1]) != _hex(theirs[i][1]):
                differs = True
        self._checked_batches = len(mine)
        row, self._checked_rows = self._checked_rows, self._checked_rows + 1
        if probe.device.type == "cpu" and not differs:
            if row >= len(self._first_rows["loss"]):
                return  # more steps than pass 1: the runner names it with the full records at the end
            loss, _, parts = probe._table._pending[-1] if probe._table._pending else (None, None, None)
            if parts is not None:
                # Summed over tensors as the table sums a stacked epoch (axis 0 here: the same order).
                sums = parts.sum(axis=0)
                values = {"loss": float(loss.to(torch.float64)), "grad_sq": sums[2], "update_sq": sums[4]}
                differs = any(values[c] != self._first_rows[c][row] for c in values)
        if differs:
            try:
                self._verifier.verify(first, probe, self.theta_T(), None)
            except TwoPassMismatchError as exc:
                self._stop(exc)

    def _stop(self, exc: TwoPassMismatchError) -> None:
        self.mismatch = exc
        _one_line_hook()
        raise exc

    # ------------------------------------------------------------------ at exit
    def _at_exit(self) -> None:
        """Write this rank's record (rank 0: also θ_T and the tables). No collective: the script
        may have destroyed its process group."""
        probe = self.probe
        if probe is None:
            return
        raw = probe.raw_steps()
        obj: dict[str, Any] = {
            "rank": self.rank, "steps": _frame_to_obj(raw), "skipped": _frame_to_obj(probe.skipped()),
            "batches": [[k, *_fingerprint_obj(fp)] for k, fp in probe.batches],
            "setups": [[k, s.threads, s.deterministic, s.rng] for k, s in sorted(probe.setups.items())],
            "meta": json.dumps({**self.meta, "mismatch": None if self.mismatch is None else {
                "message": str(self.mismatch), "step": self.mismatch.step, "cause": self.mismatch.cause}}),
        }
        if self.rank == 0:
            obj.update(tensors=_frame_to_obj(probe.tensor_steps()) if probe.mode == "reference" else None,
                       samples=_frame_to_obj(probe.sample_steps()), d0_sq=probe.d0_sq)
            curvature = probe.curvature_table()
            obj["curvature"] = _frame_to_obj(curvature) if len(curvature) else None
            # No measured step: θ as it is now (the runner refuses a run without steps anyway).
            _save(self._snapshot if self._snapshot is not None else _state(probe.model), self.folder / "final.pt")
        _save(obj, self.folder / f"rank{self.rank}.pt")


def _hex(fingerprint: Any) -> str:
    """A batch fingerprint's host part (a device checksum is compared at the end, unsynchronised)."""
    return fingerprint if isinstance(fingerprint, str) else fingerprint[0]


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _one_line_hook() -> None:
    """A pass 2 stopped by a mismatch ends with one line on stderr, not a traceback through
    the script (the runner reports the diagnosis again)."""
    previous = sys.excepthook
    if getattr(previous, "_gammatrace", False):
        return

    def hook(kind: type, value: BaseException, tb: Any) -> None:
        if isinstance(value, TwoPassMismatchError):
            print(f"gammatrace twopass: pass 2 stopped: {value}", file=sys.stderr)
        else:
            previous(kind, value, tb)

    hook._gammatrace = True  # type: ignore[attr-defined]
    sys.excepthook = hook


# --------------------------------------------------------------------------- the runner
def _fresh_state(out: Path) -> Path:
    state = out / STATE
    if state.exists():
        if not (state / MARK).is_file():
            raise UserError(f"{state} exists and is not gammatrace twopass's working folder; remove it or "
                            "choose another --out")
        shutil.rmtree(state)  # a failed attempt's records: ours (MARK), and stale now
    state.mkdir(parents=True)
    (state / MARK).write_text("the working folder of `gammatrace twopass`; removed once the run is written\n")
    return state


def _note(text: str, quiet: bool) -> None:
    if not quiet:
        print(f"gammatrace twopass: {text}", file=sys.stderr, flush=True)


def _ranks(folder: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("rank").removesuffix(".pt")) for p in folder.glob("rank*.pt"))


def _check_pass(number: int, folder: Path, returncode: int, command: str) -> list[PassRecord]:
    started = sorted(folder.glob("started-rank*"))
    records = [PassRecord.load(folder / f"rank{r}.pt") for r in _ranks(folder)]
    found = [r.meta["mismatch"] for r in records if r.meta.get("mismatch")]
    if found:
        # The earliest step; at one step, a cause other than "nondeterministic" (another rank
        # saw the batch or the random stream that explains it).
        best = min(found, key=lambda m: (m["step"] if m["step"] is not None else -1,
                                         m["cause"] == "nondeterministic"))
        raise TwoPassMismatchError(best["message"], best["step"], best["cause"])
    if not started:
        raise UserError(f"pass {number}: `{command}` never called gammatrace.attach(model, optimizer, loss_fn=...) "
                        f"(it exited with status {returncode}), so nothing was measured")
    ranks = [int(p.name.removeprefix("started-rank")) for p in started]
    missing = [r for r in ranks if not (folder / f"rank{r}.pt").is_file()]
    if missing or (number == 1 and not (folder / "final.pt").is_file()):
        raise UserError(f"pass {number}: `{command}` ended (status {returncode}) without writing rank "
                        f"{(missing or [0])[0]}'s record at exit: the process was killed (a signal, the OOM killer) "
                        "or left through os._exit, so there is no θ_T; the script must exit normally")
    if returncode != 0:
        raise UserError(f"pass {number}: `{command}` exited with status {returncode} (its output is above)")
    if not any(len(r.steps) for r in records):
        raise UserError(f"pass {number}: `{command}` made no measured step; call probe.batch(batch, loss) between "
                        "the forward and each optimizer.step() (or `with probe.update(lr=...)`)")
    return records


def run_twopass(command: Sequence[str], out: str | Path, *, seed: int = 0, threads: int = 1,
                reference: str | Path | None = None, deterministic: str = "on", quiet: bool = False,
                env: Mapping[str, str] | None = None) -> Run:
    """Run ``command`` twice (pass 1: record; pass 2: measure against θ_T, verified) and write
    the run folder ``out``; returns it opened. See the module docstring.

    Args:
        command: the script's command line, e.g. ``["python", "train.py"]`` or
            ``["torchrun", "--nproc-per-node", "2", "train.py"]`` (no shell).
        out: the run folder (local; refused when it holds a run).
        seed: seeds Python, NumPy and torch before the script's first line (and
            ``PYTHONHASHSEED`` unless it is set).
        threads: the torch thread count of both passes.
        reference: θ* other than θ_T: a state-dict file every rank can read.
        deterministic: ``"on"`` (``torch.use_deterministic_algorithms(True)``), ``"warn"``
            (warn only), ``"off"``.
        env: the environment to start from (default: this process's).
    """
    command = list(command)
    if not command:
        raise UserError("gammatrace twopass needs a command after --, e.g. `gammatrace twopass --out runs/a -- "
                        "python train.py`")
    if deterministic not in DETERMINISTIC:
        raise UserError(f"--deterministic must be one of {', '.join(DETERMINISTIC)}, got {deterministic!r}")
    if not isinstance(threads, int) or threads < 1:
        raise UserError(f"--threads must be a positive integer, got {threads!r}")
    if is_remote(str(out)):
        raise UserError(f"gammatrace twopass --out must be a local folder (every pass writes its records and θ_T "
                        f"there), got {out}")
    ref_name, ref_state = "last", None
    if reference is not None:
        ref_state = canonical_state(load_reference(reference))
        ref_name = f"file-{Path(reference).stem}-{params_sha256(ref_state)[:16]}"
    store = check_run_folder(out)
    shown = shlex.join(command)
    with store.lock():
        state = _fresh_state(Path(store.root))
        records: dict[int, list[PassRecord]] = {}
        timing: dict[str, float] = {}  # each pass's wall time and CPU time (its processes', all ranks)
        for number in (1, 2):
            _note(f"pass {number} of 2: {shown}", quiet)
            environment = pass_environment(number, state, seed=seed, threads=threads, deterministic=deterministic,
                                           reference=reference, base=env)
            start, used = time.perf_counter(), _children_cpu()
            try:
                returncode = subprocess.run(command, env=environment, check=False).returncode
            except FileNotFoundError:
                raise UserError(f"cannot run `{shown}`: {command[0]} was not found") from None
            timing[f"pass{number}_wall_s"] = round(time.perf_counter() - start, 3)
            timing[f"pass{number}_cpu_s"] = round(_children_cpu() - used, 3)
            records[number] = _check_pass(number, state / f"pass{number}", returncode, shown)
        checked = time.perf_counter()
        first, second = ({r.rank: r for r in records[n]} for n in (1, 2))
        theta_T = torch.load(state / "pass1" / "final.pt", weights_only=True)
        final_2 = torch.load(state / "pass2" / "final.pt", weights_only=True)
        verifier = PassVerifier(threads, SCRIPT_HINTS)
        for rank, record in first.items():
            if rank not in second:
                raise UserError(f"pass 2 wrote no record for rank {rank} (pass 1 had {len(first)} ranks)")
            verifier.verify(record, second[rank], theta_T, final_2 if rank == 0 else theta_T)
        if 0 not in first:
            raise UserError("no record of rank 0: the run is written from rank 0's")
        one, two = first[0], second[0]
        theta_0 = torch.load(state / "pass1" / "theta_0.pt", weights_only=True)
        result = TwoPassResult(
            reference_name=ref_name, seed=seed, threads=threads, deterministic=deterministic != "off",
            theta_0=theta_0, theta_T=theta_T, reference=ref_state if ref_state is not None else theta_T,
            names=list(two.meta["names"]), record=one.raw_steps(),
            # Versions, commit and device read here, by the runner (the same machine and
            # installation): a pass would spend ~0.1 s of CPU on them (a git call).
            provenance={**provenance(RunConfig.model_construct(threads=threads, device=two.meta["device"])),
                        "seed": seed, "deterministic": deterministic, "command": command,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            model_class=two.meta["model"], optimizer_class=two.meta["optimizer"], _probe=two,  # type: ignore[arg-type]
            _record_samples=one.sample_steps())
        name = Path(store.root).name
        timing["verify_s"] = round(time.perf_counter() - checked, 3)  # this runner: read, verify, assemble
        run = _save_two_pass(store, result, name if _plain(name) else "own-loop", recorded_by="gammatrace twopass",
                             command=command, world_size=int(one.meta["world"]), timing=timing)
        shutil.rmtree(state)
    _note(f"verified: {len(result.record)} steps, the same in both passes; run written to {store.root}", quiet)
    return run


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _plain(name: str) -> bool:
    return all(ch.isalnum() or ch in "-_." for ch in name) and bool(name)


# --------------------------------------------------------------------------- the command line
def cmd_twopass(args: Any) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    run_twopass(command, args.out, seed=args.seed, threads=args.threads, reference=args.reference,
                deterministic=args.deterministic, quiet=args.quiet)
    return 0


def register(subparsers: Any) -> None:
    """``gammatrace twopass``: the subcommand (``gammatrace.cli`` calls this)."""
    p = subparsers.add_parser(
        "twopass", help="run a training script twice and measure it exactly (gammatrace.attach in the script)",
        description="Run COMMAND twice as two fresh processes with the same seeds, threads and deterministic "
                    "kernels: pass 1 records, pass 2 measures every step against θ_T and is verified against pass "
                    "1. The script attaches with gammatrace.attach(model, optimizer, loss_fn=...) and "
                    "probe.batch(batch, loss); GAMMATRACE_PASS (1 or 2) tells it which pass it is in.")
    p.add_argument("--out", default="runs/twopass", help="the run folder to write (default runs/twopass)")
    p.add_argument("--seed", type=int, default=0, help="seed of Python, NumPy and torch before the script (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in both passes (default 1)")
    p.add_argument("--reference", default=None, help="θ* other than θ_T: a state-dict file")
    p.add_argument("--deterministic", default="on", choices=DETERMINISTIC,
                   help="torch.use_deterministic_algorithms: on (default), warn (warn only), off")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the script's command line, e.g. -- python train.py, or -- torchrun --nproc-per-node 2 train.py")
    p.set_defaults(fn=cmd_twopass)
