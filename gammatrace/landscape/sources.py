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
is named) and shapes — except that a prefix every key shares (``module.`` of a DDP
wrapper, ``model.`` of a LightningModule's attribute, ``_orig_mod.`` of
``torch.compile``) is stripped when the stripped keys are exactly the model's. The data
factory returns the **training data** the loss is evaluated on (a fixed subset of it,
see ``samples``): either a pair ``(inputs, targets)`` of tensors or numpy arrays with
one row per sample (numpy floating inputs take the model's parameter dtype: numpy's
float64 default would not multiply a float32 model), or a map-style
``torch.utils.data.Dataset`` whose items are ``(input, target)`` pairs (stacked once).
Everything runs on the CPU.

The files of one path are taken in the order given, θ_0 first. Shells sort
``ckpt_*.pt`` as text (``ckpt_10`` before ``ckpt_2``), so when all file names are one
skeleton with numbers in it (``ckpt_<n>.pt``, ``epoch=<e>-step=<s>.ckpt``), the numbers
must increase along the path (:func:`training_order_problem`); other names are taken as
given, and a path whose last point's loss is clearly above its first's draws a
:class:`LandscapeWarning`.

Every mistake a user can make here is one line: a :class:`LandscapeInputError` — a
factory that raises, or a model that does not run on the data with the loss (tried
once on two samples when the evaluator is built), included.

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
import re
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
from gammatrace.landscape.evaluate import (
    BN_MODES,
    LossEvaluator,
    Trajectory,
    flatten,
    load_trajectory,
)
from gammatrace.store.run import Run, RunStore, StoreError
from gammatrace.techniques import LOSSES


class LandscapeInputError(UserError, ValueError):
    """A landscape's input a user can fix: a checkpoint file, a factory name, an option."""


class LandscapeWarning(UserWarning):
    """Something about a landscape's input that may be a mistake but need not be one."""


