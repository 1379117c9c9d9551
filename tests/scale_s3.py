"""An S3-compatible server for the tests: moto's server mode (a real HTTP S3 API with
conditional PUTs), started as a separate process on 127.0.0.1 and stopped afterwards.

Not a test module (no ``test_`` prefix): imported by tests/test_scale_*.py, and run as a
script by the namespace test (``python tests/scale_s3.py PORT`` serves until killed).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

# Credentials of the test server only (moto accepts any); never real ones.
TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def moto_available() -> str | None:
    """None when moto's server, s3fs and fsspec are importable, else why not."""
    try:
        import flask  # noqa: F401  (moto's server needs it)
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install -r requirements-dev.txt: moto[server], s3fs)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(timeout: float = 30.0) -> Iterator[dict[str, str]]:
    """Start ``python -m moto.server`` on 127.0.0.1; yields the environment a client needs
    (credentials of the test server and ``AWS_ENDPOINT_URL``)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.2)
        yield {**TEST_ENV, "AWS_ENDPOINT_URL": endpoint}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_bucket(env: dict[str, str], bucket: str) -> None:
    """Create ``bucket`` on the server of ``env`` (through s3fs, in a fresh instance)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                           secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
    fs.mkdir(bucket)


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` in os.environ for the duration (restored afterwards)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":  # serve on the given port until killed (the namespace test)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]))
    server.start()
    while True:
        time.sleep(3600)
