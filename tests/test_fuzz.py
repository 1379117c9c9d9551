"""Issue 10: fuzzing every file format a user hands gammatrace or gammatrace reads back.

Each format gets at least 300 seeded mutations from five operators — truncate, bit flip,
type swap, huge length, missing field — run in-process through the command line's
``main(argv)`` (and one per format through a real subprocess, in the background). A
trial passes when

- the command exits 2 with exactly one stderr line (an "Exception ignored" report counts
  as one, as a real process would print it), starting ``gammatrace: error: `` and naming
  the damaged file (a config: the file or the field), and nothing is written; or, where
  the mutation is harmless, it exits 0 and every number (each step table, the summary) is
  bit for bit the unmutated run's; a config mutated into another *valid* config may train
  that config into a fresh folder (its run.json must then hold it);
- and every other file's SHA-256 is unchanged.

Never a traceback, never exit 1, never a silently different number. Formats: the local
dataset readers (CIFAR python-version pickles and MNIST IDX files, headers mutated),
run.json, YAML configs, and Parquet step shards (the analysis's and pass 1's). Mutations
are distinct within a format (a repeat would only repeat a trial).

``python -m pytest tests/test_fuzz.py -s`` prints the table of fault classes (trials,
passes) and the CPU time per format; ``GAMMATRACE_FUZZ_TRIALS=N`` changes the trials per
format (default 300). The whole file takes under a minute on 2 CPUs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import hashlib
import io
import json
import os
import pickle
import pickletools
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import gammatrace
from gammatrace import cli
from gammatrace.cli import main
from gammatrace.config import RunConfig
from tests.conftest import tiny_config

TRIALS = int(os.environ.get("GAMMATRACE_FUZZ_TRIALS", "300"))
OPERATORS = ("truncate", "bit flip", "type swap", "huge length", "missing field")
PREFIX = "gammatrace: error: "
LEAN = {"per_tensor": False, "per_sample": False}  # fewer tables: a harmless mutation's run is cheaper


# ----------------------------------------------------------------------------- bookkeeping
@dataclass
class Tally:
    """Trials and passes per (format, operator), and the failures to report."""

    counts: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0, 0]))  # trials, passes, exit 2, exit 0
    failures: list = field(default_factory=list)
    cpu: dict = field(default_factory=lambda: defaultdict(float))  # format -> CPU seconds of its trials

    def add(self, fmt: str, op: str, seed: int, rc: Any, problem: str | None) -> None:
        now = time.process_time()
        self.cpu[fmt] += now - getattr(self, "last", now)
        if os.environ.get("GAMMATRACE_FUZZ_DEBUG"):
            print(f"{now - getattr(self, 'last', now):6.3f}s {fmt} {op} {seed} rc={rc}", file=sys.__stderr__)
        self.last = now
        row = self.counts[(fmt, op)]
        row[0] += 1
        if problem is None:
            row[1] += 1
            row[2 if rc == 2 else 3] += 1
        else:
            self.failures.append(f"{fmt} / {op} / seed {seed}: rc={rc}: {problem}")

    def start(self) -> None:
        """Count CPU time from here (a test's trials, not its fixtures)."""
        self.last = time.process_time()

    def table(self) -> str:
        lines = ["| fault class | trials | passes | refused (exit 2) | harmless (exit 0) |",
                 "|---|---:|---:|---:|---:|"]
        for (fmt, op), (n, ok, two, zero) in sorted(self.counts.items()):
            lines.append(f"| {fmt}: {op} | {n} | {ok} | {two} | {zero} |")
        cpu = ", ".join(f"{fmt} {s:.1f} s" for fmt, s in sorted(self.cpu.items()) if "subprocess" not in fmt)
        return "\n".join(lines) + f"\n\nCPU time of the in-process trials: {cpu}"


TALLY = Tally()


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    # main() builds its argument parser on every call (options generated from signatures,
    # ~15 ms); the trials share one, built the same way, so the time goes to the trials.
    build = cli.build_parser
    cli.build_parser = functools.cache(build)
    yield
    cli.build_parser = build
    if TALLY.counts:
        print("\n\nFuzz: fault classes tried (issue 10)\n" + TALLY.table())


class _Watchdog(Exception):
    pass


def call(argv: list[str], budget: float = 20.0) -> tuple[Any, str, str]:
    """``main(argv)`` in this process: (exit status, stderr, stdout). An exception that
    escapes main is returned as the status 'traceback: ...' (what exit 1 would be)."""
    err, out = io.StringIO(), io.StringIO()
    # What a real process would print as "Exception ignored in ..." (a traceback on stderr).
    ignored: list = []

    def alarm(*_):
        raise KeyboardInterrupt  # what a user's Ctrl-C does: main must end cleanly (130)

    old, hook = signal.signal(signal.SIGALRM, alarm), sys.unraisablehook
    signal.setitimer(signal.ITIMER_REAL, budget)
    sys.unraisablehook = ignored.append
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    except BaseException as exc:  # noqa: BLE001 - the point is to catch everything
        rc = f"traceback: {exc.__class__.__name__}: {str(exc)[:300]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        sys.unraisablehook = hook
    lines = [f"Exception ignored in: {u.object!r}: {u.exc_type.__name__}: {u.exc_value}\n" for u in ignored]
    return rc, "".join(lines) + err.getvalue(), out.getvalue()


def error_line(rc: Any, err: str, *names: str) -> str | None:
    """None when (rc, err) is the one-line error contract naming one of ``names``; else why not."""
    if rc != 2:
        return f"exit {rc!r}, not 2; stderr: {err.strip()[-300:]!r}"
    lines = [line for line in err.splitlines() if line.strip()]
    if len(lines) != 1:
        return f"{len(lines)} stderr lines: {lines[:4]!r}"
    if not lines[0].startswith(PREFIX):
        return f"stderr does not start with {PREFIX!r}: {lines[0][:200]!r}"
    if names and not any(n in lines[0] for n in names):
        return f"the line names none of {names}: {lines[0][:300]!r}"
    return None


def tree_hashes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"
            and not any(str(p.relative_to(root)).startswith(s) for s in skip)}


