"""Where a path comes from: a gammatrace run, or plain checkpoint files from any loop.

A *source* is a small frozen (hashable, picklable) description of one optimization
path that grid tasks can carry to any worker:

- :class:`RunSource` — a trained run directory (or URL): its epoch checkpoints and
  ``final.pt``; model, data and loss come from the run's config.
- :class:`CheckpointSource` — ordered files θ_0, …, θ_T saved by any training loop,
  plus ``module:attr`` names of a zero-argument **model factory** (returns the
  ``nn.Module``) and a zero-argument **data factory**, and a loss name from
  :data:`~gammatrace.techniques.LOSSES` (``cross_entropy``, ``mse``).

Checkpoint files are read with ``torch.load(..., weights_only=True)`` (no arbitrary
object is ever unpickled) and may hold

- a state_dict, as ``torch.save(model.state_dict(), f)`` writes it, or
- a dict with a ``"model"`` entry (gammatrace's own checkpoints, most hand-written
  loops) or else a ``"state_dict"`` entry (Lightning) holding the state_dict.

It must match the factory's model exactly: the same keys (a missing or unexpected key
is named) and shapes. The data factory returns the **training data** the loss is
evaluated on (a fixed subset of it, see ``samples``): either a pair ``(inputs,
targets)`` of tensors with one row per sample, or a map-style ``torch.utils.data.Dataset``
whose items are ``(input, target)`` pairs (stacked once). Everything runs on the CPU.

Every mistake a user can make here is one line: a :class:`LandscapeInputError`.

Example: a linear model's two checkpoints, from files a loop saved.

    >>> import sys, tempfile, textwrap
    >>> from pathlib import Path
    >>> tmp = Path(tempfile.mkdtemp())
    >>> _ = (tmp / "toy_factories.py").write_text(textwrap.dedent('''
    ...     import torch
    ...     def net():
    ...         torch.manual_seed(0)
    ...         return torch.nn.Linear(4, 3)
    ...     def data():
    ...         return torch.randn(20, 4, generator=torch.Generator().manual_seed(1)), torch.arange(20) % 3
    ... '''))
    >>> sys.path.insert(0, str(tmp))
    >>> net = resolve_factory("toy_factories:net", "--model")()
    >>> torch.save(net.state_dict(), tmp / "ckpt_0.pt")
    >>> torch.save({"model": {k: v + 0.1 for k, v in net.state_dict().items()}}, tmp / "ckpt_1.pt")
    >>> src = CheckpointSource((str(tmp / "ckpt_0.pt"), str(tmp / "ckpt_1.pt")), "toy_factories:net",
    ...                        "toy_factories:data")
    >>> ev = src.evaluator(samples=16, bn="train", seed=0)
    >>> traj = src.trajectory(ev)
    >>> traj.points.shape, traj.epochs.tolist(), src.name
    ((2, 15), [0, 1], 'ckpt_0..ckpt_1')
    >>> sys.path.remove(str(tmp))
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from gammatrace.engine.replay import pruned_error
from gammatrace.errors import UserError
from gammatrace.landscape.evaluate import LossEvaluator, Trajectory, flatten, load_trajectory
from gammatrace.store.run import Run
from gammatrace.techniques import LOSSES


class LandscapeInputError(UserError, ValueError):
    """A landscape's input a user can fix: a checkpoint file, a factory name, an option."""


class PathSource(Protocol):
    """One optimization path: its name, its model and loss at any point, its stored points."""

    @property
    def name(self) -> str: ...

    @property
    def label(self) -> str:
        """Where it comes from (a run folder, the last checkpoint file)."""
        ...

    def check(self) -> None:
        """Raise a :class:`~gammatrace.errors.UserError` when the path cannot be read."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the path's content: a changed file changes it."""
        ...

    def evaluator(self, samples: int, bn: str, seed: int) -> LossEvaluator:
        """The path's loss on a fixed training subset (cached per process)."""
        ...

    def build_evaluator(self, samples: int, bn: str, seed: int) -> LossEvaluator:
        """A new evaluator (what :meth:`evaluator` caches)."""
        ...

    def trajectory(self, ev: LossEvaluator) -> Trajectory:
        """θ_0, …, θ_T over ``ev.names`` with each point's buffers."""
        ...

    def final_buffers(self, ev: LossEvaluator) -> dict[str, torch.Tensor]:
        """The buffers (batch-norm statistics) of θ_T, without reading the whole path."""
        ...

    def compatibility(self) -> Any:
        """Paths with equal values share a loss surface (model, data and loss)."""
        ...


