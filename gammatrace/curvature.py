"""Curvature of the mini-batch loss: Hessian-vector products, top eigenvalues, the trace; and
along a trajectory (:class:`CurvatureMonitor`: the engine's ``curvature`` step hook and
``Probe(curvature=...)``): the stability ratio of the optimizer (:func:`stability`) and
Santurkar et al.'s measurements along the step (:func:`along_step`).

H is the Hessian of ℓ(θ; B) = ``loss_fn(model, batch)`` (per-sample losses are averaged,
as the probe does) with respect to the trainable parameters θ, flattened in
``model.parameters()`` order. Products H v come from double backward on ``torch.autograd``
(one forward and one backward build the gradient's graph; every product is one more
backward through it), optionally in float64.

A measurement never changes the training: it runs on a deep copy of the model, under
``torch.random.fork_rng``, so the trained parameters, their ``.grad``, batch norm's running
statistics, dropout masks to come and the random stream are as they were. Batch norm is
evaluated in train mode by default (batch statistics: the mode the training step saw), and
every result says the mode (``bn_mode``). Dropout, in train mode, draws its masks once per
measurement from ``seed``, so every product of one measurement sees the same function.

Example:
    >>> import torch
    >>> from gammatrace import curvature
    >>> model = torch.nn.Linear(3, 1, bias=False)
    >>> x = torch.diag(torch.tensor([1.0, 2.0, 3.0]))          # three samples
    >>> loss_fn = lambda m, b: 1.5 * m(b).pow(2).squeeze(1)     # per-sample; H = diag(1, 4, 9)
    >>> top = curvature.top_eigenvalues(model, loss_fn, x, k=2, tol=1e-10)
    >>> top.values.round(6).tolist(), top.bn_mode
    ([9.0, 4.0], 'none')
    >>> tr = curvature.hessian_trace(model, loss_fn, x, samples=3)   # samples ≥ 3 parameters: exact
    >>> round(tr.estimate, 6), tr.stderr, tr.exact
    (14.0, 0.0, True)
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]

__all__ = ["STABILITY", "CurvatureConfig", "CurvatureMonitor", "Eigen", "HessianOperator", "Stability", "StepLine",
           "Trace", "along_step", "columns", "hessian_trace", "hvp", "stability", "top_eigenvalues"]


class CurvatureConfig(BaseModel):
    """Curvature along a trajectory (the run config's ``curvature`` block; ``Probe(curvature=...)``).

    Measured at every ``every``-th step (k % every == 0) and, with ``at_epoch_end``, at the
    last step of every epoch, at θ_k before the step, on a copy of the model with batch norm
    in train mode (batch statistics, as the step saw them):

    * on the fixed evaluation subset (``subset`` training samples chosen once from the run's
      seed, no augmentation; the probe's own evaluation batch in ``Probe``): λ_1 … λ_k, the
      trace (``trace_samples`` Hutchinson vectors; 0: no trace) and the stability ratio;
    * on the step's own mini-batch B_k, along the raw gradient g_k: Santurkar et al.'s loss
      range, gradient change and effective β-smoothness at s = c·η_k for c in
      ``santurkar_steps`` (multiples of the step's learning rate: the step itself is c = 1).

    Example:
        >>> CurvatureConfig(every=10).k, CurvatureConfig().santurkar_steps
        (3, (0.25, 0.5, 1.0, 2.0, 4.0))
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    every: int = Field(100, ge=1, description="steps between measurements")
    k: int = Field(3, ge=1, le=64, description="top eigenvalues λ_1 … λ_k")
    trace_samples: int = Field(0, ge=0, le=100_000, description="Hutchinson vectors for tr H; 0: no trace")
    subset: int = Field(256, ge=1, le=100_000_000, description="evaluation-subset size (training samples)")
    at_epoch_end: bool = Field(True, description="also measure at the last step of every epoch")
    santurkar_steps: tuple[Annotated[float, Field(gt=0)], ...] = Field(
        (0.25, 0.5, 1.0, 2.0, 4.0), min_length=1, max_length=64,
        description="s = c·η_k along −g_k for these c (multiples of the step's learning rate)")
    tol: float = Field(1e-4, ge=0, description="relative accuracy of the eigenvalues (eigsh's tol)")
    max_iter: int | None = Field(None, ge=1, description="eigsh's limit on Arnoldi restarts (None: its default)")


@dataclass(frozen=True)
class Eigen:
    """The top eigenpairs of H: ``values`` descending, ``vectors[:, i]`` (unit norm, float64,
    flattened over the trainable parameters) belongs to ``values[i]``; ``n_products`` Hessian-
    vector products were spent; ``bn_mode`` is "train", "eval" or "none" (no batch norm)."""

    values: np.ndarray
    vectors: np.ndarray
    n_products: int
    bn_mode: str


@dataclass(frozen=True)
class Trace:
    """tr H: the estimate, its standard error (0 when exact), the number of probe vectors,
    whether it is exact (Σ e_iᵀ H e_i over every parameter), and the batch norm mode."""

    estimate: float
    stderr: float
    samples: int
    exact: bool
    bn_mode: str


def _cast(batch: Any, dtype: torch.dtype | None) -> Any:
    """``batch`` with its floating tensors cast to ``dtype`` (tuples, lists, dicts walked)."""
    if dtype is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _cast(v, dtype) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_cast(v, dtype) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_cast(v, dtype) for v in batch)
    return batch


def _bn_mode(model: nn.Module) -> str:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return "none"
    return "train" if all(m.training for m in norms) else "eval"


@contextlib.contextmanager
def _isolated(model: nn.Module, seed: int) -> Iterator[None]:
    """The block's random draws start from ``seed`` and leave the live generators untouched."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        # Only the forked generators are seeded (torch.manual_seed would reseed every GPU's).
        torch.default_generator.manual_seed(seed)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)  # the current device's generator only
        yield


class HessianOperator:
    """v ↦ H v for ℓ(θ; batch) at the model's current θ, on a private copy of the model.

    Built once per measurement (one forward and backward with ``create_graph``); each
    :meth:`matvec` is one more backward. ``dtype=torch.float64`` measures in float64 (the
    copy and the batch's floating tensors are cast). ``train=True`` evaluates batch norm
    with batch statistics, the mode a training step sees; ``False`` in eval mode.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> op = HessianOperator(model, lambda m, b: m(b).pow(2).mean(), torch.eye(2), dtype=torch.float64)
        >>> op.n, op.matvec(torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist()   # H = I
        (2, [1.0, 0.0])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        *,
        dtype: torch.dtype | None = None,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        twin = copy.deepcopy(model)
        if dtype is not None:
            twin.to(dtype)
        twin.train(train)
        self.params = [p for p in twin.parameters() if p.requires_grad]
        for p in twin.parameters():
            p.grad = None
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.shapes = [p.shape for p in self.params]
        self.n = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.bn_mode = _bn_mode(twin)
        self.n_products = 0
        with _isolated(model, seed), torch.enable_grad():
            loss = loss_fn(twin, _cast(batch, dtype))
            loss = loss.mean() if loss.ndim else loss
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        # A parameter the loss does not reach has zero gradient and zero Hessian rows.
        self.pairs = [(g, p) for g, p in zip(grads, self.params, strict=True) if g is not None and g.requires_grad]
        self.loss = float(loss.detach())

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector ``v`` of length :attr:`n` (returned flat, in the operator's dtype)."""
        v = torch.as_tensor(v).reshape(-1).to(self.device, self.dtype)
        if v.numel() != self.n:
            raise ValueError(f"vector of length {v.numel()}, the model has {self.n} trainable parameters")
        self.n_products += 1
        pieces = dict(zip(map(id, self.params), v.split([p.numel() for p in self.params]), strict=True))
        out = {id(p): torch.zeros_like(p) for p in self.params}
        if self.pairs:
            hv = torch.autograd.grad(
                [g for g, _ in self.pairs],
                [p for p in self.params],
                grad_outputs=[pieces[id(p)].view_as(g) for g, p in self.pairs],
                retain_graph=True,
                allow_unused=True,
            )
            for p, h in zip(self.params, hv, strict=True):
                if h is not None:
                    out[id(p)] = h.detach()
        return torch.cat([out[id(p)].reshape(-1) for p in self.params])


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    v: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    train: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """One Hessian-vector product H v (flat ``v`` over the trainable parameters).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> hvp(model, lambda m, b: m(b).pow(2).sum(), torch.ones(1, 2), torch.tensor([1.0, 0.0])).tolist()
        [2.0, 2.0]
    """
    return HessianOperator(model, loss_fn, batch, dtype=dtype, train=train, seed=seed).matvec(v)


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int = 1,
    *,
    tol: float = 1e-6,
    max_iter: int | None = None,
    seed: int = 0,
    v0: np.ndarray | torch.Tensor | Eigen | None = None,
    dtype: torch.dtype | None = None,
    train: bool = True,
) -> Eigen:
    """The ``k`` largest (algebraic) eigenvalues of H and their vectors, descending.

    scipy's ``eigsh`` (ARPACK's implicitly restarted Lanczos, ``which="LA"``) on a linear
    operator of Hessian-vector products; ``tol`` is its relative accuracy of the eigenvalues
    (0: machine precision), ``max_iter`` its limit on Arnoldi iterations. The start vector is
    ``v0`` — a previous measurement's :class:`Eigen` (its top vector) or a flat vector — to
    warm-start along a trajectory, else a normal vector drawn from ``seed``. With ``k`` ≥ the
    number of parameters, H is built column by column and diagonalised densely.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> x = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> loss_fn = lambda m, b: 1.5 * m(b).pow(2).mean()        # H = diag(1, 4, 9)
        >>> first = top_eigenvalues(model, loss_fn, x, tol=1e-10)
        >>> round(float(first.values[0]), 6), first.vectors[:, 0].round(6).tolist()[2] ** 2
        (9.0, 1.0)
        >>> again = top_eigenvalues(model, loss_fn, x, tol=1e-10, v0=first)   # warm start
        >>> again.n_products <= first.n_products
        True
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    op = HessianOperator(model, loss_fn, batch, dtype=dtype, train=train, seed=seed)
    return _top(op, k, tol=tol, max_iter=max_iter, seed=seed, v0=v0)


def _top(op: HessianOperator, k: int, *, tol: float, max_iter: int | None, seed: int,
         v0: np.ndarray | torch.Tensor | Eigen | None = None, scale: torch.Tensor | None = None) -> Eigen:
    """The top-k eigenpairs of H, or of S H S with S = diag(``scale``) (a preconditioned
    Hessian P⁻¹H has the eigenvalues of P^{-1/2} H P^{-1/2}: ``scale`` = P^{-1/2})."""
    n = op.n
    n_before = op.n_products
    if scale is not None:
        scale = scale.reshape(-1).to(op.device, op.dtype)

    def product(x: torch.Tensor) -> torch.Tensor:
        return op.matvec(x) if scale is None else scale * op.matvec(scale * x.to(op.device, op.dtype))

    if k >= n:
        eye = torch.eye(n, dtype=op.dtype, device=op.device)
        dense = torch.stack([product(eye[i]) for i in range(n)], dim=1).double().cpu().numpy()
        values, vectors = np.linalg.eigh(0.5 * (dense + dense.T))  # symmetrised against round-off
        order = np.argsort(values)[::-1][:k]
        return Eigen(values[order], vectors[:, order], op.n_products - n_before, op.bn_mode)
    # scipy is costly to import and only a curvature measurement needs it.
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    def matvec(x: np.ndarray) -> np.ndarray:
        return product(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).ravel())).double().cpu().numpy()

    if isinstance(v0, Eigen):
        v0 = v0.vectors[:, 0]
    start = (np.random.default_rng(seed).standard_normal(n) if v0 is None
             else np.asarray(torch.as_tensor(v0).detach().double().cpu().numpy(), dtype=np.float64).ravel())
    if start.shape != (n,):
        raise ValueError(f"v0 has {start.size} entries, the model has {n} trainable parameters")
    linear = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    try:
        values, vectors = eigsh(linear, k=k, which="LA", tol=tol, maxiter=max_iter, v0=start)
    except ArpackNoConvergence as exc:
        # What did converge is kept; the rest is NaN, never an unconverged number.
        got = np.asarray(exc.eigenvalues, dtype=np.float64)
        values = np.concatenate([got, np.full(k - len(got), np.nan)])
        vectors = np.concatenate([np.asarray(exc.eigenvectors).reshape(n, -1),
                                  np.full((n, k - len(got)), np.nan)], axis=1)
    order = np.argsort(np.where(np.isnan(values), -np.inf, values))[::-1]
    return Eigen(values[order], vectors[:, order], op.n_products - n_before, op.bn_mode)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    samples: int = 100,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    train: bool = True,
) -> Trace:
    """tr H by Hutchinson's estimator: the mean of zᵀ H z over ``samples`` Rademacher vectors z,
    with its standard error (sample standard deviation / √samples).

    The vectors come from a ``torch.Generator`` seeded with ``seed`` (never the global stream).
    With ``samples`` ≥ the number of parameters n the trace is exact instead: Σ e_iᵀ H e_i over
    the n unit vectors (n products), standard error 0.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> x = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> loss_fn = lambda m, b: 1.5 * m(b).pow(2).mean()        # tr H = 1 + 4 + 9
        >>> est = hessian_trace(model, loss_fn, x, samples=2, seed=1)
        >>> est.exact, est.samples, abs(est.estimate - 14.0) <= 4 * est.stderr + 1e-9
        (False, 2, True)
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    return _trace(HessianOperator(model, loss_fn, batch, dtype=dtype, train=train, seed=seed), samples, seed)


def _trace(op: HessianOperator, samples: int, seed: int) -> Trace:
    n = op.n
    if samples >= n:
        eye = torch.eye(n, dtype=op.dtype, device=op.device)
        total = math.fsum(float(op.matvec(eye[i])[i]) for i in range(n))
        return Trace(total, 0.0, n, True, op.bn_mode)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    values = []
    for _ in range(samples):
        z = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(op.device, op.dtype)
        values.append(float(torch.dot(z, op.matvec(z)).double()))
    arr = np.asarray(values)
    stderr = float(arr.std(ddof=1) / math.sqrt(samples)) if samples > 1 else math.inf
    return Trace(float(arr.mean()), stderr, samples, False, op.bn_mode)


# ------------------------------------------------------------------ along the trajectory
@dataclass(frozen=True)
class Stability:
    """Where a step of the optimizer stops being stable on a quadratic with curvature λ.

    ``kind`` names the rule; ``threshold`` is the value the sharpness is compared with
    (in the eigenvalue's units: 2/η for plain SGD); ``scale`` is P^{-1/2} flattened over the
    trainable parameters for an adaptive optimizer with diagonal preconditioner P (the
    sharpness is then λ_1(P⁻¹H), the top eigenvalue of P^{-1/2} H P^{-1/2}), None when the
    sharpness is λ_1(H) itself."""

    kind: str
    threshold: float
    scale: torch.Tensor | None = None


def _sgd_stability(opt: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]) -> Stability:
    # Cohen et al. 2021 ("Gradient descent on neural networks typically occurs at the edge of
    # stability", appendix): heavy ball buf = βbuf + g, θ −= η buf diverges on a quadratic once
    # ηλ > 2 + 2β; Nesterov once ηλ > (2 + 2β)/(1 + 2β).
    lr, beta = float(group["lr"]), float(group.get("momentum", 0.0))
    if beta == 0.0:
        return Stability("sgd", 2.0 / lr)
    if group.get("nesterov", False):
        return Stability("nesterov", (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * lr))
    return Stability("heavy_ball", 2.0 * (1.0 + beta) / lr)


def _state(opt: torch.optim.Optimizer, p: torch.Tensor, key: str) -> torch.Tensor:
    value = opt.state.get(p, {}).get(key)
    return torch.zeros_like(p, dtype=torch.float64) if value is None else value.detach().double()


def _steps_taken(opt: torch.optim.Optimizer, p: torch.Tensor) -> float:
    step = opt.state.get(p, {}).get("step", 0)
    return float(step.item() if isinstance(step, torch.Tensor) else step)


def _grad(opt: torch.optim.Optimizer, group: dict, p: torch.Tensor, coupled_decay: bool) -> torch.Tensor:
    g = torch.zeros_like(p, dtype=torch.float64) if p.grad is None else p.grad.detach().double()
    wd = float(group.get("weight_decay", 0.0))
    return g + wd * p.detach().double() if coupled_decay and wd else g


def _adam_stability(opt: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]) -> Stability:
    # Cohen et al. 2022 ("Adaptive gradient methods at the edge of stability"): Adam's step is
    # θ_{t+1} = θ_t − η P_t⁻¹ m_t with m_t = β1 m_{t−1} + (1 − β1) g_t and
    # P_t = (1 − β1^t)·(√(v_t / (1 − β2^t)) + ε) (m's bias correction folded into P); EMA
    # momentum on a quadratic is stable while η λ_1(P⁻¹H) < (2 + 2β1)/(1 − β1). P_t is the
    # preconditioner *this* step divides by: v_t from the state before the step and the
    # gradient the optimizer receives now (.grad, with Adam's coupled weight decay added;
    # AdamW's decoupled decay is not in the gradient), AMSGrad's running maximum included.
    beta1, beta2 = (float(b) for b in group["betas"])
    eps, lr = float(group["eps"]), float(group["lr"])
    coupled = not isinstance(opt, torch.optim.AdamW) and not group.get("decoupled_weight_decay", False)
    pieces = []
    for p in params:
        t = _steps_taken(opt, p) + 1.0
        g = _grad(opt, group, p, coupled)
        v = beta2 * _state(opt, p, "exp_avg_sq") + (1.0 - beta2) * g * g
        if group.get("amsgrad", False):
            v = torch.maximum(_state(opt, p, "max_exp_avg_sq"), v)
        precond = (1.0 - beta1 ** t) * (torch.sqrt(v / (1.0 - beta2 ** t)) + eps)
        pieces.append(precond.reshape(-1).rsqrt())
    return Stability("adam_preconditioned", (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr), torch.cat(pieces))


def _rmsprop_stability(opt: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]) -> Stability:
    # RMSprop divides by P_t = √(a_t) + ε (a_t = α a_{t−1} + (1 − α) g_t², centred: minus the
    # squared mean gradient); with momentum μ it is heavy ball on P⁻¹g: stable while
    # η λ_1(P⁻¹H) < 2 + 2μ (2 without momentum; Cohen et al. 2022 treat RMSprop this way).
    alpha, eps, lr = float(group["alpha"]), float(group["eps"]), float(group["lr"])
    mu = float(group.get("momentum", 0.0))
    pieces = []
    for p in params:
        g = _grad(opt, group, p, True)
        a = alpha * _state(opt, p, "square_avg") + (1.0 - alpha) * g * g
        if group.get("centered", False):
            mean = alpha * _state(opt, p, "grad_avg") + (1.0 - alpha) * g
            a = a - mean * mean
        pieces.append((torch.sqrt(a) + eps).reshape(-1).rsqrt())
    return Stability("rmsprop_preconditioned", 2.0 * (1.0 + mu) / lr, torch.cat(pieces))


def _adagrad_stability(opt: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]) -> Stability:
    # Adagrad: θ −= η_t g / (√(Σ g²) + ε), η_t = η / (1 + (t − 1)·lr_decay): stable while
    # η_t λ_1(P⁻¹H) < 2.
    eps, lr, decay = float(group["eps"]), float(group["lr"]), float(group.get("lr_decay", 0.0))
    pieces, t = [], 1.0
    for p in params:
        t = _steps_taken(opt, p) + 1.0
        g = _grad(opt, group, p, True)
        total = _state(opt, p, "sum") + g * g
        pieces.append((torch.sqrt(total) + eps).reshape(-1).rsqrt())
    return Stability("adagrad_preconditioned", 2.0 * (1.0 + (t - 1.0) * decay) / lr, torch.cat(pieces))