def restore(root: Path, pristine: dict[str, bytes]) -> None:
    """Put ``root`` back as ``pristine`` (relative path -> bytes) for the next trial."""
    for p in [p for p in root.rglob("*") if p.is_file() and p.name != ".lock"]:
        rel = str(p.relative_to(root))
        if rel not in pristine:
            p.unlink()
        elif p.read_bytes() != pristine[rel]:
            p.write_bytes(pristine[rel])
    for rel, raw in pristine.items():
        if not (root / rel).exists():
            (root / rel).write_bytes(raw)


def numbers(run: Path) -> dict[str, str]:
    """The files holding a run's numbers (every table and summary), without those that
    embed a time (run.json's 'created', epochs.parquet's 'seconds')."""
    return tree_hashes(run, skip=("run.json", "epochs.parquet"))


def changed(before: dict[str, str], after: dict[str, str], exclude: set[str] = frozenset()) -> list[str]:
    keys = (set(before) | set(after)) - set(exclude)
    return sorted(k for k in keys if before.get(k) != after.get(k))


def distinct(seen: set, original: bytes, mutate, *args) -> tuple[bytes, str]:
    """A mutation not tried before (nor a no-op): ``mutate(*args)`` again (its generator
    among them, so each draw differs) until the mutated bytes are new; identical inputs
    would only repeat a trial."""
    for _ in range(100):
        raw, what = mutate(*args)
        key = hashlib.sha256(raw).digest()
        if raw != original and key not in seen:
            break
    seen.add(key)
    return raw, what