# ------------------------------------------------------------------------------- runs

@dataclass(frozen=True)
class RunSource:
    """A trained gammatrace run directory (or URL).

    Example:
        >>> RunSource("runs/sgd") == RunSource("runs/sgd"), hash(RunSource("runs/sgd")) == hash(RunSource("runs/sgd"))
        (True, True)
        >>> RunSource("runs/sgd").name  # needs a trained run in runs/sgd  # doctest: +SKIP
        'sgd'
    """

    path: str

    @property
    def name(self) -> str:
        return Run(self.path).name

    @property
    def label(self) -> str:
        return str(Run(self.path).path)

    def check(self) -> None:
        run = Run(self.path)
        if run.meta.checkpoints_pruned:
            raise pruned_error(run, "a landscape")

    def fingerprint(self) -> dict[str, Any]:
        # The path's end points pin the trajectory down: a retrained or resumed-differently
        # run changes final.pt or checkpoint 0 (the rest is a deterministic function of them
        # and the config, which is part of the fingerprint too).
        r = Run(self.path)
        return {"path": str(r.path.resolve()), "horizon": r.meta.horizon_epochs, "config": r.meta.config,
                "final": hashlib.sha256(r.store.read_bytes("final.pt")).hexdigest(),
                "start": hashlib.sha256(r.store.read_bytes(r.store.checkpoint(0))).hexdigest()}

    def evaluator(self, samples: int, bn: str, seed: int) -> LossEvaluator:
        # The run's config is part of the key: a run directory retrained with another
        # config in the same process must not get the old data and model.
        config = json.dumps(Run(self.path).meta.config, sort_keys=True)
        return _cached_evaluator(self, samples, bn, seed, config)

    def build_evaluator(self, samples: int, bn: str, seed: int) -> LossEvaluator:
        return LossEvaluator(self.path, samples=samples, bn=bn, seed=seed)

    def trajectory(self, ev: LossEvaluator) -> Trajectory:
        return load_trajectory(self.path, ev.names)

    def final_buffers(self, ev: LossEvaluator) -> dict[str, torch.Tensor]:
        keep = set(ev.names)
        return {k: v for k, v in Run(self.path).store.read_torch("final.pt")["model"].items() if k not in keep}

    def compatibility(self) -> Any:
        cfg = Run(self.path).config
        return {"data": cfg.data, "loss": cfg.loss, "model": (cfg.model.name, cfg.model.switches())}


# ----------------------------------------------------------------- checkpoint files

