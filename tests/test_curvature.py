"""gammatrace.curvature against explicit Hessians of tiny models (float64), and the promise
that a measurement never changes the training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gammatrace import curvature


def mlp(batchnorm: bool = False, dropout: float = 0.0, width: int = 8, d_in: int = 5, classes: int = 3,
        seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(d_in, width)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(width))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def batch(n: int = 16, d_in: int = 5, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)


def per_sample_ce(m: nn.Module, b) -> torch.Tensor:  # per-sample losses: the probe's convention, averaged
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def explicit_hessian(model: nn.Module, b) -> torch.Tensor:
    """The dense float64 Hessian of the mean cross-entropy by torch.autograd.functional.hessian."""
    twin = copy.deepcopy(model).double()
    twin.train(model.training)
    named = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    x, y = b[0].double(), b[1]

    def f(flat):
        params = {n: piece.view_as(p) for (n, p), piece in zip(named, flat.split(sizes), strict=True)}
        return F.cross_entropy(functional_call(twin, params, (x,)), y)

    return torch.autograd.functional.hessian(f, flat0)


class Quadratic(nn.Module):
    """ℓ(w) = ½ wᵀ A w with A = batch: H = A, whatever w is."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, d, dtype=torch.float64))


def quad_loss(m: Quadratic, a: torch.Tensor) -> torch.Tensor:
    return 0.5 * m.w @ a @ m.w


def known_spectrum(d: int = 12, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = np.array([7.0, 5.0, 3.0, 2.5, -9.0, -1.0, 0.5, 0.25, 0.0, 1.0, -0.5, 1.5])[:d]
    return torch.from_numpy(q @ np.diag(lam) @ q.T), lam


# ----------------------------------------------------------------------------- products


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm-train"])
def test_hvp_matches_explicit_hessian(batchnorm):
    model, b = mlp(batchnorm), batch()
    h = explicit_hessian(model, b)
    n = h.shape[0]
    assert n <= 300
    op = curvature.HessianOperator(model, per_sample_ce, b, dtype=torch.float64)
    assert op.n == n and op.bn_mode == ("train" if batchnorm else "none")
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        v = torch.randn(n, generator=g, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(v), h @ v, rtol=1e-10, atol=1e-12)
    # The one-shot function agrees with the operator.
    torch.testing.assert_close(curvature.hvp(model, per_sample_ce, b, v, dtype=torch.float64), h @ v,
                               rtol=1e-10, atol=1e-12)


def test_hvp_matches_finite_differences():
    model, b = mlp(batchnorm=True).double(), batch()
    b = (b[0].double(), b[1])
    params = [p for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    v = torch.randn(flat0.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def grad_at(flat):
        twin = copy.deepcopy(model)
        torch.nn.utils.vector_to_parameters(flat, twin.parameters())
        loss = per_sample_ce(twin, b).mean()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(twin.parameters()))])

    eps = 1e-5
    fd = (grad_at(flat0 + eps * v) - grad_at(flat0 - eps * v)) / (2 * eps)
    torch.testing.assert_close(curvature.hvp(model, per_sample_ce, b, v), fd, rtol=1e-6, atol=1e-8)


def test_quadratic_known_eigenvalues_and_hvp():
    a, lam = known_spectrum()
    model = Quadratic(len(lam))
    v = torch.randn(len(lam), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(curvature.hvp(model, quad_loss, a, v), a @ v, rtol=1e-12, atol=1e-12)
    top = curvature.top_eigenvalues(model, quad_loss, a, k=3, tol=1e-12)
    # Largest *algebraic*: -9 has the largest magnitude and is not among them.
    np.testing.assert_allclose(top.values, [7.0, 5.0, 3.0], rtol=1e-10)
    for i in range(3):
        vec = torch.from_numpy(top.vectors[:, i])
        torch.testing.assert_close(a @ vec, top.values[i] * vec, rtol=0, atol=1e-9)
    tr = curvature.hessian_trace(model, quad_loss, a, samples=len(lam))
    assert tr.exact and tr.stderr == 0.0 and tr.samples == len(lam)
    assert tr.estimate == pytest.approx(lam.sum(), abs=1e-12)
    # k ≥ n: the dense path gives the whole spectrum, descending.
    full = curvature.top_eigenvalues(model, quad_loss, a, k=len(lam))
    np.testing.assert_allclose(full.values, np.sort(lam)[::-1], atol=1e-12)


# ----------------------------------------------------------------------------- eigenvalues


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm-train"])
def test_top_k_matches_eigvalsh(batchnorm):
    model, b = mlp(batchnorm), batch()
    h = explicit_hessian(model, b).numpy()
    exact = np.linalg.eigvalsh(0.5 * (h + h.T))[::-1][:3]
    top = curvature.top_eigenvalues(model, per_sample_ce, b, k=3, tol=1e-12, dtype=torch.float64)
    np.testing.assert_allclose(top.values, exact, rtol=1e-6)
    assert top.vectors.shape == (h.shape[0], 3) and top.vectors.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(top.vectors, axis=0), 1.0, rtol=1e-10)
    np.testing.assert_allclose(h @ top.vectors[:, 0], top.values[0] * top.vectors[:, 0], atol=1e-6 * abs(exact[0]))
    assert top.bn_mode == ("train" if batchnorm else "none")
    # Reproducible from the seed; warm-started from the previous vector it needs no more products.
    again = curvature.top_eigenvalues(model, per_sample_ce, b, k=3, tol=1e-12, dtype=torch.float64)
    np.testing.assert_array_equal(again.values, top.values)
    warm = curvature.top_eigenvalues(model, per_sample_ce, b, k=1, tol=1e-10, dtype=torch.float64, v0=top)
    cold = curvature.top_eigenvalues(model, per_sample_ce, b, k=1, tol=1e-10, dtype=torch.float64)
    assert warm.values[0] == pytest.approx(exact[0], rel=1e-8)
    assert warm.n_products <= cold.n_products