def flip_bits(raw: bytes, rng: np.random.Generator, lo: int, hi: int) -> bytes:
    b = bytearray(raw)
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(lo, max(hi, lo + 1)))
        if i < len(b):
            b[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


# -------------------------------------------------------- structured values (JSON, YAML)
def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _set(obj: Any, path: tuple, value: Any) -> Any:
    obj = copy.deepcopy(obj)
    target = obj
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    return obj


def _delete(obj: Any, path: tuple) -> Any:
    obj = copy.deepcopy(obj)
    target = obj
    for k in path[:-1]:
        target = target[k]
    del target[path[-1]]
    return obj


def _get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def swapped(value: Any, rng: np.random.Generator) -> Any:
    """``value`` as another type: the number as text, the text as a number, a list as a map, ..."""
    if isinstance(value, bool):
        options = [int(value), str(value).lower(), [value], None]
    elif isinstance(value, int):
        options = [str(value), float(value), bool(value), [value], {"value": value}, None]
    elif isinstance(value, float):
        options = [str(value), int(value), [value], None, True]
    elif isinstance(value, str):
        options = [len(value), [value], {value: value}, None, 1.5, True]
    elif value is None:
        options = [0, "", [], {}, False]
    elif isinstance(value, list):
        options = [{str(i): v for i, v in enumerate(value)}, "list", len(value), None]
    else:  # dict
        options = [list(value.values()), "map", len(value), None]
    return options[int(rng.integers(len(options)))]


HUGE_VALUES = ("int", "float", "inf", "string", "list", "nesting")


def huge_text(kind: str, scale: int) -> str:
    """A huge value as JSON/YAML flow text. ``scale`` sizes the text ones: PyYAML's scanner
    is slow on long scalars and quadratic in nesting depth, so a YAML config gets smaller
    (still far beyond any real config: 600 levels pass Python's recursion limit)."""
    return {"int": str(10 ** 40), "float": "1e308", "inf": "1e400", "string": json.dumps("x" * 100 * scale),
            "list": "[" + ",".join(["0"] * 2 * scale) + "]", "nesting": "[" * scale + "]" * scale}[kind]


@functools.lru_cache(maxsize=8)
def _parse(text: str, load) -> Any:
    return load(text)  # the unmutated document, parsed once


def mutate_structured(text: str, rng: np.random.Generator, op: str, load, dump, scale: int) -> tuple[str, str]:
    """A mutation of a JSON or YAML document: (text, what was done)."""
    raw = text.encode()
    if op == "truncate":
        cut = int(rng.integers(0, len(raw)))
        return raw[:cut].decode(errors="replace"), f"cut at byte {cut}"
    if op == "bit flip":
        return flip_bits(raw, rng, 0, len(raw)).decode("utf-8", errors="surrogateescape"), "bits flipped"
    data = copy.deepcopy(_parse(text, load))
    paths = _paths(data)
    path = paths[int(rng.integers(len(paths)))]
    if op == "type swap":
        return dump(_set(data, path, swapped(_get(data, path), rng))), f"type of {path} swapped"
    if op == "missing field":
        return dump(_delete(data, path)), f"{path} removed"
    kind = HUGE_VALUES[int(rng.integers(len(HUGE_VALUES)))]
    marker = "HUGE_VALUE_MARKER"
    return dump(_set(data, path, marker)).replace(json.dumps(marker) if dump is _json_dump else marker,
                                                   huge_text(kind, scale), 1), f"{path} = huge {kind}"


def _json_dump(data: Any) -> str:
    return json.dumps(data, indent=2)


def _yaml_dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def mutate_text(text: str, rng: np.random.Generator, op: str, load, dump, scale: int) -> tuple[bytes, str]:
    """:func:`mutate_structured`, as the bytes written to the file."""
    text, what = mutate_structured(text, rng, op, load, dump, scale)
    return text.encode("utf-8", errors="surrogateescape"), what


# ------------------------------------------------------------------------- shared runs
@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> Path:
    """A tiny analysed run (2 epochs, 3 steps each), the source of every run copy here."""
    run = tmp_path_factory.mktemp("fuzz") / "run"
    gammatrace.train(tiny_config(epochs=2, analysis=LEAN), run, progress=False)
    return run


@pytest.fixture(scope="module")
def subprocesses(tmp_path_factory, analysed):
    """A few mutations through the real command line, started at once in the background
    (one CPU each while the in-process trials use another); collected by the last test."""
    root = tmp_path_factory.mktemp("sub")
    cases = []
    run = root / "run"
    shutil.copytree(analysed, run)
    (run / "run.json").write_text((run / "run.json").read_text()[:200])  # truncated run.json
    cases.append(("run.json: truncate", ["analyze", str(run), "--quiet"], str(run / "run.json"), run))
    shard_run = root / "shard"
    shutil.copytree(analysed, shard_run)
    shard = shard_run / "analysis" / "last" / "steps" / "epoch_0001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cases.append(("Parquet step shard: truncate", ["analyze", str(shard_run), "--quiet"], str(shard), shard_run))
    cfg = root / "c.yaml"
    cfg.write_text("epochs: 1\ndata: {name: digits, n_train: 32\n")  # YAML syntax error
    cases.append(("YAML config: truncate", ["run", str(cfg), "--out", str(root / "o"), "--quiet"], str(cfg), None))
    data = root / "data"
    folder = data / "cifar-100-python"
    folder.mkdir(parents=True)
    batch = _cifar_pickle(_cifar_batch(np.random.default_rng(10), 6), 3)
    # the dtype's flags byte: numpy fails inside the unpickler, then reports the clean-up of
    # the half-built array as "Exception ignored" (a traceback a real process prints)
    ops = [(op.name, pos) for op, _, pos in pickletools.genops(batch)]
    payload = next(pos for name, pos in ops if name == "BINBYTES")
    flags = next(pos for name, pos in ops if name == "BININT1" and payload - 10 < pos < payload) + 1
    (folder / "train").write_bytes(batch[:flags] + b"\xff" + batch[flags + 1:])
    (folder / "test").write_bytes(batch)
    ccfg = root / "cifar.yaml"
    ccfg.write_text(json.dumps(tiny_config(data={"name": "cifar100", "data_dir": str(data), "n_train": None,
                                                 "n_test": None})))
    cases.append(("CIFAR header: huge length", ["run", str(ccfg), "--out", str(root / "co"), "--quiet"],
                  str(folder / "train"), None))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    befores = [tree_hashes(tree, skip=("run.json",)) if tree else None for *_, tree in cases]
    results: list = []

    def one_after_another() -> None:  # one at a time: the in-process trials keep a core
        for name, argv, file, tree in cases:
            done = subprocess.run([sys.executable, "-m", "gammatrace.cli", *argv], capture_output=True, text=True,
                                  env=env, timeout=300)
            results.append((name, file, tree, done))

    worker = threading.Thread(target=one_after_another, daemon=True)
    worker.start()
    yield worker, results, befores


# ------------------------------------------------------------------------------- CIFAR
def _cifar_batch(rng: np.random.Generator, n: int) -> dict:
    return {b"batch_label": b"training batch 1 of 1", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"img_%d.png" % i for i in range(n)],
            b"fine_labels": rng.integers(0, 100, n).tolist(), b"coarse_labels": rng.integers(0, 20, n).tolist()}