# The optimizer classes whose stability rule is known, most specific first (AdamW before Adam
# where it subclasses it). Another optimizer gets kind "unknown" and a NaN ratio.
STABILITY: dict[type, Callable[[torch.optim.Optimizer, dict, list[torch.Tensor]], Stability]] = {
    torch.optim.SGD: _sgd_stability,
    torch.optim.AdamW: _adam_stability,
    torch.optim.Adam: _adam_stability,
    torch.optim.RMSprop: _rmsprop_stability,
    torch.optim.Adagrad: _adagrad_stability,
}


def stability(optimizer: torch.optim.Optimizer | None, params: list[torch.Tensor], lr: float,
              lr_group: int = 0) -> Stability:
    """The stability rule of ``optimizer`` at this step (see :class:`Stability`), for the
    trainable ``params`` (in order) and learning rate ``lr``; call it at θ_k with ``.grad``
    holding the gradient the optimizer is about to receive and its state from before the step.
    The hyperparameters are ``lr_group``'s (every group is assumed to share them).

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> rule = stability(torch.optim.SGD([w], lr=0.1, momentum=0.9), [w], lr=0.1)
        >>> rule.kind, round(rule.threshold, 6)                     # 2(1 + β)/η
        ('heavy_ball', 38.0)
        >>> stability(None, [w], lr=0.1).kind
        'unknown'
    """
    if optimizer is None:
        return Stability("unknown", math.nan)
    group = {**optimizer.param_groups[lr_group], "lr": lr}
    for cls in type(optimizer).__mro__:
        rule = STABILITY.get(cls)
        if rule is not None:
            return rule(optimizer, group, params)
    return Stability("unknown", math.nan)


