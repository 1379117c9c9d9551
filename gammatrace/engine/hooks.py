"""Per-step hooks of the engine (:class:`~gammatrace.engine.session.StepHook`): measurements
a replay makes at θ_k besides the probe's, stored as an extra per-step table
``analysis/<reference>/<name>/``. :func:`config_hooks` names those a run config asks for
(the ``curvature`` block: :class:`Curvature`); every replay of the run adds them.

Example:
    >>> import torch
    >>> from gammatrace.config import RunConfig
    >>> from gammatrace.engine.session import build_session
    >>> sess = build_session(RunConfig.model_validate({
    ...     "loss": "mse", "batch_size": 8, "data": {"name": "teacher", "num_train": 16, "num_test": 4, "dim": 3},
    ...     "model": {"name": "mlp", "width": 4, "depth": 1}}))
    >>> theta_star = {k: torch.zeros_like(v) for k, v in sess.model.state_dict().items()}
    >>> row = OnePointConvexity(sess, theta_star)(batch=None)
    >>> sorted(row), bool(row["dist_sq"] > 0)
    (['delta', 'dist_sq', 'full_loss', 'grad_dot'], True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from gammatrace.config import RunConfig
from gammatrace.curvature import CurvatureConfig, CurvatureMonitor
from gammatrace.data.loader import stream_seed
from gammatrace.engine.session import Session, StepHookFactory
from gammatrace.errors import UserError
from gammatrace.models.init import preserved_buffers
from gammatrace.probe.decay import decay_of

# Random streams of the curvature measurement (data.loader.stream_seed): the evaluation subset
# and the per-measurement draws (start vectors, Hutchinson vectors, dropout masks).
_SUBSET_STREAM = 0xC0B5
_CURVATURE_STREAM = 0xC0B6


class OnePointConvexity:
    """One-point strong convexity along the path (Li & Yuan 2017): with ∇L the gradient of
    the *full* training loss at θ_k,

        δ_k = ⟨∇L(θ_k), θ_k − θ*⟩ / ‖θ_k − θ*‖²,

    and the condition ⟨−∇L(θ), θ* − θ⟩ > δ‖θ* − θ‖² holds at step k with δ = δ_k when
    δ_k > 0. Row columns: ``delta`` (NaN where θ_k = θ*), ``grad_dot``, ``dist_sq``
    (float64) and ``full_loss`` (L(θ_k), the mean per-sample loss over the training set).

    Costs one forward and backward over the training set per step (in chunks of
    ``eval_batch_size``), in the model's mode (train), without augmentation.
    ``torch.autograd.grad`` leaves ``.grad`` — the step's own gradient — untouched, and
    buffers (batch-norm statistics) are restored after the extra forward.
    """

    name = "one_point"

    def __init__(self, session: Session, reference: Mapping[str, torch.Tensor]):
        self.session = session
        named = [(n, p) for n, p in session.model.named_parameters() if p.requires_grad]
        missing = [n for n, _ in named if n not in reference]
        if missing:
            raise UserError(f"the reference lacks trainable tensor(s) {missing[:3]}")
        self.params = [p for _, p in named]
        self.reference = [reference[n].detach().to(device=p.device, dtype=torch.float64) for n, p in named]

    def full_gradient(self, x: torch.Tensor | None = None,
                      y: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(L(θ), ∇L(θ)) of the mean per-sample loss over ``(x, y)`` (default: the whole
        training set) at the current parameters."""
        sess = self.session
        x = sess.x if x is None else x
        y = sess.y if y is None else y
        n, chunk = len(x), sess.cfg.eval_batch_size
        total = torch.zeros((), dtype=torch.float64, device=sess.device)
        grads: list[torch.Tensor] | None = None
        loss_fn = sess.loss_fn
        with preserved_buffers(sess.model):
            for s in range(0, n, chunk):
                part = loss_fn(sess.model, (x[s:s + chunk], y[s:s + chunk])).sum() / n
                g = torch.autograd.grad(part, self.params)
                grads = list(g) if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
                total += part.detach().double()
        assert grads is not None
        return total, grads

    def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
        loss, grads = self.full_gradient()
        dot = torch.zeros((), dtype=torch.float64, device=loss.device)
        dist = torch.zeros_like(dot)
        for p, g, ref in zip(self.params, grads, self.reference, strict=True):
            diff = p.detach().double() - ref
            dot += (g.double() * diff).sum()
            dist += (diff * diff).sum()
        delta = torch.where(dist > 0, dot / dist, torch.full_like(dot, math.nan))
        return {"delta": delta, "grad_dot": dot, "dist_sq": dist, "full_loss": loss}


