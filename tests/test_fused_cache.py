"""The fused kernels' compile (~1 s) is paid once per machine, not once per process.

Numba's on-disk cache (``cache=True`` in :mod:`gammatrace.probe._fused`) is checked with
Numba's own counters in fresh processes, not with a wall-clock threshold: the first process
compiles (cache misses), a second one loads (hits, no miss). Where no writable cache place
exists the kernels compile per process, quietly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("before_step", "after_step", "grad_step")

SCRIPT = """
import json, warnings
warnings.simplefilter("error")  # a cache that cannot be written must not warn either
import numpy as np
from gammatrace.probe import _fused
k = _fused.compiled()
a = np.arange(4, dtype=np.float32); z = np.zeros(4, np.float32); o = np.zeros(5)
k.before_step(a, z, a, np.empty(4, np.float32), o)
k.after_step(z, z, a, o)
k.grad_step(a, z, a, o)
stats = {n: getattr(k, n).stats for n in ("before_step", "after_step", "grad_step")}
print(json.dumps({"ok": o.tolist() == [14.0, 14.0, 14.0, 14.0, 14.0],
                  "hits": {n: sum(s.cache_hits.values()) for n, s in stats.items()},
                  "misses": {n: sum(s.cache_misses.values()) for n, s in stats.items()}}))
"""


def _fresh_process(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(env_extra, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_kernels_from_the_cache(tmp_path):
    cache = tmp_path / "numba-cache"
    first = _fresh_process({"NUMBA_CACHE_DIR": str(cache)})
    assert first["ok"]
    assert first["hits"] == dict.fromkeys(KERNELS, 0) and first["misses"] == dict.fromkeys(KERNELS, 1)
    assert any(cache.rglob("*.nbi")) and any(cache.rglob("*.nbc"))
    second = _fresh_process({"NUMBA_CACHE_DIR": str(cache)})
    assert second["ok"]
    assert second["hits"] == dict.fromkeys(KERNELS, 1), second  # loaded, not recompiled
    assert second["misses"] == dict.fromkeys(KERNELS, 0), second


def test_no_writable_cache_place_compiles_quietly(tmp_path):
    """NUMBA_CACHE_DIR below a regular file cannot be created (root or not); with only that
    locator allowed Numba finds no place at all, and the kernels compile in memory."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = _fresh_process({"NUMBA_CACHE_DIR": str(blocker / "cache"),
                             "NUMBA_CACHE_LOCATOR_CLASSES": "UserProvidedCacheLocator"})
    assert result["ok"]
    assert result["hits"] == dict.fromkeys(KERNELS, 0)
