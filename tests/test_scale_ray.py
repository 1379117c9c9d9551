"""Ray without a shared file system (issue 15.3): tasks read their inputs from and write
their outputs to the object store, so no node needs the study folder. Every Ray instance
here listens on 127.0.0.1 only; the S3 server is moto's, started by the tests.

* a local instance: a study, replay segments and landscape grid rows as Ray tasks on S3
  equal the local executor's results bit for bit;
* two nodes in namespaces the test creates (tests/scale_ray_cluster.py): a head without
  CPUs and a worker whose view of the output root is a private tmpfs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from gammatrace.engine.replay import replay
from gammatrace.engine.trainer import train_pass
from gammatrace.experiments.study import make_study, run_study
from gammatrace.landscape.compute import compute_landscape
from gammatrace.machine import fingerprint, ray_resource
from gammatrace.store.run import Run, RunStore
from tests.conftest import tiny_config
from tests.scale_s3 import environment, make_bucket, moto_available, moto_server

pytestmark = pytest.mark.skipif(moto_available() is not None, reason=str(moto_available()))
BUCKET = "gammatrace-ray"


@pytest.fixture(scope="module")
def ray_on_s3():
    try:
        import ray
    except ImportError as exc:
        pytest.skip(f"Ray is not installed ({exc}); pip install 'gammatrace[ray]'")
    if ray.is_initialized():
        ray.shutdown()
    # The S3 environment first: the instance's workers inherit it when they start.
    with moto_server() as env, environment(env):
        make_bucket(env, BUCKET)
        # A node declares its machine kind; replay segments of a run recorded here ask for it.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 resources={ray_resource(fingerprint()): 1})
        try:
            yield env
        finally:
            ray.shutdown()


def fresh(name: str) -> str:
    return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


def test_study_on_ray_and_s3_equals_the_local_executor(ray_on_s3, tmp_path):
    study = make_study("s", "?", tiny_config(epochs=3, checkpoint_every=2),
                       {"relu": {"model": {"activation": "relu"}}, "tanh": {"model": {"activation": "tanh"}}})
    url = fresh("study")
    where = run_study(study, url, seeds=1, executor="ray", workers=2, progress=False)
    run_study(study, tmp_path / "local", seeds=1, executor="local", progress=False)
    assert str(where) == f"{url}/report/report.html"
    for name in ("relu", "tanh"):
        a, b = Run(f"{url}/{name}"), Run(tmp_path / "local" / name)
        assert a.status == b.status == "complete" and a.meta.final_sha256 == b.meta.final_sha256
        assert a.steps().equals(b.steps()) and a.summary()["gamma_min"] == b.summary()["gamma_min"]


def test_replay_segments_and_grid_rows_as_ray_tasks(ray_on_s3, tmp_path):
    cfg = tiny_config(epochs=3)
    url = fresh("run")
    train_pass(cfg, url, progress=False)
    train_pass(cfg, tmp_path / "local", progress=False)
    replay(url, "last", executor="ray", workers=2, progress=False)
    replay(tmp_path / "local", "last", progress=False)
    a, b = RunStore(url).read_shards("analysis/last/steps"), RunStore(tmp_path / "local").read_shards("analysis/last/steps")
    assert len(a) == 9 and a.equals(b)
    remote = compute_landscape([url], f"{url}-landscape", grid=3, samples=32, workers=2, executor="ray",
                               progress=False)
    local = compute_landscape([tmp_path / "local"], tmp_path / "ls", grid=3, samples=32, progress=False)
    assert np.array_equal(remote.loss, local.loss) and RunStore(f"{url}-landscape").exists("landscape.npz")


def _namespaces_problem() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    try:
        probe = subprocess.run(["unshare", "-rnpf", "--mount-proc", "sh", "-c",
                                "ip link set lo up && unshare -m sh -c 'mount -t tmpfs tmpfs /mnt'"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed ({exc})"
    if probe.returncode:
        return f"unprivileged user, network and mount namespaces are not available here ({probe.stderr.strip()[:200]})"
    return None


def test_two_nodes_without_a_shared_file_system(tmp_path):
    problem = moto_available() or _namespaces_problem()
    if problem:
        pytest.skip(problem)
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"Ray is not installed ({exc})")
    script = Path(__file__).with_name("scale_ray_cluster.py")
    done = subprocess.run(["unshare", "-rnpf", "--mount-proc", sys.executable, str(script)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env={**os.environ, "TMPDIR": "/tmp"})
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), (done.stdout[-3000:] + done.stderr[-3000:])
