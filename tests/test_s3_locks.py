"""Issue 22, item 5: S3 locks that can never be renewed are taken over, with a line saying
so (a non-JSON lock object was "locked by another process at the same moment" on every
retry; a NaN expiry held forever), and releasing a lock after the store dropped out is
one warning, not an EndpointConnectionError traceback. Against moto's server on
127.0.0.1 (tests/scale_s3.py)."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from gammatrace.errors import RunInUseError
from gammatrace.store.backend import ObjectFiles, location
from gammatrace.store.run import RunStore
from tests.scale_s3 import environment, make_bucket, moto_available, moto_server

pytestmark = pytest.mark.skipif(moto_available() is not None, reason=str(moto_available()))
BUCKET = "gammatrace-locks"


@pytest.fixture(scope="module")
def s3():
    with moto_server() as env, environment(env):
        make_bucket(env, BUCKET)
        yield env


def fresh() -> str:
    return f"s3://{BUCKET}/lock-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("body, why", [
    (b"\x00\xffnot json at all", "not a lock gammatrace wrote"),
    (b"[1, 2, 3]", "not a lock gammatrace wrote"),
    (b'{"host": "elsewhere", "pid": 1, "expires": NaN}', "is not a time"),
    (b'{"host": "elsewhere", "pid": 1, "expires": Infinity}', "is not a time"),
    (b'{"host": "elsewhere", "pid": 1, "expires": "tomorrow"}', "is not a time"),
    (json.dumps({"host": "elsewhere", "pid": 1, "expires": time.time() - 5}).encode(), "expired"),
], ids=["binary", "json list", "nan", "inf", "text", "expired"])
def test_unusable_locks_are_taken_over_with_a_line(s3, capsys, body, why):
    url = fresh()
    files = ObjectFiles(location(url))
    files.write_bytes(".lock", body)
    with RunStore(url).lock():
        assert json.loads(files.read_bytes(".lock"))["token"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gammatrace: taking over the lock") and why in err[0], err
    assert not files.exists(".lock")


def test_a_live_lock_elsewhere_is_still_refused(s3):
    url = fresh()
    files = ObjectFiles(location(url))
    files.write_bytes(".lock", json.dumps({"host": "elsewhere", "pid": 1, "expires": time.time() + 600}).encode())
    with pytest.raises(RunInUseError, match="in use by process 1 on elsewhere"):
        with RunStore(url).lock():
            pass


def test_release_after_the_store_dropped_out_is_one_warning(s3, capsys, monkeypatch):
    url = fresh()
    files = ObjectFiles(location(url))
    with files.lock(ttl=600) as held:
        def gone(*args, **kwargs):
            raise ConnectionError("Could not connect to the endpoint URL")  # as botocore's EndpointConnectionError

        monkeypatch.setattr(held.files.fs, "info", gone)
        monkeypatch.setattr(held.files.fs, "cat_file", gone)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was not removed" in err[0] and "cannot be reached" in err[0], err
