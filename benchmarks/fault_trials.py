"""A randomized fault series per failure class of issue 22, and its trial table.

    python benchmarks/fault_trials.py --trials 3            # every class, 3 trials each
    python benchmarks/fault_trials.py --trials 5 --only names absurd

Each trial draws its case at random (seeded by ``--seed``): which user file sits beside a
report, which writer finds a planted link, when a second report starts, at which write an
analysis is interrupted, which absurd value or name, when Ctrl-C arrives while workers or
Ray start, when the object store drops out, which garbage lock object waits. A trial passes
when the tool does what issue 22 promises for its class (the user's files untouched, one
line with exit 2 or 130, a rerun equal in every file to an uninterrupted run, no process
left behind). The table prints class x trials x passes x seconds; a failed trial prints
what it saw. S3 classes need moto and s3fs, the Ray class Ray (skipped with the reason
otherwise). Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gammatrace import train  # noqa: E402
from gammatrace.cli import main  # noqa: E402
from gammatrace.engine import train_pass  # noqa: E402
from gammatrace.store.run import RunStore  # noqa: E402
from tests.conftest import tiny_config, tree_hashes  # noqa: E402

INTERRUPTED = "gammatrace: interrupted; rerun the same command to resume"


class Trial:
    """What one trial needs: a fresh folder, the random stream, a shared cache."""

    def __init__(self, rng: random.Random, tmp: Path, shared: dict):
        self.rng, self.tmp, self.shared = rng, tmp, shared


def quiet_main(argv: list[str]) -> tuple[int, list[str]]:
    """``gammatrace ARGV`` in this process: (exit status, stderr lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, [line for line in err.getvalue().splitlines() if line.strip()]


def one_line(rc: int, err: list[str], code: int = 2) -> bool:
    return rc == code and len(err) == 1 and err[0].startswith("gammatrace: ")


def cli(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gammatrace", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def config(t: Trial, **over) -> Path:
    cfg = t.tmp / f"c-{uuid.uuid4().hex[:6]}.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(**over)))
    return cfg


def analysed(t: Trial) -> Path:
    """A tiny analysed run, made once per series (trials copy it before changing it)."""
    if "analysed" not in t.shared:
        out = Path(tempfile.mkdtemp(prefix="gt-faults-")) / "run"
        train(tiny_config(epochs=2), out, progress=False)
        t.shared["analysed"] = out
    dst = t.tmp / "run"
    shutil.copytree(t.shared["analysed"], dst)
    return dst


def outside(t: Trial) -> Path:
    folder = t.tmp / "outside"
    folder.mkdir(exist_ok=True)
    (folder / "mine.txt").write_text("the user's")
    return folder


# ------------------------------------------------------------------- the classes
def report_beside_user_files(t: Trial) -> tuple[bool, str]:
    run = analysed(t)
    docs = t.tmp / "docs"
    docs.mkdir()
    # Names the old cleanup's patterns (trajectory*|layers*|theorem1*|matched* .png/.pdf)
    # matched; in a third of the trials also one the report writes itself (trajectory.png,
    # summary.md, ...), which must be refused in one line with nothing written.
    stems = ["trajectory", "layers", "theorem1", "matched"]
    for _ in range(t.rng.randint(1, 4)):
        name = f"{t.rng.choice(stems)}{t.rng.choice(['_', '-', '_2024', '-notes', '_pairs', '2'])}" \
               f"{t.rng.choice(['.png', '.pdf'])}"
        (docs / name).write_bytes(os.urandom(32))
    same = t.rng.random() < 1 / 3
    if same:
        (docs / t.rng.choice(["trajectory.png", "layers.pdf", "summary.md", "report.html"])).write_bytes(os.urandom(32))
    before = tree_hashes(docs)
    rc, err = quiet_main(["report", str(run), "--out", str(docs)])
    after = tree_hashes(docs)
    kept = all(after.get(k) == v for k, v in before.items())
    refused = one_line(rc, err) and "no earlier report here wrote it" in err[0] and set(after) - {".lock"} == set(before)
    return (refused if same else rc == 0) and kept, f"rc {rc}, {sorted(before)}, {err}"


def _writer_report_file(t: Trial, target: Path) -> list[str]:
    run, docs = analysed(t), t.tmp / "docs"
    docs.mkdir()
    (docs / t.rng.choice(["summary.md", "report.html", "trajectory.png", ".gammatrace-report.json"])).symlink_to(target)
    return ["report", str(run), "--out", str(docs)]


def _writer_report_folder(t: Trial, target: Path) -> list[str]:
    run = analysed(t)
    shutil.rmtree(run / "report", ignore_errors=True)
    (run / "report").symlink_to(target.parent, target_is_directory=True)
    return ["report", str(run), "--out", str(run / "report")]


def _writer_landscape(t: Trial, target: Path) -> list[str]:
    run, out = analysed(t), t.tmp / "ls"
    out.mkdir()
    (out / "landscape_per_path.png").symlink_to(target)
    return ["landscape", str(run), "--out", str(out), "--plane", "per_path", "--grid", "3", "--samples", "32",
            "--quiet"]


def _writer_study_cell(t: Trial, target: Path) -> list[str]:
    spec = t.tmp / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "base": tiny_config(epochs=1), "variants": {
        "relu": {"model": {"activation": "relu"}}, "tanh": {"model": {"activation": "tanh"}}}}))
    out = t.tmp / "study"
    out.mkdir()
    (out / t.rng.choice(["relu", "tanh"])).symlink_to(target.parent, target_is_directory=True)
    return ["study", str(spec), "--out", str(out), "--quiet"]


