"""Issue 22, item 5: an S3 outage (the server gone, a connection refused or reset) is one
line on stderr and exit status 2 in every command, naming the URL and the cause; no
aiohttp/botocore traceback above it ("Task exception was never retrieved", logged by
asyncio for a request body still being written when the connection was reset), no exit 1
with only the traceback (``analyze``), no "does not exist" for a file that was merely not
reachable (fsspec's ``isfile`` answers False for any error). The rerun once the store is
back reaches the same bits as a run that never saw the outage.

Against moto's server on 127.0.0.1 (tests/scale_s3.py), behind a TCP proxy these tests
control: ``reset()`` resets every open connection and every new one (the server gone
mid-command), ``stall()`` stops answering without closing anything (a server host gone
silent), ``restore()`` lets them through again. ``AWS_MAX_ATTEMPTS=1`` keeps botocore's
retries (each a few seconds of back-off) out of the tests' time; s3fs still retries each
call (``S3_RETRIES`` times).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from gammatrace.cli import main
from gammatrace.store.backend import ObjectFiles, StoreUnreachableError, location, remote_error
from tests.conftest import tiny_config
from tests.scale_s3 import environment, free_port, make_bucket, moto_available, moto_server
from tests.test_crash_resume import differences, fingerprint

pytestmark = pytest.mark.skipif(moto_available() is not None, reason=str(moto_available()))
BUCKET = "gammatrace-outage"
FAST = {"AWS_MAX_ATTEMPTS": "1"}


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``port`` that can drop out."""

    def __init__(self, port: int):
        self.target = ("127.0.0.1", port)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.down = False
        self.silent = False  # stall(): connections stay open, nothing is answered
        self.open: list[socket.socket] = []
        self.guard = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def _reset(s: socket.socket) -> None:
        try:  # linger 0: the last close sends RST, as a crashed server's host does
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # Wake a pipe thread blocked in recv() on it first: on Linux close() alone does
            # not, and the kernel socket then lives on (no RST) while that recv() holds it,
            # a half-open connection the client waits on for its read timeout (the stalls
            # of issue 22 that were this proxy's, not the server's). SHUT_RD sends nothing.
            s.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.silent:
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            if self.down:
                self._reset(client)
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                self._reset(client)
                continue
            with self.guard:  # reset() may have run since the check above
                if self.down:
                    self._reset(client)
                    self._reset(server)
                    continue
                self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while not self.down and (data := a.recv(65536)):
                if not self.silent:
                    b.sendall(data)
        except OSError:
            pass
        self._reset(a)
        self._reset(b)

    def _swallow(self, client: socket.socket) -> None:
        with self.guard:
            self.open.append(client)
        with contextlib.suppress(OSError):
            while client.recv(65536):
                pass

    def reset(self) -> None:
        with self.guard:
            self.down = True
            for s in self.open:
                self._reset(s)
            self.open.clear()

    def stall(self) -> None:
        """The server stops answering without closing anything (its host gone silent)."""
        self.silent = True

    def restore(self) -> None:
        self.down = self.silent = False

    def close(self) -> None:
        self.reset()
        self.sock.close()


@pytest.fixture(scope="module")
def s3():
    with moto_server() as env, environment(env):
        make_bucket(env, BUCKET)
        yield env


@pytest.fixture
def proxy(s3):
    p = Proxy(int(s3["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    yield p, {**s3, **FAST, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{p.port}"}
    p.close()


def fresh(name: str) -> str:
    return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


def _config(tmp_path: Path, epochs: int = 6) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(epochs=epochs, checkpoint_every=1,
                                              reference={"kind": "last", "extra_epochs": 2})))
    return cfg


