"""Every online quantity against a brute-force reference on a tiny problem.

The brute force stores every iterate θ_k and gradient g_k in float64 and computes the
contract's columns the slow, obvious way; the probe (reference mode) and the
trainer's verified replay must agree with it.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gammatrace
from gammatrace.engine.session import build_session
from tests.conftest import tiny_config


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


class Recorder:
    """A stand-in for Probe with the same step() signature that stores everything.

    ``grads`` are the raw gradients g_k (DESIGN §1): each tensor's .grad copied by its own
    post-accumulate-grad hook, i.e. as the backward left it, before the loop clips;
    ``used`` are the gradients the optimizer received (read at step())."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.thetas, self.grads, self.losses, self.lrs, self.batches = [], [], [], [], []
        self.used, self._raw = [], {}
        for p in self.params:
            p.register_post_accumulate_grad_hook(lambda q: self._raw.__setitem__(id(q), q.grad.detach().clone()))

    def step(self, loss, batch=None, **_):
        self.thetas.append(flat(self.params))
        self.grads.append(flat([self._raw.get(id(p), torch.zeros_like(p)) for p in self.params]))
        self.used.append(flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]))
        self._raw = {}
        self.losses.append(float(loss.detach()))
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        self.batches.append(tuple(t.clone() for t in batch))
        self.optimizer.step()

    def end_epoch(self):
        pass


def brute_force(rec: Recorder, model: nn.Module, loss_fn, theta_T: torch.Tensor, ref_state) -> pd.DataFrame:
    """The contract's raw columns from stored iterates, one obvious formula each."""
    ref_model = copy.deepcopy(model)
    ref_model.load_state_dict(ref_state)
    ref_model.train()
    rows = []
    thetas = [*rec.thetas, theta_T]
    theta_star = flat([ref_state[n] for n, p in model.named_parameters() if p.requires_grad])
    for k, batch in enumerate(rec.batches):
        with torch.no_grad():
            loss_ref = float(loss_fn(ref_model, batch).mean())
        e = thetas[k] - theta_star
        delta = thetas[k] - thetas[k + 1]
        rows.append({
            "loss": rec.losses[k], "loss_ref": loss_ref, "lr": rec.lrs[k],
            "progress": float(e @ delta - 0.5 * delta @ delta),
            "progress_identity": 0.5 * (float(e @ e) - float((thetas[k + 1] - theta_star) @ (thetas[k + 1] - theta_star))),
            "dist_sq": float(e @ e), "update_sq": float(delta @ delta),
            "grad_dot": float(e @ rec.grads[k]), "grad_sq": float(rec.grads[k] @ rec.grads[k]),
            "grad_dot_used": float(e @ rec.used[k]), "grad_sq_used": float(rec.used[k] @ rec.used[k]),
            # "No Wrong Turns" (get_norm_dot_prod on the flattened parameters), raw g_k:
            # RSI_k = ⟨g_k, θ_k − θ*⟩ / ‖θ_k − θ*‖², EB_k = ‖g_k‖ / ‖θ_k − θ*‖.
            "rsi": float(rec.grads[k] @ e) / float(torch.linalg.vector_norm(e)) ** 2,
            "eb": float(torch.linalg.vector_norm(rec.grads[k])) / float(torch.linalg.vector_norm(e)),
        })
    return pd.DataFrame(rows)