def _writer_identity(t: Trial, target: Path) -> list[str]:
    out = t.tmp / "im"
    out.mkdir()
    name = t.rng.choice(["summary.md", "report.html", "fig4_loss_distance.png", "identity_mapping.json"])
    (out / name).symlink_to(target)
    return ["identity-mapping", "--out", str(out), "--preset", "tiny", "--quiet"]


def _writer_inspect(t: Trial, target: Path) -> list[str]:
    out = t.tmp / "insp"
    out.mkdir()
    (out / "inspect_tiny.png").symlink_to(target)
    return ["inspect", str(config(t)), "--out", str(out)]


WRITERS: dict[str, Callable[[Trial, Path], list[str]]] = {
    "report file": _writer_report_file, "report folder in a run": _writer_report_folder,
    "landscape figure": _writer_landscape, "study cell": _writer_study_cell,
    "identity study file": _writer_identity, "inspect figure": _writer_inspect}


def planted_links(t: Trial) -> tuple[bool, str]:
    which = t.rng.choice(sorted(WRITERS))
    target = outside(t) / "mine.txt"
    argv = WRITERS[which](t, target)
    before = tree_hashes(target.parent)
    rc, err = quiet_main(argv)
    ok = one_line(rc, err) and "symbolic link" in err[0] and tree_hashes(target.parent) == before
    return ok, f"{which}: rc {rc}, {err[-2:]}"


def concurrent_reports(t: Trial) -> tuple[bool, str]:
    if "two_runs" not in t.shared:
        base = Path(tempfile.mkdtemp(prefix="gt-faults-"))
        for name in ("alpha", "beta"):
            train(tiny_config(epochs=2, name=name), base / name, progress=False)
        t.shared["two_runs"] = base
    docs = t.tmp / "docs"
    first = cli(["report", str(t.shared["two_runs"] / "alpha"), "--out", str(docs)])
    time.sleep(t.rng.uniform(0.0, 2.0))
    second = cli(["report", str(t.shared["two_runs"] / "beta"), "--out", str(docs)])
    results = [(p.wait(timeout=300), p.stderr.read().strip().splitlines()) for p in (first, second)]
    codes = sorted(rc for rc, _ in results)
    refused = [err for rc, err in results if rc == 2]
    summary, html = (docs / "summary.md").read_text(), (docs / "report.html").read_text()
    author = "alpha" if "| alpha" in summary else "beta"
    manifest = json.loads((docs / ".gammatrace-report.json").read_text())["files"]
    present = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*") if p.is_file())
    ok = codes in ([0, 0], [0, 2]) and all(len(e) == 1 and "in use by process" in e[0] for e in refused) \
        and author in html and present == sorted([*manifest, ".gammatrace-report.json", ".lock"])
    return ok, f"exit {codes}, summary of {author}, files {present}, refused {refused}"


