"""What curvature along the trajectory costs (issue 24, item 6): time and memory.

Time: for each quick network, the same short run is trained three times (pass 1 does not
depend on the curvature block, so the trajectories are identical) and ``gammatrace.analyze``
(the replay, pass 2) is timed without curvature and with ``curvature: {every: N}`` for each N;
the overhead ratio is (analysis with curvature) / (analysis without). CPU time of this
process beside wall time (the machine may be shared). A measurement is k·(Lanczos iterations)
Hessian-vector products on the evaluation subset plus 1 + len(santurkar_steps) gradients on the
step's mini-batch; the table says how many of each were spent.

Memory: one measurement in a fresh process, ``tracemalloc``'s peak (NumPy/SciPy: ARPACK's
Lanczos basis of max(2k + 1, 20) float64 vectors of length d, and its workspace) in units of
d float64 numbers, and the growth of the process's peak RSS (everything: the model copies, the
double-backward graph on the subset, torch's allocations, which tracemalloc does not see).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curvature_cost.py            # ~3 min on 2 shared vCPUs
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curvature_cost.py --epochs 2 --every 10,100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The quick presets' networks (gammatrace.experiments.presets): the digits MLP of the
# activation/optimizer studies, the MNIST-1D conv net of the batch-norm study with and
# without its batch norm.
NETWORKS = {
    "digits-mlp-128x3-bn": {"data": {"name": "digits"}, "batch_size": 128,
                            "model": {"name": "mlp", "width": 128, "depth": 3, "batchnorm": True},
                            "optim": {"name": "sgd", "lr": 0.1}},
    "mnist1d-cnn1d-0.5-bn": {"data": {"name": "mnist1d", "num_samples": 1000}, "batch_size": 128,
                             "model": {"name": "cnn1d", "width": 0.5, "norm": "all"},
                             "optim": {"name": "momentum", "lr": 0.02, "momentum": 0.9}},
    "mnist1d-cnn1d-0.5-none": {"data": {"name": "mnist1d", "num_samples": 1000}, "batch_size": 128,
                               "model": {"name": "cnn1d", "width": 0.5, "norm": "none"},
                               "optim": {"name": "momentum", "lr": 0.02, "momentum": 0.9}},
}

MEMORY_CHILD = r"""
import json, sys, tracemalloc
sys.path.insert(0, sys.argv[1])
import torch
from gammatrace.config import RunConfig
from gammatrace.engine.session import build_session
from gammatrace.engine.hooks import Curvature
cfg = RunConfig.model_validate(json.loads(sys.argv[2]))
sess = build_session(cfg)
d = sum(p.numel() for p in sess.model.parameters() if p.requires_grad)
idx = sess.batches(0)[0]
batch = (sess.x[idx], sess.y[idx])
sess.model.train()
sess.loss_fn(sess.model, batch).mean().backward()
hook = Curvature(sess, {})
import scipy.sparse.linalg  # imported before the baseline: a fixed cost, not the measurement's
def rss(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak RSS (VmHWM) to the current RSS (Linux)
before = rss("VmHWM:")
tracemalloc.start()
hook.due(0)
row = hook(batch)
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
after = rss("VmHWM:")
print(json.dumps({"d": d, "tracemalloc_peak": peak, "rss_growth": after - before,
                  "products": row["n_products"]}))
"""


def _config(net: str, epochs: int, curvature: dict | None) -> dict:
    cfg = {"name": net, "seed": 0, "epochs": epochs, **NETWORKS[net]}
    if curvature is not None:
        cfg["curvature"] = curvature
    return cfg


def time_analysis(net: str, epochs: int, curvature: dict | None, folder: Path) -> dict:
    import gammatrace
    from gammatrace.analysis import load_hook_table

    out = folder / f"{net}-{json.dumps(curvature, sort_keys=True) if curvature else 'plain'}".replace(" ", "")
    run = gammatrace.train(_config(net, epochs, curvature), out, replay=False, progress=False)
    def cpu_now() -> float:  # this process: with one worker the replay runs in it
        t = os.times()
        return t.user + t.system

    wall, cpu = time.perf_counter(), cpu_now()
    gammatrace.analyze(run.path, progress=False)
    wall, cpu = time.perf_counter() - wall, cpu_now() - cpu
    table = load_hook_table(run.path, "curvature") if curvature else None
    return {"wall": wall, "cpu": cpu, "steps": int(run.meta.horizon_steps or 0),
            "measured": 0 if table is None else len(table),
            "products": 0 if table is None else float(table["n_products"].mean())}


def memory(net: str, k: int) -> dict:
    cfg = _config(net, 1, {"every": 1, "k": k})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(ROOT), json.dumps(cfg)], capture_output=True,
                         text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", default="10,100", help="comma-separated N of curvature.every")
    parser.add_argument("--k", default="1,3,16", help="comma-separated k for the memory table")
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--at-epoch-end", default="false,true", help="comma-separated curvature.at_epoch_end values")
    args = parser.parse_args()
    import torch

    nets = args.networks.split(",")
    everies = [int(x) for x in args.every.split(",")]
    print(f"# curvature cost — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, torch threads 1, load avg {os.getloadavg()[0]:.2f}; {args.epochs} epochs per run, "
          "curvature defaults otherwise (k 3, subset 256, trace off, 5 Santurkar steps, tol 1e-4); CPU: this "
          "process's user + system time (the replay runs in it)")
    print("| network | d | steps | N | epoch ends | measured steps | HVPs per measurement | analysis wall s (CPU s) | "
          "without curvature wall s (CPU s) | overhead ratio wall (CPU) | CPU s per measurement |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="gammatrace-curvature-cost-") as tmp:
        folder = Path(tmp)
        for net in nets:
            base = time_analysis(net, args.epochs, None, folder)
            d = memory(net, 1)["d"]
            for ends in (x.strip().lower() == "true" for x in args.at_epoch_end.split(",")):
                for n in everies:
                    r = time_analysis(net, args.epochs, {"every": n, "at_epoch_end": ends}, folder)
                    per = (r["cpu"] - base["cpu"]) / max(r["measured"], 1)
                    print(f"| {net} | {d:,} | {r['steps']} | {n} | {'yes' if ends else 'no'} | {r['measured']} | "
                          f"{r['products']:.0f} | {r['wall']:.1f} ({r['cpu']:.1f}) | {base['wall']:.1f} "
                          f"({base['cpu']:.1f}) | {r['wall'] / base['wall']:.1f} ({r['cpu'] / base['cpu']:.1f}) | "
                          f"{per:.2f} |", flush=True)
    print()
    print("| network | d | k | HVPs | tracemalloc peak MB | peak / (8·d bytes) | peak RSS growth MB |")
    print("|---|---|---|---|---|---|---|")
    for net in nets:
        for k in (int(x) for x in args.k.split(",")):
            m = memory(net, k)
            print(f"| {net} | {m['d']:,} | {k} | {m['products']} | {m['tracemalloc_peak'] / 2**20:.1f} | "
                  f"{m['tracemalloc_peak'] / (8 * m['d']):.1f} | {m['rss_growth'] / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