def gammatrace(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gammatrace", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def outage_when(env: dict[str, str], proxy: Proxy, seen: Callable[[], bool], *args: str,
                outage: str = "reset", timing: list[float] | None = None) -> tuple[int, list[str]]:
    """Run ``gammatrace ARGS`` through ``proxy``; once ``seen()`` (asked of the server
    directly) reset every connection (``outage="stall"``: stop answering); (exit status,
    stderr lines). The command must end within 60 s of the outage; ``timing`` receives
    how long it took."""
    proc = subprocess.Popen([sys.executable, "-m", "gammatrace", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not seen():
            assert proc.poll() is None, f"finished before the outage: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        getattr(proxy, outage)()
        began = time.monotonic()
        _, err = proc.communicate(timeout=60)
        if timing is not None:
            timing.append(time.monotonic() - began)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.strip().splitlines()


def one_line(rc: int, err: list[str], url: str) -> None:
    assert rc == 2 and len(err) == 1, (rc, err)
    assert err[0].startswith("gammatrace: error: ") and url in err[0] and "object store cannot be reached" in err[0], err


def objects(url: str, local: Path) -> dict[str, str]:
    """Every object below ``url`` but the lock and the report folder, by name: its SHA-256,
    without the fields that record a time (as tests/test_crash_resume.py compares files),
    nor the checkout's commit in run.json: other sessions commit to a shared checkout while
    these tests run, so a run started a minute later records another HEAD (what made the
    outage runs of benchmarks/fault_trials.py differ in run.json, and only there)."""
    ObjectFiles(location(url)).download("", local, skip=lambda rel: rel.startswith("report/"))
    for meta in local.rglob("run.json"):
        data = json.loads(meta.read_text())
        data.get("provenance", {}).pop("commit", None)
        meta.write_text(json.dumps(data))
    return fingerprint(local)


def test_connection_failures_are_mapped_by_their_cause():
    import aiohttp
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    for exc in (EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k"),
                ConnectionClosedError(endpoint_url="http://127.0.0.1:1/b/k"),
                ReadTimeoutError(endpoint_url="http://127.0.0.1:1/b/k"),
                aiohttp.ServerDisconnectedError(), aiohttp.ClientPayloadError("cut short"),
                ConnectionResetError(104, "Connection reset by peer"), TimeoutError()):
        mapped = remote_error(exc, "reading s3://b/k")
        assert isinstance(mapped, StoreUnreachableError), exc
        assert str(mapped).startswith(f"reading s3://b/k: the object store cannot be reached ({type(exc).__name__}")
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = ConnectionResetError(104, "Connection reset by peer")
    assert "ConnectionResetError" in str(remote_error(wrapped, "x"))
    assert remote_error(ValueError("a bug"), "x") is None


def test_every_command_against_a_closed_port_is_one_line(s3, tmp_path):
    url = fresh("closed")
    env = {**s3, **FAST, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    for args in (["run", str(_config(tmp_path)), "--out", url, "--quiet"], ["analyze", url, "--quiet"],
                 ["report", url, "--out", str(tmp_path / "rep")]):
        done = gammatrace(env, *args)
        one_line(done.returncode, done.stderr.strip().splitlines(), url)


def test_run_through_an_outage_is_one_line_and_resumes_to_the_same_bits(proxy, tmp_path):
    px, env = proxy
    cfg = _config(tmp_path)
    url = fresh("run")
    files = ObjectFiles(location(url))
    rc, err = outage_when(env, px, lambda: files.exists("checkpoints/epoch_0002.pt"), "run", str(cfg), "--out", url,
                          "--quiet", "--no-report")
    one_line(rc, err, url)
    px.restore()
    again = gammatrace(env, "run", str(cfg), "--out", url, "--quiet", "--no-report")
    assert again.returncode == 0, again.stderr
    whole = fresh("whole")
    assert main(["run", str(cfg), "--out", whole, "--quiet", "--no-report"]) == 0  # directly to the server
    assert not differences(objects(url, tmp_path / "a"), objects(whole, tmp_path / "b"))


def test_analyze_through_an_outage_is_one_line_and_resumes_to_the_same_bits(proxy, tmp_path):
    px, env = proxy
    cfg = _config(tmp_path, epochs=8)
    url, whole = fresh("analyze"), fresh("whole")
    for where in (url, whole):
        assert main(["run", str(cfg), "--out", where, "--quiet", "--no-report"]) == 0
    files = ObjectFiles(location(url))
    args = ("--reference", "last", "--tail", "3", "--quiet")
    rc, err = outage_when(env, px, lambda: bool(files.list("analysis/last/tail=3/steps")), "analyze", url, *args)
    err = [line for line in err if "is stored as analysis/last/tail=3" not in line]  # the note on --tail
    one_line(rc, err, url)
    px.restore()
    again = gammatrace(env, "analyze", url, *args)
    assert again.returncode == 0, again.stderr
    assert main(["analyze", whole, *args]) == 0
    assert not differences(objects(url, tmp_path / "a"), objects(whole, tmp_path / "b"))


def test_report_through_an_outage_is_one_line_and_reruns_to_the_same_files(proxy, tmp_path):
    px, env = proxy
    url = fresh("report")
    assert main(["run", str(_config(tmp_path, epochs=3)), "--out", url, "--quiet", "--no-report"]) == 0
    files = ObjectFiles(location(url))
    rc, err = outage_when(env, px, lambda: bool(files.list("rep")), "report", url, "--out", f"{url}/rep")
    one_line(rc, err, url)
    px.restore()
    again = gammatrace(env, "report", url, "--out", f"{url}/rep")
    assert again.returncode == 0, again.stderr
    first = objects(f"{url}/rep", tmp_path / "a")
    assert main(["report", url, "--out", f"{url}/rep"]) == 0
    assert objects(f"{url}/rep", tmp_path / "b") == first and "report.html" in first


def test_a_store_that_stops_answering_is_one_line_within_the_timeout_policy(proxy, tmp_path):
    # The stalls that had these tests marked slow (issue 22): a PUT of a file carries
    # "Expect: 100-continue" (botocore), and aiohttp waited for the answer with no timeout,
    # so a connection that went silent held `report` forever. Now every call is bounded by
    # the store's policy (GAMMATRACE_S3_TIMEOUT per connect and per read, S3_RETRIES x
    # attempts): with 2 s and one attempt, about 8 s per call, a few calls to fail and
    # give the lock back.
    px, env = proxy
    url = fresh("silent")
    assert main(["run", str(_config(tmp_path, epochs=3)), "--out", url, "--quiet", "--no-report"]) == 0
    files = ObjectFiles(location(url))
    took: list[float] = []
    rc, err = outage_when({**env, "GAMMATRACE_S3_TIMEOUT": "2"}, px, lambda: bool(files.list("rep")),
                          "report", url, "--out", f"{url}/rep", outage="stall", timing=took)
    one_line(rc, err, url)
    assert "Timeout" in err[0], err  # it ended by the read timeout, not by a reset
    assert took[0] < 45, took  # the failed write, the lock's release, the exit: well under; before: never
