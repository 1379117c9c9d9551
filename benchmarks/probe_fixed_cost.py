"""The fixed cost of probing in a fresh process: ``import gammatrace`` + the first ``Probe()`` and step.

Each sample is a fresh Python process that imports torch, builds a small model and optimizer
and takes one unprobed step on a twin (torch's own first-step cost, paid by any script), then
times ``import gammatrace``, ``gammatrace.Probe(model, opt)`` and the first probed step, and
subtracts a second probed step: what remains is what probing adds once per process (pandas,
numba, and the fused kernels: compiled, or loaded from Numba's on-disk cache).

Two conditions, interleaved: ``cold`` gives every process an empty ``NUMBA_CACHE_DIR`` (the
kernels compile, as in a process with no usable cache: the first run after installing or
after ``_fused.py`` changed), ``warm`` shares one cache directory filled beforehand (every
later process). Medians over the rounds; CPU time (the process's own) beside wall time,
since the machine may be shared.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_fixed_cost.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, time
import torch
torch.set_num_threads(1)
def make():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    return m, torch.optim.SGD(m.parameters(), lr=0.01)
x, y = torch.randn(32, 40), torch.randn(32, 1)
twin, twin_opt = make()
torch.nn.functional.mse_loss(twin(x), y).backward(); twin_opt.step()  # torch's first-step cost
model, opt = make()
clock = lambda: (time.perf_counter(), time.process_time())
def step(probe):
    opt.zero_grad(); loss = torch.nn.functional.mse_loss(model(x), y); loss.backward(); probe.step(loss, (x, y))
a = clock()
import gammatrace
b = clock()
probe = gammatrace.Probe(model, opt)
c = clock()
step(probe)
d = clock()
step(probe)
e = clock()
first, second = (d[0] - c[0], d[1] - c[1]), (e[0] - d[0], e[1] - d[1])
print(json.dumps({"import_wall": b[0] - a[0], "import_cpu": b[1] - a[1],
                  "probe_wall": c[0] - b[0], "probe_cpu": c[1] - b[1],
                  "first_step_wall": first[0] - second[0], "first_step_cpu": first[1] - second[1],
                  "fixed_wall": (c[0] - a[0]) + first[0] - second[0],
                  "fixed_cpu": (c[1] - a[1]) + first[1] - second[1]}))
"""


def sample(cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(NUMBA_CACHE_DIR=cache_dir, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as tmp:
        warm = str(Path(tmp) / "warm")
        sample(warm)  # fills the shared cache
        for r in range(args.rounds):
            results["cold"].append(sample(str(Path(tmp) / f"cold{r}")))
            results["warm"].append(sample(warm))
    import torch

    print(f"# probe fixed cost — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}; "
          f"median of {args.rounds} fresh processes per condition, seconds")
    keys = ("import", "probe", "first_step", "fixed")
    print(f"{'condition':<10}" + "".join(f"{k + ' wall/cpu':>24}" for k in keys))
    for cond, rows in results.items():
        cells = "".join(
            f"{statistics.median(r[k + '_wall'] for r in rows):>12.3f}/{statistics.median(r[k + '_cpu'] for r in rows):<11.3f}"
            for k in keys)
        print(f"{cond:<10}{cells}")


if __name__ == "__main__":
    main()
