"""Matched vs unmatched dropout masks: what the reference loss's randomness does to γ_k.

A small character-level Transformer (dropout, AdamW with weight decay, gradient clipping,
linear warm-up + cosine schedule, two micro-batches per step) trains for a few hundred
steps under :class:`gammatrace.TwoPass`, which measures every step against θ* = θ_T. The
probe evaluates ℓ(θ*; B_k) with the dropout masks of the training forward (matched, the
default). The baseline evaluates it with fresh masks, as a probe that forks the random
stream after the backward did: its loss_fn reseeds the generator whenever it is called on
a model other than the one being trained (the probe's reference copy, inside the probe's
``fork_rng``, so the training trajectory is the same in every run).

Each row is one two-pass run; ``late`` is the second half of the steps. With dropout 0 the
two columns must agree exactly (the masks do not matter), which the script checks.

Usage::

    python benchmarks/transformer_masks.py                     # 300 steps, dropout 0.1 and 0 (~100 s CPU)
    python benchmarks/transformer_masks.py --steps 200 --dropout 0.1,0.2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import itertools
import math
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import gammatrace  # noqa: E402

CTX, BATCH, ACCUM, WARMUP = 32, 16, 2, 20
# A fixed text that ships with Python (the source of textwrap, ~20k characters, ASCII).
TEXT = inspect.getsource(textwrap)
CHARS = sorted(set(TEXT))
DATA = torch.tensor([CHARS.index(c) for c in TEXT])


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, dropout: float, d: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(CTX, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CTX))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.tok(x) + self.pos[: x.shape[1]])
        return self.head(self.blocks(h, mask=self.mask, is_causal=True))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def experiment(steps: int, dropout: float, matched: bool, seed: int, threads: int) -> tuple[dict, float]:
    live: dict[str, nn.Module] = {}
    fresh = itertools.count(10**6)

    def reference_loss(model: nn.Module, batch):
        if not matched and model is not live.get("model"):
            torch.manual_seed(next(fresh))  # inside the probe's fork_rng: other masks, same training
        return loss_fn(model, batch)

    def build():
        model = CharTransformer(len(CHARS), dropout)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        schedule = lambda k: min(1.0, (k + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * k / steps))  # noqa: E731
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    def train(model, opt, probe, sched):
        live["model"] = model
        model.train()
        for k in range(steps):
            opt.zero_grad()
            for _ in range(ACCUM):
                i = torch.randint(len(DATA) - CTX - 1, (BATCH,)).tolist()
                batch = (torch.stack([DATA[j:j + CTX] for j in i]), torch.stack([DATA[j + 1:j + CTX + 1] for j in i]))
                loss = reference_loss(model, batch)
                (loss / ACCUM).backward()
                probe.batch(batch, loss)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if (k + 1) % 50 == 0:
                probe.end_epoch()

    t0 = time.perf_counter()
    # The consistency check recomputes ℓ(θ_0; B_0) on a copy: with fresh masks it would (rightly) fail.
    result = gammatrace.TwoPass(build, train, loss_fn=reference_loss, seed=seed, threads=threads,
                                check=matched).run()
    seconds = time.perf_counter() - t0
    steps_table = result.steps()
    g = steps_table["gamma"].to_numpy()
    late = g[len(g) // 2:]
    gap = (steps_table["loss"] - steps_table["loss_ref"]).to_numpy()
    row = {
        "median": np.nanmedian(g), "late median": np.nanmedian(late), "max": np.nanmax(g),
        "late max": np.nanmax(late), "frac > 0": float(np.mean(g[np.isfinite(g)] > 0)),
        "undefined": int(np.sum(~np.isfinite(g))), "late gap": float(np.median(gap[len(gap) // 2:])),
        "final loss": float(steps_table["loss"].iloc[-10:].mean()),
    }
    return row, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dropout", default="0.1,0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    t_all = time.perf_counter()
    n_params = sum(p.numel() for p in CharTransformer(len(CHARS), 0.0).parameters())
    print(f"# transformer masks — {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, torch threads {args.threads}, load avg {os.getloadavg()[0]:.2f}")
    print(f"# char-level Transformer ({n_params:,} parameters: d 64, 4 heads, 2 pre-norm layers, context {CTX}), "
          f"text: textwrap.py ({len(TEXT):,} chars, vocab {len(CHARS)}); AdamW lr 3e-3 wd 0.1, clip 1.0, "
          f"warm-up {WARMUP} + cosine, {ACCUM} micro-batches of {BATCH} per step, {args.steps} steps, seed {args.seed}")
    cols = ["median", "late median", "max", "late max", "frac > 0", "undefined", "late gap", "final loss"]
    print(f"{'dropout':>7} {'masks':>9} " + " ".join(f"{c:>11}" for c in cols) + f" {'seconds':>8}")
    ok = True
    for p in [float(x) for x in args.dropout.split(",")]:
        rows = {}
        for matched in (True, False):
            row, seconds = experiment(args.steps, p, matched, args.seed, args.threads)
            rows[matched] = row
            print(f"{p:>7.2f} {'matched' if matched else 'unmatched':>9} "
                  + " ".join(f"{row[c]:>11.4g}" for c in cols) + f" {seconds:>8.1f}", flush=True)
        if p == 0 and rows[True] != rows[False]:
            ok = False
            print("  dropout 0: matched and unmatched differ, but the masks cannot matter — a bug")
    print("γ_k = P_k / (η_k D_0² (ℓ_k − ℓ*_k)), θ* = θ_T; late: the second half of the steps; late gap: median "
          "ℓ_k − ℓ*_k there; final loss: mean batch loss of the last 10 steps")
    print(f"(wall time {time.perf_counter() - t_all:.1f} s){'' if ok else '  CHECK FAILED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