def evaluation_subset(n: int, size: int, seed: int) -> torch.Tensor:
    """The indices (sorted) of the curvature's fixed evaluation subset: ``size`` of the ``n``
    training samples (all when ``size`` ≥ n), drawn once from the run's seed.

    Example:
        >>> evaluation_subset(10, 4, seed=0).tolist() == evaluation_subset(10, 4, seed=0).tolist()
        True
        >>> evaluation_subset(10, 99, seed=0).tolist()
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """
    if size >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(stream_seed(seed, 0, _SUBSET_STREAM))
    return torch.randperm(n, generator=gen)[:size].sort().values


# Hooks whose table does not depend on θ* (measured at θ_k alone): one reference's replay measures
# it and the others share it (a study replays against θ_T and the continuation θ*).
REFERENCE_FREE = frozenset({"curvature"})


class Curvature:
    """Curvature along the trajectory (the run config's ``curvature`` block, DESIGN §4): the
    table ``analysis/<reference>/curvature/``, one row per measured step — every ``every``-th
    step and, with ``at_epoch_end``, the last step of each epoch — with the columns of
    :class:`~gammatrace.curvature.CurvatureMonitor` (λ_1 … λ_k, trace, stability ratio,
    outlier ratio, Santurkar's loss range, gradient change and effective β-smoothness).

    Where: eigenvalues, trace and stability on the fixed evaluation subset
    (:func:`evaluation_subset`: ``subset`` training samples from the run's seed, without
    augmentation, as one batch); Santurkar's quantities on the step's own mini-batch B_k (as
    the step saw it, augmentation included) along ∇ℓ(θ_k; B_k). Batch norm in train mode,
    on copies of the model under a forked random stream: the trajectory is untouched (the
    replay's bitwise verification checks it). The learning rate is the step's η_k.

    Nothing here depends on θ*, so the table is measured once per run: a replay against a
    second reference reuses the first one's (:data:`REFERENCE_FREE`).
    """

    name = "curvature"

    def __init__(self, session: Session, reference: Mapping[str, torch.Tensor]):
        cfg = session.cfg
        self.session = session
        idx = evaluation_subset(len(session.x), (cfg.curvature or CurvatureConfig()).subset, cfg.seed)
        idx = idx.to(session.device)
        self.monitor = CurvatureMonitor(cfg.curvature or CurvatureConfig(), session.loss_fn,
                                        (session.x[idx], session.y[idx]), seed=stream_seed(cfg.seed, 0, _CURVATURE_STREAM))
        self._step = -1

    def due(self, step: int) -> bool:
        self._step = step
        return self.monitor.due(step, self._at_epoch_end(step))

    def _at_epoch_end(self, step: int) -> bool:
        return step % self.session.steps_per_epoch == self.session.steps_per_epoch - 1

    def __call__(self, batch: Any) -> dict[str, Any]:
        sess, k = self.session, self._step
        lr = float(sess.optimizer.param_groups[0]["lr"])
        return self.monitor.measure(sess.model, sess.optimizer, step=k, lr=lr, at_epoch_end=self._at_epoch_end(k),
                                    step_batches=[(batch, 1.0)])


