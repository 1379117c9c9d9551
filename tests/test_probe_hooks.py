"""The probe in real loops (issue 11): measured through the optimizer's own step hooks.

One table over {SGD, SGD momentum + Nesterov, AdamW, LBFGS with a closure} x {GradScaler
with forced overflows, bf16 autocast, dropout, gradient accumulation, clipping,
channels-last conv net}, one condition per cell, plus one cell with everything at once on
a tiny dropout Transformer. Every cell runs the same loop three times:

* plain: no probe, no recording (the trajectory the probe must not change);
* oracle: hook-free, stores every θ_k in float64, the raw gradient g_k (read right after
  the step's last backward, divided by the GradScaler's scale: DESIGN §1) and the gradient
  the optimizer received (read just before the step: clipped, unscaled), and the generator
  state before each forward; the §6 columns are then computed in float64 NumPy, and
  ℓ(θ*; B_k) by replaying each forward on a fresh model at θ* under the stored generator
  state;
* probed: ``probe.batch`` plus the loop's own step call, in reference mode against the
  oracle's θ_T.
"""

from __future__ import annotations

import contextlib
import copy
import doctest
import gc
import importlib
import math
import pickle
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gammatrace
from gammatrace.probe import ConsistencyError, ProbeUsageError

# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(6, 12), nn.Dropout(dropout), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 3), nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).flatten(1))


