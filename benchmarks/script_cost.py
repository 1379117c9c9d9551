"""What `gammatrace twopass` costs on the stand-in scripts, side by side in one run.

For each stand-in of ``tests/fixtures/scripts`` (a GPT-style module-level loop, an LSTM LM with
a manual update; ``--torchrun`` adds the 2-rank DDP script), interleaved over ``--rounds``:

* ``plain``: the unmodified script, ``python SCRIPT`` with the same thread count (a fresh process:
  torch's import included);
* ``twopass``: ``gammatrace twopass -- python SCRIPT_attached`` as a whole (the runner's own start-up,
  both passes, the verification and the run folder); ``ratio`` = twopass / plain;
* ``pass 1``, ``pass 2``: each pass's processes (from run.json's ``own_loop.timing``), and
  pass 2 / pass 1;
* ``fixed``: what attaching adds once per process, measured in a fresh pass-1 process of a small
  model: ``import gammatrace`` + ``gammatrace.attach`` (the first probe: the fused kernels from
  Numba's cache, θ_0 saved, provenance) + the first step beyond a second one + the record written
  at exit; and ``verify`` (the runner reading both records, verifying, assembling the result).

CPU seconds (user + system of the processes, children included) beside wall seconds: the machine
may be shared. Medians over the rounds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/script_cost.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "fixtures" / "scripts"
PY = sys.executable

FIXED = r"""
import json, os, time, torch
def make():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    return m, torch.optim.SGD(m.parameters(), lr=0.01)
x, y = torch.randn(32, 40), torch.randn(32, 1)
twin, twin_opt = make()
torch.nn.functional.mse_loss(twin(x), y).backward(); twin_opt.step()  # torch's own first-step cost
model, opt = make()
clock = lambda: (time.perf_counter(), time.process_time())
def step(probe):
    opt.zero_grad(); loss = torch.nn.functional.mse_loss(model(x), y); loss.backward()
    probe.batch((x, y), loss); opt.step()
a = clock()
import gammatrace
attach = gammatrace.attach
b = clock()
probe = attach(model, opt, loss_fn=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
c = clock()
step(probe)
d = clock()
step(probe)
e = clock()
from gammatrace.integrations.script import _ATTACHED
_ATTACHED[0]._at_exit()  # the record written at exit (written again at the real exit)
f = clock()
out = {}
for i, unit in enumerate(("wall", "cpu")):
    out[f"import_{unit}"] = b[i] - a[i]
    out[f"attach_{unit}"] = c[i] - b[i]
    out[f"first_step_{unit}"] = (d[i] - c[i]) - (e[i] - d[i])
    out[f"exit_{unit}"] = f[i] - e[i]
    out[f"fixed_{unit}"] = out[f"import_{unit}"] + out[f"attach_{unit}"] + out[f"first_step_{unit}"] + out[f"exit_{unit}"]
print(json.dumps(out))
"""


def children_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str]:
    t, c = time.perf_counter(), children_cpu()
    out = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t, children_cpu() - c, out.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(torchrun: bool) -> list[str]:
    if not torchrun:
        return [PY]
    return [PY, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr",
            "127.0.0.1", "--master-port", str(free_port())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--torchrun", action="store_true", help="also the 2-rank DDP stand-in")
    ap.add_argument("--long", type=int, default=300,
                    help="also the GPT stand-in at this many iterations (a copy with max_iters and lr_decay_iters "
                         "replaced: the per-step cost beside the start-up); 0: not")
    args = ap.parse_args()
    names = ["gpt_train", "lstm_train"] + (["ddp_train"] if args.torchrun else [])
    long = f"gpt_train_{args.long}" if args.long else None
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"}
    rows: dict[str, dict[str, list[float]]] = {n: {} for n in names + ["fixed"]}

    def add(name: str, key: str, value: float) -> None:
        rows[name].setdefault(key, []).append(value)

    sys.path.insert(0, str(ROOT))
    from gammatrace.engine.script import pass_environment

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scripts = {n: SCRIPTS for n in names}
        if long:
            for suffix in ("", "_attached"):
                text = (SCRIPTS / f"gpt_train{suffix}.py").read_text()
                for key in ("max_iters = 20", "2e-3, 3, 20\n"):
                    assert key in text
                text = text.replace("max_iters = 20", f"max_iters = {args.long}").replace(
                    "2e-3, 3, 20\n", f"2e-3, 3, {args.long}\n")
                (work / f"{long}{suffix}.py").write_text(text)
            names.append(long)
            rows[long] = {}
            scripts[long] = work
        for r in range(args.rounds):
            for name in names:
                run = launcher(name == "ddp_train")
                wall, cpu, _ = timed([*run, str(scripts[name] / f"{name}.py"), str(work / "out")], env, work)
                add(name, "plain_wall", wall)
                add(name, "plain_cpu", cpu)
                out = work / f"run-{name}-{r}"
                wall, cpu, _ = timed([PY, "-m", "gammatrace", "twopass", "--quiet", "--threads", str(args.threads),
                                      "--out", str(out), "--", *launcher(name == "ddp_train"),
                                      str(scripts[name] / f"{name}_attached.py"), str(work / "out")], env, work)
                add(name, "twopass_wall", wall)
                add(name, "twopass_cpu", cpu)
                timing = json.loads((out / "run.json").read_text())["own_loop"]["timing"]
                for key, value in timing.items():
                    add(name, key, value)
            state = work / f"state-{r}"
            fixed_env = pass_environment(1, state, seed=0, threads=args.threads, deterministic="on", base=env)
            _, _, stdout = timed([PY, "-c", FIXED], fixed_env, work)
            for key, value in json.loads(stdout.strip().splitlines()[-1]).items():
                add("fixed", key, value)
            fixed_verify = rows["gpt_train"]["verify_s"][-1]
            add("fixed", "verify_wall", fixed_verify)

    med = {n: {k: statistics.median(v) for k, v in cols.items()} for n, cols in rows.items()}
    print(f"threads {args.threads}, rounds {args.rounds}; seconds: CPU (wall); medians\n")
    print(f"{'stand-in':<14} {'plain':>14} {'twopass':>15} {'ratio':>6} {'pass 1':>14} {'pass 2':>14} "
          f"{'pass 2 / 1':>10}")
    for name in names:
        m = med[name]
        print(f"{name:<14} {m['plain_cpu']:6.2f} ({m['plain_wall']:5.2f}) {m['twopass_cpu']:6.2f} "
              f"({m['twopass_wall']:6.2f}) {m['twopass_cpu'] / m['plain_cpu']:5.2f}x "
              f"{m['pass1_cpu_s']:6.2f} ({m['pass1_wall_s']:5.2f}) {m['pass2_cpu_s']:6.2f} ({m['pass2_wall_s']:5.2f}) "
              f"{m['pass2_cpu_s'] / m['pass1_cpu_s']:9.2f}x")
    f = med["fixed"]
    print("\nfixed cost per pass process (CPU, wall):")
    for key, label in (("import", "import gammatrace + attach"), ("attach", "first attach (probe, θ_0, kernels)"),
                       ("first_step", "first step beyond the second"), ("exit", "record + θ_T written at exit"),
                       ("fixed", "total")):
        print(f"  {label:<38} {f[key + '_cpu']:6.3f} s  ({f[key + '_wall']:6.3f} s)")
    print(f"  runner: read both records, verify, assemble     ({f['verify_wall']:6.3f} s wall, GPT stand-in)")


if __name__ == "__main__":
    main()
