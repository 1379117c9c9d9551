"""Curvature of the mini-batch loss: Hessian-vector products, top eigenvalues, the trace.

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

__all__ = ["CurvatureConfig", "Eigen", "HessianOperator", "Trace", "hessian_trace", "hvp", "top_eigenvalues"]


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
    n = op.n
    if k >= n:
        dense = _dense(op)
        values, vectors = np.linalg.eigh(dense)
        order = np.argsort(values)[::-1][:k]
        return Eigen(values[order], vectors[:, order], op.n_products, op.bn_mode)
    # scipy is costly to import and only a curvature measurement needs it.
    from scipy.sparse.linalg import LinearOperator, eigsh

    def matvec(x: np.ndarray) -> np.ndarray:
        return op.matvec(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).ravel())).double().cpu().numpy()

    if isinstance(v0, Eigen):
        v0 = v0.vectors[:, 0]
    start = (np.random.default_rng(seed).standard_normal(n) if v0 is None
             else np.asarray(torch.as_tensor(v0).detach().double().cpu().numpy(), dtype=np.float64).ravel())
    if start.shape != (n,):
        raise ValueError(f"v0 has {start.size} entries, the model has {n} trainable parameters")
    linear = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    values, vectors = eigsh(linear, k=k, which="LA", tol=tol, maxiter=max_iter, v0=start)
    order = np.argsort(values)[::-1]
    return Eigen(values[order], vectors[:, order], op.n_products, op.bn_mode)


def _dense(op: HessianOperator) -> np.ndarray:
    """H, column by column (n products), symmetrised against round-off."""
    eye = torch.eye(op.n, dtype=op.dtype, device=op.device)
    h = torch.stack([op.matvec(eye[i]) for i in range(op.n)], dim=1).double().cpu().numpy()
    return 0.5 * (h + h.T)


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
    op = HessianOperator(model, loss_fn, batch, dtype=dtype, train=train, seed=seed)
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
