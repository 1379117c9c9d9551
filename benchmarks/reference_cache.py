"""What does the cached reference pass save? Replay time with and without it, side by side.

For each network (the MLP and the 1-D conv net without normalization, on MNIST-1D), one
run is trained (pass 1), then replayed against θ* = θ_T (pass 2, verified step by step)
in both ways, ``--rounds`` times, alternating which goes first:

* ``direct``: ℓ*_k = ℓ(θ*; B_k) by an extra forward at every step (``reference_cache: off``);
* ``cached``: one pass over the training set at θ*, then a look-up per step (the default
  where the loss is batch-independent), with the direct forward at each segment's first step.

Each replay starts from scratch (its analysis folder removed) and is timed end to end:
building the session, the per-sample pass, every segment. Reported: the median seconds of
each, their ratio, and the largest |ℓ*_direct − ℓ*_cached| over the checked steps, plus
whether the two analyses are equal bit for bit. Benchmarks inform: always exits 0.

Usage::

    python benchmarks/reference_cache.py            # ~3 min on one CPU thread
    python benchmarks/reference_cache.py --quick    # smoke run, ~30 s
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gammatrace.engine.replay import replay
from gammatrace.engine.trainer import train_pass
from gammatrace.store.run import RunStore

NETWORKS = {
    "mlp": {"name": "mlp", "width": 256, "depth": 3},
    "cnn1d": {"name": "cnn1d", "norm": "none"},
}


def config(net: str, epochs: int, n_train: int) -> dict:
    return {"name": net, "seed": 0, "epochs": epochs, "batch_size": 128, "threads": 1,
            "data": {"name": "mnist1d", "num_samples": max(5000, -(-n_train * 5 // 4)), "n_train": n_train,
                     "n_test": 500},
            "model": NETWORKS[net], "optim": {"name": "momentum", "lr": 0.05}}


def timed_replay(path: Path, cache: str) -> float:
    shutil.rmtree(path / "analysis", ignore_errors=True)
    t0 = time.perf_counter()
    replay(path, "last", progress=False, reference_cache=cache)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 epochs, 1000 samples, 1 round")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.n_train, args.rounds = 2, 1000, 1
    torch.set_num_threads(1)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# reference cache — {stamp}, torch {torch.__version__}, {os.cpu_count()} CPUs, 1 torch thread, "
          f"load avg {load:.2f}")
    print(f"# MNIST-1D, {args.n_train} training samples, batch 128, {args.epochs} epochs, momentum SGD; "
          f"replay against θ_T, {args.rounds} round(s), median seconds")
    print(f"{'network':<8} {'params':>9} {'steps':>6} {'direct s':>9} {'cached s':>9} {'speed-up':>9} "
          f"{'max |Δℓ*|':>10} {'bitwise':>8}")
    with tempfile.TemporaryDirectory(prefix="gt-refcache-") as tmp:
        for net in NETWORKS:
            run = train_pass(config(net, args.epochs, args.n_train), Path(tmp) / net, progress=False)
            times: dict[str, list[float]] = {"off": [], "auto": []}
            tables = {}
            for r in range(args.rounds):
                for cache in (("off", "auto") if r % 2 == 0 else ("auto", "off")):
                    times[cache].append(timed_replay(run.path, cache))
                    tables[cache] = RunStore(run.path).read_shards("analysis/last/steps")
                    if cache == "auto":
                        record = RunStore(run.path).read_json("analysis/last/reference_cache.json")
            direct, cached = statistics.median(times["off"]), statistics.median(times["auto"])
            same = tables["off"][["loss_ref", "progress"]].equals(tables["auto"][["loss_ref", "progress"]])
            steps = (run.meta.horizon_steps or 0)
            print(f"{net:<8} {run.meta.n_params:>9,} {steps:>6} {direct:>9.2f} {cached:>9.2f} {direct / cached:>8.2f}x "
                  f"{record.get('max_dev', float('nan')):>10.2g} {'yes' if same else 'no':>8}  ({record['mode']})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # benchmarks inform; a failure is printed, not raised
        print(f"benchmark failed: {exc.__class__.__name__}: {exc}")
        sys.exit(0)
