"""Calibration of the claim verdict rule (issue 19, item 4): how often each verdict is read on
synthetic studies whose truth is known — the false "consistent" rate under the null, under each
counterexample of the issue, with near-copy cells and with shared-seed effects, and the power at
the presets' default seeds.

Each replicate draws every seed's value of every cell as

    x[cell, s] = mu[cell] + seed_sd * u[s] + noise_sd * e[cell, s],   u, e ~ N(0, 1),

u shared by the cells of one seed (the batch order and initial point a seed's runs share), and
decides the claim with :func:`gammatrace.principles.claims.check_claim` (runs carry their seed,
so the relations are paired). Beside it, the old rule: the Jonckheere–Terpstra trend test of the
whole order over all seeds, "consistent" when its p < α. Rates over ``--reps`` replicates (seeded);
the Monte-Carlo standard error of a rate near 0.05 is ±0.005 at 2,000 replicates.

    python benchmarks/claims_calibration.py            # 2,000 replicates per row
    python benchmarks/claims_calibration.py --reps 500
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter

import numpy as np

from gammatrace.principles.claims import ALPHA, RunPoint, check_claim, parse_order

ACT = "relu ≈ leaky_relu > tanh > sigmoid"
CELLS = ("relu", "leaky_relu", "tanh", "sigmoid")
SD = 0.02  # seed spread of a cell's median γ_k in the quick activation study (issue 19)

# (label, claim, seeds, mu per cell, seed_sd, noise_sd, what a correct rule reads)
SCENARIOS = [
    ("null: all cells equal", ACT, 7, (0, 0, 0, 0), 0.0, SD, "≤ α consistent"),
    ("null, shared-seed effect (seed sd 3× noise)", ACT, 7, (0, 0, 0, 0), 3 * SD, SD, "≤ α consistent"),
    ("counterexample 1 at the boundary: tanh = sigmoid, the rest 10 sd apart", ACT, 7,
     (0.6, 0.6, 0.2, 0.2), 0.0, SD, "≤ α consistent"),
    ("counterexample 1: sigmoid > tanh by 1 sd, the rest 10 sd apart", ACT, 7,
     (0.6, 0.6, 0.2, 0.22), 0.0, SD, "never consistent"),
    ("counterexample 1, every seed: sigmoid > tanh by 10 sd", ACT, 7,
     (0.6, 0.6, 0.2, 0.4), 0.0, SD, "not consistent"),
    ("counterexample 2, every seed: leaky_relu below tanh", ACT, 7,
     (0.8, 0.4, 0.6, 0.2), 0.0, SD, "not consistent"),
    ("counterexample 3, every seed: tanh > relu ≈ leaky_relu > sigmoid", ACT, 7,
     (0.4, 0.4, 0.6, 0.2), 0.0, SD, "not consistent"),
    ("near copies: leaky_relu = relu + 0.002 (claim relu > leaky_relu > …), shared seeds",
     "relu > leaky_relu > tanh > sigmoid", 7, (0.6, 0.602, 0.4, 0.2), SD, 0.002, "≤ α consistent"),
    ("near copies at the boundary: leaky_relu = relu, shared seeds", "relu > leaky_relu > tanh > sigmoid", 7,
     (0.6, 0.6, 0.4, 0.2), SD, 0.002, "≤ α consistent"),
    ("power: gaps 1 cell sd, default seeds", ACT, 7, (0.04, 0.04, 0.02, 0.0), 0.0, SD, "consistent"),
    ("power: gaps 2 cell sd, default seeds", ACT, 7, (0.08, 0.08, 0.04, 0.0), 0.0, SD, "consistent"),
    ("power: gaps 2 cell sd, shared-seed effect 3× noise", ACT, 7, (0.08, 0.08, 0.04, 0.0), 3 * SD, SD, "consistent"),
    ("power: gaps 3 cell sd, default seeds", ACT, 7, (0.12, 0.12, 0.06, 0.0), 0.0, SD, "consistent"),
    ("power: two cells, gap 2 cell sd (skip ResNet-18), 5 seeds", "all > first", 5, (0.04, 0.0), 0.0, SD, "consistent"),
]


def run(reps: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for label, claim, seeds, mu, seed_sd, noise_sd, want in SCENARIOS:
        names = [c for lv in parse_order(claim) for c in lv]
        cells = [c for c in CELLS if c in names] if set(names) <= set(CELLS) else names
        counts: Counter = Counter()
        old = 0
        t0 = time.perf_counter()
        for _ in range(reps):
            u = rng.standard_normal(seeds) * seed_sd
            pts = [RunPoint(f"{c}-s{s}", c, float(m + u[s] + noise_sd * rng.standard_normal()), 0.0, seed=s)
                   for c, m in zip(cells, mu, strict=True) for s in range(seeds)]
            r = check_claim(claim, pts)
            counts[r.verdict] += 1
            old += r.trend.p_value < ALPHA
        rows.append({"scenario": label, "claim": claim, "seeds": seeds, "want": want,
                     "consistent": counts["consistent"] / reps, "not consistent": counts["not consistent"] / reps,
                     "inconclusive": counts["inconclusive"] / reps, "old J-T consistent": old / reps,
                     "seconds": time.perf_counter() - t0})
    return rows


def table(rows: list[dict], reps: int) -> str:
    se = math.sqrt(ALPHA * (1 - ALPHA) / reps)
    out = [f"# claims calibration — {reps} replicates per row, α = {ALPHA:g}, Monte-Carlo s.e. at 0.05: ±{se:.3f}",
           "| scenario | claim | seeds | a correct rule reads | consistent | not consistent | inconclusive | "
           "old J-T rule: consistent |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['scenario']} | {r['claim']} | {r['seeds']} | {r['want']} | {r['consistent']:.3f} | "
                   f"{r['not consistent']:.3f} | {r['inconclusive']:.3f} | {r['old J-T consistent']:.3f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = run(args.reps, args.seed)
    print(table(rows, args.reps))
    print(f"(wall time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
