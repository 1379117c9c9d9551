"""A stand-in for a GPT training script (issue 21, "What must hold"), probed against a brute force.

The loop below is written as a flat training script is (nanoGPT's ``train.py`` shape): a
script-level iteration counter, the next batch prefetched right after the forward (drawn
from the global RNG, between the forward and the backward), no epochs, 2 micro-batches per
step with the loss divided for accumulation, ``torch.amp.GradScaler("cpu", enabled=True)``
(scaled backward, ``unscale_``, ``step``, ``update``; a short growth interval so the scale
changes during the run), ``clip_grad_norm_``, AdamW with decay/no-decay groups and a
hand-written warm-up + cosine schedule, dropout, weight tying, and a periodic ``no_grad``
evaluation that also draws batches. The model is a tiny causal transformer (~3.6k
parameters, torch only).

Pass A runs the script with an oracle that only reads (θ_k, the raw gradient at the end of the
step's last backward divided by the scale, the gradient the optimizer received, the RNG state
of every micro-batch's forward); θ* = θ_T of that run. Pass B runs the same script with
``gammatrace.Probe`` in reference mode, attached by one ``probe.batch`` line. Every column of
``probe.steps()`` (raw: :mod:`gammatrace.probe.table`; derived: DESIGN §1) and the per-tensor
progress is compared with the brute force in float64, ≤ 1e-9 relative (inner products that can
pass through zero get an absolute floor of 1e-13 of the product of the norms involved).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

import gammatrace
from gammatrace.probe.table import REFERENCE_COLUMNS, USED_COLUMNS
from tests.oracle import DERIVED, FOLDED, assert_matches_brute_force, brute_force_table, close

VOCAB, BLOCK, N_EMBD, N_HEAD = 12, 8, 16, 2
BATCH, ACCUM, MAX_ITERS, WARMUP = 8, 2, 23, 4
LEARNING_RATE, MIN_LR, GRAD_CLIP, EVAL_INTERVAL = 3e-2, 3e-3, 0.35, 8


# ---------------------------------------------------------------- the model (nanoGPT-like)
class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.1), nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(BLOCK, BLOCK)).view(1, 1, BLOCK, BLOCK))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(N_EMBD, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = (
            nn.LayerNorm(N_EMBD),
            CausalSelfAttention(),
            nn.LayerNorm(N_EMBD),
        )
        self.mlp = nn.Sequential(
            nn.Linear(N_EMBD, 4 * N_EMBD), nn.GELU(), nn.Linear(4 * N_EMBD, N_EMBD), nn.Dropout(0.1)
        )

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(VOCAB, N_EMBD),
                "wpe": nn.Embedding(BLOCK, N_EMBD),
                "drop": nn.Dropout(0.1),
                "h": nn.ModuleList([Block()]),
                "ln_f": nn.LayerNorm(N_EMBD),
            }
        )
        self.lm_head = nn.Linear(N_EMBD, VOCAB, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.size(1), dtype=torch.long)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = (
            None
            if targets is None
            else F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-1)
        )
        return logits, loss


def loss_fn(model, batch):
    return model(*batch)[1]


def _data() -> torch.Tensor:
    """A token stream with structure to learn (a noisy cycle)."""
    g = torch.Generator().manual_seed(7)
    base = torch.arange(600) % VOCAB
    noise = torch.randint(0, VOCAB, (600,), generator=g)
    return torch.where(torch.rand(600, generator=g) < 0.2, noise, base)


def _configure_optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LEARNING_RATE,
        betas=(0.9, 0.95),
    )


class Quiet:
    """The script's hook points; the unprobed run does nothing at them."""

    def attach(self, model, optimizer):
        pass

    def forward(self):
        pass

    def micro_batch(self, batch, loss):
        pass

    def after_backward(self, scale):
        pass

    def before_step(self):
        pass


def script(observer: Quiet) -> tuple[nn.Module, list[torch.Tensor], list[float]]:
    """The training script, as a function body: returns the model, θ_k at each step (and θ_T)
    in float64, and the per-step losses it printed."""
    torch.manual_seed(1337)
    data = _data()

    def get_batch():
        ix = torch.randint(len(data) - BLOCK, (BATCH,))  # the global RNG, as nanoGPT
        x = torch.stack([data[i : i + BLOCK] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + BLOCK] for i in ix])
        return x, y

    def get_lr(it):
        if it < WARMUP:
            return LEARNING_RATE * (it + 1) / (WARMUP + 1)
        ratio = (it - WARMUP) / (MAX_ITERS - WARMUP)
        return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LEARNING_RATE - MIN_LR)

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = float(torch.stack([model(*get_batch())[1] for _ in range(2)]).mean())
        model.train()
        return out

    model = GPT()
    optimizer = _configure_optimizer(model)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10, growth_interval=5)
    observer.attach(model, optimizer)
    thetas, printed = [], []
    X, Y = get_batch()  # fetch the very first batch
    iter_num = 0
    while True:
        lr = get_lr(iter_num)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        if iter_num % EVAL_INTERVAL == 0:
            estimate_loss()
        thetas.append(torch.cat([p.detach().reshape(-1).double() for p in model.parameters()]))
        for _micro_step in range(ACCUM):
            observer.forward()
            _logits, loss = model(X, Y)
            observer.micro_batch((X, Y), loss)  # the attachment: probe.batch((X, Y), loss)
            loss = loss / ACCUM
            X, Y = get_batch()  # prefetch the next batch while the backward runs
            scaler.scale(loss).backward()
        observer.after_backward(scaler.get_scale())
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        observer.before_step()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        printed.append(loss.item() * ACCUM)
        iter_num += 1
        if iter_num > MAX_ITERS:
            break
    thetas.append(torch.cat([p.detach().reshape(-1).double() for p in model.parameters()]))
    return model, thetas, printed