@dataclass(frozen=True)
class StepLine:
    """Santurkar et al.'s measurements along −g from θ: ``losses[i]`` = ℓ(θ − s_i g) and
    ``grad_changes[i]`` = ‖∇ℓ(θ) − ∇ℓ(θ − s_i g)‖ for ``steps[i]`` = s_i; ``loss`` and
    ``grad_norm`` are ℓ(θ) and ‖g‖ (g = ∇ℓ(θ) unless a direction was given)."""

    steps: np.ndarray
    losses: np.ndarray
    grad_changes: np.ndarray
    loss: float
    grad_norm: float
    bn_mode: str

    @property
    def beta_eff(self) -> float:
        """max_s ‖∇ℓ(θ) − ∇ℓ(θ − s g)‖ / ‖s g‖: the effective β-smoothness along the step."""
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = self.grad_changes / (self.steps * self.grad_norm)
        return float(np.max(ratios)) if self.grad_norm > 0 else math.nan


def along_step(model: nn.Module, loss_fn: LossFn, batches: list[tuple[Any, float]], steps: Any, *,
               direction: torch.Tensor | None = None, seed: int = 0, train: bool = True) -> StepLine:
    """ℓ and ∇ℓ at θ − s·g for each s in ``steps`` (Santurkar et al. 2018, Fig. 4), on a copy.

    ℓ is the weighted mean of ``loss_fn`` over ``batches`` (``(batch, weight)`` pairs: a
    step's micro-batches and their sample counts), g is ``direction`` (flat) or, by default,
    ∇ℓ(θ) itself — the step's raw gradient when ``batches`` are the step's and no dropout
    draws other masks. Every evaluation runs under the same seeded random stream (one
    dropout mask for the whole line) with batch norm in train mode (``train``).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0)
        >>> loss_fn = lambda m, b: m(b).pow(2).mean()               # ℓ(w) = w², ∇ℓ = 2w
        >>> line = along_step(model, loss_fn, [(torch.ones(1, 1), 1.0)], [0.25, 0.5])
        >>> line.losses.tolist(), line.grad_changes.tolist(), line.beta_eff   # w = 0.5, 0
        ([0.25, 0.0], [1.0, 2.0], 2.0)
    """
    twin = copy.deepcopy(model)
    twin.train(train)
    params = [p for p in twin.parameters() if p.requires_grad]
    for p in twin.parameters():
        p.grad = None
    origin = [p.detach().clone() for p in params]
    total_weight = float(sum(w for _, w in batches))

    def at(s: float, d: list[torch.Tensor] | None) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            for p, o, *rest in zip(params, origin, *([d] if d is not None else []), strict=True):
                p.copy_(o if d is None else o - s * rest[0])
        loss = torch.zeros((), dtype=torch.float64)
        grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        with _isolated(model, seed), torch.enable_grad():
            for batch, weight in batches:
                part = loss_fn(twin, batch)
                part = (part.mean() if part.ndim else part) * (weight / total_weight)
                g = torch.autograd.grad(part, params, allow_unused=True)
                for acc, gi in zip(grads, g, strict=True):
                    if gi is not None:
                        acc += gi.double()
                loss += part.detach().double().cpu()
        return float(loss), torch.cat([g.reshape(-1) for g in grads])

    loss0, grad0 = at(0.0, None)
    flat = grad0 if direction is None else torch.as_tensor(direction).reshape(-1).to(grad0.device).double()
    if flat.numel() != grad0.numel():
        raise ValueError(f"direction of length {flat.numel()}, the model has {grad0.numel()} trainable parameters")
    pieces = [piece.view_as(p).to(p.dtype) for piece, p in zip(flat.split([p.numel() for p in params]), params,
                                                                 strict=True)]
    s_values = np.asarray(list(steps), dtype=np.float64)
    losses, changes = [], []
    for s in s_values:
        loss_s, grad_s = at(float(s), pieces)
        losses.append(loss_s)
        changes.append(float(torch.linalg.vector_norm(grad0 - grad_s)))
    return StepLine(s_values, np.asarray(losses), np.asarray(changes), loss0,
                    float(torch.linalg.vector_norm(flat)), _bn_mode(twin))


