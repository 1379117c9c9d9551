"""Issue 22, item 3, on object storage: a report folder under a URL loses the figures the
last report there wrote and this one did not (known by the manifest stored there), and
never a file the manifest does not list (the user's, beside the report). Against moto's
server on 127.0.0.1 (tests/scale_s3.py).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml

from gammatrace.cli import main
from gammatrace.reporting.build import MANIFEST
from gammatrace.store.backend import ObjectFiles, location
from tests.conftest import tiny_config
from tests.scale_s3 import environment, make_bucket, moto_available, moto_server

pytestmark = pytest.mark.skipif(moto_available() is not None, reason=str(moto_available()))
BUCKET = "gammatrace-manifest"
USERS = {"trajectory_2024.png": b"the user's figure", "layers-notes.pdf": b"the user's notes",
         "sub/matched_pairs.pdf": b"the user's pairs"}


@pytest.fixture(scope="module")
def run_url(tmp_path_factory):
    with moto_server() as env, environment(env):
        make_bucket(env, BUCKET)
        cfg = tmp_path_factory.mktemp("cfg") / "c.yaml"
        cfg.write_text(yaml.safe_dump(tiny_config(epochs=2)))
        url = f"s3://{BUCKET}/run-{uuid.uuid4().hex[:8]}"
        assert main(["run", str(cfg), "--out", url, "--quiet", "--no-report"]) == 0
        yield url


def _listed(files: ObjectFiles) -> list[str]:
    return json.loads(files.read_bytes(MANIFEST))["files"]


def _all(files: ObjectFiles, folder: str = "") -> set[str]:
    found = {f"{folder}/{n}".lstrip("/") for n in files.list(folder)}
    for sub in files.folders(folder):
        found |= _all(files, f"{folder}/{sub}".lstrip("/"))
    return found


def test_a_remote_report_removes_only_what_its_manifest_lists(run_url):
    out = f"{run_url}-rep-{uuid.uuid4().hex[:6]}"
    files = ObjectFiles(location(out))
    assert main(["report", run_url, "--out", out]) == 0
    first = _listed(files)
    assert "report.html" in first and "summary.md" in first and any(n.endswith(".png") for n in first)
    assert _all(files) == {*first, MANIFEST}
    # A figure the last report wrote and this one will not (listed there), and the user's files.
    files.write_bytes("layers_old.png", b"an old figure")
    files.write_bytes(MANIFEST, json.dumps({"files": [*first, "layers_old.png"]}).encode())
    for name, data in USERS.items():
        files.write_bytes(name, data)
    assert main(["report", run_url, "--out", out]) == 0
    assert not files.exists("layers_old.png")
    assert {n: files.read_bytes(n) for n in USERS} == USERS
    assert _listed(files) == first
    assert _all(files) == {*first, MANIFEST, *USERS}


@pytest.mark.slow  # ~20 s (three reports on S3); the default run keeps the test above
def test_a_damaged_manifest_or_one_naming_keys_outside_removes_nothing(run_url):
    out = f"{run_url}-rep-{uuid.uuid4().hex[:6]}"
    files, runs = ObjectFiles(location(out)), ObjectFiles(location(run_url))
    assert main(["report", run_url, "--out", out]) == 0
    first = _listed(files)
    files.write_bytes("layers_old.png", b"an old figure")
    files.write_bytes(MANIFEST, b"not json")  # damaged: nothing is known to be ours
    assert main(["report", run_url, "--out", out]) == 0
    assert files.read_bytes("layers_old.png") == b"an old figure"
    assert _listed(files) == first
    before = runs.read_bytes("run.json")
    files.write_bytes(MANIFEST, json.dumps({"files": [*first, f"../{Path(run_url).name}/run.json",
                                                      f"/{BUCKET}/x", "s3://elsewhere/y"]}).encode())
    assert main(["report", run_url, "--out", out]) == 0
    assert runs.read_bytes("run.json") == before and _listed(files) == first
