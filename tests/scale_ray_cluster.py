"""The two-node Ray check of issue 15.3, run by tests/test_scale_ray.py inside namespaces it
creates: ``unshare -rnpf --mount-proc python tests/scale_ray_cluster.py``.

Inside: a network namespace with only loopback (brought up here), a PID namespace (every
process started here dies with this script; nothing outside is touched), an S3 server
(moto) on 127.0.0.1, a Ray head with no CPUs and a worker node with two, started in a
nested mount namespace whose output root is a private tmpfs (each worker its own): a task that wrote a local
path would write where the driver never looks. The driver runs a study and a replay on
Ray with the run folders on S3, and the same locally, and compares them bit for bit.

Machine kinds (issue 25): the worker declares this machine's kind (``gammatrace machine
--ray``, as a user starts a node); a second worker declares a planted other kind, as a
node with another CPU would. Tasks of a kind run only on the node of that kind (replay
segments of a run recorded here included), and a kind no node has is refused in one line.

Not a test module: prints ``OK`` and exits 0 when every check holds.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gammatrace.machine import fingerprint, machine_id, ray_resource  # noqa: E402
from tests.scale_s3 import environment, free_port, make_bucket, moto_server  # noqa: E402

OTHER_KIND = "0123456789ab"  # a planted machine kind: a node with another CPU


def node_of_task() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def check_machine_kinds(address: str) -> None:
    """Tasks go to the node of their kind; a kind no node declares is refused before any runs."""
    import ray

    from gammatrace.executors import MachineUnavailableError, make_executor

    here = machine_id(fingerprint())
    nodes = {}
    for node in ray.nodes():
        for kind in (here, OTHER_KIND):
            if node["Alive"] and ray_resource(kind) in node["Resources"]:
                nodes[kind] = node["NodeID"]
    assert len(set(nodes.values())) == 2, nodes
    executor = make_executor("ray", address=address)
    for kind in (here, OTHER_KIND):
        ran_on = executor.map(node_of_task, [()] * 6, progress=False, machines=[kind] * 6)
        assert set(ran_on) == {nodes[kind]}, (kind, ran_on, nodes)
    try:
        executor.map(node_of_task, [()], progress=False, machines=["fedcba987654"])
    except MachineUnavailableError as exc:
        assert "fedcba987654" in str(exc) and "\n" not in str(exc), exc
    else:
        raise AssertionError("a machine kind no node declares was not refused")


def sh(*cmd: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed ({done.returncode}): {done.stderr[-1500:]}")


def main() -> None:
    sh("ip", "link", "set", "lo", "up")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    out_root = Path(tempfile.mkdtemp(prefix="gt-root-"))  # the worker node sees a tmpfs here
    temp = tempfile.mkdtemp(prefix="gtr-", dir="/tmp")  # Ray's sockets: a short path
    with moto_server() as s3:
        make_bucket(s3, "cluster")
        env = {**os.environ, **s3, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
               "RAY_USAGE_STATS_ENABLED": "0"}
        port = free_port()
        address = f"127.0.0.1:{port}"
        sh(ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=0",
           "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}", env=env)
        here = subprocess.run([str(Path(sys.executable).with_name("gammatrace")), "machine", "--ray"],
                              capture_output=True, text=True, check=True).stdout.strip()
        sh("unshare", "-m", "sh", "-c",
           f"mount -t tmpfs tmpfs {out_root} && exec {ray_bin} start --address={address} "
           f"--node-ip-address=127.0.0.1 --num-cpus=2 --disable-usage-stats --resources='{here}'", env=env)
        other = json.dumps({ray_resource(OTHER_KIND): 1})
        sh("unshare", "-m", "sh", "-c",
           f"mount -t tmpfs tmpfs {out_root} && exec {ray_bin} start --address={address} "
           f"--node-ip-address=127.0.0.1 --num-cpus=2 --disable-usage-stats --resources='{other}'", env=env)
        with environment({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", *s3)}):
            import ray

            ray.init(address=address, _node_ip_address="127.0.0.1", log_to_driver=False)
            deadline = time.monotonic() + 60
            while ray.cluster_resources().get("CPU", 0) < 4:
                assert time.monotonic() < deadline, "the worker nodes did not join"
                time.sleep(0.5)
            check_machine_kinds(address)
            check(address, out_root)
            ray.shutdown()
    print("OK")


def check(address: str, out_root: Path) -> None:
    import ray

    from gammatrace.engine.replay import replay
    from gammatrace.engine.trainer import train_pass
    from gammatrace.experiments.study import make_study, run_study
    from gammatrace.store.run import Run, RunStore

    # The setup itself: a task writing a local path writes to the worker's tmpfs.
    @ray.remote(num_cpus=1)
    def write_local(path: str) -> bool:
        Path(path).write_text("x")
        return Path(path).exists()

    assert ray.get(write_local.remote(str(out_root / "probe"))) and not (out_root / "probe").exists()

    tiny = {"seed": 3, "epochs": 3, "batch_size": 32, "checkpoint_every": 2,
            "data": {"name": "digits", "n_train": 96, "n_test": 64}, "model": {"name": "mlp", "width": 8, "depth": 2},
            "optim": {"name": "momentum", "lr": 0.1}, "reference": {"kind": "last", "extra_epochs": 1}}
    study = make_study("cluster", "?", tiny, {"relu": {"model": {"activation": "relu"}},
                                              "tanh": {"model": {"activation": "tanh"}}})
    run_study(study, "s3://cluster/study", seeds=1, executor="ray", address=address, progress=False)
    run_study(study, out_root / "study", seeds=1, executor="local", progress=False)
    for name in ("relu", "tanh"):
        a, b = Run(f"s3://cluster/study/{name}"), Run(out_root / "study" / name)
        assert a.meta.final_sha256 == b.meta.final_sha256, name
        for ref in ("last", "continuation"):
            assert a.steps(ref).equals(b.steps(ref)), (name, ref)
    assert RunStore("s3://cluster/study").exists("report/report.html")

    # Replay segments as Ray tasks, against the same run replayed locally.
    cfg = {**tiny, "name": "r", "checkpoint_every": 1, "reference": {"kind": "last"}}
    remote = train_pass(cfg, "s3://cluster/replay", progress=False)
    local = train_pass(cfg, out_root / "replay", progress=False)
    replay(remote.path, "last", executor="ray", address=address, workers=2, progress=False)
    replay(local.path, "last", progress=False)
    a = RunStore("s3://cluster/replay").read_shards("analysis/last/steps")
    b = RunStore(out_root / "replay").read_shards("analysis/last/steps")
    assert len(a) == 9 and a.equals(b)


if __name__ == "__main__":
    main()