OPTIMIZERS = [
    {"name": "sgd", "lr": 0.2, "weight_decay": 1e-3},
    {"name": "momentum", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    {"name": "adam", "lr": 0.01, "weight_decay": 1e-3},
]


def _config(optim: dict, batchnorm: bool) -> dict:
    return tiny_config(optim=optim, schedule={"name": "step", "step_epochs": 1, "factor": 0.5}, epochs=3,
                       model={"batchnorm": batchnorm})


def _brute(cfg_dict):
    """Run the trainer's own epoch code with a Recorder; return (recorder, session, θ_T)."""
    cfg = gammatrace.RunConfig.model_validate(cfg_dict)
    sess = build_session(cfg)
    rec = Recorder(sess.model, sess.optimizer)
    for e in range(cfg.epochs):
        sess.run_epoch(e, rec, check_finite=True)
    return rec, sess, flat([p for p in sess.model.parameters() if p.requires_grad])


def _compare(ours: pd.DataFrame, expected: pd.DataFrame) -> None:
    scale = expected["dist_sq"].max()
    np.testing.assert_array_equal(ours["loss"].to_numpy(), expected["loss"].to_numpy())
    np.testing.assert_array_equal(ours["lr"].to_numpy(), expected["lr"].to_numpy())
    # Same float32 kernels on the same inputs: the reference loss agrees to float32 rounding.
    np.testing.assert_allclose(ours["loss_ref"], expected["loss_ref"], rtol=1e-6, atol=1e-7)
    for col in ("dist_sq", "update_sq", "grad_sq", "grad_sq_used"):
        np.testing.assert_allclose(ours[col], expected[col], rtol=1e-12, atol=0)
    # Inner products that can be tiny compared to the squared norms: absolute float64 tolerance.
    for col in ("progress", "grad_dot", "grad_dot_used"):
        np.testing.assert_allclose(ours[col], expected[col], rtol=1e-10, atol=1e-13 * scale)
    # The identity P_k = ½(d_k² − d_{k+1}²) to float64 round-off of the squared distances.
    np.testing.assert_allclose(ours["progress"], expected["progress_identity"], rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("optim", OPTIMIZERS, ids=[o["name"] for o in OPTIMIZERS])
def test_replay_matches_brute_force(tmp_path, optim, batchnorm):
    cfg = _config(optim, batchnorm)
    rec, sess, theta_T = _brute(cfg)
    run = gammatrace.train(cfg, out=tmp_path / "run", progress=False)
    assert run.status == "complete"
    final = torch.load(run.path / "final.pt", weights_only=True)["model"]
    # The recorded trajectory is the brute-force one, bit for bit.
    assert torch.equal(flat([final[n] for n, p in sess.model.named_parameters() if p.requires_grad]), theta_T)
    expected = brute_force(rec, sess.model, sess.loss_fn, theta_T, final)
    steps = run.steps("last")
    assert len(steps) == len(expected) == 3 * 3
    _compare(steps, expected)
    # Derived columns: formulas of DESIGN §1 applied to the brute-force values.
    d0 = expected["dist_sq"].iloc[0]
    gap = expected["loss"] - expected["loss_ref"]
    gamma = np.where(gap > 1e-8, expected["progress"] / (expected["lr"] * d0 * gap), np.nan)
    np.testing.assert_allclose(steps["gamma"], gamma, rtol=1e-6)
    np.testing.assert_allclose(steps["gamma_rp"], expected["progress"] / (expected["lr"] * expected["loss"]) / d0, rtol=1e-9)
    np.testing.assert_allclose(steps["gamma_rc"], expected["progress"] / (expected["lr"] * expected["dist_sq"]), rtol=1e-9)
    np.testing.assert_allclose(steps["star"], expected["grad_dot"] - gap, rtol=1e-6, atol=1e-7)
    cos = (expected["progress"] + 0.5 * expected["update_sq"]) / np.sqrt(expected["dist_sq"] * expected["update_sq"])
    np.testing.assert_allclose(steps["cos_align"], cos, rtol=1e-9)
    # RSI and EB from the stored θ_k, θ*, g_k (grad_dot's absolute tolerance, divided by d_k²).
    np.testing.assert_allclose(steps["rsi"], expected["rsi"], rtol=1e-9, atol=1e-13 * d0 / expected["dist_sq"].min())
    np.testing.assert_allclose(steps["eb"], expected["eb"], rtol=1e-9)
    # Per-tensor progress sums to P_k.
    tensors = run.tensor_steps("last")
    np.testing.assert_allclose(tensors.groupby("step")["progress"].sum().to_numpy(), steps["progress"],
                               rtol=1e-10, atol=1e-13 * d0)
    # Record mode (pass 1): ‖Δ‖², ‖g‖², ‖θ_k − θ_0‖².
    record = run.record_steps()
    np.testing.assert_allclose(record["update_sq"], expected["update_sq"], rtol=1e-12)
    np.testing.assert_allclose(record["grad_sq"], expected["grad_sq"], rtol=1e-12)
    dist0 = [float((t - rec.thetas[0]) @ (t - rec.thetas[0])) for t in rec.thetas]
    np.testing.assert_allclose(record["dist0_sq"], dist0, rtol=1e-12, atol=0)


def test_trainer_with_clipping_records_the_raw_gradient(tmp_path):
    """The engine's own trainer with optim.clip_grad_norm clipping every step (issue 21, item
    1): grad_sq, grad_dot and star hold the raw gradient of ℓ_k (DESIGN §1), both passes;
    grad_*_used the clipped one the optimizer received. Before, grad_sq was the clipped one."""
    cfg = tiny_config(optim={"name": "momentum", "lr": 0.1, "momentum": 0.9, "clip_grad_norm": 0.05}, epochs=2)
    rec, sess, theta_T = _brute(cfg)
    run = gammatrace.train(cfg, out=tmp_path / "run", progress=False)
    final = torch.load(run.path / "final.pt", weights_only=True)["model"]
    assert torch.equal(flat([final[n] for n, p in sess.model.named_parameters() if p.requires_grad]), theta_T)
    expected = brute_force(rec, sess.model, sess.loss_fn, theta_T, final)
    assert (np.sqrt(expected["grad_sq_used"]) <= 0.05 * (1 + 1e-6)).all()
    assert (np.sqrt(expected["grad_sq"]) > 0.1).all()  # every step clipped
    steps = run.steps("last")
    _compare(steps, expected)
    gap = expected["loss"] - expected["loss_ref"]
    np.testing.assert_allclose(steps["star"], expected["grad_dot"] - gap, rtol=1e-6, atol=1e-7)
    record = run.record_steps()
    np.testing.assert_allclose(record["grad_sq"], expected["grad_sq"], rtol=1e-12)


def _user_loop(model, opt, data, probe=None, sched=None):
    """A plain user training loop; the probe (if any) wraps optimizer.step()."""
    x, y = data
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    for _epoch in range(2):
        for s in range(0, len(x), 16):
            batch = (x[s:s + 16], y[s:s + 16])
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            probe.step(loss, batch) if probe is not None else opt.step()
            if sched is not None:
                sched.step()
        if probe is not None:
            probe.end_epoch()
    return loss_fn


def _user_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Linear(10, 3), nn.Linear(3, 3))
    model[4].weight.requires_grad_(False)  # a frozen tensor is not part of θ
    return model


def _user_opt(model):
    # Two parameter groups with their own weight decay; the frozen tensor is in neither.
    first, rest = list(model[0].parameters()) + list(model[1].parameters()), list(model[3].parameters()) + [model[4].bias]
    opt = torch.optim.SGD([{"params": first, "weight_decay": 1e-2}, {"params": rest}], lr=0.1, momentum=0.5)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


KERNELS = ["fused", "torch"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_probe_in_user_loop_matches_brute_force(kernel):
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g))
    # Pass A: plain loop, storing every iterate via a recorder wrapped around opt.step.
    model = _user_model()
    opt, sched = _user_opt(model)
    rec = Recorder(model, opt)
    loss_fn = _user_loop(model, opt, data, probe=rec, sched=sched)
    theta_T = flat([p for p in model.parameters() if p.requires_grad])
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    # Pass B: the same loop with the probe in reference mode.
    model_b = _user_model()
    opt_b, sched_b = _user_opt(model_b)
    probe = gammatrace.Probe(model_b, opt_b, loss_fn, reference=ref_state, kernel=kernel)
    _user_loop(model_b, opt_b, data, probe=probe, sched=sched_b)
    # Probing does not change the trajectory (BN statistics included).
    for (k, a), b in zip(model.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    expected = brute_force(rec, model, loss_fn, theta_T, ref_state)
    steps = probe.steps()
    assert steps["epoch"].tolist() == [0] * 3 + [1] * 3
    assert len(set(steps["lr"])) == 2  # the scheduler's decay is seen
    _compare(steps, expected)
    assert "4.weight" not in set(probe.tensor_steps()["tensor"])


@pytest.mark.parametrize("kernel", KERNELS)
def test_least_squares_closed_form(kernel):
    """Full-batch GD on over-parameterised least squares with known θ* = X⁺y.

    ⟨θ − θ*, ∇f⟩ = 2(f − f*) and γ_k = (2 − ½η‖∇f‖²/f) / D_0² in closed form.
    """
    rng = np.random.default_rng(0)
    n, d, lr = 6, 15, 0.05
    X, y = rng.standard_normal((n, d)), rng.standard_normal(n)
    theta_star = np.linalg.pinv(X) @ y  # GD from 0 converges to the min-norm interpolant
    model = nn.Linear(d, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    loss_fn = lambda m, b: ((m(b[0]).squeeze(1) - b[1]) ** 2).mean()  # noqa: E731
    probe = gammatrace.Probe(model, opt, loss_fn, reference={"weight": torch.from_numpy(theta_star[None, :])},
                             kernel=kernel)
    thetas = []
    for _ in range(40):
        thetas.append(model.weight.detach().numpy().ravel().copy())
        opt.zero_grad()
        loss = loss_fn(model, (Xt, yt))
        loss.backward()
        probe.step(loss, (Xt, yt))
    steps = probe.steps()
    f = np.array([np.mean((X @ t - y) ** 2) for t in thetas])
    grad = np.array([2 / n * X.T @ (X @ t - y) for t in thetas])
    d0_sq = float(theta_star @ theta_star)
    assert steps["loss_ref"].abs().max() < 1e-25
    np.testing.assert_allclose(steps["loss"], f, rtol=1e-12)
    np.testing.assert_allclose(steps["grad_dot"], 2 * (steps["loss"] - steps["loss_ref"]), rtol=1e-9)
    np.testing.assert_allclose(steps["star"], f, rtol=1e-9)  # s = ⟨e, ∇f⟩ − f = f
    closed = (2 - 0.5 * lr * (grad ** 2).sum(1) / f) / d0_sq
    np.testing.assert_allclose(steps["gamma"], closed, rtol=1e-9)
    assert (steps["gamma"] > 0).all() and steps["dist_sq"].is_monotonic_decreasing


class GradEatingSGD(torch.optim.SGD):
    """An optimizer that scribbles on .grad after stepping (as some in-place variants do)."""

    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(-3.0)
        return out


class _OddModel(nn.Module):
    """A channels-last conv (non-contiguous parameters), a head, and a branch the loss never reaches."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(3 * 4 * 4, 3)
        self.unused = nn.Linear(2, 2)  # g = None every step

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("kernel", KERNELS)
def test_probe_kernels_exact_on_awkward_parameters(kernel):
    """Non-contiguous parameters, a never-reached tensor, a float64 θ* off the float32 grid,
    and an optimizer that changes .grad inside step(): each kernel still matches the
    brute force (g_k is the gradient the loss produced, read before the step)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 2, 6, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731

    def build():
        torch.manual_seed(0)
        model = _OddModel().to(memory_format=torch.channels_last)
        return model, GradEatingSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)

    model, opt = build()
    assert not model.conv.weight.is_contiguous()
    # θ* in float64 with values no float32 holds: the probe must not round it.
    ref_state = {k: v.double() + 1e-9 * (1 + torch.arange(v.numel()).reshape(v.shape)) for k, v in model.state_dict().items()}

    def loop(model, opt, stepper):
        for s in range(0, 24, 8):
            batch = (x[s:s + 8], y[s:s + 8])
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            stepper.step(loss, batch)

    rec = Recorder(model, opt)
    loop(model, opt, rec)
    theta_T = flat([p for p in model.parameters() if p.requires_grad])
    model_b, opt_b = build()
    probe = gammatrace.Probe(model_b, opt_b, loss_fn, reference=ref_state, kernel=kernel)
    loop(model_b, opt_b, probe)
    assert torch.equal(flat(model_b.parameters()), flat(model.parameters()))
    _compare(probe.steps(), brute_force(rec, model, loss_fn, theta_T, ref_state))
    assert (probe.steps()["grad_sq"] > 0).all()
    if kernel == "fused":  # the float64 θ* is kept in float64, a float32 one would be narrowed
        assert {a.dtype for a in probe.kernel.anchor} == {torch.float64}


def test_probe_kernels_agree_in_record_mode():
    """Record mode (anchor θ_0) gives the same rows from both kernels, to float64 round-off."""
    g = torch.Generator().manual_seed(5)
    data = (torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g))
    tables = []
    for kernel in KERNELS:
        model = _user_model()
        opt, sched = _user_opt(model)
        probe = gammatrace.Probe(model, opt, kernel=kernel)
        _user_loop(model, opt, data, probe=probe, sched=sched)
        tables.append(probe.steps())
    fused, torch_ = tables
    assert list(fused.columns) == list(torch_.columns)
    np.testing.assert_array_equal(fused["loss"], torch_["loss"])
    for col in ("update_sq", "grad_sq", "dist0_sq"):
        np.testing.assert_allclose(fused[col], torch_[col], rtol=1e-13)
    assert fused["dist0_sq"].iloc[0] == 0.0 and (fused["dist0_sq"].iloc[1:] > 0).all()


