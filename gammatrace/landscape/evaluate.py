"""Loss and gradient of a run's model at arbitrary parameter points, and its stored path.

:class:`LossEvaluator` rebuilds a run's data and model from its config
(:func:`~gammatrace.engine.session.build_session`) — or takes any model, per-sample
loss and training tensors (:meth:`LossEvaluator.from_model`, for checkpoint files of
other loops) — fixes an evaluation subset of the training set, and evaluates the
per-sample loss (mean over the subset, accumulated in float64) at any flat float64
parameter vector θ (the trainable parameters, in module order). Parameters are written
into the model in place and everything else of the state (buffers, frozen parameters)
is reset before every forward, so evaluations are independent of each other and of
their order — which is what lets grid rows run as separate tasks.

Batch-norm mode is a registry (:data:`BN_MODES`): ``train`` normalises with the
statistics of the evaluation subset (one forward over the whole subset, the train-mode
loss the principles use), ``eval`` with the running statistics of the buffers passed
in. Stochastic layers (dropout) draw from a fixed seed per forward, so a point's
loss is a function of the point.

Example: a two-epoch run on 96 digits (pass 1 only: the path needs no analysis), its
stored path θ_0, θ_1, θ_T, and the loss at both ends:

    >>> import tempfile
    >>> import gammatrace
    >>> run = gammatrace.train({"name": "tiny", "seed": 0, "epochs": 2, "batch_size": 32,
    ...                         "data": {"name": "digits", "n_train": 96, "n_test": 64},
    ...                         "model": {"name": "mlp", "width": 8, "depth": 2},
    ...                         "optim": {"name": "sgd", "lr": 0.2}},
    ...                        out=tempfile.mkdtemp(), replay=False, progress=False)
    >>> ev = LossEvaluator(run, samples=64, bn="train")
    >>> traj = load_trajectory(run, ev.names)
    >>> traj.points.shape, traj.epochs.tolist()
    ((3, 682), [0, 1, 2])
    >>> ev.loss(traj.points[-1], traj.buffers[-1]) < ev.loss(traj.points[0], traj.buffers[0])
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gammatrace.data.loader import stream_seed
from gammatrace.engine.session import build_session
from gammatrace.errors import ConfigError
from gammatrace.registry import Registry
from gammatrace.store.run import Run, RunStore, StoreError

BN_MODES: Registry[Callable[[nn.Module], nn.Module]] = Registry("batch-norm mode")
BN_MODES.register("train")(lambda model: model.train())
BN_MODES.register("eval")(lambda model: model.eval())

# Its own stream, so the evaluation subset never coincides by construction with a
# run's data order or augmentation draws.
_SUBSET_STREAM = 0x1A9D_5CA9


def evaluation_subset(n_train: int, samples: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a fixed random subset of the training set (all if ``samples`` ≥ n).

    Example:
        >>> evaluation_subset(10, 4, seed=0).tolist() == sorted(evaluation_subset(10, 4).tolist())
        True
        >>> len(evaluation_subset(10, 50))
        10
    """
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    if samples >= n_train:
        return torch.arange(n_train)
    g = torch.Generator().manual_seed(stream_seed(seed, 0, _SUBSET_STREAM))
    return torch.randperm(n_train, generator=g)[:samples].sort().values


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that define θ (``requires_grad``), in module order.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[0].bias.requires_grad_(False)
        >>> trainable_names(net)
        ['0.weight', '1.weight', '1.bias']
    """
    return [n for n, p in model.named_parameters() if p.requires_grad]


def flatten(state: Mapping[str, torch.Tensor], names: list[str]) -> np.ndarray:
    """The tensors ``names`` of a state dict as one flat float64 vector.

    Example:
        >>> flatten({"a": torch.ones(2), "b": torch.zeros(1, 1)}, ["b", "a"]).tolist()
        [0.0, 1.0, 1.0]
    """
    missing = [n for n in names if n not in state]
    if missing:
        raise StoreError(f"state lacks trainable tensor(s) {missing[:3]}")
    return np.concatenate([state[n].detach().cpu().double().reshape(-1).numpy() for n in names])


@dataclass
class Trajectory:
    """A run's stored path: θ_0, θ_1, …, θ_{E−1} (start of each epoch), θ_T (final.pt).

    ``points`` (E+1, d) float64 over the trainable tensors ``names``; ``buffers`` the
    matching non-trainable entries (batch-norm statistics) of each state; ``epochs``
    the epoch index of each point (E for θ_T).
    """

    path: Path
    name: str
    names: list[str]
    points: np.ndarray
    buffers: list[dict[str, torch.Tensor]]
    epochs: np.ndarray


def load_trajectory(run: str | Path | Run, names: list[str] | None = None) -> Trajectory:
    """Read the epoch checkpoints and θ_T of a trained run (only up to its horizon).

    Continuation epochs (trained beyond the analysed horizon for a continuation
    reference) are left out: the path is the one the principles were measured on.

    Example:
        >>> traj = load_trajectory("runs/quickstart/relu")   # needs the README's quickstart run  # doctest: +SKIP
        >>> traj.points.shape                                # doctest: +SKIP
        (41, 144650)
    """
    run = run if isinstance(run, Run) else Run(run)
    horizon = run.meta.horizon_epochs
    if horizon is None or not run.store.exists(RunStore.FINAL):
        raise StoreError(f"{run.path} has no final point yet (status {run.status}); train it first")
    every = run.config.checkpoint_every if isinstance(run.config.checkpoint_every, int) else 1
    at = list(range(0, int(horizon), every))  # the stored checkpoints (checkpoint_every epochs apart)
    states = [run.store.read_torch(RunStore.checkpoint(e))["model"] for e in at]
    states.append(run.store.read_torch(RunStore.FINAL)["model"])
    if names is None:
        names = trainable_names(build_session(run.config).model)
    points = np.stack([flatten(s, names) for s in states])
    keep = set(names)
    buffers = [{k: v for k, v in s.items() if k not in keep} for s in states]
    return Trajectory(run.path, run.name, list(names), points, buffers, np.array([*at, int(horizon)]))


class LossEvaluator:
    """The run's loss on a fixed training subset at any parameter point.

    Built from a run (below) or, for any model, with :meth:`from_model`.

    Args:
        run: the run directory whose config defines data, model and loss.
        samples: size of the evaluation subset (drawn once from ``seed``).
        bn: a :data:`BN_MODES` name, the module mode of every forward.
        seed: seed of the subset and of the per-forward RNG (dropout).

    Example:
        >>> ev = LossEvaluator("runs/quickstart/relu", samples=128)   # needs the README's quickstart run  # doctest: +SKIP
        >>> round(ev.loss(np.zeros(ev.n_params), {}), 6)  # all logits 0: the loss is ln 10  # doctest: +SKIP
        2.302585
    """

    def __init__(self, run: str | Path | Run, samples: int = 512, bn: str = "train", seed: int = 0):
        run = run if isinstance(run, Run) else Run(run)
        sess = build_session(run.config)
        self._setup(sess.model, sess.loss_fn, sess.x, sess.y, samples=samples, bn=bn, seed=seed)
        self.run_path = run.path

    @classmethod
    def from_model(cls, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], inputs: torch.Tensor,
                   targets: torch.Tensor, *, samples: int = 512, bn: str = "train", seed: int = 0) -> LossEvaluator:
        """An evaluator of any model: ``loss_fn(model, (x, y))`` returns per-sample losses;
        ``inputs``/``targets`` are the training set the subset is drawn from.

        Example:
            >>> net = nn.Linear(3, 2)
            >>> per_sample = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
            >>> ev = LossEvaluator.from_model(net, per_sample, torch.ones(5, 3), torch.zeros(5, dtype=torch.long))
            >>> ev.n_params, ev.names, round(ev.loss(np.zeros(ev.n_params)), 6)  # all logits 0: ln 2
            (8, ['weight', 'bias'], 0.693147)
        """
        ev = cls.__new__(cls)
        ev._setup(model, loss_fn, inputs, targets, samples=samples, bn=bn, seed=seed)
        return ev

    def _setup(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], inputs: torch.Tensor,
               targets: torch.Tensor, *, samples: int, bn: str, seed: int) -> None:
        self.run_path: Path | None = None
        self.samples, self.bn, self.seed = samples, bn, seed
        self._set_mode: Callable[[nn.Module], nn.Module] = BN_MODES.get(bn)
        self.model, self.loss_fn = model, loss_fn
        self.names = trainable_names(self.model)
        named = dict(self.model.named_parameters())
        self.params = [named[n] for n in self.names]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.n_params = sum(p.numel() for p in self.params)
        self.indices = evaluation_subset(len(inputs), samples, seed)
        idx = self.indices.to(inputs.device)
        self.batch = (inputs[idx], targets[idx])
        # Everything of the state that θ does not cover: buffers (batch-norm statistics)
        # and frozen parameters. What a caller does not pass keeps the freshly built
        # model's values; the landscape always passes a stored state's own.
        keep = set(self.names)
        self._rest = {**dict(self.model.named_buffers()),
                      **{n: p for n, p in self.model.named_parameters() if n not in keep}}
        self.default_buffers = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k not in keep}

    @property
    def n_samples(self) -> int:
        """How many training samples the loss is on: ``samples``, or the whole set when smaller.

        Example:
            >>> per_sample = lambda m, b: (m(b[0]) - b[1]).pow(2).mean(1)
            >>> LossEvaluator.from_model(nn.Linear(3, 1), per_sample, torch.ones(5, 3), torch.zeros(5, 1),
            ...                          samples=100).n_samples
            5
        """
        return len(self.indices)

    @property
    def running_stats(self) -> bool:
        """Whether the model has a normalisation layer with running statistics (batch norm),
        the only layers whose evaluation the ``bn`` mode changes besides dropout.

        Example:
            >>> per_sample = lambda m, b: (m(b[0]) - b[1]).pow(2).mean(1)
            >>> x, y = torch.ones(4, 3), torch.zeros(4, 3)
            >>> [LossEvaluator.from_model(m, per_sample, x, y).running_stats
            ...  for m in (nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))]
            [False, True]
        """
        return any(name.rsplit(".", 1)[-1] in ("running_mean", "running_var")
                   for name, _ in self.model.named_buffers())

    def _load(self, theta: np.ndarray, buffers: Mapping[str, torch.Tensor] | None) -> None:
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (self.n_params,):
            raise ValueError(f"expected a flat vector of {self.n_params} parameters, got shape {theta.shape}")
        flat = torch.from_numpy(theta)
        with torch.no_grad():
            for p, chunk in zip(self.params, flat.split([p.numel() for p in self.params]), strict=True):
                p.copy_(chunk.view_as(p))  # one rounding float64 -> the parameter's dtype
            for k, v in {**self.default_buffers, **(buffers or {})}.items():
                if k in self._rest:
                    self._rest[k].copy_(v)

    def _forward(self) -> torch.Tensor:
        self._set_mode(self.model)
        devices = [self.batch[0].device] if self.batch[0].device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return self.loss_fn(self.model, self.batch).double().mean()

    def loss(self, theta: np.ndarray, buffers: Mapping[str, torch.Tensor] | None = None) -> float:
        """Mean per-sample loss over the subset at parameters ``theta`` (flat float64)."""
        self._load(theta, buffers)
        with torch.no_grad():
            return float(self._forward())

    def losses(self, thetas: np.ndarray, buffers: Mapping[str, torch.Tensor] | None = None) -> np.ndarray:
        """:meth:`loss` of each row of ``thetas``."""
        return np.array([self.loss(t, buffers) for t in np.atleast_2d(thetas)])

    def gradient(self, theta: np.ndarray, buffers: Mapping[str, torch.Tensor] | None = None) -> np.ndarray:
        """∇ of the subset loss at ``theta``, flat float64 (the full-batch gradient plain
        gradient descent on the subset would follow)."""
        self._load(theta, buffers)
        for p in self.params:
            p.grad = None
        self._forward().backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        return np.concatenate([g.detach().cpu().double().reshape(-1).numpy() for g in grads])