def columns(k: int) -> list[str]:
    """The curvature table's columns for ``k`` eigenvalues (besides ``step`` and ``epoch``).

    Example:
        >>> columns(2)[:5]
        ['lr', 'at_epoch_end', 'lambda_1', 'lambda_2', 'trace']
    """
    return ["lr", "at_epoch_end", *(f"lambda_{i + 1}" for i in range(k)), "trace", "trace_se",
            "sharpness", "stability_threshold", "stability_ratio", "stability_threshold_kind", "outlier_ratio",
            "beta_eff", "loss_range_min", "loss_range_max", "grad_change_max", "grad_norm", "eval_loss",
            "bn_mode", "n_products"]


class CurvatureMonitor:
    """Curvature measurements along a trajectory (:class:`CurvatureConfig`), one row per
    measured step; what the engine's ``curvature`` step hook and ``Probe(curvature=...)`` share.

    A row, at θ_k before the step (everything on a copy, under a forked and seeded random
    stream: the training is untouched), holds:

    * ``lambda_1`` … ``lambda_k``: the top eigenvalues of the Hessian of the mean loss on the
      evaluation batch (eigsh, warm-started from the previous measurement's top vector);
      ``eval_loss`` that loss; ``n_products`` the Hessian-vector products spent on the row;
    * ``trace``, ``trace_se``: Hutchinson's estimate of tr H on the evaluation batch and its
      standard error (NaN when ``trace_samples`` is 0);
    * ``sharpness``, ``stability_threshold``, ``stability_ratio`` = sharpness / threshold,
      ``stability_threshold_kind`` (:func:`stability`): plain SGD ("sgd") compares λ_1 with
      2/η_k, so the ratio is η_k·λ_1/2; heavy-ball momentum β ("heavy_ball") with
      2(1 + β)/η_k, the ratio η_k·λ_1/(2(1 + β)); Nesterov ("nesterov") with
      (2 + 2β)/((1 + 2β)η_k); Adam/AdamW/AMSGrad ("adam_preconditioned", Cohen et al. 2022)
      compare the preconditioned sharpness λ_1(P⁻¹H) — the top eigenvalue of
      P^{-1/2} H P^{-1/2} on the evaluation batch, P = (1 − β1^t)(√v̂_t + ε) the diagonal this
      step divides by — with (2 + 2β1)/((1 − β1)η_k); RMSprop and Adagrad likewise with their
      own P ("…_preconditioned"); weight decay is not added to H;
    * ``outlier_ratio`` = λ_1/λ_k;
    * on the step's own mini-batch B_k along its raw gradient g_k (recomputed on the copy,
      train-mode batch norm: the step's gradient when no dropout draws other masks; its norm
      is ``grad_norm``), at s = c·η_k for c in ``santurkar_steps``: ``loss_range_min`` /
      ``loss_range_max`` = min / max of ℓ(θ_k − s g_k; B_k), ``grad_change_max`` =
      max_s ‖∇ℓ(θ_k) − ∇ℓ(θ_k − s g_k)‖, ``beta_eff`` = max_s of that change / ‖s g_k‖;
    * ``bn_mode``: "train" (batch statistics, as the step saw them) or "none".

    ``seed`` seeds every measurement's draws (with the step index): the same trajectory gives
    the same table. Memory: the Lanczos basis, O(max(2k + 1, 20)·d) floats, and a copy of the model.
    """

    def __init__(self, config: CurvatureConfig | Mapping[str, Any] | None, loss_fn: LossFn, eval_batch: Any = None,
                 *, seed: int = 0):
        self.config = config if isinstance(config, CurvatureConfig) else CurvatureConfig.model_validate(config or {})
        self.loss_fn, self.eval_batch, self.seed = loss_fn, eval_batch, seed
        self.previous: Eigen | None = None

    def columns(self) -> list[str]:
        """This monitor's row columns (:func:`columns` for its ``k``)."""
        return columns(self.config.k)

    def due(self, step: int, at_epoch_end: bool = False) -> bool:
        """Whether step ``step`` is measured (every ``every``-th, and epoch ends if asked)."""
        return step % self.config.every == 0 or (at_epoch_end and self.config.at_epoch_end)

    def measure(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, step: int, lr: float,
                at_epoch_end: bool, step_batches: list[tuple[Any, float]], lr_group: int = 0) -> dict[str, Any]:
        """One row (see the class) at the model's current parameters θ_k."""
        cfg = self.config
        if self.eval_batch is None:
            raise ValueError("the curvature monitor has no evaluation batch")
        seed = (self.seed * 1_000_003 + step) % (2**63)
        op = HessianOperator(model, self.loss_fn, self.eval_batch, seed=seed)
        k = min(cfg.k, op.n)
        v0 = self.previous if self.previous is not None and np.isfinite(self.previous.vectors[:, 0]).all() else None
        top = _top(op, k, tol=cfg.tol, max_iter=cfg.max_iter, seed=seed, v0=v0)
        self.previous = top
        values = np.full(cfg.k, np.nan)
        values[:k] = top.values
        trace = _trace(op, cfg.trace_samples, seed) if cfg.trace_samples else None
        params = [p for p in model.parameters() if p.requires_grad]
        rule = stability(optimizer, params, lr, lr_group)
        sharp = (float(values[0]) if rule.scale is None
                 else float(_top(op, 1, tol=cfg.tol, max_iter=cfg.max_iter, seed=seed, scale=rule.scale).values[0]))
        line = along_step(model, self.loss_fn, step_batches, [c * lr for c in cfg.santurkar_steps], seed=seed)
        return {
            "lr": float(lr), "at_epoch_end": bool(at_epoch_end),
            **{f"lambda_{i + 1}": float(v) for i, v in enumerate(values)},
            "trace": trace.estimate if trace else math.nan, "trace_se": trace.stderr if trace else math.nan,
            "sharpness": sharp, "stability_threshold": rule.threshold,
            "stability_ratio": sharp / rule.threshold, "stability_threshold_kind": rule.kind,
            "outlier_ratio": float(values[0] / values[cfg.k - 1]) if values[cfg.k - 1] != 0 else math.nan,
            "beta_eff": line.beta_eff, "loss_range_min": float(line.losses.min()),
            "loss_range_max": float(line.losses.max()), "grad_change_max": float(line.grad_changes.max()),
            "grad_norm": line.grad_norm, "eval_loss": op.loss, "bn_mode": op.bn_mode, "n_products": op.n_products,
        }
