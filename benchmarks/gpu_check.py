"""GPU readiness: one prepared script for a CUDA machine, one table.

For each paper network (AlexNet-small, VGG-11, VGG-16, ResNet-18, ResNet-34, U-Net) on
5,000 CIFAR-shaped samples it generates (3×32×32; the U-Net denoises them), one epoch:

* **determinism**: pass 1 trained twice under CUDA determinism (``torch.use_deterministic_
  algorithms``, ``CUBLAS_WORKSPACE_CONFIG``), θ_T compared bit for bit, then pass 2 — the
  verified replay, every step's loss and the final state checked against pass 1
  (``same θ_T``, ``replay``: ok / the first mismatch);
* **probe overhead** of the ``torch`` kernel (the one GPUs use): median ms of a plain step
  (zero_grad, forward, backward, ``optimizer.step()``) and of the same step measured by a
  probe in record and in reference mode, as ratios;
* **throughput**: samples/s of a plain PyTorch loop over the epoch's batches against the
  engine's pass-1 epoch (its loop, data order and record-mode probe).

It prints one table (and ``--json`` writes the rows). On a machine without CUDA it says
"no CUDA device" and exits 0; ``--cpu-selftest`` runs every code path on the CPU at a tiny
size instead (what the test suite checks). Sized to finish well under 4 minutes on one
GPU: each network trains 2 × 40 steps, replays 40 and times 3 × 30 steps.

Usage::

    python benchmarks/gpu_check.py                    # on a CUDA machine
    python benchmarks/gpu_check.py --networks resnet18 --samples 2000
    python benchmarks/gpu_check.py --cpu-selftest     # every path on the CPU, tiny, ~1 min
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Before torch initialises cuBLAS: its deterministic workspace (the engine sets it too).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

# Runs from a checkout without installing the package (a bare GPU machine brings its own
# torch; gammatrace's other dependencies — pydantic, pandas, pyarrow, numba, tqdm, PyYAML,
# scikit-learn — must be importable there, e.g. installed from carried wheels).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NETWORKS = ("alexnet_small", "vgg11", "vgg16", "resnet18", "resnet34", "unet")


@dataclass
class Row:
    network: str
    params: int = 0
    same_theta_T: str = "-"
    replay: str = "-"
    plain_ms: float = float("nan")
    record_x: float = float("nan")
    reference_x: float = float("nan")
    plain_sps: float = float("nan")
    engine_sps: float = float("nan")
    seconds: float = 0.0
    error: str = ""


def run_config(network: str, device: str, samples: int, width: float | None, batch: int) -> dict[str, Any]:
    """The engine config of one network's check (CIFAR-shaped synthetic data)."""
    model: dict[str, Any] = {"name": network}
    if width is not None:
        model["width"] = width
    if network == "unet":
        data = {"name": "synthetic_denoise", "size": 32, "num_train": samples, "num_test": 256}
        loss, optim = "mse", {"name": "momentum", "lr": 0.005}
    else:
        data = {"name": "synthetic_images", "size": 32, "num_train": samples, "num_test": 256}
        loss, optim = "cross_entropy", {"name": "momentum", "lr": 0.01}
    return {"name": network, "seed": 0, "device": device, "epochs": 1, "batch_size": batch, "loss": loss,
            "data": data, "model": model, "optim": optim, "eval_batch_size": 1024,
            "analysis": {"per_sample": False}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_determinism(cfg: dict[str, Any], root: Path, row: Row) -> None:
    """Pass 1 twice (same θ_T bit for bit?) and the verified replay of the first."""
    from gammatrace.engine.replay import ReplayMismatchError, replay
    from gammatrace.engine.trainer import train_pass

    a = train_pass(cfg, root / "a", progress=False)
    b = train_pass(cfg, root / "b", progress=False)
    row.params = int(a.meta.n_params or 0)
    row.same_theta_T = "yes" if a.meta.final_sha256 == b.meta.final_sha256 else "NO"
    try:
        replay(a.path, "last", progress=False)
        row.replay = "ok"
    except ReplayMismatchError as exc:
        row.replay = "MISMATCH"
        row.error = str(exc)[:300]


def _step_timer(sess, batches, device, mode: str, steps: int, warmup: int) -> list[float]:
    """Per-step seconds of ``steps`` training steps (after ``warmup``) on a private copy of
    the session's model and optimizer: plain, or measured by a probe in record/reference mode."""
    from gammatrace.probe import Probe
    from gammatrace.techniques import make_optimizer

    model = copy.deepcopy(sess.model)
    opt = make_optimizer(model.parameters(), sess.cfg.optim.name, **sess.cfg.optim.optimizer_kwargs())
    loss_fn = sess.loss_fn
    probe = None
    if mode == "record":
        probe = Probe(model, opt, per_tensor=False, kernel="torch", check=False)
    elif mode == "reference":
        ref = {k: v.detach().clone() for k, v in model.state_dict().items()}
        probe = Probe(model, opt, loss_fn, reference=ref, per_tensor=True, kernel="torch", check=False)
    model.train()
    times = []
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        per = loss_fn(model, (x, y))
        loss = per.mean()
        loss.backward()
        if probe is not None:
            probe.step(loss, (x, y))
        else:
            opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if probe is not None:
        probe.flush()
        probe.close()
    return times


def check_speed(cfg: dict[str, Any], row: Row, steps: int, warmup: int) -> None:
    """Probe overhead (torch kernel) and samples/s: a plain loop against the engine's epoch."""
    from gammatrace.config import RunConfig
    from gammatrace.engine.session import build_session
    from gammatrace.probe import Probe
    from gammatrace.techniques import make_optimizer

    rc = RunConfig.model_validate(cfg)
    sess = build_session(rc)
    device = sess.device
    idx = sess.batches(0)
    batches = [(sess.x[i.to(device)], sess.y[i.to(device)]) for i in idx[: max(4, min(len(idx), 8))]]
    # Modes interleaved in rounds, so a drift of the machine's speed hits each alike.
    per_mode: dict[str, list[float]] = {"plain": [], "record": [], "reference": []}
    for _ in range(3):
        for mode in per_mode:
            per_mode[mode] += _step_timer(sess, batches, device, mode, steps // 3 or 1, warmup)
    plain = statistics.median(per_mode["plain"])
    row.plain_ms = plain * 1e3
    row.record_x = statistics.median(per_mode["record"]) / plain
    row.reference_x = statistics.median(per_mode["reference"]) / plain

    # Throughput over one epoch: the same batches, the same order; plain loop vs the engine.
    model = copy.deepcopy(sess.model)
    opt = make_optimizer(model.parameters(), sess.cfg.optim.name, **sess.cfg.optim.optimizer_kwargs())
    n = sum(len(i) for i in idx)
    loss_fn = sess.loss_fn
    sync(device)
    t0 = time.perf_counter()
    for i in idx:
        i = i.to(device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, (sess.x[i], sess.y[i])).mean()
        loss.backward()
        opt.step()
    sync(device)
    row.plain_sps = n / (time.perf_counter() - t0)
    probe = Probe(sess.model, sess.optimizer, per_tensor=False)  # as pass 1 builds it
    sync(device)
    t0 = time.perf_counter()
    sess.run_epoch(0, probe, check_finite=device.type == "cpu")
    probe.take()
    sync(device)
    row.engine_sps = n / (time.perf_counter() - t0)
    probe.close()


def table(rows: list[Row], header: str) -> str:
    lines = [header,
             f"{'network':<14} {'params':>11} {'same θ_T':>8} {'replay':>8} {'plain ms':>9} {'record ×':>9} "
             f"{'ref ×':>7} {'plain sps':>10} {'engine sps':>10} {'engine/plain':>12} {'s':>6}"]
    for r in rows:
        ratio = r.engine_sps / r.plain_sps if r.plain_sps == r.plain_sps and r.plain_sps > 0 else float("nan")
        lines.append(f"{r.network:<14} {r.params:>11,} {r.same_theta_T:>8} {r.replay:>8} {r.plain_ms:>9.2f} "
                     f"{r.record_x:>9.2f} {r.reference_x:>7.2f} {r.plain_sps:>10.0f} {r.engine_sps:>10.0f} "
                     f"{ratio:>12.2f} {r.seconds:>6.1f}")
        if r.error:
            lines.append(f"    {r.network}: {r.error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated paper networks")
    p.add_argument("--samples", type=int, default=5000, help="generated CIFAR-shaped training samples")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=float, default=None, help="width multiplier (default: each network's full width)")
    p.add_argument("--steps", type=int, default=90, help="timed steps per mode (in 3 rounds)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.add_argument("--cpu-selftest", action="store_true",
                   help="run every path on the CPU at a tiny size (no CUDA needed): checks the script, not a GPU")
    args = p.parse_args(argv)
    if args.cpu_selftest:
        device = "cpu"
        args.samples, args.batch, args.steps, args.warmup = 128, 64, 6, 1
        args.width = 0.125 if args.width is None else args.width
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (run this on a GPU machine, or --cpu-selftest)")
        return 0
    else:
        device = "cuda"
    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = sorted(set(networks) - set(NETWORKS))
    if unknown:
        print(f"unknown network(s) {unknown}; choose from {', '.join(NETWORKS)}")
        return 2
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    header = (f"# gpu_check — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}, device {name}; {args.samples} CIFAR-shaped samples, batch {args.batch}, "
              f"1 epoch, width {args.width or 'full'}; ratios: probe step / plain step (torch kernel)")
    rows = []
    t_all = time.perf_counter()
    for net in networks:
        row = Row(net)
        t0 = time.perf_counter()
        cfg = run_config(net, device, args.samples, args.width, args.batch)
        try:
            with tempfile.TemporaryDirectory(prefix=f"gpu-check-{net}-") as tmp:
                check_determinism(cfg, Path(tmp), row)
            check_speed(cfg, row, args.steps, args.warmup)
        except Exception as exc:  # one network's failure is a row of the table, not the end of it
            row.error = f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}"
            traceback.print_exc(limit=3, file=sys.stderr)
        row.seconds = time.perf_counter() - t0
        rows.append(row)
        print(f"{net}: {row.seconds:.1f} s", file=sys.stderr, flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    print(table(rows, header))
    print(f"(wall time {time.perf_counter() - t_all:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0 if all(not r.error and r.replay == "ok" and r.same_theta_T == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