def _cifar_pickle(batch: dict, protocol: int) -> bytes:
    # The archive's files name numpy.core (numpy 1.x); protocol 5 is a numpy-2 re-save.
    raw = pickle.dumps(batch, protocol=protocol)
    return raw.replace(b"numpy._core", b"numpy.core") if protocol <= 3 else raw


def _ops(raw: bytes) -> list[tuple[int, str, Any]]:
    return [(pos, op.name, arg) for op, arg, pos in pickletools.genops(raw)]


def _header_end(raw: bytes) -> int:
    """Where the image payload starts: everything before it is the header."""
    for pos, name, arg in _ops(raw):
        if name in ("BINBYTES", "BINBYTES8", "BYTEARRAY8") and len(arg) >= 3072:
            return pos + (5 if name == "BINBYTES" else 9)
    raise AssertionError("no payload")


# Opcodes with the same argument layout, each group a type swap of the others.
_SWAPS = [b"}])", b"N\x88\x89", b"\x85\x86\x87", b"C\x8c", b"BX", b"Kqh", b"Jrj", b"Rbsa"]


def mutate_cifar(raw: bytes, batch: dict, protocol: int, rng: np.random.Generator, op: str) -> tuple[bytes, str]:
    end = _header_end(raw)
    header_ops = [(pos, name, arg) for pos, name, arg in _ops(raw) if pos < end]
    if op == "truncate":
        cut = int(rng.integers(0, end + 1)) if rng.random() < 0.8 else int(rng.integers(end, len(raw)))
        return raw[:cut], f"cut at {cut} of {len(raw)}"
    if op == "bit flip":
        return flip_bits(raw, rng, 0, end), "bits flipped in the header"
    if op == "type swap":
        if rng.random() < 0.3:  # the element type of the image array
            code = [b"i1", b"b1", b"S1", b"U1", b"f2", b"u2", b"i2", b"O8", b"V1", b"c8"][int(rng.integers(10))]
            return raw.replace(b"u1", code, 1), f"dtype u1 -> {code.decode()}"
        candidates = [(pos, g) for pos, _, _ in header_ops for g in _SWAPS if raw[pos:pos + 1] in g]
        pos, group = candidates[int(rng.integers(len(candidates)))]
        others = [c for c in group if c != raw[pos]]
        new = bytes([others[int(rng.integers(len(others)))]])
        return raw[:pos] + new + raw[pos + 1:], f"opcode at {pos} {raw[pos:pos + 1]!r} -> {new!r}"
    if op == "huge length":
        choices = []
        for pos, name, _ in header_ops:
            if name in ("SHORT_BINBYTES", "SHORT_BINUNICODE", "BININT1"):
                choices.append((pos + 1, 1))
            elif name in ("BINBYTES", "BINUNICODE", "BININT"):
                choices.append((pos + 1, 4))
            elif name == "BININT2":
                choices.append((pos + 1, 2))
            elif name in ("FRAME", "BINBYTES8", "BYTEARRAY8"):
                choices.append((pos + 1, 8))
        pos, size = choices[int(rng.integers(len(choices)))]
        value = {1: 0xFF, 2: 0xFFFF, 4: [0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, len(raw) * 1000][int(rng.integers(4))],
                 8: [2 ** 63 - 1, 2 ** 64 - 1, 2 ** 40][int(rng.integers(3))]}[size]
        return raw[:pos] + value.to_bytes(size, "little") + raw[pos + size:], f"length at {pos} = {value}"
    # missing field: a key of the batch, or one opcode of the header
    if rng.random() < 0.5:
        key = sorted(batch)[int(rng.integers(len(batch)))]
        return _cifar_pickle({k: v for k, v in batch.items() if k != key}, protocol), f"key {key!r} removed"
    i = int(rng.integers(1, len(header_ops)))
    pos, name, _ = header_ops[i]
    nxt = header_ops[i + 1][0] if i + 1 < len(header_ops) else end
    return raw[:pos] + raw[nxt:], f"opcode {name} at {pos} removed"


