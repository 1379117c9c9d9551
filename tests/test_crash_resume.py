"""Issue 10: the crash-resume property, measured the way the fault audit did.

A command — pass 1 with its replay and analysis (``gammatrace run``), a replay with two
workers (``gammatrace analyze --workers 2``) and a study (``gammatrace study`` on a tiny
YAML grid) — runs in a real process that is killed with SIGKILL after a seeded random
delay; the same command is then run again, and every file it leaves is compared bit for
bit with an uninterrupted run's. Three kinds of file record when, not what, and are
compared without it: ``run.json`` without its ``created`` time, ``epochs.parquet`` without
its ``seconds`` column, and the report's PDF figures without the ``/CreationDate`` that
matplotlib writes into each (PNG figures, report.html and summary.md embed no time and
compare as bytes). ``.lock`` files are skipped (they hold the last holder's PID).

Killing a study's parent while its workers run leaves no worker alive (checked at every
kill of the study). Also: a full disk (a real 1 MB tmpfs in a private mount namespace)
is a one-line error, and once space is freed the run resumes bit-identically.

The default run keeps one small case; ``-m slow`` runs the kill series.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import gammatrace
from gammatrace.cli import main
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# The command line in a child that says when its imports are done, so that the seeded
# delay measures time inside the command, not the interpreter's start.
CHILD = ("import sys; from gammatrace.cli import main; print('ready', flush=True); "
         "sys.exit(main(sys.argv[1:]))")
# fault class -> [trials, passes, files compared]; printed at the end (pytest -s)
ROWS: dict[str, list[int]] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if ROWS:
        lines = ["| fault class | trials | passes | files compared |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {n} | {ok} | {files} |" for name, (n, ok, files) in ROWS.items()]
        print("\n\nCrash-resume: fault classes tried (issue 10)\n" + "\n".join(lines))


def tally(name: str, passed: bool, files: int = 0) -> None:
    row = ROWS.setdefault(name, [0, 0, 0])
    row[0] += 1
    row[1] += bool(passed)
    row[2] += files


def fingerprint(root: Path) -> dict[str, str]:
    """Every file below ``root`` (but .lock) -> SHA-256 of its content; run.json,
    epochs.parquet and PDF figures without the fields that record a time."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == ".lock":
            continue
        if p.name == "run.json":
            data = json.loads(p.read_text())
            data.pop("created", None)
            blob = json.dumps(data, sort_keys=True).encode()
        elif p.name == "epochs.parquet":
            frame = pd.read_parquet(p).drop(columns=["seconds"])
            blob = (json.dumps([list(frame.columns), [str(t) for t in frame.dtypes]]).encode()
                    + pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
        elif p.suffix == ".pdf":
            blob = re.sub(rb"/CreationDate \(D:[^)]*\)", b"", p.read_bytes())
        else:
            blob = p.read_bytes()
        out[str(p.relative_to(root))] = hashlib.sha256(blob).hexdigest()
    return out


def differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kill_after(argv: list[str], delay: float) -> tuple[int | None, list[int]]:
    """Run the command line in a child, SIGKILL it ``delay`` seconds after its imports;
    returns (its exit status if it ended first, else None; the processes below it then)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        ended = proc.poll()
        kids = descendants(proc.pid)
        proc.kill()
        proc.wait()
        return ended, kids
    finally:
        proc.kill()


def quiet_main(argv: list[str]) -> int:
    return main([*argv, "--quiet"])


def resume_series(tmp_path: Path, argv, prepare, points: int, seed: int, reference_seconds: float,
                  check_workers: bool = False, span: tuple[float, float] = (0.0, 1.2), name: str = "") -> list[str]:
    """Kill ``argv`` (built for a folder by ``argv(folder)``) at ``points`` seeded delays in
    ``span`` x the uninterrupted duration, rerun it to the end, compare with the reference
    at ``tmp_path/'reference'``. Returns the problems found; fewer than half of the kills
    landing while the command ran is one (the delays would then test nothing)."""
    expected = fingerprint(tmp_path / "reference")
    rng = np.random.default_rng(seed)
    problems = []
    interrupted = 0
    for i, delay in enumerate(rng.uniform(span[0] * reference_seconds, span[1] * reference_seconds, points)):
        folder = tmp_path / f"killed{i}"
        prepare(folder)
        ended, kids = kill_after(argv(folder), float(delay))
        interrupted += ended is None
        if check_workers:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(alive(k) for k in kids):
                time.sleep(0.1)
            left = [k for k in kids if alive(k)]
            if left:
                problems.append(f"kill at {delay:.2f}s left processes {left} alive")
                for k in left:
                    os.kill(k, 9)
            if ended is None and kids:
                tally(f"kill -9 of `{name}` with workers running: none left alive", not left)
        rc = quiet_main(argv(folder))
        found = fingerprint(folder)
        diff = differences(expected, found)
        if rc != 0 or diff:
            problems.append(f"kill at {delay:.2f}s (ended first: {ended}): rerun exit {rc}, differs in {diff[:6]}")
        tally(f"kill -9 of `{name}`, rerun: bit-identical", rc == 0 and not diff, len(found))
        shutil.rmtree(folder)
    if 2 * interrupted < points:
        problems.append(f"only {interrupted} of {points} kills landed while the command ran")
    return problems


def _timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    assert quiet_main(argv) == 0
    return time.perf_counter() - t0


# ------------------------------------------------------- pass 1, replay and analysis
def _run_config(tmp_path: Path, epochs: int) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(epochs=epochs, data={"n_train": 256}, reference={
        "kind": "continuation", "extra_epochs": 1})))
    return cfg


def test_killed_run_resumes_bit_identically(tmp_path):
    """The default case: one kill of `gammatrace run` (pass 1, replay, analysis) at a seeded moment."""
    cfg = _run_config(tmp_path, epochs=4)
    argv = lambda folder: ["run", str(cfg), "--out", str(folder), "--no-report"]  # noqa: E731
    seconds = _timed(argv(tmp_path / "reference"))
    assert resume_series(tmp_path, argv, lambda folder: None, points=1, seed=10, reference_seconds=seconds,
                         span=(0.3, 0.8), name="gammatrace run") == []


@pytest.mark.slow
def test_killed_run_resumes_bit_identically_at_many_points(tmp_path):
    cfg = _run_config(tmp_path, epochs=6)
    argv = lambda folder: ["run", str(cfg), "--out", str(folder), "--no-report"]  # noqa: E731
    seconds = _timed(argv(tmp_path / "reference"))
    assert resume_series(tmp_path, argv, lambda folder: None, points=10, seed=11, reference_seconds=seconds,
                         name="gammatrace run") == []


@pytest.mark.slow
def test_killed_replay_with_two_workers_resumes_bit_identically(tmp_path):
    trained = tmp_path / "trained"
    gammatrace.train(tiny_config(epochs=6, data={"n_train": 256}), trained, replay=False, progress=False)
    shutil.copytree(trained, tmp_path / "reference")
    argv = lambda folder: ["analyze", str(folder), "--workers", "2"]  # noqa: E731
    seconds = _timed(argv(tmp_path / "reference"))

    def prepare(folder: Path) -> None:
        shutil.copytree(trained, folder)

    problems = resume_series(tmp_path, argv, prepare, points=6, seed=12, reference_seconds=seconds,
                             check_workers=True, name="gammatrace analyze --workers 2")
    assert problems == []


# -------------------------------------------------------------------------------- study
STUDY = {
    "name": "tiny",
    "base": {"seed": 3, "epochs": 3, "batch_size": 32, "data": {"name": "digits", "n_train": 96, "n_test": 64},
             "model": {"name": "mlp", "width": 8, "depth": 2}, "optim": {"name": "sgd", "lr": 0.2}},
    "variants": {"relu": {"model": {"activation": "relu"}}, "tanh": {"model": {"activation": "tanh"}}},
    "claims": [{"text": "ReLU first", "order": ["relu", "tanh"]}],
}


@pytest.mark.slow
def test_killed_study_resumes_bit_identically_and_leaves_no_worker(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(STUDY))
    argv = lambda folder: ["study", str(spec), "--out", str(folder), "--workers", "2"]  # noqa: E731
    seconds = _timed(argv(tmp_path / "reference"))
    problems = resume_series(tmp_path, argv, lambda folder: None, points=6, seed=13, reference_seconds=seconds,
                             check_workers=True, name="gammatrace study --workers 2")
    assert problems == []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to find the workers")
def test_study_workers_end_when_the_study_parent_is_killed(tmp_path):
    """kill -9 of `gammatrace study` while both its workers train: none survives it."""
    spec = tmp_path / "slow.yaml"
    slow = json.loads(json.dumps(STUDY))
    slow["base"].update(epochs=400, data={"name": "digits", "n_train": 512, "n_test": 64})
    spec.write_text(yaml.safe_dump(slow))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "study", str(spec), "--out", str(tmp_path / "s"),
                             "--workers", "2", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 90
        workers: list[int] = []
        while time.monotonic() < deadline and len(workers) < 2:
            # the two workers have started training once their run folders hold a checkpoint
            workers = [w for w in descendants(proc.pid)
                       if "spawn_main" in Path(f"/proc/{w}/cmdline").read_bytes().decode(errors="replace")]
            started = [n for n in ("relu", "tanh") if (tmp_path / "s" / n / "checkpoints").is_dir()]
            if len(started) < 2:
                workers = []
            time.sleep(0.2)
        assert len(workers) == 2, workers
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(alive(w) for w in workers):
            time.sleep(0.2)
        tally("kill -9 of `gammatrace study` while both workers train: none left alive",
              not any(alive(w) for w in workers))
        assert not any(alive(w) for w in workers)
    finally:
        proc.kill()
        for w in descendants(proc.pid):
            os.kill(w, 9)


# ---------------------------------------------------------------------------- full disk
_FULL_DISK = """
import json, os, shutil, sys, io, contextlib
from pathlib import Path
from gammatrace.cli import main

disk, cfg, out, levels = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
results = []
for i, (free, flags) in enumerate(levels):
    run = disk / f"run{i}"
    ballast = disk / "ballast"
    st = os.statvfs(disk)
    avail = st.f_bavail * st.f_frsize
    with open(ballast, "wb") as f:  # leave about `free` bytes
        f.write(b"\\0" * max(avail - free, 0))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        first = main(["run", cfg, "--out", str(run), "--no-report", "--quiet", *flags])
    ballast.unlink()
    with contextlib.redirect_stderr(io.StringIO()):
        second = main(["run", cfg, "--out", str(run), "--no-report", "--quiet"])
    results.append({"free": free, "flags": flags, "first": first, "stderr": err.getvalue(), "second": second})
    shutil.copytree(run, out / f"run{i}")
    shutil.rmtree(run)
print(json.dumps(results))
"""


def _can_mount_tmpfs() -> str | None:
    if not shutil.which("unshare") or not shutil.which("mount"):
        return "needs unshare(1) and mount(8)"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()[:120]}"
    return None


_NO_TMPFS = _can_mount_tmpfs() if sys.platform == "linux" else "needs Linux mount namespaces"


@pytest.mark.skipif(_NO_TMPFS is not None, reason=str(_NO_TMPFS))
def test_full_disk_is_one_line_and_the_run_resumes_bit_identically(tmp_path):
    """A real 1 MB file system, filled to leave a few pages free. Started anyway
    (--no-check-free, as when space is expected to be freed meanwhile), each run stops
    with the one-line 'no space left' error at a different point; with the space freed the
    same command resumes it to the uninterrupted run's files. Without that flag the disk
    estimate refuses to start, in one line, and nothing is written."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(epochs=3, reference={"kind": "continuation", "extra_epochs": 1})))
    assert quiet_main(["run", str(cfg), "--out", str(tmp_path / "reference"), "--no-report"]) == 0
    expected = fingerprint(tmp_path / "reference")
    size = sum(p.stat().st_size for p in (tmp_path / "reference").rglob("*") if p.is_file())
    # free bytes left before the run, and the flags of the first attempt
    levels = [[8_192, ["--no-check-free"]], [40_960, ["--no-check-free"]], [size // 2, ["--no-check-free"]],
              [size - 8_192, ["--no-check-free"]], [40_960, []]]
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(_FULL_DISK)
    shell = (f"mount -t tmpfs -o size=1m tmpfs {disk} && cd {ROOT} && "
             f"{sys.executable} {script} {disk} {cfg} {out} '{json.dumps(levels)}'")
    done = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    def words(r: dict) -> str:  # what the one line must say: the write that failed, or the estimate
        return "no space left on device" if r["flags"] else "free some space"

    for i, r in enumerate(results):
        lines = [line for line in r["stderr"].splitlines() if line.strip()]
        found = fingerprint(out / f"run{i}")
        name = ("full disk during the run (1 MB tmpfs): one line, then resumed bit-identically" if r["flags"] else
                "full disk before the run (1 MB tmpfs): refused in one line, then trained bit-identically")
        tally(name, r["first"] == 2 and len(lines) == 1 and words(r) in lines[0] and r["second"] == 0
              and not differences(expected, found), len(found))
    for i, r in enumerate(results):
        lines = [line for line in r["stderr"].splitlines() if line.strip()]
        assert r["first"] == 2 and len(lines) == 1, r
        assert lines[0].startswith("gammatrace: error: ") and words(r) in lines[0], r
        assert r["second"] == 0, r
        assert differences(expected, fingerprint(out / f"run{i}")) == [], r
    # the disk filled up at different points: run.json, a step table, a checkpoint, the analysis...
    where = {r["stderr"].split(": no space")[0].split(f"/run{i}/", 1)[-1] for i, r in enumerate(results) if r["flags"]}
    assert len(where) >= 2, where