class TinyTransformer(nn.Module):
    VOCAB, WIDTH, LENGTH = 11, 16, 8

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(self.VOCAB, self.WIDTH)
        self.pos = nn.Parameter(0.1 * torch.randn(self.LENGTH, self.WIDTH))
        self.block = nn.TransformerEncoderLayer(self.WIDTH, 2, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(self.WIDTH, self.VOCAB)

    def forward(self, tokens):
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(
            self.block(self.emb(tokens) + self.pos[: tokens.shape[1]], src_mask=causal)
        )


def classify(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def next_token(model, batch):
    logits = model(batch[0][:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[0][:, 1:].reshape(-1))


def make_opt(name: str, params) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    if name == "lbfgs":
        return torch.optim.LBFGS(params, lr=0.5, max_iter=3, history_size=4)
    raise ValueError(name)


# --------------------------------------------------------------- one loop, three observers


@dataclass
class Spec:
    """One cell's loop: model, data (micro-batches per attempted step) and techniques."""

    make_model: Callable[[], nn.Module]
    attempts: list[list[tuple]]
    loss_fn: Callable = classify
    autocast: bool = False
    scaler: bool = False
    overflow: frozenset[int] = frozenset()  # attempts whose scaled gradient gets an inf
    clip: float | None = None
    batch_before_backward: bool = False
    schedule: bool = False
    set_to_none: bool = True


def _data(seed: int, sizes: list[list[int]], shape=(6,)) -> list[list[tuple]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [
            (torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g))
            for n in step
        ]
        for step in sizes
    ]


def _tokens(seed: int, sizes: list[list[int]]) -> list[list[tuple]]:
    g = torch.Generator().manual_seed(seed)
    V, L = TinyTransformer.VOCAB, TinyTransformer.LENGTH
    return [[(torch.randint(0, V, (n, L + 1), generator=g),) for n in step] for step in sizes]


def _channels_last_data(seed: int, steps: int) -> list[list[tuple]]:
    return [
        [(x.to(memory_format=torch.channels_last), y) for x, y in step]
        for step in _data(seed, [[8]] * steps, shape=(2, 6, 6))
    ]


def _conv_model():
    return ConvNet().to(memory_format=torch.channels_last)


CONDITIONS: dict[str, Callable[[], Spec]] = {
    "scaler": lambda: Spec(MLP, _data(1, [[8]] * 7), scaler=True, overflow=frozenset({1, 4})),
    "autocast": lambda: Spec(MLP, _data(2, [[8]] * 5), autocast=True),
    "dropout": lambda: Spec(lambda: MLP(0.3), _data(3, [[8]] * 5)),
    "accumulation": lambda: Spec(MLP, _data(4, [[8, 5]] * 4)),
    "clipping": lambda: Spec(MLP, _data(5, [[8]] * 5), clip=0.05),
    "channels_last": lambda: Spec(_conv_model, _channels_last_data(6, 4)),
}


def everything() -> Spec:
    """The Transformer cell: every condition at once."""
    return Spec(
        TinyTransformer,
        _tokens(7, [[4, 3]] * 6),
        loss_fn=next_token,
        autocast=True,
        scaler=True,
        overflow=frozenset({2}),
        clip=0.5,
        batch_before_backward=True,
        schedule=True,
    )


def _schedule(k: int) -> float:  # warm-up + cosine
    return min(1.0, (k + 1) / 3) * 0.5 * (1 + math.cos(math.pi * k / 10))


def flat64(tensors) -> np.ndarray:
    return np.concatenate([t.detach().to_dense().double().reshape(-1).numpy() for t in tensors])


class Plain:
    """No probe, no recording."""

    probe = None

    def attach(self, model, opt):
        pass

    def forward(self):
        pass

    def batch(self, b, loss):
        pass

    def after_backward(self, scale):
        pass

    def before_step(self, skipped):
        pass

    def step_closure(self, opt, closure, b):
        opt.step(closure)

    def closure_done(self, loss):
        pass


@dataclass
class StepRecord:
    theta: np.ndarray
    grad: np.ndarray | None  # as the optimizer received it
    lr: float
    micro: list = field(default_factory=list)  # (batch, loss float64, n, rng state)
    raw: np.ndarray | None = None  # g_k: after the last backward, unscaled, before clipping


class Oracle(Plain):
    """Stores every θ_k, g_k, micro-batch loss and the generator state before each forward."""

    def attach(self, model, opt):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt, self.steps, self.skips, self.micro = opt, [], [], []
        self._first = self._raw_pending = False

    def forward(self):
        self._rng = torch.get_rng_state()

    def batch(self, b, loss):
        self.micro.append((b, float(loss.detach().double()), b[0].shape[0], self._rng))

    def grads(self):
        return flat64([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])

    def after_backward(self, scale):
        # Dividing float32 values by a power of two in float64 is exact.
        if not self._first:
            self._raw = self.grads() / scale
        elif self._raw_pending:
            self._raw_pending, self.steps[-1].raw = False, self.grads() / scale

    def before_step(self, skipped):
        if skipped:
            self.skips.append(len(self.steps))
        else:
            self.steps.append(
                StepRecord(
                    flat64(self.params),
                    self.grads(),
                    self.opt.param_groups[0]["lr"],
                    self.micro,
                    raw=self._raw,
                )
            )
        self.micro = []

    def step_closure(self, opt, closure, b):
        self.steps.append(StepRecord(flat64(self.params), None, opt.param_groups[0]["lr"]))
        self._first, self._b, self._raw_pending = True, b, True
        opt.step(closure)

    def forward_in_closure(self):
        if self._first:
            self._rng = torch.get_rng_state()

    def closure_done(self, loss):
        if self._first:
            self._first = False
            rec = self.steps[-1]
            rec.grad = self.grads()
            rec.micro = [(self._b, float(loss.detach().double()), self._b[0].shape[0], self._rng)]


class Probed(Plain):
    def __init__(self, loss_fn, reference=None, kernel=None):
        self.loss_fn, self.reference, self.kernel = loss_fn, reference, kernel

    def attach(self, model, opt):
        self.probe = gammatrace.Probe(
            model, opt, self.loss_fn, reference=self.reference, kernel=self.kernel
        )

    def batch(self, b, loss):
        self.probe.batch(b, loss)

    def step_closure(self, opt, closure, b):
        self.probe.batch(b)
        opt.step(closure)


def train(spec: Spec, optim: str, obs: Plain) -> nn.Module:
    """The user's loop. Every observer sees the same tensor operations in the same order."""
    torch.manual_seed(0)
    model = spec.make_model()
    model.train()
    opt = make_opt(optim, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule) if spec.schedule else None
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if spec.scaler else None
    obs.attach(model, opt)
    params = [p for p in model.parameters() if p.requires_grad]

    def autocast():
        return (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if spec.autocast
            else contextlib.nullcontext()
        )

    torch.manual_seed(1)  # the dropout stream
    for k, micro in enumerate(spec.attempts):
        if optim == "lbfgs":
            (b,) = micro

            def closure(b=b):
                opt.zero_grad()
                if isinstance(obs, Oracle):
                    obs.forward_in_closure()
                with autocast():
                    loss = spec.loss_fn(model, b)
                loss.backward()
                obs.after_backward(1.0)
                if spec.clip is not None:
                    nn.utils.clip_grad_norm_(params, spec.clip)
                obs.closure_done(loss)
                return loss

            obs.step_closure(opt, closure, b)
            continue
        opt.zero_grad(set_to_none=spec.set_to_none)
        for b in micro:
            obs.forward()
            with autocast():
                loss = spec.loss_fn(model, b)
            scaled = loss / len(micro) if len(micro) > 1 else loss
            if scaler is not None:
                scaled = scaler.scale(scaled)
            if spec.batch_before_backward:
                obs.batch(b, loss)
            scaled.backward()
            if not spec.batch_before_backward:
                obs.batch(b, loss)
        obs.after_backward(scaler.get_scale() if scaler is not None else 1.0)
        if k in spec.overflow:
            params[0].grad.view(-1)[0] = float("inf")
        if scaler is not None:
            scaler.unscale_(opt)
        if spec.clip is not None:
            nn.utils.clip_grad_norm_(params, spec.clip)
        obs.before_step(skipped=k in spec.overflow)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if sched is not None:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore"
                )  # lr_scheduler.step() after a skipped optimizer step
                sched.step()
    return model


# ----------------------------------------------------------------------------- the oracle's columns


def _mean(values, weights):
    """Σ n_i v_i / Σ n_i, one micro-batch: the value itself."""
    if len(values) == 1:
        return values[0]
    acc = values[0] * weights[0]
    for v, n in zip(values[1:], weights[1:], strict=True):
        acc = acc + v * n
    return acc / sum(weights)


def oracle_table(spec: Spec, oracle: Oracle, model: nn.Module, ref_state) -> pd.DataFrame:
    theta_T = flat64([p for p in model.parameters() if p.requires_grad])
    star = flat64([ref_state[n] for n, p in model.named_parameters() if p.requires_grad])
    ref = spec.make_model()
    ref.load_state_dict(ref_state)
    ref.train()
    thetas = [s.theta for s in oracle.steps] + [theta_T]
    rows = []
    for k, s in enumerate(oracle.steps):
        refs = []
        for b, _, _, rng in s.micro:
            with (
                torch.random.fork_rng(devices=[]),
                torch.no_grad(),
                (
                    torch.autocast("cpu", dtype=torch.bfloat16)
                    if spec.autocast
                    else contextlib.nullcontext()
                ),
            ):
                torch.set_rng_state(rng)  # the oracle's own matched randomness
                refs.append(float(spec.loss_fn(ref, b).double()))
        ns = [n for _, _, n, _ in s.micro]
        e, delta, g, used = thetas[k] - star, thetas[k] - thetas[k + 1], s.raw, s.grad
        rows.append(
            {
                "step": k,
                "lr": s.lr,
                "loss": _mean([m[1] for m in s.micro], ns),
                "loss_ref": _mean(refs, ns),
                "progress": e @ delta - 0.5 * (delta @ delta),
                "dist_sq": e @ e,
                "update_sq": delta @ delta,
                "grad_dot": e @ g,
                "grad_sq": g @ g,
                "grad_dot_used": e @ used,
                "grad_sq_used": used @ used,
                # For the folded weight decay g + λθ (gammatrace.probe.decay).
                "theta_dot": thetas[k] @ e,
                "grad_theta": g @ thetas[k],
                "theta_sq": thetas[k] @ thetas[k],
            }
        )
    df = pd.DataFrame(rows)
    d0, lr, gap = df.dist_sq.iloc[0], df.lr.to_numpy(), (df.loss - df.loss_ref).to_numpy()
    P = df.progress.to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        df["gamma"] = np.where(gap > 1e-8, P / (lr * d0 * gap), np.nan)
        df["gamma_rp"] = np.where(df.loss > 1e-8, P / (lr * df.loss) / d0, np.nan)
        df["gamma_rc"] = np.where(df.dist_sq > 0, P / (lr * df.dist_sq), np.nan)
        df["star"] = df.grad_dot - gap
        df["cos_align"] = (P + 0.5 * df.update_sq) / np.sqrt(df.dist_sq * df.update_sq)
    return df


def assert_columns_match(ours: pd.DataFrame, exp: pd.DataFrame) -> None:
    assert list(ours.columns[:18]) == [
        "step",
        "epoch",
        "lr",
        "loss",
        "loss_ref",
        "progress",
        "dist_sq",
        "update_sq",
        "grad_dot",
        "grad_sq",
        "grad_dot_used",
        "grad_sq_used",
        "grad_dot_wd",
        "grad_sq_wd",
        "gamma",
        "gamma_rp",
        "gamma_rc",
        "star",
    ]
    assert len(ours) == len(exp) and ours.step.tolist() == exp.step.tolist()
    assert not ours[["loss", "loss_ref", "progress", "dist_sq", "update_sq"]].isna().any().any()
    np.testing.assert_array_equal(ours.lr, exp.lr)
    # Same float32 forward on the same inputs under the same generator state: bit for bit.
    np.testing.assert_array_equal(ours.loss, exp.loss)
    np.testing.assert_array_equal(ours.loss_ref, exp.loss_ref)
    for c in ("dist_sq", "update_sq", "grad_sq", "grad_sq_used"):
        np.testing.assert_allclose(ours[c], exp[c], rtol=1e-12, atol=0, err_msg=c)
    # Inner products of vectors much longer than the result: float64 round-off of the norms.
    tol = {
        "progress": 1e-13 * exp.dist_sq.max(),
        "grad_dot": 1e-13 * np.sqrt(exp.dist_sq * exp.grad_sq).max(),
        "grad_dot_used": 1e-13 * np.sqrt(exp.dist_sq * exp.grad_sq_used).max(),
    }
    for c, atol in tol.items():
        np.testing.assert_allclose(ours[c], exp[c], rtol=1e-10, atol=atol, err_msg=c)
    for c in ("gamma", "gamma_rp", "gamma_rc", "star", "cos_align"):
        np.testing.assert_allclose(ours[c], exp[c], rtol=1e-8, atol=1e-12, err_msg=c)


# Each optimizer's coupled weight decay λ (make_opt): folded into g for grad_*_wd; AdamW's is
# decoupled, so not folded (NaN).
DECAY = {"sgd": 0.0, "nesterov": 1e-3, "adamw": math.nan, "lbfgs": 0.0}


def assert_folded_match(ours: pd.DataFrame, exp: pd.DataFrame, lam: float) -> None:
    """grad_dot_wd = ⟨θ − θ*, g + λθ⟩, grad_sq_wd = ‖g + λθ‖² from the oracle's θ_k and raw g_k."""
    if math.isnan(lam):
        assert ours.grad_dot_wd.isna().all() and ours.grad_sq_wd.isna().all()
        return
    dot = exp.grad_dot + lam * exp.theta_dot
    sq = exp.grad_sq + 2 * lam * exp.grad_theta + lam * lam * exp.theta_sq
    np.testing.assert_allclose(ours.grad_dot_wd, dot, rtol=1e-10, atol=1e-13 * np.sqrt(exp.dist_sq * sq).max())
    np.testing.assert_allclose(ours.grad_sq_wd, sq, rtol=1e-10, atol=0)
    if lam == 0.0:
        assert ours.grad_dot_wd.equals(ours.grad_dot) and ours.grad_sq_wd.equals(ours.grad_sq)


def run_cell(spec: Spec, optim: str, kernel: str | None = None):
    """Plain, oracle and probed runs of one cell; returns (probe, oracle table, oracle)."""
    plain = train(spec, optim, Plain())
    oracle = Oracle()
    model = train(spec, optim, oracle)
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    probed = Probed(spec.loss_fn, reference=ref_state, kernel=kernel)
    model_p = train(spec, optim, probed)
    # Probing leaves the trajectory bit for bit as the unprobed run's (two independent runs).
    for (name, a), b in zip(plain.state_dict().items(), model_p.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    return probed.probe, oracle_table(spec, oracle, model, ref_state), oracle


OPTIMIZERS = ["sgd", "nesterov", "adamw", "lbfgs"]
# Not PyTorch's: GradScaler refuses closures, LBFGS re-evaluates its closure (no accumulation),
# and LBFGS flattens gradients with .view(-1), which channels-last gradients refuse.
UNSUPPORTED = {("lbfgs", "scaler"), ("lbfgs", "accumulation"), ("lbfgs", "channels_last")}
TABLE = [(o, c) for o in OPTIMIZERS for c in CONDITIONS if (o, c) not in UNSUPPORTED]


@pytest.mark.parametrize(("optim", "condition"), TABLE, ids=[f"{o}-{c}" for o, c in TABLE])
def test_table_matches_brute_force(optim, condition):
    spec = CONDITIONS[condition]()
    probe, expected, oracle = run_cell(spec, optim, kernel="torch" if optim == "nesterov" else None)
    assert_columns_match(probe.steps(), expected)
    assert_folded_match(probe.steps(), expected, DECAY[optim])
    skipped = probe.skipped()
    assert skipped.next_step.tolist() == oracle.skips
    assert len(probe.steps()) + len(skipped) == len(spec.attempts)
    if condition == "scaler":
        assert (
            len(skipped) == 2 and (skipped.micro_batches == 1).all() and skipped.loss.notna().all()
        )
    if condition == "clipping":
        # g_k is the raw gradient (DESIGN §1); the clipped one the optimizer received is
        # grad_*_used. (Before issue 21 grad_sq was the clipped one.)
        steps = probe.steps()
        assert (np.sqrt(expected.grad_sq_used) <= 0.05 * (1 + 1e-6)).all()
        assert (np.sqrt(expected.grad_sq) > 0.05 * 1.5).all()  # every step clipped
        assert (steps.grad_sq > steps.grad_sq_used * 2).all()
        np.testing.assert_allclose(
            steps.star, expected.grad_dot - (expected.loss - expected.loss_ref), rtol=1e-8
        )


@pytest.mark.parametrize("kernel", ["fused", "torch"])
def test_everything_at_once_on_a_dropout_transformer(kernel):
    """AdamW + warm-up/cosine + clipping + dropout + bf16 autocast + two unequal micro-batches
    + GradScaler with an overflow, probe.batch called before backward."""
    spec = everything()
    probe, expected, oracle = run_cell(spec, "adamw", kernel=kernel)
    assert_columns_match(probe.steps(), expected)
    assert oracle.skips == [2] and probe.skipped()[
        ["next_step", "micro_batches"]
    ].values.tolist() == [[2, 2]]
    assert probe.steps().lr.nunique() > 2  # the schedule is seen


def _closure_loop(model, opt, batches, probe, kwarg: bool):
    for b in batches:

        def closure(b=b):
            opt.zero_grad()
            loss = classify(model, b)
            loss.backward()
            return loss

        probe.batch(b)
        opt.step(closure=closure) if kwarg else opt.step(closure)


def test_closure_as_keyword_and_with_sgd():
    """The closure arrives as ``closure=`` too, and non-LBFGS optimizers evaluate it once."""
    data = [b for step in _data(8, [[8]] * 3) for b in step]
    tables = []
    for kwarg in (False, True):
        torch.manual_seed(0)
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        probe = gammatrace.Probe(model, opt, classify)
        _closure_loop(model, opt, data, probe, kwarg)
        tables.append(probe.steps())
    pd.testing.assert_frame_equal(*tables)
    assert (tables[0].grad_sq > 0).all() and len(tables[0]) == 3


# ----------------------------------------------------------------------------- unsupported cells


def test_lbfgs_with_gradscaler_is_a_clear_error():
    torch.manual_seed(0)
    model = MLP()
    opt = make_opt("lbfgs", model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    probe = gammatrace.Probe(model, opt, classify)
    ((b,),) = _data(9, [[8]])
    loss = classify(model, b)
    scaler.scale(loss).backward()
    probe.batch(b, loss)
    with pytest.raises(ProbeUsageError, match=r"LBFGS\.step\(\) needs a closure.*GradScaler"):
        scaler.step(opt)
    # And with the closure handed to GradScaler, PyTorch itself refuses.
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(opt, closure=lambda: classify(model, b))


def test_lbfgs_with_accumulation_is_a_clear_error():
    torch.manual_seed(0)
    model = MLP()
    opt = make_opt("lbfgs", model.parameters())
    probe = gammatrace.Probe(model, opt, classify)
    b1, b2 = _data(10, [[8, 5]])[0]
    probe.batch(b1)
    probe.batch(b2)
    with pytest.raises(ProbeUsageError, match="after 2 probe.batch calls.*accumulation"):
        opt.step(lambda: classify(model, b1))


def test_lbfgs_with_channels_last_fails_as_without_the_probe():
    spec = CONDITIONS["channels_last"]()
    for obs in (Plain(), Probed(classify)):
        with pytest.raises(RuntimeError, match="view size is not compatible"):
            train(spec, "lbfgs", obs)


# ----------------------------------------------------------------------------- matched randomness


def _matched_loop(model, opt, data, probe=None, keep=()):
    """Dropout + bf16 autocast + two micro-batches; returns θ (state dicts) before ``keep``."""
    kept = {}
    torch.manual_seed(1)
    for k, micro in enumerate(data):
        if k in keep:
            kept[k] = {n: v.clone() for n, v in model.state_dict().items()}
        opt.zero_grad()
        for b in micro:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = classify(model, b)
            (loss / 2).backward()
            if probe is not None:
                probe.batch(b, loss)
        opt.step()
    return kept


@pytest.mark.parametrize("k", [0, 4])
def test_reference_forward_replays_dropout_masks_and_autocast(k):
    """θ* = θ_k: the reference loss at step k is the training loss bit for bit."""
    data = _data(11, [[8, 8]] * 6)

    def build():
        torch.manual_seed(0)
        model = MLP(dropout=0.5)
        return model, torch.optim.AdamW(model.parameters(), lr=0.01)

    model, opt = build()
    theta_k = _matched_loop(model, opt, data, keep=(k,))[k]
    model_p, opt_p = build()
    probe = gammatrace.Probe(model_p, opt_p, classify, reference=theta_k)
    _matched_loop(model_p, opt_p, data, probe)
    steps = probe.steps()
    assert steps.loss_ref.iloc[k] == steps.loss.iloc[k]
    assert (steps.loss_ref != steps.loss).sum() == len(steps) - 1
    for a, b in zip(model.parameters(), model_p.parameters(), strict=True):
        assert torch.equal(a, b)  # the reference forwards drew nothing from the live stream
    # The test has teeth: other masks, or float32, give another loss.
    ref = MLP(dropout=0.5)
    ref.load_state_dict(theta_k)
    b = data[k][0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        other_masks = float(classify(ref, b))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        ref.eval()
        fp32 = float(classify(ref, b))
    assert steps.loss.iloc[k] not in (other_masks, fp32)


# ------------------------------------------------------------------- the consistency check


def _one_step(model, opt, probe, b, given=None):
    opt.zero_grad()
    loss = classify(model, b)
    loss.backward()
    probe.batch(b if given is None else given[0], loss if given is None else given[1])
    opt.step()


def _mlp_and_opt(dropout=0.0):
    torch.manual_seed(0)
    model = MLP(dropout)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_check_names_a_loss_divided_by_accumulation_steps():
    model, opt = _mlp_and_opt(dropout=0.2)
    probe = gammatrace.Probe(model, opt, classify)
    b1, b2 = _data(12, [[8, 8]])[0]
    opt.zero_grad()
    loss = classify(model, b1) / 2
    loss.backward()
    with pytest.raises(ConsistencyError, match=r"1/2 of it.*accumulation") as err:
        probe.batch(b1, loss)
    assert "\n" not in str(err.value)


def test_check_names_a_wrong_batch_and_never_touches_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = gammatrace.Probe(model, opt, classify)
    b1, b2 = _data(13, [[8, 8]])[0]
    loss = classify(model, b1)
    loss.backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ConsistencyError, match="pass probe.batch the batch this loss was computed on"
    ):
        probe.batch(b2, loss)
    for k, v in model.state_dict().items():  # batch-norm statistics included
        assert torch.equal(v, before[k]), k


def test_check_names_autocast_the_probe_did_not_see():
    """A probe attached between the forward and the step saw no forward: the reference runs
    in float32, the loss was bf16, and the check says so."""
    model, opt = _mlp_and_opt()
    ((b,),) = _data(14, [[8]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = classify(model, b)
    loss.backward()
    probe = gammatrace.Probe(model, opt, classify)
    with (
        pytest.warns(RuntimeWarning, match="saw no forward"),
        pytest.raises(
            ConsistencyError,
            match=r"computed under autocast \(torch.bfloat16\): autocast was applied outside",
        ),
    ):
        probe.batch(b, loss)


def test_check_schedule():
    """check=True: steps 0, 1, 2, 4, 8, … and the first and last step of every epoch (issue
    21: before, the first step only); check=N: also every N-th step; check=False: never."""
    data = [step[0] for step in _data(15, [[8, 8]] * 12)]

    def run(check, wrong_at, epoch_len=None, steps=4):
        model, opt = _mlp_and_opt()
        probe = gammatrace.Probe(model, opt, classify, check=check)
        for k, b in enumerate(data[:steps]):
            other = data[(k + 1) % len(data)]
            opt.zero_grad()
            loss = classify(model, b)
            loss.backward()
            probe.batch(other if k == wrong_at else b, loss)
            opt.step()
            if epoch_len and (k + 1) % epoch_len == 0:
                probe.end_epoch()
        return probe

    for k in (1, 2):  # beyond step 0 by default
        with pytest.raises(ConsistencyError, match=f"at step {k}"):
            run(True, wrong_at=k)
    assert len(run(True, wrong_at=3).steps()) == 4  # not a checked step
    with pytest.raises(ConsistencyError, match="at step 3"):
        run(3, wrong_at=3)
    # Epochs of 5 steps: 5 (the first of epoch 1), 9 (its last, predicted from epoch 0), 10.
    for k in (5, 9, 10):
        with pytest.raises(ConsistencyError, match=f"at step {k}"):
            run(True, wrong_at=k, epoch_len=5, steps=12)
    for k in (3, 6, 7, 11):
        assert len(run(True, wrong_at=k, epoch_len=5, steps=12).steps()) == 12
    assert len(run(False, wrong_at=0).steps()) == 4
    with pytest.raises(ValueError, match="check must be"):
        gammatrace.Probe(*_mlp_and_opt(), classify, check=0)


# ----------------------------------------------------------------------------- skipped steps


def test_skips_with_accumulation_and_zeroed_gradients():
    """set_to_none=False (gradients zeroed, not dropped), two micro-batches, overflow at
    attempts 1 and 2: two skips of two micro-batches each, no row and no NaN for them."""
    spec = Spec(
        MLP, _data(16, [[8, 5]] * 5), scaler=True, overflow=frozenset({1, 2}), set_to_none=False
    )
    probe, expected, oracle = run_cell(spec, "nesterov")
    assert_columns_match(probe.steps(), expected)
    assert probe.skipped()[["next_step", "micro_batches"]].values.tolist() == [[1, 2], [1, 2]]


class MLPWithUnusedTail(MLP):
    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(2, 2)  # the last trainable tensors; no loss reaches them


def test_skips_detected_when_the_last_parameter_is_never_reached():
    spec = Spec(MLPWithUnusedTail, _data(29, [[8]] * 6), scaler=True, overflow=frozenset({2, 3}))
    probe, expected, oracle = run_cell(spec, "adamw")
    assert_columns_match(probe.steps(), expected)
    assert probe.skipped().next_step.tolist() == oracle.skips == [2, 2]
    assert probe._sentinel is probe.params[-3]  # fc2.bias, the last tensor the loss reaches


def test_ten_skips_in_a_row_warn():
    model, opt = _mlp_and_opt()
    probe = gammatrace.Probe(model, opt)
    ((b,),) = _data(17, [[8]])
    with pytest.warns(RuntimeWarning, match="10 optimizer steps in a row were skipped"):
        for _ in range(12):
            opt.zero_grad()
            loss = classify(model, b)
            loss.backward()
            probe.batch(b, loss)  # and never a step
    assert len(probe.skipped()) == 11 and probe.steps().empty


def test_fused_optimizer_under_gradscaler():
    """A fused AdamW is stepped by GradScaler with scaled gradients (it unscales and skips
    internally): the probe still reads g_k unscaled and records the overflow as skipped."""
    data = _data(18, [[8]] * 4)
    runs = {}
    for probed in (False, True):
        torch.manual_seed(0)
        model = MLP()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        probe = gammatrace.Probe(model, opt) if probed else None
        grads = []
        for k, ((b,),) in enumerate(zip(data, strict=True)):
            opt.zero_grad()
            loss = classify(model, b)
            scaler.scale(loss).backward()
            if k == 1:
                model.fc1.weight.grad.view(-1)[0] = float("inf")
            grads.append(flat64(p.grad / scaler.get_scale() for p in model.parameters()))
            if probe is not None:
                probe.batch(b, loss)
            scaler.step(opt)
            scaler.update()
        runs[probed] = (model, probe, grads)
    (plain, _, grads), (model, probe, _) = runs[False], runs[True]
    assert all(
        torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters(), strict=True)
    )
    np.testing.assert_allclose(
        probe.steps().grad_sq, [g @ g for k, g in enumerate(grads) if k != 1], rtol=1e-12
    )
    assert probe.skipped().next_step.tolist() == [1]


# ----------------------------------------------------------------------------- misuse


def test_step_without_batch_and_double_step_are_clear_errors():
    model, opt = _mlp_and_opt()
    probe = gammatrace.Probe(model, opt)
    ((b,),) = _data(19, [[8]])
    loss = classify(model, b)
    loss.backward()
    with pytest.raises(ProbeUsageError, match="no probe.batch for this step.*probe.batch"):
        opt.step()
    probe.step(loss, b)
    with pytest.raises(ProbeUsageError, match="called again.*probe.step already steps"):
        opt.step()
    assert len(probe.steps()) == 1


def test_float_loss_is_accepted_and_other_types_are_refused():
    ((b,),) = _data(20, [[8]])
    tables = []
    for as_float in (False, True):
        model, opt = _mlp_and_opt()
        probe = gammatrace.Probe(model, opt, classify)
        loss = classify(model, b)
        loss.backward()
        probe.batch(b, loss.item() if as_float else loss)
        opt.step()
        tables.append(probe.steps())
    pd.testing.assert_frame_equal(*tables)
    with pytest.raises(ProbeUsageError, match="must be a tensor or a float, got str"):
        probe.batch(b, "0.5")


def test_batch_without_loss_needs_a_closure():
    model, opt = _mlp_and_opt()
    probe = gammatrace.Probe(model, opt)
    ((b,),) = _data(21, [[8]])
    classify(model, b).backward()
    probe.batch(b)
    with pytest.raises(ProbeUsageError, match="without a loss.*no closure"):
        opt.step()


@pytest.mark.parametrize("change", ["freeze", "unfreeze"])
def test_requires_grad_change_is_refused_naming_the_parameter(change):
    model, opt = _mlp_and_opt()
    if change == "unfreeze":
        model.fc2.bias.requires_grad_(False)
    probe = gammatrace.Probe(model, opt)
    ((b,),) = _data(22, [[8]])
    for k in range(3):
        if k == 2:
            model.fc2.bias.requires_grad_(change == "unfreeze")
        opt.zero_grad()
        loss = classify(model, b)
        loss.backward()
        probe.batch(b, loss)
        if k == 2:
            word = "started" if change == "unfreeze" else "stopped"
            with pytest.raises(
                ProbeUsageError, match=f"parameter 'fc2.bias' {word} requiring grad"
            ) as err:
                opt.step()
            assert "\n" not in str(err.value)
        else:
            opt.step()


def test_dropped_or_replaced_probe_releases_the_optimizer():
    model, opt = _mlp_and_opt()
    ((b,),) = _data(23, [[8]])
    probe = gammatrace.Probe(model, opt)
    with pytest.warns(UserWarning, match="earlier one is detached"):
        second = gammatrace.Probe(model, opt)
    classify(model, b).backward()
    second.batch(b, 1.0)
    opt.step()  # the first probe no longer demands its own probe.batch
    del probe, second
    gc.collect()
    opt.step()  # nor does a dropped one
    clone = copy.deepcopy(model)  # a copy carries no working hook either
    classify(clone, b).backward()


def test_hooked_model_pickles_and_a_failed_step_does_not_wedge_the_probe():
    model, opt = _mlp_and_opt()
    probe = gammatrace.Probe(model, opt, classify)
    restored = pickle.loads(pickle.dumps(model))  # torch.save(model) pickles the hooks too
    data = [step[0] for step in _data(28, [[8]] * 3)]
    assert torch.equal(restored(data[0][0]), model(data[0][0]))
    calls = []

    def closure(b):
        opt.zero_grad()
        loss = classify(model, b)
        loss.backward()
        if not calls:
            calls.append(1)
            raise FloatingPointError("the loop's own error, inside the step")
        return loss

    for k, b in enumerate(data):
        probe.batch(b)
        if k == 0:
            with pytest.raises(FloatingPointError):
                opt.step(lambda b=b: closure(b))
        else:
            opt.step(lambda b=b: closure(b))
    assert probe.steps().step.tolist() == [0, 1]

    def batch_inside(b=data[0]):
        probe.batch(b)
        return classify(model, b)

    probe.batch(data[0])
    with pytest.raises(ProbeUsageError, match="inside optimizer.step"):
        opt.step(batch_inside)


# ----------------------------------------------------------------------------- robustness


class SparseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 4, sparse=True)
        self.head = nn.Linear(4, 3)

    def forward(self, idx):
        return self.head(self.emb(idx).mean(1))


@pytest.mark.parametrize("kernel", ["fused", "torch"])
def test_sparse_gradients_on_both_kernels(kernel):
    g = torch.Generator().manual_seed(24)
    data = [
        [(torch.randint(0, 20, (8, 3), generator=g), torch.randint(0, 3, (8,), generator=g))]
        for _ in range(4)
    ]
    spec = Spec(SparseNet, data)
    probe, expected, _ = run_cell(spec, "sgd", kernel=kernel)
    assert probe.params[0].grad.is_sparse
    assert_columns_match(probe.steps(), expected)


def test_submodule_modes_are_copied_module_by_module():
    """A frozen batch norm in eval mode inside a training model: at θ* = θ_0 the reference
    loss at step 0 equals the loss (a copy put wholesale in train mode would use batch
    statistics instead)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    for p in model[1].parameters():
        p.requires_grad_(False)
    model.train()
    model[1].eval()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    probe = gammatrace.Probe(
        model, opt, classify, reference={k: v.clone() for k, v in model.state_dict().items()}
    )
    for (b,) in _data(25, [[8]] * 2):
        _one_step(model, opt, probe, b)
    steps = probe.steps()
    assert steps.loss_ref.iloc[0] == steps.loss.iloc[0]


def test_compiled_model_and_prefixed_state_dicts():
    """torch.compile'd model, reference with and without the ``_orig_mod.`` prefix: the same
    rows and tensor names as the eager model."""
    data = _data(26, [[8]] * 3)

    def run(compiled: bool, prefixed: bool):
        model, opt = _mlp_and_opt(dropout=0.2)
        torch.manual_seed(5)
        target = MLP(dropout=0.2).state_dict()
        if prefixed:
            target = {f"_orig_mod.{k}": v for k, v in target.items()}
        net = torch.compile(model, backend="eager") if compiled else model
        probe = gammatrace.Probe(net, opt, classify, reference=target)
        torch.manual_seed(1)
        for (b,) in data:
            _one_step(net, opt, probe, b)
        return probe

    eager = run(False, False)
    for compiled, prefixed in ((True, False), (True, True), (False, True)):
        probe = run(compiled, prefixed)
        pd.testing.assert_frame_equal(probe.steps(), eager.steps())
        assert probe.names == eager.names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_tied_weights_are_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5)
            self.head = nn.Linear(5, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.emb(idx).mean(1))

    g = torch.Generator().manual_seed(27)
    data = [
        [(torch.randint(0, 7, (8, 3), generator=g), torch.randint(0, 7, (8,), generator=g))]
        for _ in range(3)
    ]
    probe, expected, _ = run_cell(Spec(Tied, data), "adamw")
    assert probe.names == ["emb.weight"]
    assert_columns_match(probe.steps(), expected)


# ----------------------------------------------------------------------------- docs and cost


@pytest.mark.parametrize("module", ["probe", "matched", "kernels", "check", "table", "state"])
def test_docstring_examples_run(module):
    mod = importlib.import_module(f"gammatrace.probe.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_hooks_cost_microseconds():
    """The per-forward and per-backward hooks, timed alone (generous bound: shared machine)."""
    model, opt = _mlp_and_opt(dropout=0.1)
    probe = gammatrace.Probe(model, opt, classify)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        probe._fwd_stale = True
        probe._on_forward(model, ())
        probe._on_grad(None)
        probe._on_accumulated(None)
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 50e-6, per_call


# ------------------------------------------------- issue 21: pickles and the check after step 0


def test_probed_model_pickles_without_any_gammatrace_object(tmp_path):
    """torch.save(model) + torch.load, with the probe attached and after it is closed: the
    pickle holds no gammatrace global (issue 21, item 5: it held probe._dead_hook, the model's
    forward pre-hook, and torch.load with weights_only failed on it)."""
    model, opt = _mlp_and_opt(dropout=0.1)
    probe = gammatrace.Probe(
        model, opt, classify, reference={k: v.clone() for k, v in model.state_dict().items()}
    )
    data = [step[0] for step in _data(30, [[8]] * 4)]
    x = data[0][0]
    for state, b in zip(("attached", "closed"), data[:2], strict=True):
        _one_step(model, opt, probe, b)
        path = tmp_path / f"{state}.pt"
        torch.save(model, path)
        assert b"gammatrace" not in path.read_bytes(), state
        assert b"gammatrace" not in pickle.dumps(model), state
        model.eval()
        expected = model(x)
        model.train()
        for weights_only in (False, True):
            with torch.serialization.safe_globals([MLP, nn.Linear, nn.Dropout]):
                restored = torch.load(path, weights_only=weights_only)
            restored.eval()
            assert torch.equal(restored(x), expected), (state, weights_only)
            assert not restored._forward_pre_hooks
        probe.close()
    assert len(probe.steps()) == 1  # the second step ran after close
    _one_step(model, opt, gammatrace.Probe(model, opt, classify), data[2])  # still attachable


def test_forward_hook_is_global_and_invisible_to_torch_compile():
    """The probe's forward hook is torch's global module pre-hook, filtered to the probed
    model: a compiled model elsewhere in the process traces through it without error, and a
    compiled probed model still has its forward seen (the reference forward replays its
    dropout masks: backend="eager" keeps the eager RNG)."""
    model, opt = _mlp_and_opt()
    probe = gammatrace.Probe(model, opt, classify)
    assert not model._forward_pre_hooks and not any(m._forward_pre_hooks for m in model.modules())
    other = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that global hooks exist
        compiled_other = torch.compile(other, backend="eager")
        torch.testing.assert_close(compiled_other(x), other(x))
    torch.manual_seed(5)
    target = MLP(dropout=0.3).state_dict()
    for compiled in (False, True):
        m, o = _mlp_and_opt(dropout=0.3)
        net = torch.compile(m, backend="eager") if compiled else m
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = gammatrace.Probe(net, o, classify, reference=target)
            torch.manual_seed(1)
            for (b,) in _data(31, [[8]] * 3):
                _one_step(net, o, p, b)
        # Neither "saw no forward" nor torch's note on global hooks (the probe's own, about the
        # call it watches).
        assert not [str(w.message) for w in caught], compiled
        rows = p.steps()
        if not compiled:
            eager_rows = rows
        p.close()
    pd.testing.assert_frame_equal(rows, eager_rows)
    probe.close()
    from gammatrace.probe import probe as probe_module

    gc.collect()
    assert not probe_module._WATCHED and not probe_module._GLOBAL_HOOK  # removed with the last


class LSTMLM(nn.Module):
    VOCAB, WIDTH = 11, 16

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(self.VOCAB, 8)
        self.lstm = nn.LSTM(8, self.WIDTH, batch_first=True)
        self.head = nn.Linear(self.WIDTH, self.VOCAB)

    def forward(self, tokens, hidden=None):
        out, hidden = self.lstm(self.emb(tokens), hidden)
        return self.head(out), hidden


def lm_loss(model, batch):
    """batch = (x, y) or (x, y, hidden): the hidden state travels in the batch."""
    x, y, *state = batch
    logits, _ = model(x, *state)
    return F.cross_entropy(logits.reshape(-1, LSTMLM.VOCAB), y.reshape(-1))


class HandSGD(torch.optim.Optimizer):
    """A hand-written SGD update (as an LSTM LM script writes it), inside an Optimizer so that
    its step is a step."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def bptt(with_state: bool, probe_factory=None, record=None, steps=8, bptt_len=5, clip=0.1):
    """An LSTM LM with truncated BPTT: the hidden state is carried (detached) from step to
    step and starts at zero; clipping; a hand-written SGD update."""
    torch.manual_seed(0)
    model = LSTMLM()
    opt = HandSGD(model.parameters(), lr=1.0)
    probe = probe_factory(model, opt) if probe_factory else None
    g = torch.Generator().manual_seed(32)
    stream = torch.randint(0, LSTMLM.VOCAB, (4, steps * bptt_len + 1), generator=g)
    hidden = (torch.zeros(1, 4, LSTMLM.WIDTH), torch.zeros(1, 4, LSTMLM.WIDTH))
    params = list(model.parameters())
    for k in range(steps):
        x = stream[:, k * bptt_len : (k + 1) * bptt_len]
        y = stream[:, k * bptt_len + 1 : (k + 1) * bptt_len + 1]
        batch = (x, y, hidden) if with_state else (x, y)
        opt.zero_grad()
        logits, new_hidden = model(x, hidden)
        loss = F.cross_entropy(logits.reshape(-1, LSTMLM.VOCAB), y.reshape(-1))
        loss.backward()
        if record is not None:
            record.append({"theta": flat64(params), "raw": flat64(p.grad for p in params),
                           "batch": batch, "loss": float(loss.detach().double())})
        nn.utils.clip_grad_norm_(params, clip)
        if record is not None:
            record[-1]["used"] = flat64(p.grad for p in params)
        if probe is not None:
            probe.batch(batch, loss)
        opt.step()
        hidden = tuple(h.detach() for h in new_hidden)
    return model, probe


def test_check_after_step_0_names_a_hidden_state_the_batch_lacks():
    """The batch given to probe.batch lacks the LSTM's hidden state: fine at step 0 (the state
    is zero, as loss_fn recomputes it), wrong from step 1 on; the check runs beyond step 0 by
    default and names it (issue 21, item 6: it ran at step 0 only and this went unnoticed)."""
    with pytest.raises(ConsistencyError) as err:
        bptt(False, lambda m, o: gammatrace.Probe(m, o, lm_loss))
    msg = str(err.value)
    assert "at step 1" in msg and "recurrent hidden state" in msg and "2 positional arguments" in msg
    assert "a tuple of 2 tensors [1, 4, 16], [1, 4, 16]" in msg and "\n" not in msg
    # A hidden state in the batch, but the one after the forward instead of before it.
    with pytest.raises(ConsistencyError, match=r"at step \d+.*argument 2 of the model's forward"):
        _stale_state_loop()


def _stale_state_loop():
    torch.manual_seed(0)
    model = LSTMLM()
    opt = HandSGD(model.parameters(), lr=1.0)
    probe = gammatrace.Probe(model, opt, lm_loss)
    g = torch.Generator().manual_seed(32)
    stream = torch.randint(0, LSTMLM.VOCAB, (4, 41), generator=g)
    hidden = (torch.zeros(1, 4, LSTMLM.WIDTH), torch.zeros(1, 4, LSTMLM.WIDTH))
    for k in range(8):
        x, y = stream[:, k * 5 : (k + 1) * 5], stream[:, k * 5 + 1 : (k + 1) * 5 + 1]
        opt.zero_grad()
        logits, new_hidden = model(x, hidden)
        loss = F.cross_entropy(logits.reshape(-1, LSTMLM.VOCAB), y.reshape(-1))
        loss.backward()
        hidden = tuple(h.detach() for h in new_hidden)
        probe.batch((x, y, hidden), loss)  # the state after this forward: wrong
        opt.step()


@pytest.mark.parametrize("kernel", ["fused", "torch"])
def test_lstm_with_state_in_the_batch_matches_brute_force(kernel):
    """Truncated BPTT, hidden state in the batch, clipping every step, a hand-written update:
    every column against the brute force (raw and used gradients)."""
    record = []
    model, _ = bptt(True, record=record)
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    model_p, probe = bptt(
        True, lambda m, o: gammatrace.Probe(m, o, lm_loss, reference=ref_state, kernel=kernel)
    )
    for a, b in zip(model.parameters(), model_p.parameters(), strict=True):
        assert torch.equal(a, b)
    ref = LSTMLM()
    ref.load_state_dict(ref_state)
    star = flat64(ref.parameters())
    thetas = [r["theta"] for r in record] + [flat64(model.parameters())]
    rows = []
    for k, r in enumerate(record):
        with torch.no_grad():
            loss_ref = float(lm_loss(ref, r["batch"]).double())
        e, d = thetas[k] - star, thetas[k] - thetas[k + 1]
        rows.append({"loss": r["loss"], "loss_ref": loss_ref, "progress": e @ d - 0.5 * (d @ d),
                     "dist_sq": e @ e, "update_sq": d @ d, "grad_dot": e @ r["raw"],
                     "grad_sq": r["raw"] @ r["raw"], "grad_dot_used": e @ r["used"],
                     "grad_sq_used": r["used"] @ r["used"]})
    exp = pd.DataFrame(rows)
    ours = probe.steps()
    assert (exp.grad_sq > 3 * exp.grad_sq_used).all()  # clipped on every step
    np.testing.assert_array_equal(ours.loss, exp.loss)
    np.testing.assert_allclose(ours.loss_ref, exp.loss_ref, rtol=1e-6)
    for c in ("dist_sq", "update_sq", "grad_sq", "grad_sq_used"):
        np.testing.assert_allclose(ours[c], exp[c], rtol=1e-12, err_msg=c)
    for c, scale in (("progress", exp.dist_sq.max()),
                     ("grad_dot", np.sqrt(exp.dist_sq * exp.grad_sq).max()),
                     ("grad_dot_used", np.sqrt(exp.dist_sq * exp.grad_sq_used).max())):
        np.testing.assert_allclose(ours[c], exp[c], rtol=1e-10, atol=1e-13 * scale, err_msg=c)
    np.testing.assert_allclose(ours.star, exp.grad_dot - (exp.loss - ours.loss_ref), rtol=1e-8, atol=1e-12)