# File name endings that mark a checkpoint file rather than a run folder.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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
        try:
            run = Run(self.path)
        except StoreError as exc:
            p = Path(self.path)
            if p.is_file() or p.suffix.lower() in CHECKPOINT_SUFFIXES:
                raise LandscapeInputError(f"{_one_line(exc)}; checkpoint files of your own loop need --model and "
                                          "--data") from None
            raise
        if run.meta.checkpoints_pruned:
            raise pruned_error(run, "a landscape")

    def fingerprint(self) -> dict[str, Any]:
        # The path's end points pin the trajectory down: a retrained or resumed-differently
        # run changes final.pt or checkpoint 0 (the rest is a deterministic function of them
        # and the config, which is part of the fingerprint too).
        r = Run(self.path)
        return {"path": str(r.path.resolve()), "horizon": r.meta.horizon_epochs, "config": r.meta.config,
                "final": hashlib.sha256(r.store.read_bytes(RunStore.FINAL)).hexdigest(),
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
        return {k: v for k, v in Run(self.path).store.read_torch(RunStore.FINAL)["model"].items() if k not in keep}

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


def call_factory(spec: str, option: str) -> Any:
    """What the factory ``spec`` returns; whatever it raises becomes one line that names
    it (the original exception is the ``__cause__``).

    Example:
        >>> call_factory("collections:OrderedDict", "--data")
        OrderedDict()
        >>> call_factory("json:loads", "--data")
        Traceback (most recent call last):
        ...
        gammatrace.landscape.sources.LandscapeInputError: --data 'json:loads' raised TypeError: loads() missing 1 required positional argument: 's'
    """
    factory = resolve_factory(spec, option)
    try:
        return factory()
    except Exception as exc:  # any error of the user's code: one line, the chain kept for Python users
        detail = _one_line(exc)
        raise LandscapeInputError(f"{option} {spec!r} raised {type(exc).__name__}"
                                  f"{': ' + detail if detail else ''}") from exc


_NUMBER = re.compile(r"[0-9]+")


def _order_example(shown: list[str], numbers: list[tuple[int, ...]]) -> str:
    # A brace expansion that lists the files in order, when one number field varies
    # evenly and without zero padding; else only the generic advice.
    fields = [k for k in range(len(numbers[0])) if len({n[k] for n in numbers}) > 1]
    if len(fields) == 1:
        k = fields[0]
        texts = [_NUMBER.findall(s)[k] for s in shown]
        values = sorted({n[k] for n in numbers})
        steps = set(np.diff(values).tolist())
        if len(steps) == 1 and all(t == str(int(t)) for t in texts):
            step = steps.pop()
            brace = f"{{{values[0]}..{values[-1]}{'' if step == 1 else f'..{step}'}}}"
            parts = _NUMBER.split(shown[0])
            nums = _NUMBER.findall(shown[0])
            nums[k] = brace
            return "".join(p + n for p, n in zip(parts, [*nums, ""], strict=True)) + ", or ls -v"
    return "ls -v"


def training_order_problem(files: Sequence[str | Path]) -> str | None:
    """Why ``files`` (one path, θ_0 first) cannot be in training order, or None.

    When every name (as given) has one non-numeric skeleton and carries numbers, the
    tuples of those numbers must increase strictly along the path — what a shell's text
    order breaks (``ckpt_10`` before ``ckpt_2``). Names without numbers, or of different
    skeletons (``init.pt``, ``ckpt_5.pt``, ``final.pt``), are taken as given.

    Example:
        >>> shell_order = sorted(f"ckpt_{e}.pt" for e in range(13))  # what ckpt_*.pt expands to
        >>> shell_order[:5]
        ['ckpt_0.pt', 'ckpt_1.pt', 'ckpt_10.pt', 'ckpt_11.pt', 'ckpt_12.pt']
        >>> training_order_problem(shell_order)
        'checkpoint files are not in training order: ckpt_12.pt comes before ckpt_2.pt; give them in order (e.g. ckpt_{0..12}.pt, or ls -v)'
        >>> training_order_problem(["epoch=1-step=100.ckpt", "epoch=2-step=200.ckpt"]) is None
        True
        >>> training_order_problem(["init.pt", "ckpt_20.pt", "final.pt"]) is None
        True
    """
    names = [str(f) for f in files]
    if len(names) < 2 or len({tuple(_NUMBER.split(n)) for n in names}) != 1 or not _NUMBER.search(names[0]):
        return None
    # Short names when all sit in one folder (its numbers are the same for all).
    shown = [Path(n).name for n in names] if len({str(Path(n).parent) for n in names}) == 1 else names
    numbers = [tuple(int(x) for x in _NUMBER.findall(n)) for n in shown]
    for i in range(1, len(numbers)):
        if numbers[i] > numbers[i - 1]:
            continue
        a, b = shown[i - 1], shown[i]
        if numbers[i] == numbers[i - 1]:
            what = f"{a} is given twice" if a == b else f"{a} and {b} carry the same number(s)"
            return f"checkpoint files are not one path in training order: {what}; give each point once, in order"
        return (f"checkpoint files are not in training order: {a} comes before {b}; give them in order "
                f"(e.g. {_order_example(shown, numbers)})")
    return None


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


def _uniform_prefix(keys: Sequence[str]) -> str | None:
    heads = {k.split(".", 1)[0] for k in keys}
    return f"{heads.pop()}." if len(heads) == 1 and keys and all("." in k for k in keys) else None


_PREFIX_HINTS = {"module.": "saved from a DDP wrapper? save model.module.state_dict()",
                 "_orig_mod.": "saved from torch.compile? save model._orig_mod.state_dict()"}


def fit_state(state: Mapping[str, torch.Tensor], model: nn.Module, where: str, spec: str) -> dict[str, torch.Tensor]:
    """``state`` as ``model``'s keys name it: as is, or without a prefix every key shares
    (``module.``, ``model.``, ``_orig_mod.``, nested ones too) when the stripped keys are
    exactly the model's; else :func:`check_state`'s refusal, with a hint at the prefix.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> sorted(fit_state({"module." + k: v for k, v in net.state_dict().items()}, net, "f.pt", "m:f"))
        ['bias', 'weight']
        >>> fit_state({"module.weight": torch.zeros(1, 2)}, net, "f.pt", "m:f")
        Traceback (most recent call last):
        ...
        gammatrace.landscape.sources.LandscapeInputError: f.pt does not fit the model of m:f: missing key 'weight', unexpected key 'module.weight' (2 more key(s) differ); the file's keys start with 'module.': saved from a DDP wrapper? save model.module.state_dict()
    """
    own = set(model.state_dict())
    current = dict(state)
    while set(current) != own and (prefix := _uniform_prefix(list(current))) is not None:
        current = {k[len(prefix):]: v for k, v in current.items()}
        if set(current) == own:
            return current
    hint = ""
    first = _uniform_prefix(list(state))
    if first is not None and _uniform_prefix(list(own)) != first:
        why = _PREFIX_HINTS.get(first, f"saved from a wrapper (a LightningModule's self.{first[:-1]}?); "
                                       f"save the inner model's state_dict()")
        hint = f"the file's keys start with '{first}': {why}"
    check_state(state, model, where, spec, hint)
    return dict(state)


def check_state(state: Mapping[str, torch.Tensor], model: nn.Module, where: str, spec: str, hint: str = "") -> None:
    """Refuse a state_dict that does not fit ``model``: the first missing or unexpected key,
    or the first shape that differs (and ``hint``, if given, after a semicolon).

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
        extra += f"; {hint}" if hint and (missing or unexpected) else ""
        raise LandscapeInputError(f"{where} does not fit the model of {spec}: {', '.join(problems)}{extra}")


def _as_tensor(a: Any, spec: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    try:
        # A read-only array (np.load with mmap, a broadcast) is copied: torch would warn.
        return torch.as_tensor(a) if not isinstance(a, np.ndarray) or a.flags.writeable else torch.tensor(a)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise LandscapeInputError(f"--data {spec!r}: cannot make a tensor of a {type(a).__name__} "
                                  f"({_one_line(exc)})") from None


def _training_data(spec: str, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The data factory's (inputs, targets) as CPU tensors; numpy floating inputs in ``dtype``."""
    data = call_factory(spec, "--data")
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise LandscapeInputError(f"--data {spec!r} returned an empty dataset")
        items = [data[i] for i in range(len(data))]
        if not all(isinstance(it, Sequence) and len(it) == 2 for it in items[:1]):
            raise LandscapeInputError(f"--data {spec!r}: dataset items must be (input, target) pairs")
        data = ([x for x, _ in items], [y for _, y in items])
        from_numpy = isinstance(data[0][0], np.ndarray)
        data = tuple(torch.stack([_as_tensor(v, spec) for v in column]) for column in data)
    else:
        from_numpy = isinstance(data, Sequence) and len(data) == 2 and isinstance(data[0], np.ndarray)
        if isinstance(data, Sequence) and len(data) == 2 and all(isinstance(t, torch.Tensor | np.ndarray)
                                                                 for t in data):
            data = tuple(_as_tensor(t, spec) for t in data)
    if not (isinstance(data, Sequence) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        raise LandscapeInputError(f"--data {spec!r} returned a {type(data).__name__}; expected (inputs, targets) "
                                  "tensors or numpy arrays, or a map-style Dataset of (input, target) pairs")
    x, y = data
    if len(x) != len(y) or len(x) == 0:
        raise LandscapeInputError(f"--data {spec!r}: {len(x)} inputs but {len(y)} targets")
    if from_numpy and dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    return x.cpu(), y.cpu()


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


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
        problem = training_order_problem(self.files)
        if problem is not None:
            raise LandscapeInputError(f"{self.title}: {problem}" if self.title else problem)
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
        model = call_factory(self.model, "--model")
        if not isinstance(model, nn.Module):
            raise LandscapeInputError(f"--model {self.model!r} returned a {type(model).__name__}, "
                                      "not a torch.nn.Module")
        model = model.cpu()
        per_sample = LOSSES.get(self.loss)
        x, y = _training_data(self.data, _model_dtype(model))

        def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return per_sample(m(batch[0]), batch[1])

        self._try_once(model, loss_fn, x, y, bn)
        return LossEvaluator.from_model(model, loss_fn, x, y, samples=samples, bn=bn, seed=seed)

    def _try_once(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor, bn: str) -> None:
        # The loss on two samples, so that data that does not fit the model (shapes, target
        # dtypes) is one line naming the inputs, not a traceback from inside the grid. The
        # model's state (batch-norm statistics a train-mode forward updates) and the global
        # RNG (dropout) are left as they were.
        n = min(2, len(x))
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            BN_MODES.get(bn)(model)
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                loss_fn(model, (x[:n], y[:n])).double().mean()
        except Exception as exc:  # whatever the user's model or data raise
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            raise LandscapeInputError(
                f"--model {self.model!r} does not run on --data {self.data!r} with --loss {self.loss} (tried on "
                f"{n} sample(s) of inputs {tuple(x.shape[1:])} {_dtype(x)} and targets {tuple(y.shape[1:])} {_dtype(y)}): "
                f"{type(exc).__name__}: {' '.join(lines[-1].split()) if lines else ''}") from exc
        finally:
            model.load_state_dict(saved)

    def state(self, i: int, ev: LossEvaluator) -> dict[str, torch.Tensor]:
        return fit_state(load_state_file(self.files[i]), ev.model, self.files[i], self.model)

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