def test_bfloat16_model_takes_torch_kernel_and_stays_exact():
    """bfloat16 parameters (no NumPy dtype): the torch kernel, still exact in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    probe = gammatrace.Probe(model, opt)
    assert type(probe.kernel).__name__ == "TorchKernel"
    x, y = torch.randn(16, 5, dtype=torch.bfloat16), torch.randn(16, 2, dtype=torch.bfloat16)
    thetas, grads = [], []
    for _ in range(4):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        thetas.append(flat(model.parameters()))
        grads.append(flat(p.grad for p in model.parameters()))
        probe.step(loss)
    thetas.append(flat(model.parameters()))
    steps = probe.steps()
    np.testing.assert_allclose(steps["update_sq"], [float((a - b) @ (a - b)) for a, b in zip(thetas[:-1], thetas[1:], strict=True)], rtol=1e-12)
    np.testing.assert_allclose(steps["grad_sq"], [float(g @ g) for g in grads], rtol=1e-12)
    np.testing.assert_allclose(steps["dist0_sq"], [float((t - thetas[0]) @ (t - thetas[0])) for t in thetas[:-1]], rtol=1e-12)
    assert (steps["update_sq"] > 0).all()


def test_probe_kernel_choice():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert type(gammatrace.Probe(model, opt).kernel).__name__ == "FusedKernel"
    half = nn.Linear(3, 2).to(torch.bfloat16)
    assert type(gammatrace.Probe(half, torch.optim.SGD(half.parameters(), lr=0.1)).kernel).__name__ == "TorchKernel"
    with pytest.raises(ValueError, match="fused"):
        gammatrace.Probe(half, torch.optim.SGD(half.parameters(), lr=0.1), kernel="fused")
    with pytest.raises(ValueError, match="unknown probe kernel 'cuda'"):
        gammatrace.Probe(model, opt, kernel="cuda")


def test_reference_errors():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="loss_fn"):
        gammatrace.Probe(model, opt, reference=model.state_dict())
    with pytest.raises(ValueError, match="lacks"):
        gammatrace.Probe(model, opt, lambda m, b: m(b).sum(), reference={"weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="shapes"):
        gammatrace.Probe(model, opt, lambda m, b: m(b).sum(), reference={"weight": torch.zeros(3, 3), "bias": torch.zeros(2)})
    with pytest.raises(ValueError, match="does not exist"):
        gammatrace.Probe(model, opt, lambda m, b: m(b).sum(), reference="/nonexistent/theta.pt")


def test_fused_kernels_compile_where_no_cache_can_be_written():
    """Numba refuses cache=True where it finds no writable cache location (here: code without a
    source file, the same error a read-only install gives); the kernels then compile per process."""
    from numba import njit

    from gammatrace.probe import _fused

    namespace: dict = {}
    exec("def f(x):\n    return x + 1", namespace)
    with pytest.raises(RuntimeError, match="no locator"):
        njit(cache=True)(namespace["f"])
    assert _fused._jit(namespace["f"])(1) == 2
