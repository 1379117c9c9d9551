"""Issue 10: never a silent wrong number. One test per audited failure (table-driven where
alike); each was written before its fix and failed on the code as it was.

Every error a user can fix is one line on stderr with exit status 2, names the file or
field and the fix, and leaves what is on disk untouched.
"""

from __future__ import annotations

import json
import os
import pickletools
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import gammatrace
from gammatrace.cli import main
from gammatrace.engine import train_pass
from gammatrace.store.run import RunStore, StoreError, load_run
from tests.conftest import one_error_line, tiny_config, tree_hashes


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny analysed run with a continuation reference, shared read-only by the tests
    (each copies it before changing anything)."""
    out = tmp_path_factory.mktemp("shared") / "run"
    gammatrace.train(tiny_config(epochs=3, reference={"kind": "continuation", "extra_epochs": 1}), out,
                     progress=False)
    return out


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


# ------------------------------------------------------------ 1. reference identity
def test_analysis_against_another_reference_file_is_a_new_analysis(trained, tmp_path):
    run = _copy(trained, tmp_path)
    # two different θ* files with the same stem, one after the other
    a, b = tmp_path / "x" / "theta.pt", tmp_path / "y" / "theta.pt"
    a.parent.mkdir()
    b.parent.mkdir()
    shutil.copy(run / "final.pt", a)
    shutil.copy(run / "reference.pt", b)
    sa = gammatrace.analyze(run, str(a), progress=False)
    sb = gammatrace.analyze(run, str(b), progress=False)
    assert sa["reference"] != sb["reference"]
    fresh = gammatrace.analyze(_copy(trained, tmp_path, "fresh"), str(b), progress=False)
    assert sb["gamma_median"] == fresh["gamma_median"]
    assert sa["gamma_median"] == gammatrace.analyze(run, "last", progress=False)["gamma_median"]


def test_reference_file_changed_in_place_is_a_new_analysis(trained, tmp_path):
    run = _copy(trained, tmp_path)
    ref = tmp_path / "theta.pt"
    shutil.copy(run / "final.pt", ref)
    first = gammatrace.analyze(run, str(ref), progress=False)
    shutil.copy(run / "reference.pt", ref)
    second = gammatrace.analyze(run, str(ref), progress=False)
    assert first["reference"] != second["reference"]
    assert second["gamma_median"] == gammatrace.analyze(run, "continuation", progress=False)["gamma_median"]


# -------------------------------------------------------------- 2. θ_T is checked
@pytest.mark.parametrize("target", ["final.pt", "reference.pt"])
def test_replaced_final_point_is_refused(trained, tmp_path, capsys, target):
    run = _copy(trained, tmp_path)
    other = tmp_path / "other"
    gammatrace.train(tiny_config(epochs=3, seed=99, reference={"kind": "continuation", "extra_epochs": 1}),
                     other, progress=False)
    shutil.copy(other / target, run / target)
    shutil.rmtree(run / "analysis")
    before = tree_hashes(run)
    ref = "last" if target == "final.pt" else "continuation"
    assert main(["analyze", str(run), "--reference", ref, "--quiet"]) == 2
    line = one_error_line(capsys)
    assert target in line and "SHA-256" in line
    assert tree_hashes(run) == before


# ---------------------------------------------------------- 3. names escape --out
@pytest.mark.parametrize("name", ["../../ESCAPED", "ABSOLUTE", "a/b", "..", ".hidden", ""])
def test_run_names_are_confined_to_out(tmp_path, capsys, name):
    name = str(tmp_path / "ESCAPED_abs") if name == "ABSOLUTE" else name
    cfg = tmp_path / "runs.yaml"
    cfg.write_text(json.dumps({"base": tiny_config(epochs=1), "runs": {name: {}}}))
    out = tmp_path / "deep" / "out"
    assert main(["run", str(cfg), "--out", str(out), "--no-report", "--quiet"]) == 2
    assert "name" in one_error_line(capsys)
    assert not (tmp_path / "ESCAPED").exists() and not (tmp_path / "ESCAPED_abs").exists()
    assert not out.exists()


def test_store_refuses_a_path_outside_its_root(tmp_path):
    store = RunStore(tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "link").symlink_to(tmp_path / "elsewhere")
    for rel in ("../x.json", "link/x.json", "/abs.json"):
        with pytest.raises(StoreError, match="outside"):
            store.write_json(rel, {})
    assert not any((tmp_path / "elsewhere").iterdir())


# ------------------------------------------------------------------- 4. the lock
_HOLD = """
import sys, time
from gammatrace.store.run import RunStore
with RunStore(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_second_writer_is_refused_while_a_live_holder_exists(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = tmp_path / "c.yaml"
        cfg.write_text(json.dumps(tiny_config()))
        assert main(["run", str(cfg), "--out", str(out), "--no-report", "--quiet"]) == 2
        line = one_error_line(capsys)
        assert str(holder.pid) in line and "in use" in line
        assert not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead: its lock went with it, and the run trains
    assert main(["run", str(cfg), "--out", str(out), "--no-report", "--quiet"]) == 0


def test_two_processes_with_different_configs_never_mix_one_folder(tmp_path):
    out = tmp_path / "r"
    code = ("import sys, json; from gammatrace.engine import train_pass; from gammatrace.errors import UserError\n"
            "try:\n    train_pass(json.loads(sys.argv[1]), sys.argv[2], progress=False); print('trained')\n"
            "except UserError as e:\n    print('refused', e)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(tiny_config(epochs=6, seed=s)), str(out)],
                              stdout=subprocess.PIPE, text=True) for s in (1, 2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert sorted(o.split()[0] for o in outs) == ["refused", "trained"], outs
    run = load_run(out)
    seed = run.config.seed
    ref = gammatrace.train(tiny_config(epochs=6, seed=seed), tmp_path / "alone", replay=False, progress=False)
    pd.testing.assert_frame_equal(run.record_steps(), ref.record_steps())


# ------------------------------------------------ 5. diverged continuation
def test_diverged_continuation_leaves_the_horizon_analysable(tmp_path, capsys):
    # lr x1e30 from epoch 3 on (step schedule): the horizon (3 epochs) trains, the continuation diverges
    cfg = tiny_config(epochs=3, optim={"lr": 0.05}, schedule={"name": "step", "step_epochs": 3, "factor": 1e30},
                      reference={"kind": "continuation", "extra_epochs": 2})
    run = gammatrace.train(cfg, tmp_path / "r", progress=False)
    assert run.status == "complete" and (tmp_path / "r" / "final.pt").exists()
    assert run.meta.continuation_error and "diverged" in run.meta.continuation_error
    assert len(run.steps("last")) == 9
    assert "continuation beyond the horizon diverged" in capsys.readouterr().err  # said, not silent
    assert main(["analyze", str(tmp_path / "r"), "--reference", "continuation", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "continuation" in line and "diverged" in line


# -------------------------------------------------------- 6. silent acceptance
def test_shard_missing_a_column_is_refused(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    shard = run / "analysis" / "continuation" / "steps" / "epoch_0001.parquet"
    pd.read_parquet(shard).drop(columns=["loss_ref"]).to_parquet(shard, index=False)
    before = tree_hashes(run)
    assert main(["analyze", str(run), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "epoch_0001.parquet" in line and "loss_ref" in line
    assert tree_hashes(run) == before


@pytest.mark.parametrize("args, words", [
    (["--tail", "100000"], "--tail"),
    (["--tail", "-1"], "--tail"),
    (["--ell-inf", "nan"], "--ell-inf"),
    (["--ell-inf", "inf"], "--ell-inf"),
    (["--workers", "0"], "--workers"),
])
def test_bad_analysis_options_are_refused_before_work(trained, tmp_path, capsys, args, words):
    run = _copy(trained, tmp_path)
    before = tree_hashes(run)
    assert main(["analyze", str(run), "--quiet", *args]) == 2
    assert words in one_error_line(capsys)
    assert tree_hashes(run) == before


def test_workers_zero_is_refused_before_training(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(tiny_config()))
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--workers", "0", "--quiet"]) == 2
    assert "--workers" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------ 7. one-line errors
def test_yaml_syntax_error_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochs: 3\nmodel: {name: mlp\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert "bad.yaml" in line and "line" in line


def test_misspelt_model_switch_names_the_switches(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(tiny_config(model={"widht": 8})))
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "widht" in line and "width" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("below", ["", "below"])
def test_out_that_is_a_file_or_below_one(tmp_path, capsys, below):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(tiny_config()))
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / below if below else tmp_path / "file"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "file" in one_error_line(capsys)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(tiny_config()))
    assert main(["run", str(cfg), "--out", str(ro / "o"), "--quiet"]) == 2
    assert "permission" in one_error_line(capsys).lower()


@pytest.mark.parametrize("content, field", [
    ("[1, 2, 3]", "run.json"),
    ("{broken", "run.json"),
])
def test_damaged_run_json_is_one_line_naming_the_file(trained, tmp_path, capsys, content, field):
    run = _copy(trained, tmp_path)
    (run / "run.json").write_text(content)
    before = tree_hashes(run)
    assert main(["analyze", str(run), "--quiet"]) == 2
    assert field in one_error_line(capsys)
    assert tree_hashes(run) == before


def test_null_horizon_in_run_json_names_the_field(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    meta = json.loads((run / "run.json").read_text())
    meta["horizon_epochs"] = None
    (run / "run.json").write_text(json.dumps(meta))
    before = tree_hashes(run)
    assert main(["analyze", str(run), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "run.json" in line and "horizon_epochs" in line
    assert tree_hashes(run) == before


def test_reference_that_is_a_text_file(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    ref = tmp_path / "notes.txt"
    ref.write_text("hello")
    assert main(["analyze", str(run), "--reference", str(ref), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "notes.txt" in line and "weights_only=False" not in line


def test_malicious_init_from_is_one_line(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    bad = tmp_path / "init.pt"
    bad.write_bytes(pickle.dumps(Evil()))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(tiny_config(model={"init_from": str(bad)})))
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "init.pt" in line and "weights_only=False" not in line
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------- 8. advice that works
def test_corrupt_checkpoint_advice_works(tmp_path, capsys):
    cfg = tiny_config(epochs=4)
    out = tmp_path / "r"
    train_pass(cfg, out, progress=False, stop_after=3)
    (out / "checkpoints" / "epoch_0003.pt").write_bytes(b"garbage")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(json.dumps(cfg))
    assert main(["run", str(cfg_file), "--out", str(out), "--no-report", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "epoch_0003.pt" in line
    # follow the advice literally
    advice = line.split("remove it", 1)
    assert len(advice) == 2, line
    (out / "checkpoints" / "epoch_0003.pt").unlink()
    assert main(["run", str(cfg_file), "--out", str(out), "--no-report", "--quiet"]) == 0
    ref = gammatrace.train(cfg, tmp_path / "ref", replay=False, progress=False)
    pd.testing.assert_frame_equal(load_run(out).record_steps(), ref.record_steps())


# ------------------------------------------------------------ 9. small things
def test_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        store = RunStore(tmp_path / "r")
        store.write_json("a/x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "r" / "a" / "x.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "r" / "a").stat().st_mode & 0o777 == 0o755


def test_temporary_files_of_a_killed_writer_are_removed_under_the_lock(trained, tmp_path):
    run = _copy(trained, tmp_path)
    stale = run / "steps" / ".epoch_0000.parquet.abc123.tmp"
    stale.write_bytes(b"partial")
    old = time.time() - 10
    os.utime(stale, (old, old))
    with RunStore(run).lock():
        pass
    assert not stale.exists()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to find the workers")
def test_workers_end_when_the_parent_is_killed(tmp_path):
    # The parent maps a long task over two spawned workers, then is killed with SIGKILL.
    code = ("import time; from gammatrace.executors import make_executor\n"
            "make_executor('local', workers=2).map(time.sleep, [(120,), (120,)], progress=False)\n")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        workers: list[int] = []
        while time.time() < deadline and len(workers) < 2:
            # spawn starts a resource tracker too: keep the processes that run the pool's workers
            workers = [c for c in _children(parent.pid)
                       if "spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")]
            time.sleep(0.2)
        assert len(workers) == 2, workers
        time.sleep(2.0)  # let the workers arm their parent-death signal
        parent.kill()
        parent.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers)
    finally:
        parent.kill()
        for w in _children(parent.pid):
            os.kill(w, 9)


# ------------------------------------------- 7. damaged local datasets (the fuzz's findings)
def _cifar_case(how: str) -> bytes:
    """A CIFAR-100 batch damaged the way one of the audit's (and tests/test_fuzz.py's)
    header mutations did, each of which escaped the reader on the code before issue 10."""
    from tests.test_fuzz import _cifar_batch, _cifar_pickle

    batch = _cifar_batch(np.random.default_rng(10), 6)
    raw = _cifar_pickle(batch, 5 if how in ("MemoryError", "OverflowError") else 3)
    ops = [(op.name, pos) for op, _, pos in pickletools.genops(raw)]
    at = dict(reversed(ops))  # first position of each opcode
    if how == "MemoryError":  # the payload's 8-byte length made 2**40
        pos = next(p for n, p in ops if n == "BYTEARRAY8") + 1
        return raw[:pos] + (2 ** 40).to_bytes(8, "little") + raw[pos + 8:]
    if how == "OverflowError":  # the frame's 8-byte length beyond sys.maxsize
        return raw[:at["FRAME"] + 1] + (2 ** 64 - 1).to_bytes(8, "little") + raw[at["FRAME"] + 9:]
    if how == "SystemError":  # the dtype's flags byte
        pos = next(p for n, p in ops if n == "BININT1" and p > at["BINBYTES"] - 10) + 1
        return raw[:pos] + b"\xff" + raw[pos + 1:]
    if how == "IndexError":  # two bits of the header: a memo store made a SETITEMS, the payload length
        return raw[:163] + b"u" + raw[164:202] + bytes([raw[202] ^ 1]) + raw[203:]
    if how == "TypeError":  # the key b"data" stored as text
        pos = next(p for n, p in ops if n == "SHORT_BINBYTES" and raw[p + 2:p + 6] == b"data")
        return raw[:pos] + b"\x8c" + raw[pos + 1:]
    assert how == "Fortran order"  # the array's order flag: the same bytes, other images, no error
    return raw[:at["BINBYTES"] - 1] + b"\x88" + raw[at["BINBYTES"]:]


@pytest.mark.parametrize("how", ["MemoryError", "OverflowError", "SystemError", "IndexError", "TypeError",
                                 "Fortran order"])
def test_damaged_cifar_header_is_one_line(tmp_path, capsys, how):
    from tests.test_fuzz import _cifar_batch, _cifar_pickle

    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "train").write_bytes(_cifar_case(how))
    (folder / "test").write_bytes(_cifar_pickle(_cifar_batch(np.random.default_rng(11), 4), 3))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(tiny_config(data={"name": "cifar100", "data_dir": str(tmp_path / "data"),
                                                "n_train": None, "n_test": None})))
    before = tree_hashes(tmp_path)
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert str(folder / "train") in line and ("re-extract" in line or "b'data'" in line)
    assert tree_hashes(tmp_path) == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["truncated", "five samples", "other arguments"])
def test_mnist1d_cache_is_regenerated_never_trained_on(tmp_path, monkeypatch, capsys, damage):
    from gammatrace.data.embedded import mnist1d

    monkeypatch.setenv("GAMMATRACE_CACHE", str(tmp_path))
    good = mnist1d(num_samples=200, seed=5)
    (cache,) = tmp_path.glob("mnist1d-*-200-5-0.8.npz")
    intact = cache.read_bytes()
    if damage == "truncated":  # BadZipFile on every later run, the file never named
        cache.write_bytes(intact[: len(intact) // 2])
    elif damage == "five samples":  # a valid file of the wrong size: trained on 5 samples
        with np.load(cache) as z:
            np.savez(cache, **{k: z[k][:5] if k != "key" else z[k] for k in z.files})
    else:  # a valid entry of the right size, made for another seed
        shutil.copy(_mnist1d_entry(tmp_path, 6), cache)
    capsys.readouterr()
    again = mnist1d(num_samples=200, seed=5)
    assert torch.equal(again.x_train, good.x_train) and torch.equal(again.y_test, good.y_test)
    note = capsys.readouterr().err
    assert str(cache) in note and "regenerating" in note
    assert mnist1d(num_samples=200, seed=5).n_train == 160  # the regenerated entry is cached again
    assert capsys.readouterr().err == ""


def _mnist1d_entry(folder: Path, seed: int) -> Path:
    from gammatrace.data.embedded import mnist1d

    mnist1d(num_samples=200, seed=seed)
    (path,) = folder.glob(f"mnist1d-*-200-{seed}-0.8.npz")
    moved = folder / "other.npz"
    path.rename(moved)
    return moved


# ------------------------------------------------ 7. damaged run files (the fuzz's findings)
def test_run_json_field_changed_by_damage_is_named(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    meta = json.loads((run / "run.json").read_text())
    # one digit of ‖θ_0 − θ_T‖: a valid file, a silently different path_ratio before issue 10
    text = (run / "run.json").read_text().replace(repr(meta["displacement"])[:6], repr(meta["displacement"])[:5] + "9", 1)
    (run / "run.json").write_text(text)
    before = tree_hashes(run)
    assert main(["analyze", str(run), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "run.json" in line and "'displacement'" in line
    assert tree_hashes(run) == before


def test_run_json_config_stays_editable(trained, tmp_path):
    """Only what pass 1 recorded is sealed: a moved study points its runs' init_from elsewhere."""
    run = _copy(trained, tmp_path)
    meta = json.loads((run / "run.json").read_text())
    meta["config"]["model"]["init_from"] = None
    meta["config"]["name"] = "renamed"
    (run / "run.json").write_text(json.dumps(meta))
    assert load_run(run).name == "renamed"


def _last_page_byte(path: Path, column: str) -> int:
    """The offset of the last byte of ``column``'s chunk in row group 0: the end of its last
    page's payload, which the page CRC covers. Found from the file's metadata, never a
    fixed offset: where the pages lie depends on the values, and so on the machine that
    computed them (issue 25: len // 3 fell into the footer on another CPU)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 1
    group = meta.row_group(0)
    chunk = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == column)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    end = start + chunk.total_compressed_size
    assert end <= path.stat().st_size - 8 - meta.serialized_size  # inside the data, before the footer
    return end - 1


@pytest.mark.parametrize("damage", ["bit flip", "type swap", "rows cut"])
def test_shard_damaged_in_place_is_refused(trained, tmp_path, capsys, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = _copy(trained, tmp_path)
    shard = run / "analysis" / "continuation" / "steps" / "epoch_0001.parquet"
    table = pq.read_table(shard)
    if damage == "bit flip":  # one bit of a stored number (a page of 'loss'): Parquet's page CRC
        raw = bytearray(shard.read_bytes())
        raw[_last_page_byte(shard, "loss")] ^= 0x10
        shard.write_bytes(bytes(raw))
    else:  # a valid file with the original metadata: the column checksums
        if damage == "type swap":
            col = table.column("loss_ref").cast(pa.float32())
            table = table.set_column(table.column_names.index("loss_ref"), pa.field("loss_ref", pa.float32()), col)
        else:
            table = table.slice(0, 2)
        pq.write_table(table, shard)
    before = tree_hashes(run)
    assert main(["analyze", str(run), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert str(shard) in line and "damaged" in line and "recompute" in line
    assert tree_hashes(run) == before


def test_shard_rewritten_with_another_type_is_refused(trained, tmp_path, capsys):
    """Without the checksums (another tool rewrote it): the column's type is checked."""
    run = _copy(trained, tmp_path)
    shard = run / "analysis" / "continuation" / "steps" / "epoch_0000.parquet"
    frame = pd.read_parquet(shard)
    frame["loss_ref"] = frame["loss_ref"].astype("int64")  # silently truncated numbers before
    frame.to_parquet(shard, index=False)
    assert main(["analyze", str(run), "--reference", "continuation", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "epoch_0000.parquet" in line and "loss_ref is int64" in line


def test_equal_states_are_equal_files(tmp_path):
    """torch.save names the archive inside after the path it writes: through the store's
    temporary files every checkpoint differed in bytes; a resumed run must equal bit for bit."""
    a, b = (gammatrace.train(tiny_config(), tmp_path / n, replay=False, progress=False) for n in "ab")
    for rel in ("final.pt", "checkpoints/epoch_0001.pt"):
        assert (a.path / rel).read_bytes() == (b.path / rel).read_bytes()


# ------------------------------------------------------- 7. configs (the fuzz's findings)
@pytest.mark.parametrize("text, words", [
    ("", "holds no settings"),  # a truncated or unsaved file trained every default
    ("# only a comment\n", "holds no settings"),
    ("epochs: " + "[" * 600 + "]" * 600 + "\n", "nested too deeply"),  # RecursionError
    ("optim: {name: {sgd: 1}}\n", "unknown optimizer"),  # TypeError: unhashable type: 'dict'
    ("epochs: 10000000000000000000000000000000000000000\n", "epochs"),
    ("seed: 10000000000000000000000000000000000000000\n", "seed"),  # Overflow when unpacking long
    ("optim: {lr: 1e400}\n", "optim.lr"),  # YAML text, read as inf: trained with lr inf
    ("model: {name: mlp, depth: '3'}\n", "model.depth"),  # '<' not supported between str and int
])
def test_damaged_config_is_one_line(tmp_path, capsys, text, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert words in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_rerun_with_another_config_names_the_field(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(tiny_config()))
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--no-report", "--quiet"]) == 0
    cfg.write_text(json.dumps(tiny_config(optim={"lr": 0.3})))
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--no-report", "--quiet"]) == 2
    assert "optim.lr: 0.2 there, 0.3 now" in one_error_line(capsys)
