"""Executors: results in task order, the first failure raised as itself, and the Ray path
on a local Ray instance (two tasks) — skipped with the reason when Ray is unavailable."""

from __future__ import annotations

import operator
import sys
import time

import pytest
import yaml

from gammatrace.executors import (
    EXECUTORS,
    MissingDependencyError,
    RayExecutor,
    make_executor,
)
from gammatrace.experiments.study import grid_study, run_study, run_task
from gammatrace.store import load_run
from tests.conftest import tiny_config

# Ray's local instance starts in ~10 s here; far slower means a broken setup, not a test.
RAY_START_LIMIT_S = 60


def _tiny_study(**base):
    return grid_study({"name": "r", "base": {**tiny_config(), **base},
                       "variants": {"relu": {"model": {"activation": "relu"}},
                                    "tanh": {"model": {"activation": "tanh"}}}})


def test_registry_has_local_and_ray():
    assert EXECUTORS.names() == ["local", "ray"]
    with pytest.raises(ValueError, match="workers must be >= 1"):
        make_executor("local", workers=0)


@pytest.mark.parametrize("workers", [1, 2])
def test_local_results_in_task_order(workers):
    tasks = [(2, 10), (3, 2), (5, 1)]
    assert make_executor("local", workers=workers).map(pow, tasks, progress=False) == [1024, 9, 5]


def test_local_first_failure_is_raised_as_itself():
    with pytest.raises(ZeroDivisionError):
        make_executor("local", workers=2).map(operator.truediv, [(1, 1), (1, 0), (2, 1)], progress=False)


def test_missing_ray_is_one_clear_line(monkeypatch, tmp_path, capsys):
    from gammatrace.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'gammatrace\[ray\]'"):
        RayExecutor(workers=1).map(pow, [(2, 2)], progress=False)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"base": tiny_config(), "variants": {"a": {}}}))
    assert main(["study", str(spec), "--executor", "ray", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gammatrace: error: executor 'ray' needs Ray, which is not installed: pip install 'gammatrace[ray]'"]


@pytest.fixture(scope="module")
def ray_module():
    try:
        import ray
    except ImportError as exc:
        pytest.skip(f"Ray is not installed ({exc}); pip install 'gammatrace[ray]' to test the ray executor")
    return ray


@pytest.fixture(scope="module")
def ray_instance(ray_module):
    t0 = time.perf_counter()
    # Loopback only: Ray would otherwise use the host's interface address even locally.
    ray_module.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    started = time.perf_counter() - t0
    if started > RAY_START_LIMIT_S:
        ray_module.shutdown()
        pytest.skip(f"Ray's local instance took {started:.0f} s to start (> {RAY_START_LIMIT_S} s)")
    yield ray_module
    ray_module.shutdown()


def test_ray_two_tasks_in_order_and_first_failure(ray_instance):
    ex = make_executor("ray", workers=2)
    assert ex.map(pow, [(2, 3), (3, 2)], progress=False) == [8, 9]
    with pytest.raises(ZeroDivisionError):
        ex.map(operator.truediv, [(1, 1), (1, 0)], progress=False)
    assert ray_instance.is_initialized()  # an instance the executor did not start is left running


def test_ray_study_matches_the_local_one(ray_instance, tmp_path):
    # Two runs as two Ray tasks: the same trajectories, bit for bit, as the local executor's.
    run_study(_tiny_study(), tmp_path / "ray", executor="ray", workers=2, progress=False)
    run_study(_tiny_study(), tmp_path / "local", executor="local", progress=False)
    for name in ("relu", "tanh"):
        a, b = load_run(tmp_path / "ray" / name), load_run(tmp_path / "local" / name)
        assert a.status == b.status == "complete"
        assert a.steps()["loss"].tolist() == b.steps()["loss"].tolist()
        assert a.summary()["gamma_min"] == b.summary()["gamma_min"]


@pytest.mark.slow
def test_ray_executor_starts_and_stops_its_own_instance(ray_module, tmp_path):
    if ray_module.is_initialized():
        ray_module.shutdown()
    out = make_executor("ray", workers=2).map(run_task, [(tiny_config(name=n), str(tmp_path / n)) for n in "ab"],
                                              progress=False)
    assert [r["status"] for r in out] == ["complete", "complete"]
    assert not ray_module.is_initialized()
