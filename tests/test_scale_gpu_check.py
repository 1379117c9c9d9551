"""GPU readiness (issue 15.5): benchmarks/gpu_check.py exits cleanly without CUDA, and its
code paths — train twice and compare θ_T, the verified replay, the probe's torch-kernel
overhead, throughput against a plain loop, the table — run end to end on the CPU
(``--cpu-selftest``). Plus the one CUDA-determinism fix made by construction: AlexNet's
local response normalization no longer needs ``avg_pool3d``'s backward on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from gammatrace.models.alexnet import LRN_OPTIONS, LocalResponseNorm

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_without_cuda_it_says_so_and_exits_cleanly():
    done = _run(env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0
    assert done.stdout.strip().startswith("no CUDA device")


def test_every_path_runs_on_the_cpu(tmp_path):
    out = tmp_path / "rows.json"
    done = _run("--cpu-selftest", "--networks", "alexnet_small,resnet18", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(("alexnet_small", "resnet18"))]
    assert len(lines) == 2 and all(" yes " in line and " ok " in line for line in lines), done.stdout
    import json

    rows = json.loads(out.read_text())
    assert [r["network"] for r in rows] == ["alexnet_small", "resnet18"]
    assert all(r["plain_sps"] > 0 and r["engine_sps"] > 0 and r["reference_x"] > 0 for r in rows)


def test_unknown_network_is_refused():
    assert _run("--cpu-selftest", "--networks", "nope").returncode == 2


def test_lrn_window_sum_form_equals_pytorchs():
    # The form used on CUDA (deterministic backward) computes PyTorch's LRN: exactly in
    # float64 here, and to float32 round-off in float32 (another summation order).
    lrn = LocalResponseNorm(**LRN_OPTIONS)
    for shape in ((3, 64, 8, 8), (3, 12, 7)):
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        a, b = lrn.window_sum_form(x), nn.functional.local_response_norm(x, **LRN_OPTIONS)
        ga, = torch.autograd.grad(a.square().sum(), x)
        gb, = torch.autograd.grad(b.square().sum(), x)
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14) and torch.allclose(ga, gb, rtol=1e-10, atol=1e-12)
    x = torch.randn(2, 64, 4, 4)
    assert torch.equal(lrn(x), nn.functional.local_response_norm(x, **LRN_OPTIONS))  # CPU: PyTorch's own code