class Oracle(Quiet):
    """Reads everything, changes nothing: θ_k (kept by the script), the raw g_k (accumulated
    .grad at the end of the step's last backward, divided by the scale: exact, a power of two),
    the used ĝ_k (.grad as the optimizer receives it), the micro-batches, their losses and the
    global RNG state at each forward (the dropout masks), and η_k."""

    def __init__(self):
        self.raw, self.used, self.lrs, self.micro, self.scales = [], [], [], [], []
        self._pending = []

    def attach(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.params = list(model.parameters())

    def forward(self):
        self._rng = torch.get_rng_state()

    def micro_batch(self, batch, loss):
        self._pending.append((tuple(t.clone() for t in batch), float(loss.detach()), self._rng))

    def after_backward(self, scale):
        self.scales.append(scale)
        self.raw.append(torch.cat([p.grad.reshape(-1).double() for p in self.params]) / scale)

    def before_step(self):
        self.used.append(torch.cat([p.grad.reshape(-1).double() for p in self.params]))
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        self.micro.append(self._pending)
        self._pending = []


class Probed(Quiet):
    def __init__(self, reference):
        self.reference = reference

    def attach(self, model, optimizer):
        self.probe = gammatrace.Probe(model, optimizer, loss_fn, reference=self.reference)

    def micro_batch(self, batch, loss):
        self.probe.batch(batch, loss)


def brute_force(
    oracle: Oracle, model: nn.Module, thetas: list[torch.Tensor], ref_state: dict
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every column the slow, obvious way (tests/oracle.py), from the stored float64 iterates."""
    ref_model = copy.deepcopy(model)
    ref_model.load_state_dict(ref_state)
    ref_model.train()
    losses, refs = [], []
    for micro in oracle.micro:
        step_refs = []
        for batch, _loss, rng in micro:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.set_rng_state(rng)  # the training forward's dropout masks
                step_refs.append(float(loss_fn(ref_model, batch)))
        losses.append(float(np.mean([m[1] for m in micro])))
        refs.append(float(np.mean(step_refs)))
    return brute_force_table(thetas, thetas[-1], oracle.raw, oracle.used, oracle.lrs, losses, refs,
                             names=[n for n, _ in model.named_parameters()],
                             sizes=[p.numel() for p in model.parameters()])  # AdamW: decoupled decay, NaN


def test_gpt_script_standin_matches_brute_force():
    # Pass A: the script with the read-only oracle; θ* = θ_T.
    oracle = Oracle()
    model, thetas, printed = script(oracle)
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    # Pass B: the same script, probed in reference mode.
    probed = Probed(ref_state)
    model_b, thetas_b, printed_b = script(probed)
    probe = probed.probe

    # Probing does not change the trajectory: every θ_k, the losses and the final state, bitwise.
    assert len(thetas) == len(thetas_b) == MAX_ITERS + 2
    for k, (a, b) in enumerate(zip(thetas, thetas_b, strict=True)):
        assert torch.equal(a, b), k
    assert printed == printed_b
    for (key, a), b in zip(model.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), key

    expected, expected_tensors = brute_force(oracle, model, thetas, ref_state)
    steps = probe.steps()
    assert probe.skipped().empty
    assert len(steps) == len(expected) == MAX_ITERS + 1
    # Every column the probe produces is checked here (a new column fails until it is added).
    assert (
        set(steps.columns)
        == set(expected.columns)
        == {"step", "epoch", "lr", *REFERENCE_COLUMNS, *USED_COLUMNS, *FOLDED, *DERIVED}
    )
    assert (steps["epoch"] == 0).all()  # no epochs: one, 0
    assert expected["gamma"].notna().sum() >= len(expected) // 2
    # Every column, raw and derived, and the per-tensor progress (weight-tied wte/lm_head is one
    # tensor), against the brute force at ≤ 1e-9 relative.
    assert_matches_brute_force(steps, expected, probe.tensor_steps(), expected_tensors)
    g = np.sqrt(expected["grad_sq"].to_numpy())
    gu = np.sqrt(expected["grad_sq_used"].to_numpy())

    # The raw gradient is not the used one where clipping bit, and equal where it did not.
    clipped = g > GRAD_CLIP
    assert 3 <= clipped.sum() < len(g), g  # clipping happened, and not on every step
    np.testing.assert_allclose(gu[clipped], GRAD_CLIP, rtol=1e-5)  # clip / (‖g‖ + 1e-6)
    assert (
        np.abs(steps["grad_sq"] - steps["grad_sq_used"])[clipped] > 1e-3 * steps["grad_sq"][clipped]
    ).all()
    # (Unclipped steps: clip_grad_norm_ still multiplies by min(1, clip/(‖g‖+1e-6)) = 1 exactly.)
    np.testing.assert_array_equal(expected["grad_sq"][~clipped], expected["grad_sq_used"][~clipped])
    close("unclipped used = raw", steps["grad_sq_used"][~clipped], steps["grad_sq"][~clipped])
    # The scale changed during the run (growth interval 5): g_k was divided by each step's own.
    assert len(set(oracle.scales)) >= 3, oracle.scales
    # The loss fell (the stand-in trains).
    assert np.mean(printed[-4:]) < np.mean(printed[:4])