class SubsetSecant:
    """RSI and EB of the *evaluation-subset* loss at every epoch's last step (issue 24: the
    full-batch versions of the step table's ``rsi`` and ``eb``, which use the mini-batch g_k):
    with L_S the mean per-sample loss over the curvature's fixed evaluation subset S
    (:func:`evaluation_subset`; the whole training set when ``subset`` ≥ its size) and
    G = ∇L_S(θ_k) at θ_k, before the epoch's last update,

        rsi = ⟨G, θ_k − θ*⟩ / d_k²,   eb = ‖G‖ / d_k,

    and with the optimizer's *coupled* weight decay λ folded in as "No Wrong Turns" does
    (G + λθ_k per parameter group; NaN for decoupled decay, see
    :mod:`gammatrace.probe.decay`): ``rsi_wd``, ``eb_wd``. Row columns: ``loss`` (L_S),
    ``grad_dot``, ``grad_sq``, ``dist_sq``, ``grad_dot_wd``, ``grad_sq_wd`` (float64), the four
    ratios (NaN where d_k = 0), ``samples`` (|S|) and ``full_batch`` (|S| is the training set).
    Batch norm in train mode (batch statistics over chunks of ``eval_batch_size``), buffers
    restored; one gradient over S per epoch. It depends on θ*: measured per reference.

    Example:
        >>> import torch
        >>> from gammatrace.config import RunConfig
        >>> from gammatrace.engine.session import build_session
        >>> sess = build_session(RunConfig.model_validate({
        ...     "loss": "mse", "batch_size": 8, "data": {"name": "teacher", "num_train": 16, "num_test": 4, "dim": 3},
        ...     "model": {"name": "mlp", "width": 4, "depth": 1}, "curvature": {"subset": 16}}))
        >>> hook = SubsetSecant(sess, {k: torch.zeros_like(v) for k, v in sess.model.state_dict().items()})
        >>> hook.due(0), hook.due(1)  # 2 steps per epoch: the last is step 1
        (False, True)
        >>> row = hook(batch=None)
        >>> row["samples"], row["full_batch"], bool(row["rsi"] == row["rsi_wd"])  # no decay: equal
        (16, True, True)
    """

    name = "subset_secant"

    def __init__(self, session: Session, reference: Mapping[str, torch.Tensor]):
        self.session = session
        self.point = OnePointConvexity(session, reference)
        idx = evaluation_subset(len(session.x), (session.cfg.curvature or CurvatureConfig()).subset,
                                session.cfg.seed).to(session.device)
        self.x, self.y = session.x[idx], session.y[idx]
        self.full_batch = len(idx) == len(session.x)

    def due(self, step: int) -> bool:
        per = self.session.steps_per_epoch
        return step % per == per - 1

    def __call__(self, batch: Any) -> dict[str, Any]:
        loss, grads = self.point.full_gradient(self.x, self.y)
        decay = decay_of(self.session.optimizer, self.point.params)
        zero = torch.zeros((), dtype=torch.float64, device=loss.device)
        dot, gsq, dist, dot_wd, gsq_wd = zero.clone(), zero.clone(), zero.clone(), zero.clone(), zero.clone()
        for p, g, ref, lam in zip(self.point.params, grads, self.point.reference, decay, strict=True):
            theta = p.detach().double()
            g = g.double()
            diff = theta - ref
            folded = g + lam * theta  # NaN throughout where λ is NaN (decoupled decay)
            dot += (g * diff).sum()
            gsq += (g * g).sum()
            dist += (diff * diff).sum()
            dot_wd += (folded * diff).sum()
            gsq_wd += (folded * folded).sum()
        row: dict[str, Any] = {"loss": loss, "grad_dot": dot, "grad_sq": gsq, "dist_sq": dist,
                               "grad_dot_wd": dot_wd, "grad_sq_wd": gsq_wd}
        d = float(dist)
        for suffix, num, sq in (("", dot, gsq), ("_wd", dot_wd, gsq_wd)):
            row["rsi" + suffix] = float(num) / d if d > 0 else math.nan
            row["eb" + suffix] = math.sqrt(float(sq)) / math.sqrt(d) if d > 0 else math.nan
        row["samples"], row["full_batch"] = len(self.x), self.full_batch
        return row


def config_hooks(cfg: RunConfig) -> tuple[StepHookFactory, ...]:
    """The step hooks a run config asks for (every replay of the run adds them): its
    ``curvature`` block measures the curvature table and, at epoch ends, the subset's RSI/EB.

    Example:
        >>> config_hooks(RunConfig()), [h.name for h in config_hooks(RunConfig(curvature={"every": 10}))]
        ((), ['curvature', 'subset_secant'])
    """
    return (Curvature, SubsetSecant) if cfg.curvature is not None else ()