def test_batchnorm_modes_are_said_and_differ():
    model, b = mlp(batchnorm=True), batch()
    train = curvature.top_eigenvalues(model, per_sample_ce, b, tol=1e-10, dtype=torch.float64)
    model.eval()
    h_eval = explicit_hessian(model, b).numpy()
    model.train()
    evaluated = curvature.top_eigenvalues(model, per_sample_ce, b, tol=1e-10, dtype=torch.float64, train=False)
    assert (train.bn_mode, evaluated.bn_mode) == ("train", "eval")
    np.testing.assert_allclose(evaluated.values[0], np.linalg.eigvalsh(h_eval)[-1], rtol=1e-6)
    assert abs(train.values[0] - evaluated.values[0]) > 1e-6 * abs(train.values[0])


# ----------------------------------------------------------------------------- trace


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm-train"])
def test_trace_exact_mode(batchnorm):
    model, b = mlp(batchnorm), batch()
    h = explicit_hessian(model, b)
    tr = curvature.hessian_trace(model, per_sample_ce, b, samples=10_000, dtype=torch.float64)
    assert tr.exact and tr.samples == h.shape[0] and tr.stderr == 0.0
    assert tr.estimate == pytest.approx(float(torch.trace(h)), rel=1e-10, abs=1e-12)


def test_hutchinson_standard_error_and_coverage():
    model, b = mlp(width=24), batch()  # 219 parameters
    truth = float(torch.trace(explicit_hessian(model, b)))
    small = [curvature.hessian_trace(model, per_sample_ce, b, samples=25, seed=s, dtype=torch.float64)
             for s in range(8)]
    large = [curvature.hessian_trace(model, per_sample_ce, b, samples=100, seed=s, dtype=torch.float64)
             for s in range(8)]
    assert not any(t.exact for t in small + large)
    # SE ∝ 1/√samples: 4× the samples, half the standard error (averaged over seeds).
    ratio = np.mean([t.stderr for t in large]) / np.mean([t.stderr for t in small])
    assert 0.35 < ratio < 0.7, ratio
    for t in small + large:
        assert abs(t.estimate - truth) <= 4 * t.stderr, (t, truth)
    # Its own seeded generator: reproducible, and the global stream is not drawn from.
    state = torch.get_rng_state()
    again = curvature.hessian_trace(model, per_sample_ce, b, samples=25, seed=0, dtype=torch.float64)
    assert torch.equal(state, torch.get_rng_state())
    assert again.estimate == small[0].estimate and again.stderr == small[0].stderr


# ----------------------------------------------------------------------------- the training is untouched


def _train(measure: bool) -> tuple[list[torch.Tensor], dict, torch.Tensor, list[float]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    losses = []
    prev = None
    for step in range(6):
        b = batch(seed=10 + step)
        opt.zero_grad()
        loss = per_sample_ce(model, b).mean()
        loss.backward()
        if measure:  # between the backward and the step: .grad must survive too
            prev = curvature.top_eigenvalues(model, per_sample_ce, b, k=2, v0=prev, seed=step)
            curvature.hessian_trace(model, per_sample_ce, b, samples=5, seed=step)
        opt.step()
        if measure:  # and between steps, in float64 and eval mode
            curvature.top_eigenvalues(model, per_sample_ce, b, k=1, dtype=torch.float64, train=False)
            assert next(model.parameters()).dtype == torch.float32 and model.training
        losses.append(float(loss.detach()))
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(model.state_dict()), \
        torch.get_rng_state(), losses


def test_training_is_bitwise_identical_with_and_without_curvature():
    params_a, state_a, rng_a, losses_a = _train(measure=False)
    params_b, state_b, rng_b, losses_b = _train(measure=True)
    assert losses_a == losses_b
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))
    assert state_a.keys() == state_b.keys()
    # BN running mean/var and num_batches_tracked included.
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(rng_a, rng_b)


def test_dropout_operator_is_one_function():
    """With dropout in train mode every product of one measurement sees the same masks: H is symmetric."""
    model, b = mlp(dropout=0.5), batch()
    op = curvature.HessianOperator(model, per_sample_ce, b, dtype=torch.float64, seed=4)
    h = torch.stack([op.matvec(e) for e in torch.eye(op.n, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(h, h.T, rtol=0, atol=1e-12)


def test_rejects_bad_arguments():
    model, b = mlp(), batch()
    with pytest.raises(ValueError, match="k must be"):
        curvature.top_eigenvalues(model, per_sample_ce, b, k=0)
    with pytest.raises(ValueError, match="samples must be"):
        curvature.hessian_trace(model, per_sample_ce, b, samples=0)
    with pytest.raises(ValueError, match="trainable parameters"):
        curvature.top_eigenvalues(model, per_sample_ce, b, v0=np.ones(3))
