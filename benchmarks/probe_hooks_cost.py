"""What the probe's hooks of issue 21 cost: the global forward hook, the raw-gradient read,
and the consistency check beyond step 0.

Three figures, each the median over ``--rounds`` interleaved rounds:

* the global forward pre-hook (items 5): a module call of a model the probe does *not*
  watch, with and without a live probe elsewhere in the process (every module call takes
  torch's hooked path while a probe with a ``loss_fn`` lives), per module call and per
  forward of a 20-block MLP (61 modules);
* the raw-gradient read at the end of every backward (item 1): one extra pass over θ, the
  anchor and g per backward, against the step it belongs to (a probed step of a 1 M-parameter
  MLP, record mode);
* the consistency check (item 6): the time of one check (a deep copy of the model and one
  forward without autograd) against a probed step, and how many checks the default
  schedule makes over T steps in E epochs (at most ⌊log₂ T⌋ + 1 + 2·E).

Benchmarks inform, they are not tests: the script always exits 0.

Usage::

    python benchmarks/probe_hooks_cost.py            # ~1 min on 1 thread
    python benchmarks/probe_hooks_cost.py --rounds 3 # quicker
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gammatrace  # noqa: E402
from gammatrace.probe.check import ConsistencyCheck  # noqa: E402
from gammatrace.probe.matched import capture  # noqa: E402


def deep_mlp(blocks: int, width: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.ReLU(), nn.Identity()]
    return nn.Sequential(*layers)


def time_it(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def forward_hook_cost(rounds: int) -> dict[str, float]:
    model = deep_mlp(20, 16)
    n_modules = sum(1 for _ in model.modules())
    x = torch.randn(4, 16)
    watched = nn.Linear(3, 1)
    opt = torch.optim.SGD(watched.parameters(), lr=0.1)
    loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    off, on = [], []
    with torch.no_grad():
        for _ in range(rounds):
            off.append(time_it(lambda: model(x), 2000))
            probe = gammatrace.Probe(watched, opt, loss_fn)  # installs the global hook
            on.append(time_it(lambda: model(x), 2000))
            probe.close()  # removes it (the last probe)
    a, b = statistics.median(off), statistics.median(on)
    return {"modules": n_modules, "forward_us_without": a * 1e6, "forward_us_with": b * 1e6,
            "per_module_call_us": (b - a) / n_modules * 1e6}


def raw_read_cost(rounds: int, width: int = 1000) -> dict[str, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    d = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    probe = gammatrace.Probe(model, opt)
    x, y = torch.randn(32, width), torch.randint(0, 10, (32,))

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        probe.step(loss, (x, y))

    for _ in range(5):
        step()
    grads = [p.grad for p in probe.params]
    steps, reads = [], []
    for _ in range(rounds):
        steps.append(time_it(step, 30))
        reads.append(time_it(lambda: probe.kernel.raw(probe.params, grads), 30))
    s, r = statistics.median(steps), statistics.median(reads)
    return {"params": d, "step_ms": s * 1e3, "raw_read_ms": r * 1e3, "share_of_step": r / s}


def check_cost(rounds: int, width: int = 1000) -> dict[str, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    x, y = torch.randn(32, width), torch.randint(0, 10, (32,))
    probe = gammatrace.Probe(model, opt, loss_fn, check=False)  # the check timed on its own below

    def step():
        opt.zero_grad()
        loss = loss_fn(model, (x, y))
        loss.backward()
        probe.step(loss, (x, y))

    check = ConsistencyCheck(True, loss_fn, model)
    state = capture(("cpu",), None)
    steps, checks = [], []
    for _ in range(rounds):
        steps.append(time_it(step, 30))
        loss = loss_fn(model, (x, y)).detach()
        checks.append(time_it(lambda loss=loss: check(loss, (x, y), state), 30))
    s, c = statistics.median(steps), statistics.median(checks)
    schedule = {}
    for T, E in ((1_000, 10), (100_000, 100), (1_000_000, 1)):
        sched = ConsistencyCheck(True, loss_fn, model)
        per = T // E
        schedule[f"T={T},E={E}"] = sum(sched.due(k, k // per) for k in range(T))
    return {"step_ms": s * 1e3, "check_ms": c * 1e3, "check_over_step": c / s, **schedule}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds")
    for name, fn in (("global forward hook", forward_hook_cost), ("raw-gradient read", raw_read_cost),
                     ("consistency check", check_cost)):
        out = fn(args.rounds)
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in out.items()))


if __name__ == "__main__":
    main()