def interrupt_every_write(t: Trial) -> tuple[bool, str]:
    from gammatrace import analyze

    if "trained" not in t.shared:
        base = Path(tempfile.mkdtemp(prefix="gt-faults-"))
        train_pass(tiny_config(epochs=2), base / "trained", progress=False)
        whole = base / "whole"
        shutil.copytree(base / "trained", whole)
        writes = _count_writes(lambda: analyze(whole, progress=False))
        t.shared.update(trained=base / "trained", whole=whole, writes=writes)
    k = t.rng.randint(1, t.shared["writes"])
    cut = t.tmp / "cut"
    shutil.copytree(t.shared["trained"], cut)
    seen = _count_writes(lambda: analyze(cut, progress=False), stop_at=k)
    rc, err = quiet_main(["analyze", str(cut), "--quiet"])
    same = tree_hashes(cut, links=False) == tree_hashes(t.shared["whole"], links=False)
    return rc == 0 and same and seen == k, f"interrupted at write {k}/{t.shared['writes']}: rerun rc {rc}, " \
                                           f"files equal {same}, {err[-2:]}"


def _count_writes(fn: Callable[[], object], stop_at: int | None = None) -> int:
    """Run ``fn`` counting RunStore's atomic writes; KeyboardInterrupt at write ``stop_at``."""
    real, count = RunStore._atomic, [0]

    def counted(self, rel, write):
        count[0] += 1
        if count[0] == stop_at:
            raise KeyboardInterrupt
        return real(self, rel, write)

    RunStore._atomic = counted
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            fn()
    except KeyboardInterrupt:
        pass
    finally:
        RunStore._atomic = real
    return count[0]


ABSURD: dict[str, dict] = {
    "lr 1e308": {"optim": {"name": "sgd", "lr": 1e308}},
    "weight_decay 1e308": {"optim": {"name": "sgd", "lr": 0.1, "weight_decay": 1e308}},
    "epochs 10^12": {"epochs": 10**12}, "width 10^9": {"model": {"name": "mlp", "width": 10**9, "depth": 2}},
    "extra_epochs 10^12": {"reference": {"kind": "last", "extra_epochs": 10**12}},
    "batch 10^12": {"batch_size": 10**12}, "n_train 10^12": {"data": {"name": "digits", "n_train": 10**12}},
}


def absurd_values(t: Trial) -> tuple[bool, str]:
    which = t.rng.choice([*sorted(ABSURD), "alias bomb", "seeds 10^9"])
    start = time.monotonic()
    if which == "alias bomb":
        depth = t.rng.randint(9, 30)
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + \
                [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
                 f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, depth)]
        cfg = t.tmp / "bomb.yaml"
        cfg.write_text(yaml.safe_dump(tiny_config()) + "\n".join(lines) + "\n")
        which = f"alias bomb of 10^{depth} leaves"
        argv = ["run", str(cfg), "--out", str(t.tmp / "o"), "--dry-run"]
    elif which == "seeds 10^9":
        argv = ["study", "activation", "--preset", "quick", "--seeds", str(10**9), "--dry-run", "--out",
                str(t.tmp / "o")]
    else:
        argv = ["run", str(config(t, **ABSURD[which])), "--out", str(t.tmp / "o"), "--dry-run"]
    rc, err = quiet_main(argv)
    took = time.monotonic() - start
    return one_line(rc, err) and took < 20, f"{which}: rc {rc} in {took:.1f} s, {err[-2:]}"


def names(t: Trial) -> tuple[bool, str]:
    name = t.rng.choice(["abc\n", "a" * t.rng.randint(101, 400), "a\tb", "a\x1b[31mb", "a\rb", "x\x00y",
                         "../up", "a/b", "-rf", ""])
    where = t.rng.choice(["config name", "multi-run name", "study variant"])
    if where == "config name":
        cfg = config(t, name=name)
    elif where == "multi-run name":
        cfg = t.tmp / "multi.yaml"
        cfg.write_text(yaml.safe_dump({**tiny_config(), "runs": {name: {"seed": 1}, "ok": {"seed": 2}}}))
    else:
        cfg = t.tmp / "s.yaml"
        cfg.write_text(yaml.safe_dump({"name": "s", "base": tiny_config(), "variants": {name: {"seed": 1}}}))
    argv = ["study" if where == "study variant" else "run", str(cfg), "--out", str(t.tmp / "o"), "--dry-run"]
    rc, err = quiet_main(argv)
    made = [p.name for p in (t.tmp / "o").rglob("*")] if (t.tmp / "o").exists() else []
    return one_line(rc, err) and not any("\n" in m or len(m) > 100 for m in made), f"{where} {name!r:.40}: rc {rc}, " \
                                                                                    f"{err[-2:]}"