def resolve_factory(spec: str, option: str) -> Callable[[], Any]:
    """The callable named ``"package.module:attr"`` (``attr`` may be dotted), imported with
    :mod:`importlib`; ``option`` names the flag in error messages.

    Example:
        >>> resolve_factory("collections:OrderedDict", "--model")
        <class 'collections.OrderedDict'>
        >>> resolve_factory("collections", "--model")
        Traceback (most recent call last):
        ...
        gammatrace.landscape.sources.LandscapeInputError: --model 'collections': expected 'package.module:factory'
    """
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise LandscapeInputError(f"{option} {spec!r}: expected 'package.module:factory'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise LandscapeInputError(f"{option} {spec!r}: cannot import module '{module_name}' ({exc}); "
                                  "is its folder on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LandscapeInputError(f"{option} {spec!r}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LandscapeInputError(f"{option} {spec!r} is a {type(obj).__name__}, not a callable factory")
    return obj


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in a checkpoint file: the file's dict itself, or its ``"model"`` entry,
    or else its ``"state_dict"`` entry (see module doc). Read with ``weights_only=True``.

    Example:
        >>> load_state_file("no/such/ckpt.pt")
        Traceback (most recent call last):
        ...
        gammatrace.landscape.sources.LandscapeInputError: no/such/ckpt.pt: no such checkpoint file
    """
    p = Path(path)
    if not p.is_file():
        raise LandscapeInputError(f"{path}: {'a folder, not' if p.is_dir() else 'no such'} checkpoint file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types; its message suggests weights_only=False: never pass it on
        raise LandscapeInputError(f"{path} is not a tensor file readable with weights_only=True "
                                  f"({exc.__class__.__name__})") from None
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return dict(obj[key])
    raise LandscapeInputError(f"{path} holds a {type(obj).__name__} that is neither a state_dict nor a dict "
                              "with a 'model' or 'state_dict' entry")


def check_state(state: Mapping[str, torch.Tensor], model: nn.Module, where: str, spec: str) -> None:
    """Refuse a state_dict that does not fit ``model``: the first missing or unexpected key,
    or the first shape that differs.

    Example:
        >>> check_state({"weight": torch.zeros(2, 2)}, nn.Linear(2, 2), "ckpt.pt", "m:f")
        Traceback (most recent call last):
        ...
        gammatrace.landscape.sources.LandscapeInputError: ckpt.pt does not fit the model of m:f: missing key 'bias'
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = [f"missing key '{missing[0]}'"] if missing else []
    problems += [f"unexpected key '{unexpected[0]}'"] if unexpected else []
    if not problems:
        shapes = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
        if shapes:
            k = shapes[0]
            problems = [f"'{k}' has shape {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"]
    if problems:
        more = len(missing) + len(unexpected) - 1
        extra = f" ({more} more key(s) differ)" if more > 0 else ""
        raise LandscapeInputError(f"{where} does not fit the model of {spec}: {', '.join(problems)}{extra}")


def _training_data(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = resolve_factory(spec, "--data")()
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise LandscapeInputError(f"--data {spec!r} returned an empty dataset")
        items = [data[i] for i in range(len(data))]
        if not all(isinstance(it, Sequence) and len(it) == 2 for it in items[:1]):
            raise LandscapeInputError(f"--data {spec!r}: dataset items must be (input, target) pairs")
        data = (torch.stack([torch.as_tensor(x) for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items]))
    if not (isinstance(data, Sequence) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        raise LandscapeInputError(f"--data {spec!r} returned a {type(data).__name__}; expected (inputs, targets) "
                                  "tensors or a map-style Dataset of (input, target) pairs")
    x, y = data
    if len(x) != len(y) or len(x) == 0:
        raise LandscapeInputError(f"--data {spec!r}: {len(x)} inputs but {len(y)} targets")
    return x.cpu(), y.cpu()


@dataclass(frozen=True)
class CheckpointSource:
    """Ordered checkpoint files θ_0, …, θ_T of one path, and how to evaluate them (module doc).

    Example:
        >>> CheckpointSource(("a/ckpt_0.pt", "a/ckpt_9.pt"), "m:net", "m:data").name
        'ckpt_0..ckpt_9'
    """

    files: tuple[str, ...]
    model: str
    data: str
    loss: str = "cross_entropy"
    title: str = ""

    @property
    def name(self) -> str:
        return self.title or f"{Path(self.files[0]).stem}..{Path(self.files[-1]).stem}"

    @property
    def label(self) -> str:
        return str(Path(self.files[-1]).resolve())

    def check(self) -> None:
        for f in self.files:
            p = Path(f)
            if not p.is_file():
                raise LandscapeInputError(f"{f}: {'a folder, not' if p.is_dir() else 'no such'} checkpoint file")
        LOSSES.get(self.loss)
        resolve_factory(self.model, "--model")
        resolve_factory(self.data, "--data")

    def fingerprint(self) -> dict[str, Any]:
        # A changed factory *implementation* under the same name is not seen: rename it,
        # or use another --out.
        return {"files": [{"path": str(Path(f).resolve()), "sha256": hashlib.sha256(Path(f).read_bytes()).hexdigest()}
                          for f in self.files],
                "model": self.model, "data": self.data, "loss": self.loss}

    def evaluator(self, samples: int, bn: str, seed: int) -> LossEvaluator:
        return _cached_evaluator(self, samples, bn, seed, "")

    def build_evaluator(self, samples: int, bn: str, seed: int) -> LossEvaluator:
        model = resolve_factory(self.model, "--model")()
        if not isinstance(model, nn.Module):
            raise LandscapeInputError(f"--model {self.model!r} returned a {type(model).__name__}, "
                                      "not a torch.nn.Module")
        per_sample = LOSSES.get(self.loss)
        x, y = _training_data(self.data)
        return LossEvaluator.from_model(model.cpu(), lambda m, batch: per_sample(m(batch[0]), batch[1]), x, y,
                                        samples=samples, bn=bn, seed=seed)

    def state(self, i: int, ev: LossEvaluator) -> dict[str, torch.Tensor]:
        state = load_state_file(self.files[i])
        check_state(state, ev.model, self.files[i], self.model)
        return state

    def trajectory(self, ev: LossEvaluator) -> Trajectory:
        states = [self.state(i, ev) for i in range(len(self.files))]
        keep = set(ev.names)
        points = np.stack([flatten(s, ev.names) for s in states])
        return Trajectory(Path(self.label), self.name, list(ev.names), points,
                          [{k: v for k, v in s.items() if k not in keep} for s in states],
                          np.arange(len(self.files)))

    def final_buffers(self, ev: LossEvaluator) -> dict[str, torch.Tensor]:
        keep = set(ev.names)
        return {k: v for k, v in self.state(len(self.files) - 1, ev).items() if k not in keep}

    def compatibility(self) -> Any:
        return {"model": self.model, "data": self.data, "loss": self.loss}


@functools.lru_cache(maxsize=4)
def _cached_evaluator(source: PathSource, samples: int, bn: str, seed: int,
                      key: str) -> LossEvaluator:
    # One evaluator per process, path and setting: grid tasks that land in the same worker
    # (or in this process when workers = 1) share the loaded data and model.
    return source.build_evaluator(samples, bn, seed)


def make_sources(runs: Sequence[Any] | Mapping[str, Sequence[str | Path]], model: str | None = None,
                 data: str | None = None, loss: str = "cross_entropy") -> list[RunSource | CheckpointSource]:
    """The paths ``runs`` names: run directories; or, with ``model`` and ``data``, checkpoint
    files — a flat list is one path, a list of lists several, a dict ``{name: files}``
    several with names.

    Example:
        >>> [s.path for s in make_sources(["runs/sgd", "runs/adam"])]
        ['runs/sgd', 'runs/adam']
        >>> [s.name for s in make_sources({"adam": ["a0.pt", "a1.pt"]}, model="m:f", data="m:g")]
        ['adam']
        >>> make_sources(["a0.pt"], model="m:f")
        Traceback (most recent call last):
        ...
        gammatrace.landscape.sources.LandscapeInputError: --model and --data go together: give both for checkpoint files, neither for runs
    """
    if not runs:
        raise LandscapeInputError("give at least one run (or checkpoint file)")
    if (model is None) != (data is None):
        raise LandscapeInputError("--model and --data go together: give both for checkpoint files, neither for runs")
    if model is None:
        if isinstance(runs, Mapping) or any(not isinstance(r, str | Path) for r in runs):
            raise LandscapeInputError("groups of files are checkpoint paths: give --model and --data")
        return [RunSource(str(r)) for r in runs]
    LOSSES.get(loss)  # an unknown loss fails before any file is read
    if isinstance(runs, Mapping):
        groups = [(str(k), list(v)) for k, v in runs.items()]
    elif all(isinstance(r, str | Path) for r in runs):
        groups = [("", list(runs))]
    elif all(isinstance(r, Sequence) and not isinstance(r, str) for r in runs):
        groups = [("", list(r)) for r in runs]
    else:
        raise LandscapeInputError("checkpoint paths: give one list of files, a list of lists, or a dict of lists")
    out = []
    for title, files in groups:
        if not files:
            raise LandscapeInputError(f"path {title or len(out)} has no checkpoint files")
        out.append(CheckpointSource(tuple(str(f) for f in files), model, data, loss, title))
    return out