@pytest.fixture(scope="module")
def cifar_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    data = root / "data"
    folder = data / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(10)
    batches = {"train": _cifar_batch(rng, 6), "test": _cifar_batch(rng, 4)}
    originals = {name: {p: _cifar_pickle(b, p) for p in (3, 5)} for name, b in batches.items()}
    for name in batches:
        (folder / name).write_bytes(originals[name][3])
    (folder / "meta").write_bytes(_cifar_pickle({b"fine_label_names": [], b"coarse_label_names": []}, 3))
    cfg = root / "cifar.yaml"
    cfg.write_text(json.dumps(tiny_config(epochs=1, batch_size=6, model={"width": 4, "depth": 1}, analysis=LEAN,
                                          data={"name": "cifar100", "data_dir": str(data), "n_train": None,
                                                "n_test": None})))
    base = root / "base"
    assert main(["run", str(cfg), "--out", str(base), "--no-report", "--quiet"]) == 0
    return root, folder, cfg, batches, originals, numbers(base)


def test_cifar_header_mutations(cifar_world, subprocesses):  # starts the subprocesses early
    root, folder, cfg, batches, originals, base_numbers = cifar_world
    world = tree_hashes(root, skip=("base", "out"))
    seen: set = set()
    TALLY.start()
    for i in range(TRIALS):
        seed = 1000 + i
        rng = np.random.default_rng(seed)
        op = OPERATORS[i % len(OPERATORS)]
        name = ("train", "test")[int(rng.integers(2))]
        protocol = (3, 5)[int(rng.integers(2))]
        raw, what = distinct(seen, originals[name][protocol], mutate_cifar, originals[name][protocol], batches[name],
                             protocol, rng, op)
        target = folder / name
        target.write_bytes(raw)
        out = root / "out" / str(i)
        rc, err, _ = call(["run", str(cfg), "--out", str(out), "--no-report", "--quiet"])
        target.write_bytes(originals[name][3])
        problem = None
        if rc == 0:
            problem = None if numbers(out) == base_numbers else f"exit 0 with other numbers ({what})"
        else:
            problem = error_line(rc, err, str(target))
            if problem is None and out.exists():
                problem = "wrote into --out although it failed"
        others = changed(world, tree_hashes(root, skip=("base", "out")), {str(target.relative_to(root))})
        if others:
            problem = f"other files changed: {others}"
        TALLY.add("CIFAR header", op, seed, rc, None if problem is None else f"{problem} [{what}, protocol {protocol}]")
        shutil.rmtree(out, ignore_errors=True)
    failures = [f for f in TALLY.failures if f.startswith("CIFAR")]
    assert not failures, "\n".join(failures[:15])