def sigint_worker_start(t: Trial) -> tuple[bool, str]:
    import psutil

    proc = cli(["run", str(config(t, epochs=4)), "--out", str(t.tmp / "o"), "--quiet", "--no-report",
                "--workers", "2"])
    while proc.poll() is None and not psutil.Process(proc.pid).children():
        time.sleep(0.01)
    time.sleep(t.rng.uniform(0.0, 2.5))
    workers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else []
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    time.sleep(5)
    alive = [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    lines = err.strip().splitlines()
    ok = (proc.returncode, lines) == (130, [INTERRUPTED]) or (proc.returncode == 0 and not lines)
    return ok and not alive, f"rc {proc.returncode}, {lines[-3:]}, workers alive {alive}"


# ---------------------------------------------------------------- object storage
def _s3(t: Trial) -> dict:
    """moto's server on 127.0.0.1 (started once per series) and a proxy in front of it."""
    if "s3" not in t.shared:
        from tests.scale_s3 import environment, make_bucket, moto_available, moto_server

        why = moto_available()
        if why:
            raise Skip(why)
        stack = contextlib.ExitStack()
        env = stack.enter_context(moto_server())
        stack.enter_context(environment(env))
        make_bucket(env, "faults")
        t.shared["s3"], t.shared["stack"] = env, stack
    return t.shared["s3"]


def s3_outage(t: Trial) -> tuple[bool, str]:
    from gammatrace.store.backend import ObjectFiles, location
    from tests.test_crash_resume import differences
    from tests.test_s3_outage import Proxy, objects

    env = _s3(t)
    cfg = t.tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(epochs=6, checkpoint_every=1,
                                              reference={"kind": "last", "extra_epochs": 2})))
    if "s3_whole" not in t.shared:
        t.shared["s3_whole"] = whole = f"s3://faults/whole-{uuid.uuid4().hex[:6]}"
        assert main(["run", str(cfg), "--out", whole, "--quiet", "--no-report"]) == 0
    proxy = Proxy(int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    penv = {"AWS_MAX_ATTEMPTS": "1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    url = f"s3://faults/run-{uuid.uuid4().hex[:6]}"
    try:
        files = ObjectFiles(location(url))
        epoch = t.rng.randint(0, 7)
        how = t.rng.choice(["reset", "stall"])
        proc = cli(["run", str(cfg), "--out", url, "--quiet", "--no-report"],
                   env={**penv, "GAMMATRACE_S3_TIMEOUT": "3"})
        while proc.poll() is None and not files.exists(f"checkpoints/epoch_{epoch:04d}.pt"):
            time.sleep(0.02)
        getattr(proxy, how)()
        began = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - began
        lines = err.strip().splitlines()
        first_ok = proc.returncode == 0 or (one_line(proc.returncode, lines) and "cannot be reached" in lines[0])
        proxy.restore()
        again = cli(["run", str(cfg), "--out", url, "--quiet", "--no-report"], env=penv)
        _, err2 = again.communicate(timeout=300)
        diff = differences(objects(url, t.tmp / "a"), objects(t.shared["s3_whole"], t.tmp / "b"))
        if "run.json" in diff:  # which fields
            a, b = (json.loads((t.tmp / x / "run.json").read_text()) for x in "ab")
            diff = [*diff, *_fields(a, b)]
        ok = first_ok and again.returncode == 0 and not diff
        return ok, f"{how} after epoch {epoch}: differing {diff[:4]}; rc {proc.returncode} in {took:.1f} s " \
                   f"{lines[-1:]}, rerun rc {again.returncode} {err2.strip().splitlines()[-2:]}"
    finally:
        proxy.close()


def _fields(a: object, b: object, at: str = "") -> list[str]:
    """The paths where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(set(a) | set(b)) for p in _fields(a.get(k), b.get(k), f"{at}.{k}")]
    return [] if a == b else [f"{at}: {a!r:.80} != {b!r:.80}"]


GARBAGE = [b"\x00\xffnot json", b"[1, 2, 3]", b'{"expires": NaN, "pid": 1}', b'{"expires": Infinity}',
           b'{"expires": "soon"}', b'{"expires": true}', b"", b'{"expires": 1e999}', b"null"]


def s3_garbage_locks(t: Trial) -> tuple[bool, str]:
    from gammatrace.store.backend import ObjectFiles, location

    _s3(t)
    body = t.rng.choice(GARBAGE)
    url = f"s3://faults/lock-{uuid.uuid4().hex[:6]}"
    ObjectFiles(location(url)).write_bytes(".lock", body)
    rc, err = quiet_main(["run", str(config(t)), "--out", url, "--quiet", "--no-report"])
    ok = rc == 0 and any("taking over the lock" in line for line in err)
    return ok, f"lock {body!r:.40}: rc {rc}, {err[-2:]}"


# ------------------------------------------------------------------------- Ray
def ray_ctrl_c(t: Trial) -> tuple[bool, str]:
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise Skip(f"Ray is not installed ({exc})") from None
    from tests import test_ray_interrupts as R

    tmp = tempfile.mkdtemp(prefix="gt-ray-", dir="/tmp")
    try:
        proc = R.start_study(tmp, t.tmp, epochs=60)
        phase = t.rng.choice(["gcs_server", "raylet", "ray::_call"])
        R.when(tmp, proc, lambda found: any(phase in c for c in found.values()))
        time.sleep(t.rng.uniform(0.0, 1.5))
        group = t.rng.random() < 0.5
        (os.killpg if group else os.kill)(proc.pid, signal.SIGINT)
        rc, err = R.ended(proc)
        deadline = time.monotonic() + 30
        while (left := R.ours(tmp)) and time.monotonic() < deadline:
            time.sleep(0.5)
        ok = not left and ((rc, err) == (130, [INTERRUPTED]) or (rc == 0 and not err))
        return ok, f"Ctrl-C ({'group' if group else 'driver'}) after {phase}: rc {rc}, {err[-2:]}, left {left}"
    finally:
        for pid in R.ours(tmp):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


class Skip(Exception):
    """A class that cannot run here (a missing optional package)."""


CLASSES: dict[str, Callable[[Trial], tuple[bool, str]]] = {
    "report beside user files": report_beside_user_files, "planted links per writer": planted_links,
    "concurrent reports": concurrent_reports, "interrupt at every write of analyze": interrupt_every_write,
    "absurd values": absurd_values, "names": names, "SIGINT while workers start": sigint_worker_start,
    "S3 outage (reset or silent)": s3_outage, "S3 garbage locks": s3_garbage_locks,
    "Ray Ctrl-C": ray_ctrl_c}


def main_(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=3, help="trials per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="classes whose name contains one of these words")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    shared: dict = {}
    rows = []
    try:
        for name, fn in CLASSES.items():
            if args.only and not any(w.lower() in name.lower() for w in args.only):
                continue
            passed, start, note = 0, time.monotonic(), ""
            for i in range(args.trials):
                with tempfile.TemporaryDirectory(prefix="gt-trial-") as tmp:
                    try:
                        ok, what = fn(Trial(random.Random(rng.random()), Path(tmp), shared))
                    except Skip as exc:
                        note = f"skipped: {exc}"
                        break
                    except Exception as exc:  # noqa: BLE001 - a crash of the trial is a failed trial, said
                        ok, what = False, f"{type(exc).__name__}: {exc}"
                passed += ok
                print(f"{'pass' if ok else 'FAIL'} {name} #{i + 1}: {what}"[:400], file=sys.stderr, flush=True)
            rows.append((name, 0 if note else args.trials, passed, time.monotonic() - start, note))
    finally:
        if "stack" in shared:
            shared["stack"].close()
    print("| class | trials | passed | seconds |\n|---|---:|---:|---:|")
    for name, n, ok, secs, note in rows:
        print(f"| {name} | {n} | {ok} | {secs:.0f} |" + (f" {note}" if note else ""))
    total = sum(r[1] for r in rows)
    print(f"| all | {total} | {sum(r[2] for r in rows)} | {sum(r[3] for r in rows):.0f} |")
    return 0 if all(r[1] == r[2] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main_())
