"""Issue 22, item 5, Ray: a driver interrupted (Ctrl-C, SIGTERM) during or after
``ray.init`` leaves no Ray process of its instance behind, and a Ray node that dies under a
study (an agent the raylet needs killed) is one line, exit 2, saying a rerun resumes.

Each test runs ``gammatrace study … --executor ray`` as a subprocess with its own
``RAY_TMPDIR`` (a short folder: Ray's socket paths must stay short); the instance's
processes are the ones whose command line or environment names that folder (the agents
rename their command line to ``ray::DashboardAgent``, the environment stays).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config

pytest.importorskip("ray", reason="Ray is not installed: pip install 'gammatrace[ray]'")

INTERRUPTED = "gammatrace: interrupted; rerun the same command to resume"
# Ray's C++ core worker writes its own log lines to the driver's stderr when its raylet dies
# ("[date E pid tid] task_manager.cc:…: Failed to push error to driver …"); Ray offers no
# switch for them (RAY_BACKEND_LOG_LEVEL prints a line of its own instead).
RAY_CORE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] \w+\.cc:\d+: ")


@pytest.fixture
def ray_tmp() -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="gt-ray-", dir="/tmp")
    yield tmp
    for pid in ours(tmp):  # a failed test must not leave its instance running
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(tmp, ignore_errors=True)


def ours(tmp: str) -> dict[int, str]:
    """Live processes (not zombies) of the Ray instance under ``tmp``: PID -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if cmd and (tmp in cmd or f"RAY_TMPDIR={tmp}\0".encode() in env + b"\0"):
            found[int(entry)] = cmd.strip()
    return found


def start_study(tmp: str, tmp_path: Path, epochs: int) -> subprocess.Popen:
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "r", "base": tiny_config(epochs=epochs),
                                    "variants": {"relu": {"model": {"activation": "relu"}},
                                                 "tanh": {"model": {"activation": "tanh"}}}}))
    return subprocess.Popen([sys.executable, "-m", "gammatrace", "study", str(spec), "--executor", "ray",
                             "--workers", "2", "--out", str(tmp_path / "o"), "--quiet"],
                            env={**os.environ, "RAY_TMPDIR": tmp}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def when(tmp: str, proc: subprocess.Popen, seen: Callable[[dict[int, str]], bool], limit: float = 120) -> dict[int, str]:
    deadline = time.monotonic() + limit
    while not seen(found := ours(tmp)):
        assert proc.poll() is None, f"the driver ended first: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, found
        time.sleep(0.05)
    return found


def no_survivors(tmp: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while (left := ours(tmp)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"alive {within:.0f} s after the driver ended: {left}"


def ended(proc: subprocess.Popen) -> tuple[int, list[str]]:
    _, err = proc.communicate(timeout=90)
    return proc.returncode, [ln for ln in err.strip().splitlines() if ln.strip() and not RAY_CORE_LOG.match(ln)]


def test_ctrl_c_of_the_driver_inside_ray_init_leaves_no_ray_process(ray_tmp, tmp_path):
    # The audit's case: the driver alone interrupted while ray.init starts the raylet (its
    # DashboardAgent and RuntimeEnvAgent outlived it by 30 s and more: ray.init was outside
    # the try/finally that shuts Ray down, and the agents are the raylet's children).
    proc = start_study(ray_tmp, tmp_path, epochs=30)
    when(ray_tmp, proc, lambda found: any("raylet" in c for c in found.values()))
    os.kill(proc.pid, signal.SIGINT)
    rc, err = ended(proc)
    no_survivors(ray_tmp)
    assert (rc, err) == (130, [INTERRUPTED])  # and none of Ray's INFO/WARNING lines


@pytest.mark.slow  # ~25 s: a Ray instance up and two tasks running
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupt_while_ray_tasks_run_leaves_no_ray_process(how, ray_tmp, tmp_path):
    proc = start_study(ray_tmp, tmp_path, epochs=300)
    when(ray_tmp, proc, lambda found: sum("ray::_call" in c for c in found.values()) >= 2)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole process group
    else:
        os.kill(proc.pid, signal.SIGTERM)
    assert ended(proc) == (130, [INTERRUPTED])
    no_survivors(ray_tmp)


@pytest.mark.slow  # ~25 s: a Ray instance up and two tasks running
def test_a_killed_ray_agent_under_a_study_is_one_line(ray_tmp, tmp_path):
    # The raylet ends when an agent it needs dies: the driver got LocalRayletDiedError, a
    # traceback and exit 1.
    proc = start_study(ray_tmp, tmp_path, epochs=300)
    found = when(ray_tmp, proc, lambda found: sum("ray::_call" in c for c in found.values()) >= 2
                 and any(c.startswith("ray::DashboardAgent") for c in found.values()))
    os.kill(next(pid for pid, c in found.items() if c.startswith("ray::DashboardAgent")), signal.SIGKILL)
    rc, err = ended(proc)
    assert rc == 2 and len(err) == 1, (rc, err)
    assert err[0].startswith("gammatrace: error: a node of the local Ray instance died") and \
        "LocalRayletDiedError" in err[0] and err[0].endswith("rerun the same command to resume"), err
    no_survivors(ray_tmp)