# --------------------------------------------------------------------------------- IDX
_IDX_TYPES = (0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx(arr: np.ndarray, type_byte: int = 0x08) -> bytes:
    return (bytes([0, 0, type_byte, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            + arr.astype(_IDX_DTYPES[type_byte]).tobytes())


def mutate_idx(arr: np.ndarray, rng: np.random.Generator, op: str) -> tuple[bytes, str]:
    raw = _idx(arr)
    header = 4 + 4 * arr.ndim
    if op == "truncate":
        cut = int(rng.integers(0, header + 5))
        return raw[:cut], f"cut at {cut}"
    if op == "bit flip":
        return flip_bits(raw, rng, 0, header), "bits flipped in the header"
    if op == "type swap":
        t = _IDX_TYPES[int(rng.integers(1, len(_IDX_TYPES)))]
        if rng.random() < 0.5:  # a consistent file of another element type
            return _idx(arr, t), f"written as type 0x{t:02x}"
        return raw[:2] + bytes([t]) + raw[3:], f"type byte 0x{t:02x}"
    if op == "huge length":
        if rng.random() < 0.2:
            return raw[:3] + b"\xff" + raw[4:], "ndim 255"
        d = int(rng.integers(arr.ndim))
        value = [0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0x10000][int(rng.integers(4))]
        return raw[:4 + 4 * d] + struct.pack(">I", value) + raw[8 + 4 * d:], f"dim {d} = {value}"
    # missing field: the magic zeros, the type byte, ndim, or one dimension
    k = int(rng.integers(4))
    if k == 0:
        return raw[2:], "magic zeros removed"
    if k == 1:
        return raw[:2] + raw[3:], "type byte removed"
    if k == 2:
        return raw[:3] + raw[4:], "ndim removed"
    d = int(rng.integers(arr.ndim))
    return raw[:4 + 4 * d] + raw[8 + 4 * d:], f"dim {d} removed"


@pytest.fixture(scope="module")
def idx_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    folder = root / "data" / "mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(11)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, 6, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4, dtype=np.uint8)}
    for name, arr in arrays.items():
        (folder / name).write_bytes(_idx(arr))
    cfg = root / "mnist.yaml"
    cfg.write_text(json.dumps(tiny_config(epochs=1, batch_size=6, model={"width": 4, "depth": 1}, analysis=LEAN,
                                          data={"name": "mnist", "data_dir": str(root / "data"), "n_train": None,
                                                "n_test": None})))
    base = root / "base"
    assert main(["run", str(cfg), "--out", str(base), "--no-report", "--quiet"]) == 0
    return root, folder, cfg, arrays, numbers(base)


def test_idx_header_mutations(idx_world):
    root, folder, cfg, arrays, base_numbers = idx_world
    world = tree_hashes(root, skip=("base", "out"))
    names = sorted(arrays)
    seen: set = set()
    TALLY.start()
    for i in range(TRIALS):
        seed = 2000 + i
        rng = np.random.default_rng(seed)
        op = OPERATORS[i % len(OPERATORS)]
        name = names[int(rng.integers(len(names)))]
        raw, what = distinct(seen, _idx(arrays[name]), mutate_idx, arrays[name], rng, op)
        gz = rng.random() < 0.25
        target = folder / (name + ".gz" if gz else name)
        original = folder / name
        if gz:  # the same mutation inside a gzipped copy
            original.unlink()
            target.write_bytes(gzip.compress(raw, mtime=0))
        else:
            target.write_bytes(raw)
        out = root / "out" / str(i)
        rc, err, _ = call(["run", str(cfg), "--out", str(out), "--no-report", "--quiet"])
        if gz:
            target.unlink()
        original.write_bytes(_idx(arrays[name]))
        if rc == 0:
            problem = None if numbers(out) == base_numbers else f"exit 0 with other numbers ({what})"
        else:
            problem = error_line(rc, err, str(target))
            if problem is None and out.exists():
                problem = "wrote into --out although it failed"
        others = changed(world, tree_hashes(root, skip=("base", "out")))
        if others:
            problem = f"other files changed: {others}"
        TALLY.add("MNIST IDX header", op, seed, rc, None if problem is None else f"{problem} [{what}, {name}]")
        shutil.rmtree(out, ignore_errors=True)
    failures = [f for f in TALLY.failures if f.startswith("MNIST")]
    assert not failures, "\n".join(failures[:15])


# ---------------------------------------------------------------------------- run.json
def test_run_json_mutations(analysed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(analysed, run)
    meta = run / "run.json"
    original = meta.read_bytes()
    data = json.loads(original)
    base_numbers = numbers(run)
    world = tree_hashes(tmp_path, skip=("run/run.json",))
    pristine = {p: (tmp_path / p).read_bytes() for p in tree_hashes(tmp_path)}
    seen: set = set()
    TALLY.start()
    for i in range(TRIALS):
        seed = 3000 + i
        rng = np.random.default_rng(seed)
        op = OPERATORS[i % len(OPERATORS)]
        raw, what = distinct(seen, original, mutate_text, original.decode(), rng, op, json.loads, _json_dump, 100_000)
        meta.write_bytes(raw)
        rc, err, _ = call(["analyze", str(run), "--quiet"])
        if rc == 0:
            problem = None if numbers(run) == base_numbers else f"exit 0 with other numbers ({what})"
        else:
            problem = error_line(rc, err, str(meta))
        others = changed(world, tree_hashes(tmp_path, skip=("run/run.json",)))
        if others:
            problem = f"other files changed: {others}"
        TALLY.add("run.json", op, seed, rc, None if problem is None else f"{problem} [{what}]")
        restore(tmp_path, pristine)
    assert data["status"] == "complete"
    failures = [f for f in TALLY.failures if f.startswith("run.json")]
    assert not failures, "\n".join(failures[:15])


# ------------------------------------------------------------------------- YAML config
# What bounds a run's cost comes first: a truncated copy keeps it (the defaults of a
# key cut off train in seconds, not minutes).
BASE_YAML = """\
epochs: 1
data: {name: digits, n_train: 32, n_test: 16}
batch_size: 32
model: {name: mlp, width: 8, depth: 2}
optim:
  name: sgd
  lr: 0.2
analysis: {tail: 0, per_tensor: false, per_sample: false}
name: tiny
seed: 3
# a tiny run: digits, 32 samples, one step
"""


def test_yaml_config_mutations(tmp_path):
    """Three trials in four rerun the command over the run its unmutated config made (the
    usual way a config comes back: edited, then run again into the same --out): the same
    content resumes to the same numbers, any other valid content is a conflict naming the
    first field that differs. Every fourth trains into a fresh --out, so that mutated values
    reach the dataset and the model too."""
    cfg = tmp_path / "c.yaml"
    base_data = yaml.safe_load(BASE_YAML)
    base = tmp_path / "base"
    cfg.write_text(BASE_YAML)
    assert main(["run", str(cfg), "--out", str(base), "--no-report", "--quiet"]) == 0
    base_numbers = numbers(base)
    base_files = tree_hashes(base)
    world = tree_hashes(tmp_path, skip=("out", "c.yaml"))
    fields = {k for p in _paths(base_data) for k in p if isinstance(k, str)} | set(RunConfig.model_fields)
    seen: set = set()
    TALLY.start()
    for i in range(TRIALS):
        seed = 4000 + i
        rng = np.random.default_rng(seed)
        op = OPERATORS[i % len(OPERATORS)]
        raw, what = distinct(seen, BASE_YAML.encode(), mutate_text, BASE_YAML, rng, op, yaml.safe_load, _yaml_dump, 600)
        cfg.write_bytes(raw)
        text = raw.decode("utf-8", errors="surrogateescape")
        fresh = (i // len(OPERATORS)) % 4 == 0
        out = tmp_path / "out" / str(i) if fresh else base
        rc, err, _ = call(["run", str(cfg), "--out", str(out), "--no-report", "--quiet"], budget=5.0)
        try:  # libyaml: the same document, parsed in C (the CLI's pure-Python parse is the one tested)
            parsed = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except Exception:  # noqa: BLE001 - any failure to parse means: not the base content
            parsed = None
        keys = {str(k) for p in _paths(parsed) for k in p} if isinstance(parsed, dict) else set()
        problem = None
        if rc == 0 and not fresh:  # the stored config, however spelt: nothing retrained
            problem = None if tree_hashes(base) == base_files else f"exit 0 with other numbers ({what})"
        elif rc == 0:
            if parsed == base_data:
                problem = None if numbers(out) == base_numbers else f"exit 0 with other numbers ({what})"
            else:  # another valid config: its run must be that config
                try:
                    stored = json.loads((out / "run.json").read_text())["config"]
                    wanted = RunConfig.model_validate(parsed).model_dump(mode="json")
                    problem = None if stored == wanted else f"trained a config other than the file's ({what})"
                except Exception as exc:  # noqa: BLE001
                    problem = f"exit 0 on a config that is not valid ({exc.__class__.__name__}: {what})"
        elif rc == 130 and fresh and parsed != base_data:
            problem = None  # a valid config asking for a long run (huge epochs), interrupted cleanly
            try:
                RunConfig.model_validate(parsed)
            except Exception as exc:  # noqa: BLE001
                problem = f"ran long on an invalid config ({exc.__class__.__name__}) [{what}]"
        else:
            problem = error_line(rc, err, str(cfg), "invalid config", *fields, *keys)
            if problem is None and fresh and out.exists():
                problem = "wrote into --out although it failed"
        others = changed(world, tree_hashes(tmp_path, skip=("out", "c.yaml")))
        if others:
            problem = f"other files changed: {others}"
        TALLY.add("YAML config", op, seed, rc, None if problem is None else f"{problem} [{what}]")
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
    failures = [f for f in TALLY.failures if f.startswith("YAML")]
    assert not failures, "\n".join(failures[:15])


# ------------------------------------------------------------------------ Parquet shards
def mutate_parquet(raw: bytes, rng: np.random.Generator, op: str, required: tuple[str, ...]) -> tuple[bytes, str]:
    if op == "truncate":
        cut = int(rng.integers(0, len(raw)))
        return raw[:cut], f"cut at {cut} of {len(raw)}"
    if op == "bit flip":
        return flip_bits(raw, rng, 0, len(raw)), "bits flipped"
    if op == "huge length":
        if rng.random() < 0.5:  # the footer's length, just before the closing magic
            value = [0xFFFFFFFF, 0x7FFFFFFF, len(raw) * 10, len(raw) - 7][int(rng.integers(4))]
            return raw[:-8] + struct.pack("<I", value) + raw[-4:], f"footer length {value}"
        # a page header's compressed size: its third field (Thrift compact: a field byte, then
        # a varint each for the page type, the uncompressed size and the compressed size)
        column = int(rng.integers(len(required)))
        i = pq.ParquetFile(io.BytesIO(raw)).metadata.row_group(0).column(column).data_page_offset
        for _ in range(3):
            i += 1
            start = i
            while raw[i] & 0x80:
                i += 1
            i += 1
        huge = bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x07])
        return raw[:start] + huge + raw[i:], f"page size of column {column} huge"
    table = pq.read_table(io.BytesIO(raw))
    keep_metadata = rng.random() < 0.5  # as if changed in place; else rewritten by another tool
    column = required[int(rng.integers(len(required)))]
    if op == "type swap":
        to = [pa.int64(), pa.float32(), pa.string(), pa.bool_(), pa.int32()][int(rng.integers(5))]
        if table.schema.field(column).type == to:
            to = pa.float64()
        try:
            new = table.column(column).cast(to, safe=False)
        except pa.ArrowInvalid:
            new = pa.array([str(v) for v in table.column(column).to_pylist()]).cast(pa.string())
            to = pa.string()
        table = table.set_column(table.column_names.index(column), pa.field(column, new.type), new)
        what = f"{column} as {to}"
    else:  # missing field
        if rng.random() < 0.2:
            table = table.replace_schema_metadata({})
            keep_metadata = True
            what = "key-value metadata removed"
        else:
            table = table.drop_columns([column])
            what = f"column {column} removed"
    if not keep_metadata:
        table = table.replace_schema_metadata({})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue(), what + (" (metadata kept)" if keep_metadata else "")


def test_parquet_step_shard_mutations(analysed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(analysed, run)
    base_numbers = numbers(run)
    world = tree_hashes(tmp_path)
    pristine = {p: (tmp_path / p).read_bytes() for p in world}
    originals = {p: b for p, b in pristine.items() if "/steps/" in p}
    analysis_cols = tuple(pq.read_schema(run / "analysis/last/steps/epoch_0000.parquet").names)
    record_cols = tuple(pq.read_schema(run / "steps/epoch_0000.parquet").names)
    seen: set = set()
    TALLY.start()
    for i in range(TRIALS):
        seed = 5000 + i
        rng = np.random.default_rng(seed)
        op = OPERATORS[i % len(OPERATORS)]
        epoch = int(rng.integers(2))
        pass1 = rng.random() < 0.3  # pass 1's shard: the replay of that epoch reads it
        rel = f"run/steps/epoch_{epoch:04d}.parquet" if pass1 else f"run/analysis/last/steps/epoch_{epoch:04d}.parquet"
        cols = record_cols if pass1 else analysis_cols
        raw, what = distinct(seen, originals[rel], mutate_parquet, originals[rel], rng, op, cols)
        redo = f"run/analysis/last/steps/epoch_{epoch:04d}.parquet"
        if pass1:
            (tmp_path / redo).unlink()  # the segment is replayed, verified against the damaged shard
        (tmp_path / rel).write_bytes(raw)
        rc, err, _ = call(["analyze", str(run), "--quiet"])
        if rc == 0:  # the damaged file itself is left as it is (pass 1) or rewritten (analysis)
            mine = rel.removeprefix("run/")
            same = changed(base_numbers, numbers(run), {mine}) == []
            problem = None if same else f"exit 0 with other numbers ({what})"
        else:
            problem = error_line(rc, err, str(tmp_path / rel))
        after = tree_hashes(tmp_path)
        others = changed(world, after, {rel} | ({redo} if pass1 else set()))
        record = "run/analysis/last/reference_cache.json"
        if pass1 and rc != 0 and others == [record] and json.loads((tmp_path / record).read_text())["complete"] is False:
            others = []  # the replay's own progress record, saying it is not done: the rerun completes it
        if others:
            problem = f"other files changed: {others}"
        if pass1 and rc != 0 and redo in after:
            problem = f"the replayed segment was written although its recording is damaged ({what})"
        TALLY.add("Parquet step shard", op, seed, rc,
                  None if problem is None else f"{problem} [{what}, {'pass 1' if pass1 else 'analysis'}]")
        restore(tmp_path, pristine)
    failures = [f for f in TALLY.failures if f.startswith("Parquet")]
    assert not failures, "\n".join(failures[:15])


# ------------------------------------------------------------------- real subprocesses
def test_real_subprocesses(subprocesses):
    worker, results, befores = subprocesses
    worker.join(timeout=600)
    assert len(results) == len(befores)
    failures = []
    for (name, file, tree, done), before in zip(results, befores, strict=True):
        problem = error_line(done.returncode, done.stderr, file)
        if tree is not None and tree_hashes(tree, skip=("run.json",)) != before:
            problem = "other files changed"
        fmt, op = name.split(": ")
        TALLY.add(f"{fmt} (subprocess)", op, 0, done.returncode, problem)
        if problem:
            failures.append(f"{name}: {problem}")
    assert not failures, failures
