"""Run folders on object storage (issue 15.2), against a real S3 API: moto's server,
started by these tests as a separate process on 127.0.0.1 (tests/scale_s3.py). The CLI
runs in subprocesses, as a user would run it, including a study killed mid-run and
resumed: it must reach the same bits as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

from gammatrace.cli import main
from gammatrace.errors import RunInUseError
from gammatrace.store.backend import Location, ObjectFiles, location
from gammatrace.store.run import Run, RunStore, StoreError, check_out_folder
from tests.scale_s3 import environment, make_bucket, moto_available, moto_server

pytestmark = pytest.mark.skipif(moto_available() is not None, reason=str(moto_available()))

BUCKET = "gammatrace-tests"
TINY = ("seed: 3\nepochs: {epochs}\nbatch_size: 32\ndata: {{name: digits, n_train: 96, n_test: 64}}\n"
        "model: {{name: mlp, width: 8, depth: 2}}\noptim: {{name: momentum, lr: 0.1}}\n")


@pytest.fixture(scope="module")
def s3():
    with moto_server() as env, environment(env):
        make_bucket(env, BUCKET)
        yield env


def fresh(name: str) -> str:
    return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


def cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gammatrace.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_location_and_confinement():
    loc = location("s3://b/study/") / "run"
    assert isinstance(loc, Location) and str(loc) == "s3://b/study/run" and loc.parent.name == "study"
    assert location("file:///tmp/x") == Path("/tmp/x") and location("runs/a") == Path("runs/a")


def test_store_round_trip_on_s3(s3):
    url = fresh("store")
    store = RunStore(url)
    assert store.remote and not store.exists("run.json")
    with store.lock():
        store.write_json("run.json", {"status": "running"})
        store.write_parquet("steps/epoch_0000.parquet", pd.DataFrame({"step": [0, 1], "loss": [2.5, 1.5]}))
        store.write_torch("checkpoints/epoch_0000.pt", {"model": {"w": torch.arange(4.0)}})
    assert store.read_json("run.json") == {"status": "running"}
    assert store.read_shards("steps")["loss"].tolist() == [2.5, 1.5]
    assert torch.equal(store.read_torch("checkpoints/epoch_0000.pt")["model"]["w"], torch.arange(4.0))
    assert store.files() == ["run.json"] and store.files("checkpoints") == ["epoch_0000.pt"]
    assert store.usage() > 0
    store.remove("checkpoints/epoch_0000.pt")
    assert store.files("checkpoints") == []
    with pytest.raises(StoreError, match="outside the run folder"):
        store.write_json("../elsewhere.json", {})
    with pytest.raises(StoreError, match="does not exist"):
        store.read_json("missing.json")
    # A damaged object is a damaged file, as on disk.
    ObjectFiles(location(url)).write_bytes("steps/epoch_0001.parquet", b"not parquet")
    with pytest.raises(StoreError, match="is damaged"):
        store.read_parquet("steps/epoch_0001.parquet")
    # An object where the folder should be is refused like a file.
    ObjectFiles(location(url)).write_bytes("afile", b"x")
    with pytest.raises(Exception, match="is an object"):
        check_out_folder(f"{url}/afile")


def _hold_lock_in_child(url: str, env: dict[str, str]) -> subprocess.Popen:
    code = ("import sys, time; from gammatrace.store.run import RunStore\n"
            f"with RunStore({url!r}).lock():\n    print('held', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env}, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_lock_is_a_conditional_create_with_holder_and_expiry(s3):
    url = fresh("lock")
    child = _hold_lock_in_child(url, s3)
    try:
        holder = json.loads(ObjectFiles(location(url)).read_bytes(".lock"))
        assert holder["pid"] == child.pid and holder["expires"] > time.time()
        with pytest.raises(RunInUseError, match=f"in use by process {child.pid}"):
            with RunStore(url).lock():
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The holder died without releasing: on this host its PID is gone, so the lock is taken over.
    with RunStore(url).lock():
        assert json.loads(ObjectFiles(location(url)).read_bytes(".lock"))["pid"] == os.getpid()
    assert not ObjectFiles(location(url)).exists(".lock")  # released
    # A holder elsewhere whose lock expired is taken over too; an unexpired one is not.
    files = ObjectFiles(location(url))
    files.write_bytes(".lock", json.dumps({"host": "elsewhere", "pid": 1, "expires": time.time() + 600}).encode())
    with pytest.raises(RunInUseError, match="process 1 on elsewhere"):
        with RunStore(url).lock():
            pass
    files.write_bytes(".lock", json.dumps({"host": "elsewhere", "pid": 1, "expires": time.time() - 1}).encode())
    with RunStore(url).lock():
        pass


def test_a_lost_lock_stops_the_writer(s3):
    url = fresh("lost")
    files = ObjectFiles(location(url))
    with files.lock(ttl=0.6) as held:
        first = json.loads(files.read_bytes(".lock"))["expires"]
        time.sleep(0.5)
        assert json.loads(files.read_bytes(".lock"))["expires"] > first  # renewed by its holder
        # Another process takes it over (say, after a long network partition): the If-Match
        # of the next renewal fails, and the holder's next write is refused.
        files.write_bytes(".lock", json.dumps({"host": "x", "pid": 2, "token": "other",
                                                "expires": time.time() + 600}).encode())
        time.sleep(0.6)
        with pytest.raises(RunInUseError, match="could not be renewed"):
            held.check()
    assert json.loads(files.read_bytes(".lock"))["token"] == "other"  # not removed: not ours


def test_cli_run_on_s3_equals_the_local_run(s3, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("name: tiny\n" + TINY.format(epochs=3))
    url = fresh("run")
    remote = cli(s3, "run", str(config), "--out", url, "--quiet")
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout.strip() == f"report: {url}/report/report.html"
    assert main(["run", str(config), "--out", str(tmp_path / "local"), "--quiet", "--no-report"]) == 0
    a, b = Run(url), Run(tmp_path / "local")
    assert a.status == b.status == "complete" and a.meta.final_sha256 == b.meta.final_sha256
    assert a.steps().equals(b.steps())
    assert {k: v for k, v in a.summary().items()} == {k: v for k, v in b.summary().items()}
    assert ObjectFiles(location(url)).exists("report/report.html")
    # analyze and report read the run on S3 too
    assert main(["analyze", url, "--tail", "2", "--quiet"]) == 0
    assert main(["report", url, "--out", f"{url}/report2"]) == 0
    assert ObjectFiles(location(url)).exists("report2/report.html")


def _study_yaml(tmp_path: Path, epochs: int) -> Path:
    spec = tmp_path / "tiny_study.yaml"
    spec.write_text("name: tiny_study\nbase: {" + TINY.format(epochs=epochs).strip().replace("\n", ", ")
                    + ", checkpoint_every: 2, reference: {kind: last, extra_epochs: 2}}\n"
                    "variants: {relu: {model: {activation: relu}}, tanh: {model: {activation: tanh}}}\n"
                    "claims: [{text: relu first, order: [relu, tanh]}]\n")
    return spec


def test_study_killed_on_s3_resumes_to_the_same_bits(s3, tmp_path):
    spec = _study_yaml(tmp_path, epochs=8)
    url = fresh("study")
    proc = subprocess.Popen([sys.executable, "-m", "gammatrace.cli", "study", str(spec), "--out", url, "--quiet"],
                            env={**os.environ, **s3}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    files = ObjectFiles(location(url))
    deadline = time.monotonic() + 240
    # Kill it once the first run is part-way through pass 1 (checkpoint 4 of 10 is there).
    while not files.exists("relu/checkpoints/epoch_0004.pt"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert Run(f"{url}/relu").status == "running"
    resumed = cli(s3, "study", str(spec), "--out", url, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert main(["study", str(spec), "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    for name in ("relu", "tanh"):
        a, b = Run(f"{url}/{name}"), Run(tmp_path / "whole" / name)
        assert a.meta.final_sha256 == b.meta.final_sha256 and a.meta.reference_sha256 == b.meta.reference_sha256
        for ref in ("last", "continuation"):
            assert a.steps(ref).equals(b.steps(ref)), (name, ref)
        assert a.record_steps().equals(b.record_steps())
    assert files.exists("report/report.html") and files.exists("study.json")


def test_dry_run_and_pruning_on_s3(s3, tmp_path, capsys):
    spec = _study_yaml(tmp_path, epochs=3)
    url = fresh("pruned")
    assert main(["study", str(spec), "--out", url, "--dry-run"]) == 0
    assert "free space: not reported (object storage)" in capsys.readouterr().out
    assert not ObjectFiles(location(url)).exists("study.json")
    assert main(["study", str(spec), "--out", url, "--quiet", "--max-disk", "1"]) == 0
    run = Run(f"{url}/relu")
    assert run.meta.checkpoints_pruned and run.store.files("checkpoints") == []
    assert run.store.exists("final.pt") and run.store.exists("reference.pt")
    assert main(["analyze", f"{url}/relu", "--tail", "1", "--quiet"]) == 0
    theta = tmp_path / "theta.pt"
    torch.save(run.store.read_torch("final.pt")["model"], theta)
    capsys.readouterr()
    assert main(["analyze", f"{url}/relu", "--reference", str(theta), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pruned" in err[0]
