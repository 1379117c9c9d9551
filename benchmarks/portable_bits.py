"""Which dispatch switches change a trajectory's bits on this machine (issue 25, item 4).

Bitwise replay holds on one machine kind (gammatrace.machine). Could a setting make bits
portable across x86-64 CPUs? A switch can only help if it changes what this CPU runs:
each row trains the same runs in a fresh process under one environment (ATen's CPU
capability, MKL's conditional bitwise reproducibility, oneDNN's ISA cap, numba's target
CPU) and compares θ_T and the replayed step table (pass 2, with the probe's numba kernel)
with the default row's. A row "same" as the default ran the same kernels, or kernels that
agree here; "differs" proves the switch reaches these runs' arithmetic. Whether the most
portable row equals the same row on *another* CPU needs a second CPU: run this script on
both and compare the printed hashes (they are the full SHA-256 prefixes, not just
same/differs).

    python benchmarks/portable_bits.py            # ~1 min on 2 CPUs
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "ATEN_CPU_CAPABILITY=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "MKL_CBWR=AVX2": {"MKL_CBWR": "AVX2"},
    "ONEDNN_MAX_CPU_ISA=AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "NUMBA_CPU_NAME=generic": {"NUMBA_CPU_NAME": "generic"},
    "all of the above (most portable)": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
                                         "ONEDNN_MAX_CPU_ISA": "SSE41", "NUMBA_CPU_NAME": "generic"},
}

RUNS = {
    "mlp": {"data": {"name": "digits", "n_train": 512, "n_test": 64}, "model": {"name": "mlp", "width": 64, "depth": 3},
            "optim": {"name": "momentum", "lr": 0.05}},
    "cnn1d": {"data": {"name": "mnist1d", "n_train": 512, "n_test": 64}, "model": {"name": "cnn1d"},
              "optim": {"name": "adam", "lr": 0.001}},
}

CHILD = r"""
import hashlib, json, sys, tempfile
import gammatrace
from gammatrace.machine import describe, fingerprint, machine_id
runs = json.loads(sys.argv[1])
out = {"machine": describe(fingerprint()), "kind": machine_id(fingerprint())}
for name, cfg in runs.items():
    cfg = {"name": name, "seed": 0, "threads": 1, "epochs": 2, "batch_size": 64, **cfg}
    run = gammatrace.train(cfg, tempfile.mkdtemp() + "/" + name, progress=False)
    steps = run.steps("last")
    out[name] = {"final": run.meta.final_sha256[:12],
                 "steps": hashlib.sha256(steps.to_csv(float_format="%.17g").encode()).hexdigest()[:12]}
print(json.dumps(out))
"""


def measure(env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in {e for s in SETTINGS.values() for e in s}}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(RUNS)], env={**clean, **env},
                          capture_output=True, text=True, timeout=600, cwd=tempfile.mkdtemp())
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    t0 = time.time()
    rows = {name: measure(env) for name, env in SETTINGS.items()}
    base = rows["default"]
    print(f"# portable bits — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {base['machine']}")
    print(f"# runs: 2 epochs, 1 thread each: {', '.join(RUNS)}; θ_T and the replayed step table vs the default row")
    head = f"{'setting':<34} {'kind':<12} " + " ".join(f"{n + ' θ_T':<22} {n + ' steps':<22}" for n in RUNS)
    print(head)
    for name, row in rows.items():
        cells = []
        for run in RUNS:
            for part in ("final", "steps"):
                same = "same" if row[run][part] == base[run][part] else "differs"
                cells.append(f"{row[run][part]} {same:<9}")
        print(f"{name:<34} {row['kind']:<12} " + " ".join(cells))
    print(f"(wall time {time.time() - t0:.1f} s)")
    bits = {name: {run: row[run] for run in RUNS} for name, row in rows.items()}
    digest = hashlib.sha256(json.dumps(bits, sort_keys=True).encode()).hexdigest()[:12]
    print(f"(table digest {digest}: equal on two machines ⇔ every row's bits agree there)")


if __name__ == "__main__":
    main()
