"""A verified two-pass measurement of your own training loop, and its run folder.

The engine measures its own trainer exactly by training once and replaying (DESIGN §2).
:class:`TwoPass` does the same for a loop gammatrace did not write: it runs the loop
twice from the same seed, thread count and deterministic kernels. Pass 1 records θ_0,
every step's loss and update, θ_T and the setup; pass 2 measures every step against
θ* = θ_T (or a continuation θ*, or parameters you supply) and is checked bit for bit
against pass 1. A pass 2 that is not the same trajectory is an error naming the first
step where it differs and the likely cause: the batch (data order or augmentation not
drawn from the seed), the torch thread count, the deterministic-algorithms switch, the
random stream, or — when all of these agree — a nondeterministic kernel.

:func:`save_run` writes what a :class:`TwoPass` (or a lone :class:`~gammatrace.probe.Probe`)
measured as a run folder (DESIGN §4), marked ``source: own-loop`` in run.json, which
``gammatrace analyze`` re-summarises without replay and ``gammatrace report`` draws.

Example:
    >>> import tempfile, torch, gammatrace
    >>> from torch import nn
    >>> x, y = torch.randn(64, 5, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 3
    >>> loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
    >>> def build():
    ...     model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 3))
    ...     return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> def train(model, optimizer, probe):
    ...     for epoch in range(2):
    ...         for i in torch.randperm(64).split(16):     # shuffled by the seeded global generator
    ...             optimizer.zero_grad()
    ...             loss = loss_fn(model, (x[i], y[i]))
    ...             loss.backward()
    ...             probe.batch((x[i], y[i]), loss)
    ...             optimizer.step()
    ...         probe.end_epoch()
    >>> result = gammatrace.TwoPass(build, train, loss_fn=loss_fn, seed=0, threads=1).run()
    >>> len(result.steps()), result.reference_name, result.summary()["gamma_frac_positive"] > 0.5
    (8, 'last', True)
    >>> run = gammatrace.save_run(result, tempfile.mkdtemp() + "/mine")
    >>> run.meta.source, run.references(), gammatrace.analyze(run.path, tail=2)["n_steps"]
    ('own-loop', ['last'], 6)
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from gammatrace import principles as P
from gammatrace.config import RunConfig, check_name
from gammatrace.curvature import CurvatureConfig
from gammatrace.engine.replay import ReplayMismatchError
from gammatrace.engine.session import provenance
from gammatrace.engine.trainer import RunConflictError
from gammatrace.errors import UserError
from gammatrace.probe import Probe, load_reference
from gammatrace.probe.matched import canonical_state
from gammatrace.probe.probe import REFERENCE_COLUMNS
from gammatrace.store.run import (
    OWN_LOOP,
    Run,
    RunMeta,
    RunStore,
    Status,
    check_out_folder,
    params_sha256,
)

# Columns both passes measure and that are functions of the trajectory alone: they must
# agree bit for bit (pass 1 records them in record mode, pass 2 in reference mode).
VERIFIED_COLUMNS = ("step", "epoch", "lr", "loss", "update_sq", "grad_sq")


class TwoPassMismatchError(ReplayMismatchError):
    """Pass 2 of a :class:`TwoPass` is not the trajectory pass 1 recorded.

    ``step`` is the first step where they differ (None: before the first step, θ_0), and
    ``cause`` the likely reason: ``"batch"``, ``"threads"``, ``"deterministic"``, ``"rng"``,
    ``"nondeterministic"`` (none of the others differ: a kernel), ``"init"`` (θ_0),
    ``"steps"`` (another number of steps) or ``"final"`` (θ_T alone).
    """

    def __init__(self, message: str, step: int | None, cause: str):
        super().__init__(message)
        self.step, self.cause = step, cause


# --------------------------------------------------------------------------- what each pass sees
def fingerprint(batch: Any) -> str | tuple[str, torch.Tensor]:
    """An identity of a batch: BLAKE2b of the bytes of its CPU tensors (and the repr of plain
    values) in order; for tensors on an accelerator a float64 checksum left on the device,
    so that recording it costs no synchronisation.

    Example:
        >>> a = (torch.arange(6.0).reshape(2, 3), torch.tensor([0, 1]))
        >>> b = (a[0].clone(), a[1].clone()); b[0][1, 2] += 1e-6
        >>> fingerprint(a) == fingerprint((a[0].clone(), a[1].clone())), fingerprint(a) == fingerprint(b)
        (True, False)
    """
    h = hashlib.blake2b(digest_size=16)
    device_parts: list[torch.Tensor] = []
    _digest(batch, h, device_parts)
    if device_parts:
        return h.hexdigest(), torch.cat(device_parts)
    return h.hexdigest()


def _same(a: str | tuple[str, torch.Tensor], b: str | tuple[str, torch.Tensor]) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a[0] == b[0] and torch.equal(a[1], b[1])


def _digest(obj: Any, h: Any, device_parts: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.is_sparse:
            t = t.to_dense()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.device.type == "cpu":
            if t.numel():
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif t.numel():
            flat = t.reshape(-1).to(torch.float64)
            weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
            device_parts.append(torch.stack([flat.sum(), (flat * weights.reciprocal()).sum()]))
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, Mapping):
        for key in obj:
            h.update(repr(key).encode())
            _digest(obj[key], h, device_parts)
    elif isinstance(obj, (list, tuple)):
        h.update(f"S{len(obj)}".encode())
        for item in obj:
            _digest(item, h, device_parts)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(repr(obj).encode())
    else:
        h.update(type(obj).__qualname__.encode())


def _rng_digest() -> str:
    """The state of the global generators a loop draws from (torch CPU, NumPy, Python)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(torch.get_rng_state().numpy().tobytes())
    _, keys, pos, gauss, cached = np.random.get_state()
    h.update(keys.tobytes() + repr((pos, gauss, cached)).encode())
    # Not hash(random.getstate()): the state ends with gauss_next, often None, whose hash is its
    # address before Python 3.12 — another value in every process.
    version, internal, gauss = random.getstate()
    h.update(np.asarray(internal, dtype=np.int64).tobytes() + repr((version, gauss)).encode())
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class StepSetup:
    """What a step's result depends on besides θ_k and the batch, read as the step begins."""

    threads: int
    deterministic: bool
    rng: str


def step_setup() -> StepSetup:
    """The thread count, deterministic switch and random state now (as a step begins)."""
    return StepSetup(torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), _rng_digest())


class _TraceHook:
    # Holds the probe weakly, as the probe's own hooks do: a dropped probe stops tracing.
    __slots__ = ("_probe",)

    def __init__(self, probe: _PassProbe):
        self._probe = weakref.ref(probe)

    def __call__(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        probe = self._probe()
        if probe is not None and optimizer is probe.optimizer:
            # The probe's pre-hook ran first (registered first): step_index is this step's.
            probe.setups[probe.step_index] = step_setup()


class _PassProbe(Probe):
    """The probe handed to the loop in either pass: a :class:`Probe` that also records, for
    the diagnosis of a pass 2 that differs, a fingerprint of every batch it is told and the
    thread count, deterministic switch and random state at every step (for a loop without an
    optimizer, as each ``with probe.update(...)`` block is entered). ``on_step(probe)``, if
    given, runs after every measured step (the script runner's snapshot and online check)."""

    def __init__(self, *args: Any, on_step: Callable[[_PassProbe], None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.batches: list[tuple[int, Any]] = []  # (step index, fingerprint)
        self.setups: dict[int, StepSetup] = {}
        self.on_step = on_step
        self._trace = None if self.optimizer is None else self.optimizer.register_step_pre_hook(_TraceHook(self))

    def close(self) -> None:
        super().close()
        if self._trace is not None:
            self._trace.remove()

    @contextlib.contextmanager
    def update(self, lr: float) -> Iterator[None]:
        self.setups[self.step_index] = step_setup()
        with super().update(lr):
            yield

    def _record_step(self, active: Any) -> None:
        super()._record_step(active)
        if self.on_step is not None:
            self.on_step(self)

    def batch(self, batch: Any, loss: torch.Tensor | float | None = None, **kwargs: Any) -> None:
        self.batches.append((self.step_index, fingerprint(batch)))
        super().batch(batch, loss, **kwargs)


class PendingProbe:
    """What ``train`` gets in place of the probe when ``build()`` returned no optimizer (``None``):
    the loop makes its optimizer itself (a framework that configures it when training starts)
    and calls :meth:`attach` with it before the first step, which makes the pass's probe.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> pending = PendingProbe(lambda optimizer: Probe(model, optimizer))
        >>> probe = pending.attach(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> pending.probe is probe
        True
    """

    def __init__(self, make: Callable[[torch.optim.Optimizer], Probe]):
        self._make = make
        self.probe: Probe | None = None

    def attach(self, optimizer: torch.optim.Optimizer) -> Probe:
        """The pass's probe, made on ``optimizer`` (once; before the optimizer's first step)."""
        if self.probe is not None:
            raise UserError("TwoPass: the pending probe is attached already (one optimizer per pass)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(f"TwoPass: attach() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.probe = self._make(optimizer)
        return self.probe

    def made(self) -> Probe:
        if self.probe is None:
            raise UserError("TwoPass: build() returned no optimizer, and the loop never called "
                            "probe.attach(optimizer), so no step was measured")
        return self.probe


def _made(probe: Probe | PendingProbe) -> Probe | None:
    return probe.probe if isinstance(probe, PendingProbe) else probe


def _plain_number(value: Any) -> str:
    """A table value as a plain number (``4.76e-05``, not ``np.float64(4.76e-05)``).

    Example:
        >>> _plain_number(np.float64(4.76e-05)), _plain_number(np.int64(3)), _plain_number(float("nan"))
        ('4.76e-05', '3', 'nan')
    """
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return repr(value)


def check_run_folder(run_dir: str | Path) -> RunStore:
    """The store of ``run_dir`` if a run may be written there, else the one-line error
    (:class:`RunConflictError`: it holds a run; :class:`~gammatrace.errors.UserError`: it is a
    file). The two-pass helpers call it before any compute, :func:`save_run` again at the end.

    Example:
        >>> import tempfile
        >>> check_run_folder(tempfile.mkdtemp() + "/new").root.name
        'new'
    """
    store = RunStore(check_out_folder(run_dir, "run_dir"))
    if store.exists(RunStore.META):
        raise RunConflictError(f"{store.root} already holds a run; choose another folder or remove it")
    return store


# --------------------------------------------------------------------------- the helper
def _unpack(built: Any) -> tuple[nn.Module, torch.optim.Optimizer | None, tuple]:
    if not isinstance(built, (tuple, list)) or len(built) < 2:
        raise UserError("TwoPass: build() must return (model, optimizer) or (model, optimizer, extra...), "
                        f"got {type(built).__name__}")
    model, optimizer, *extra = built
    if not isinstance(model, nn.Module) or not (optimizer is None or isinstance(optimizer, torch.optim.Optimizer)):
        raise UserError("TwoPass: build() must return (model, optimizer, ...) with an nn.Module and a "
                        f"torch.optim.Optimizer, got ({type(model).__name__}, {type(optimizer).__name__}, ...)")
    return model, optimizer, tuple(extra)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict, detached copies under canonical (uncompiled) names."""
    return {k: v.detach().clone() for k, v in canonical_state(model.state_dict()).items()
            if isinstance(v, torch.Tensor)}


def _first_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> tuple[str, float] | None:
    for name in a:
        if name not in b:
            return name, math.inf
        x, y = a[name], b[name]
        if x.shape != y.shape:
            return name, math.inf
        if not torch.equal(x, y):
            diff = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else math.inf
            return name, diff
    return None


def _equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise bitwise equality (two NaNs of the same step count as equal)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a == b) | (np.isnan(a) & np.isnan(b))


@dataclass
class TwoPassResult:
    """What a :class:`TwoPass` measured: pass 2's per-step tables against θ*, pass 1's record,
    and θ_0, θ_T, θ* (state dicts under canonical names), with the setup both passes ran under.

    See :class:`TwoPass` and the module's example for results of a run.
    """

    reference_name: str  # 'last' (θ_T), 'continuation', or 'file-…'/'given-…' (supplied θ*)
    seed: int
    threads: int
    deterministic: bool
    theta_0: dict[str, torch.Tensor]
    theta_T: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]  # θ*
    names: list[str]  # the trainable tensors, θ
    record: pd.DataFrame  # pass 1 (record mode): step, epoch, lr, loss, update_sq, grad_sq, dist0_sq
    provenance: dict[str, Any]
    model_class: str
    optimizer_class: str
    returned: Any = None  # what pass 2's train() returned
    _probe: Probe | None = field(default=None, repr=False)
    _record_samples: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    @property
    def n_params(self) -> int:
        return int(sum(self.theta_0[n].numel() for n in self.names))

    @property
    def d0_sq(self) -> float:
        """D_0² = ‖θ_0 − θ*‖², as the probe measured it at step 0."""
        assert self._probe is not None
        if self._probe.d0_sq is not None:
            return self._probe.d0_sq
        return float(sum((self.theta_0[n].double() - self.reference[n].double()).pow(2).sum() for n in self.names))

    @property
    def displacement(self) -> float:
        """‖θ_0 − θ_T‖ over the trainable tensors, in float64."""
        return math.sqrt(sum(float((self.theta_0[n].double() - self.theta_T[n].double()).pow(2).sum())
                             for n in self.names))

    def raw_steps(self) -> pd.DataFrame:
        assert self._probe is not None
        return self._probe.raw_steps()

    def steps(self, ell_inf: float = 0.0, eps: float = 1e-8) -> pd.DataFrame:
        """The DESIGN §6 per-step table of pass 2 (γ normalised by D_0², as measured at step 0)."""
        return P.derive(self.raw_steps(), d0_sq=self.d0_sq, ell_inf=ell_inf, eps=eps)

    def tensor_steps(self) -> pd.DataFrame:
        """Per-tensor progress P_k,i (step, epoch, tensor, progress)."""
        assert self._probe is not None
        return self._probe.tensor_steps()

    def sample_steps(self) -> pd.DataFrame:
        """Per-sample losses at each visit, where the loop gave ``indices``/``sample_losses``."""
        assert self._probe is not None
        return self._probe.sample_steps()

    def record_steps(self) -> pd.DataFrame:
        """Pass 1's rows (record mode)."""
        return self.record

    def skipped(self) -> pd.DataFrame:
        """Steps the optimizer never made (GradScaler overflows), as :meth:`Probe.skipped`."""
        assert self._probe is not None
        return self._probe.skipped()

    def summary(self, tail: int = 0, ell_inf: float = 0.0, eps: float = 1e-8) -> dict[str, Any]:
        """:func:`gammatrace.principles.summarize` of :meth:`steps`, plus the reference's name and
        the number of skipped steps (the same numbers ``gammatrace analyze`` gives its run folder)."""
        out: dict[str, Any] = {"reference": self.reference_name, "ell_inf": ell_inf}
        out.update(P.summarize(self.raw_steps(), tail=tail, ell_inf=ell_inf, displacement=self.displacement,
                               d0_sq=self.d0_sq, eps=eps))
        out["n_skipped"] = len(self.skipped())
        return out

    def save(self, run_dir: str | Path, name: str | None = None) -> Run:
        """:func:`save_run` of this result."""
        return save_run(self, run_dir, name=name)


class TwoPass:
    """Run your own training loop twice and measure it exactly against θ* = θ_T (DESIGN §2).

    Args:
        build: ``build() -> (model, optimizer[, extra, ...])``, fresh objects for each pass
            (a scheduler, a GradScaler, a data loader go in ``extra``). It runs after the
            global generators are seeded, so a default-initialised model is the same θ_0
            in both passes. ``optimizer`` may be ``None`` when the loop makes its optimizer
            itself: ``train`` then gets a :class:`PendingProbe` and calls its
            ``attach(optimizer)`` before the first step.
        train: ``train(model, optimizer, probe, *extra)``, your loop. It tells ``probe`` each
            micro-batch with ``probe.batch(batch, loss)`` and steps its optimizer as usual
            (:class:`~gammatrace.probe.Probe`); ``probe.end_epoch()`` counts epochs.
        loss_fn: ``loss_fn(model, batch) -> loss``, the loop's loss; pass 2 evaluates ℓ(θ*; B_k)
            with it, under the RNG and autocast state of the training forward.
        seed: seeds torch, NumPy and Python's ``random`` before each ``build()``.
        threads: ``torch.set_num_threads`` for both passes (part of the trajectory's identity).
        reference: θ* other than θ_T: a state dict or a path (``None``: θ_T, or the
            continuation's end).
        continuation: ``continuation(model, optimizer, probe, *extra)``, more training after
            pass 1's horizon (e.g. ``functools.partial(train, epochs=2)``); θ* is where it ends,
            beyond the analysed horizon, so the progress no longer telescopes (DESIGN §1).
        deterministic: ``torch.use_deterministic_algorithms`` for both passes (``"warn"``:
            warn only, for ops without a deterministic implementation).
        per_tensor, kernel, check: passed to the pass-2 :class:`~gammatrace.probe.Probe`
            (``check`` to both passes' probes).
        out: write the run folder here (:func:`save_run`) after pass 2; checked before
            pass 1, so a folder that already holds a run is refused before any training.
        curvature, curvature_batch: curvature along the path, as ``Probe(curvature=...)``,
            measured by pass 2 only (θ_k is the same in both passes) and written with the run
            as ``analysis/<ref>/curvature/`` (``gammatrace.analysis.load_hook_table``).

    Between the passes the helper compares every step bit for bit: loss, ‖Δ_k‖², ‖g_k‖²,
    learning rate and epoch, the skipped steps, the fingerprint of every batch, the thread
    count, deterministic switch and random state at every step, and finally θ_T. The first
    difference raises :class:`TwoPassMismatchError` naming the step and the likely cause.
    Torch's thread count, deterministic switch and cuDNN benchmark flag are restored
    afterwards; the global generators are left seeded.

    Example:
        >>> import torch, gammatrace
        >>> from torch import nn
        >>> data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(6)]
        >>> loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])
        >>> def build():
        ...     model = nn.Linear(4, 1)
        ...     optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        ...     return model, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)
        >>> def train(model, optimizer, probe, scheduler):
        ...     for batch in data:
        ...         optimizer.zero_grad()
        ...         loss = loss_fn(model, batch)
        ...         loss.backward()
        ...         probe.batch(batch, loss)
        ...         optimizer.step()
        ...         scheduler.step()
        >>> two = gammatrace.TwoPass(build, train, loss_fn=loss_fn, seed=1, threads=1)
        >>> steps = two.run().steps()
        >>> len(steps), float(steps["dist_sq"].iloc[0]) == two.result.d0_sq
        (6, True)

        A pass 2 that is not the same training is refused, naming the step and the cause:

        >>> def perturbed(model, optimizer, probe, scheduler):
        ...     calls.append(1)
        ...     for k, (x, y) in enumerate(data):
        ...         if len(calls) == 2 and k == 3:
        ...             x = x + 1e-3                       # pass 2 sees another batch at step 3
        ...         optimizer.zero_grad(); loss = loss_fn(model, (x, y)); loss.backward()
        ...         probe.batch((x, y), loss); optimizer.step(); scheduler.step()
        >>> calls = []
        >>> gammatrace.TwoPass(build, perturbed, loss_fn=loss_fn, seed=1, threads=1).run()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gammatrace.engine.twopass.TwoPassMismatchError: pass 2 diverged from pass 1 at step 3 (epoch 0): ...the batch of step 3 differs from pass 1's...
    """

    def __init__(
        self,
        build: Callable[[], Any],
        train: Callable[..., Any],
        *,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        seed: int,
        threads: int,
        reference: str | Path | Mapping[str, torch.Tensor] | None = None,
        continuation: Callable[..., Any] | None = None,
        deterministic: bool | str = True,
        per_tensor: bool = True,
        kernel: str | None = None,
        check: bool | int = True,
        out: str | Path | None = None,
        curvature: CurvatureConfig | Mapping[str, Any] | None = None,
        curvature_batch: Any = None,
    ):
        if not callable(build) or not callable(train):
            raise UserError("TwoPass(build, train, ...): build and train must be callables")
        if loss_fn is None or not callable(loss_fn):
            raise UserError("TwoPass needs loss_fn=lambda model, batch: loss (pass 2 evaluates ℓ(θ*; B_k) with it)")
        if not isinstance(threads, int) or threads < 1:
            raise UserError(f"TwoPass: threads must be a positive int, got {threads!r}")
        if reference is not None and continuation is not None:
            raise UserError("TwoPass: give either reference= (θ* known) or continuation= (θ* trained on), not both")
        if deterministic not in (True, False, "warn"):
            raise UserError(f"TwoPass: deterministic must be True, False or 'warn', got {deterministic!r}")
        self.build, self.train, self.loss_fn = build, train, loss_fn
        self.seed, self.threads = int(seed), threads
        self.reference, self.continuation = reference, continuation
        self.deterministic = deterministic
        self.per_tensor, self.kernel, self.check = per_tensor, kernel, check
        self.curvature, self.curvature_batch = curvature, curvature_batch
        self.out = out
        self.result: TwoPassResult | None = None

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if self.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=self.deterministic == "warn")
            torch.backends.cudnn.benchmark = False
        torch.set_num_threads(self.threads)
        if torch.get_num_threads() != self.threads:
            raise UserError(f"TwoPass: could not set {self.threads} torch threads (got {torch.get_num_threads()})")
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)

    def _probe(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
               reference: Mapping[str, torch.Tensor] | None) -> _PassProbe | PendingProbe:
        # Curvature at θ_k, which both passes share: measured once, by pass 2 (reference given).
        measured = ({"curvature": self.curvature, "curvature_batch": self.curvature_batch}
                    if reference is not None and self.curvature is not None else {})

        def make(optimizer: torch.optim.Optimizer) -> _PassProbe:
            return _PassProbe(model, optimizer, self.loss_fn, reference=reference, per_tensor=self.per_tensor,
                              kernel=self.kernel, check=self.check, **measured)

        return PendingProbe(make) if optimizer is None else make(optimizer)

    # ------------------------------------------------------------------ the passes
    def run(self) -> TwoPassResult:
        """Pass 1, then pass 2 against θ*, verified; returns (and keeps as ``.result``) the result
        (and writes it to ``out``)."""
        if self.out is not None:
            check_run_folder(self.out)  # before any compute: a taken folder costs no training
        saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                 torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
        try:
            self.result = self._run()
        finally:
            torch.set_num_threads(saved[0])
            torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
            torch.backends.cudnn.benchmark = saved[3]
        if self.out is not None:
            save_run(self.result, self.out)
        return self.result

    def _run(self) -> TwoPassResult:
        # Pass 1: record.
        self._setup()
        model, optimizer, extra = _unpack(self.build())
        theta_0 = _state(model)
        rng_after_build = _rng_digest()
        pending = self._probe(model, optimizer, None)
        self.train(model, optimizer, pending, *extra)
        first = pending.made() if isinstance(pending, PendingProbe) else pending
        first.close()
        optimizer = first.optimizer
        record = first.raw_steps()
        if record.empty:
            raise UserError("TwoPass: the loop made no measured step; call probe.batch(batch, loss) before each "
                            "optimizer.step()")
        theta_T = _state(model)
        names = list(first.names)
        ref_name, reference = self._reference(model, optimizer, extra, first, theta_T)
        del model, optimizer, extra

        # Pass 2: measure against θ*, then verify.
        self._setup()
        model, optimizer, extra = _unpack(self.build())
        diff = _first_difference(theta_0, _state(model))
        if diff is not None or _rng_digest() != rng_after_build:
            what = (f"'{diff[0]}' differs by up to {diff[1]:.3g}" if diff is not None
                    else "the random generators were left in another state")
            raise TwoPassMismatchError(
                f"pass 2 did not start where pass 1 did: build() made another θ_0 ({what}); build() must make "
                "everything afresh from the global generators TwoPass seeds (no state kept between calls)",
                None, "init")
        pending = self._probe(model, optimizer, reference)
        try:
            returned = self.train(model, optimizer, pending, *extra)
        except Exception as exc:
            # A pass 2 that left pass 1's trajectory may fail later (a NaN check, a shape):
            # name the first difference, if any, rather than its consequence.
            second = _made(pending)
            if second is not None:
                second.close()
                self._verify(first, second, theta_T, None, cause=exc)
            raise
        second = pending.made() if isinstance(pending, PendingProbe) else pending
        optimizer = second.optimizer
        second.close()
        self._verify(first, second, theta_T, _state(model))
        return TwoPassResult(
            reference_name=ref_name, seed=self.seed, threads=self.threads, deterministic=bool(self.deterministic),
            theta_0=theta_0, theta_T=theta_T, reference=reference, names=names, record=record,
            provenance={**provenance(RunConfig.model_construct(threads=self.threads, device=str(second.device))),
                        "seed": self.seed, "deterministic": self.deterministic,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            model_class=type(model).__qualname__, optimizer_class=type(optimizer).__qualname__,
            returned=returned, _probe=second, _record_samples=first.sample_steps())

    def _reference(self, model: nn.Module, optimizer: torch.optim.Optimizer, extra: tuple, first: Probe,
                   theta_T: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
        if self.continuation is not None:
            more = Probe(model, optimizer, step=first.step_index, epoch=first.epoch, check=False)
            self.continuation(model, optimizer, more, *extra)
            more.close()
            return "continuation", _state(model)
        if self.reference is not None:
            state = canonical_state(load_reference(self.reference))
            digest = params_sha256(state)[:16]
            if isinstance(self.reference, (str, Path)):
                return f"file-{Path(self.reference).stem}-{digest}", state
            return f"given-{digest}", state
        return "last", theta_T

    # ------------------------------------------------------------------ verification
    def _verify(self, first: _PassProbe, second: _PassProbe, theta_T: Mapping[str, torch.Tensor],
                final: Mapping[str, torch.Tensor] | None, cause: BaseException | None = None) -> None:
        PassVerifier(self.threads).verify(first, second, theta_T, final, cause)


# --------------------------------------------------------------------------- verification
# What the diagnosis tells the user to do differs between the in-process helper (build() and
# train() in one process) and scripts run as two processes (`gammatrace twopass`).
TWOPASS_HINTS = {
    "threads": "leave torch.set_num_threads to TwoPass(threads={threads}), which sets it for both passes",
    "deterministic": "leave it to TwoPass(deterministic=...)",
    "carried_head": ("state carried between the passes: both began from the same θ_0 and random state, yet "
                     "differ at their first step, so the loop reads something pass 1 left behind — an iteration "
                     "or step counter, an iterator, a cache kept at module level or on an object build() does "
                     "not make afresh (pass 2 starts where pass 1 stopped)"),
    "carried_fix": "; make it in build() (or reset it at the start of train())",
    "batch": ("shuffle and augment with torch's global generator, which TwoPass seeds, or with generators "
              "seeded from the same seed (DataLoader(generator=...), worker_init_fn), and build loaders "
              "afresh in build()"),
    "outside": "state outside build() that the loop reads (a global, a cache, the clock)",
    "final": "the loop changes the parameters outside optimizer.step() in one pass only",
}


class PassVerifier:
    """The comparison of two passes of one loop, step by step, and the diagnosis of the first
    difference (:class:`TwoPassMismatchError`). ``first`` and ``second`` are anything with
    ``raw_steps()``, ``skipped()``, ``batches`` (step, :func:`fingerprint`) and ``setups``
    (step -> :class:`StepSetup`): the passes' probes, or their records read back from disk.
    ``hints`` words the advice for where the passes ran (:data:`TWOPASS_HINTS`).
    """

    def __init__(self, threads: int, hints: Mapping[str, str] = TWOPASS_HINTS):
        self.threads, self.hints = threads, hints

    def verify(self, first: _PassProbe, second: _PassProbe, theta_T: Mapping[str, torch.Tensor],
                final: Mapping[str, torch.Tensor] | None, cause: BaseException | None = None) -> None:
        """Raise :class:`TwoPassMismatchError` at the first difference between the passes.

        ``final`` None: pass 2 stopped early (``cause``); only the steps it made are compared.
        """
        a, b = first.raw_steps(), second.raw_steps()
        n = min(len(a), len(b))
        differs = np.zeros(n, dtype=bool)
        for c in VERIFIED_COLUMNS:
            differs |= ~_equal(a[c].to_numpy()[:n], b[c].to_numpy()[:n])
        row = int(np.flatnonzero(differs)[0]) if differs.any() else None
        k_rows = int(a["step"].iloc[row]) if row is not None else None
        k_count = None
        if row is None and len(a) != len(b) and final is not None:
            k_count = int((a if len(a) > n else b)["step"].iloc[n])
        k_batch = self._first_batch_difference(first.batches, second.batches, complete=final is not None)
        k_setup = next((k for k in sorted(second.setups) if first.setups.get(k, second.setups[k]) != second.setups[k]),
                       None)
        k_skip = self._first_skip_difference(first.skipped(), second.skipped(), complete=final is not None)
        found = [k for k in (k_rows, k_count, k_batch, k_setup, k_skip) if k is not None]
        if not found:
            if final is None:
                return  # the failure is the loop's own, not a difference between the passes
            diff = _first_difference(theta_T, final)
            if diff is not None:
                raise TwoPassMismatchError(
                    f"pass 2 ended at another θ_T ('{diff[0]}' differs by up to {diff[1]:.3g}) although every "
                    f"step's loss and update matched pass 1: {self.hints['final']}", None, "final")
            return
        k = min(found)
        col = None
        if k_rows == k:
            col = next(c for c in VERIFIED_COLUMNS if not _equal(a[c].to_numpy()[row:row + 1],
                                                                  b[c].to_numpy()[row:row + 1])[0])
        kind, why = self._cause(k, k_batch, first, second, col)
        if col is not None:
            head = (f"pass 2 diverged from pass 1 at step {k} (epoch {int(a['epoch'].iloc[row])}): {col} "
                    f"{_plain_number(a[col].iloc[row])} in pass 1, {_plain_number(b[col].iloc[row])} in pass 2")
        elif k_count == k and kind == "nondeterministic":
            kind, why = "steps", ("the loop's number of steps depends on something besides the seed "
                                  "(a time budget, a file that changed, a global counter)")
            head = f"pass 2 made {len(b)} steps where pass 1 made {len(a)}"
        else:
            head = f"pass 2 diverged from pass 1 at step {k} (its loss still agrees)"
        if cause is not None:
            head += f", then failed ({type(cause).__name__})"
        raise TwoPassMismatchError(f"{head}; likely cause: {why}", k, kind) from cause

    def _carried(self, k: int, k_batch: int | None, first: _PassProbe, second: _PassProbe,
                 column: str | None) -> str | None:
        """Why pass 2 differs at its very first step although it began from pass 1's θ_0 and
        random state, if that points at state carried from pass 1 (else None)."""
        start = min(first.setups, default=0)
        s1, s2 = first.setups.get(start), second.setups.get(start)
        if k != start or s1 is None or s2 is None or s1.rng != s2.rng:
            return None
        head, fix = self.hints["carried_head"], self.hints["carried_fix"]
        later = [j for j, f in first.batches if j > start]
        if second.batches and second.batches[0][0] == start:
            mine = second.batches[0][1]
            seen = next((j for j, f in first.batches if j > start and _same(f, mine)), None)
            if seen is not None:
                return f"{head}: pass 2's first batch is the one pass 1 used at step {seen}{fix}"
        if column == "lr":
            return f"{head}: the learning rate of the first step differs, with the schedule built afresh{fix}"
        if k_batch == start and later:
            return (f"{head}: the first batch differs{fix}; or the data are drawn from a source the seed does not "
                    "set (an unseeded generator, the clock)")
        return None

    @staticmethod
    def _first_batch_difference(a: list, b: list, complete: bool = True) -> int | None:
        for (k1, f1), (k2, f2) in zip(a, b, strict=False):
            if k1 != k2 or not _same(f1, f2):
                return min(k1, k2)
        if complete and len(a) != len(b):
            return (a if len(a) > len(b) else b)[min(len(a), len(b))][0]
        return None

    @staticmethod
    def _first_skip_difference(a: pd.DataFrame, b: pd.DataFrame, complete: bool = True) -> int | None:
        x, y = a["next_step"].tolist(), b["next_step"].tolist()
        for s, t in zip(x, y, strict=False):
            if s != t:
                return min(s, t)
        if complete and len(x) != len(y):
            return (x if len(x) > len(y) else y)[min(len(x), len(y))]
        return None

    def _cause(self, k: int, k_batch: int | None, first: _PassProbe, second: _PassProbe,
               column: str | None = None) -> tuple[str, str]:
        """The likely reason pass 2 left pass 1's trajectory at step ``k`` (``column``: the
        first verified column that differs there, if the step's row does)."""
        for j in sorted(s for s in first.setups if s <= k):
            s1, s2 = first.setups[j], second.setups.get(j)
            if s2 is None:
                continue
            if s1.threads != s2.threads:
                return "threads", (
                    f"the torch thread count: step {j} ran with {s1.threads} thread(s) in pass 1 and {s2.threads} "
                    "in pass 2 (the count changes the order of reductions, so the trajectory); "
                    + self.hints["threads"].format(threads=self.threads))
            if s1.deterministic != s2.deterministic:
                on = lambda v: "on" if v else "off"  # noqa: E731
                return "deterministic", (
                    f"torch.use_deterministic_algorithms was {on(s1.deterministic)} in pass 1 and "
                    f"{on(s2.deterministic)} in pass 2 at step {j}; " + self.hints["deterministic"])
        carried = self._carried(k, k_batch, first, second, column)
        if carried is not None:
            return "carried", carried
        if k_batch is not None and k_batch <= k:
            return "batch", (
                f"the batch of step {k_batch} differs from pass 1's: the data (its order, augmentation or values) "
                "is not a function of the seed; " + self.hints["batch"])
        for j in sorted(s for s in first.setups if s <= k):
            s2 = second.setups.get(j)
            if s2 is not None and first.setups[j].rng != s2.rng:
                return "rng", (
                    f"the random generators were in another state when step {j} began, with the same batches: "
                    "the loop drew a different amount of randomness (a generator not seeded from the seed, or code "
                    "that runs in one pass only)")
        return "nondeterministic", (
            "the batches, thread count and random stream all agree, so a nondeterministic kernel (one "
            "torch.use_deterministic_algorithms does not cover: a custom CUDA/Triton kernel, an atomic-add "
            "reduction) or " + self.hints["outside"])


# --------------------------------------------------------------------------- the run folder
def _epochs(steps: pd.DataFrame) -> pd.DataFrame:
    per = steps.groupby("epoch", sort=True)
    return pd.DataFrame({"epoch": np.asarray(list(per.groups), dtype=np.int64),
                         "mean_batch_loss": per["loss"].mean().to_numpy(np.float64),
                         "steps": per.size().to_numpy(np.int64), "phase": "main"})


def _write_shards(store: RunStore, folder: str, table: pd.DataFrame) -> None:
    for epoch, part in table.groupby("epoch", sort=True):
        store.write_parquet(store.shard(folder, int(epoch)), part.reset_index(drop=True))


def own_loop_summary(steps: pd.DataFrame, samples: pd.DataFrame, *, reference: str, n_params: int,
                     displacement: float | None, d0_sq: float | None, epochs: int, tail: int = 0,
                     ell_inf: float = 0.0, eps: float = 1e-8) -> dict[str, Any]:
    """The summary.json of an own-loop run: the keys ``gammatrace analyze`` writes for a run the
    engine trained, except those that need a full-dataset evaluation (train/test loss, accuracy).

    Example:
        >>> s = own_loop_summary(P.example_steps(), pd.DataFrame(), reference="last", n_params=1,
        ...                      displacement=1.0, d0_sq=None, epochs=2)
        >>> s["reference"], s["n_steps"], s["epochs"]
        ('last', 4, 2)
    """
    out: dict[str, Any] = {"reference": reference, "ell_inf": ell_inf}
    out.update(P.summarize(steps, tail=tail, ell_inf=ell_inf, displacement=displacement, d0_sq=d0_sq, eps=eps))
    out["cos_null_scale"] = P.null_cos_scale(int(n_params))
    if len(samples):
        sample_summary, _ = P.per_sample_convergence(samples)
        out.update({f"sample_{k}": v for k, v in sample_summary.items()})
    out["reached_target"] = None
    out["epochs"] = epochs
    return out


def save_run(measured: TwoPass | TwoPassResult | Probe, run_dir: str | Path, *, name: str | None = None) -> Run:
    """Write what your own loop measured as a run folder (DESIGN §4) and return it opened.

    ``measured`` is a :class:`TwoPass` (after ``.run()``), its :class:`TwoPassResult`, or a
    :class:`~gammatrace.probe.Probe` (reference mode: its table as measured; record mode: the
    record only). The folder holds run.json (``source: "own-loop"``, seed, threads, versions,
    the model and optimizer classes in ``own_loop``), ``steps/`` (pass-1 record rows),
    ``epochs.parquet`` (mean batch loss per epoch: an own loop has no full-dataset
    evaluation), ``checkpoints/epoch_0000.pt`` (θ_0), ``final.pt`` (θ_T, its SHA-256 in
    run.json), ``reference.pt`` (a θ* other than θ_T), and ``analysis/<reference>/`` (the §6
    step table, per-tensor and per-sample tables, ``summary.json``). ``gammatrace analyze``
    re-summarises it with another ``--tail``/``--ell-inf`` without replay; another reference
    needs the two-pass again. ``name`` defaults to the folder's name. An existing run folder
    is never overwritten.

    Example (a lone probe: its table, θ* as it was given; see the module for a two-pass run):
        >>> import tempfile, torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> loss_fn = lambda m, b: m(b).pow(2).mean()
        >>> probe = Probe(model, opt, loss_fn, reference={"weight": torch.zeros(1, 3), "bias": torch.zeros(1)})
        >>> for _ in range(4):
        ...     opt.zero_grad(); loss = loss_fn(model, torch.ones(2, 3)); loss.backward()
        ...     probe.batch(torch.ones(2, 3), loss); opt.step()
        >>> run = save_run(probe, tempfile.mkdtemp() + "/probe-run")
        >>> run.status.value, run.references(), len(run.steps())
        ('complete', ['probe'], 4)
    """
    if isinstance(measured, TwoPass):
        if measured.result is None:
            raise UserError("save_run: this TwoPass has not run yet; call .run() first")
        measured = measured.result
    store = check_run_folder(run_dir)
    name = name or (store.root.name if _plain_name(store.root.name) else "own-loop")
    check_name(name)
    with store.lock():
        if isinstance(measured, TwoPassResult):
            return _save_two_pass(store, measured, name)
        if isinstance(measured, Probe):
            return _save_probe(store, measured, name)
    raise UserError(f"save_run: expected a TwoPass, its result or a Probe, got {type(measured).__name__}")


def _plain_name(name: str) -> bool:
    try:
        check_name(name)
    except UserError:
        return False
    return True


def _config(name: str, seed: int | None, threads: int | None, device: str, epochs: int) -> dict[str, Any]:
    # Only what an own loop really has; a reader's RunConfig fills the rest with defaults,
    # and data/model say "own-loop" so that no default passes for the loop's own choice.
    out: dict[str, Any] = {"name": name, "device": device, "epochs": max(epochs, 1),
                           "data": {"name": OWN_LOOP}, "model": {"name": OWN_LOOP}}
    if seed is not None:
        out["seed"] = seed
    if threads is not None:
        out["threads"] = threads
    return out


def _meta(config: dict[str, Any], steps: pd.DataFrame, **fields: Any) -> RunMeta:
    epochs = int(steps["epoch"].max()) + 1
    return RunMeta(config=config, epochs_done=epochs, horizon_epochs=epochs, horizon_steps=len(steps),
                   steps_per_epoch=int((steps["epoch"] == steps["epoch"].iloc[0]).sum()), source=OWN_LOOP,
                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields)


def _write_curvature(store: RunStore, ref: str, table: pd.DataFrame) -> None:
    """The probe's curvature rows as the engine's step-hook table ``analysis/<ref>/curvature/``
    (one shard per epoch; nothing when the probe measured none)."""
    if len(table):
        _write_shards(store, store.analysis(ref, "curvature"), table)


def _write_analysis(store: RunStore, ref: str, raw: pd.DataFrame, tensors: pd.DataFrame, samples: pd.DataFrame,
                    summary: dict[str, Any], d0_sq: float | None) -> None:
    steps = P.derive(raw, d0_sq=d0_sq)
    for folder, table in (("tensors", tensors), ("samples", samples)):
        if len(table):
            _write_shards(store, store.analysis(ref, folder), table)
    _write_shards(store, store.analysis(ref, "steps"), steps)
    store.write_json(store.analysis(ref, "summary.json"), summary)


def _save_two_pass(store: RunStore, r: TwoPassResult, name: str, **own_loop: Any) -> Run:
    raw = r.raw_steps()
    epochs = int(raw["epoch"].max()) + 1
    config = _config(name, r.seed, r.threads, str(r.provenance.get("device", "cpu")).split(" ")[0], epochs)
    store.write_torch(store.checkpoint(0), {"model": r.theta_0, "epoch": 0, "step": 0})
    store.write_torch(RunStore.FINAL, {"model": r.theta_T})
    extra: dict[str, Any] = {}
    if r.reference_name != "last":
        store.write_torch(RunStore.REFERENCE, {"model": r.reference})
        extra["reference_sha256"] = params_sha256(r.reference)
    _write_shards(store, RunStore.STEPS, r.record)
    if len(r._record_samples):
        _write_shards(store, RunStore.SAMPLES, r._record_samples)
    store.write_parquet(RunStore.EPOCHS, _epochs(r.record))
    if len(r.skipped()):
        store.write_parquet(RunStore.SKIPPED, r.skipped())
    summary = own_loop_summary(raw, r.sample_steps(), reference=r.reference_name, n_params=r.n_params,
                               displacement=r.displacement, d0_sq=r.d0_sq, epochs=epochs)
    summary["n_skipped"] = len(r.skipped())
    _write_analysis(store, r.reference_name, raw, r.tensor_steps(), r.sample_steps(), summary, r.d0_sq)
    if r._probe is not None:
        _write_curvature(store, r.reference_name, r._probe.curvature_table())
    own = {"recorded_by": "TwoPass", "reference": r.reference_name, "d0_sq": r.d0_sq, "seed": r.seed,
           "threads": r.threads, "deterministic": r.deterministic, "model": r.model_class,
           "optimizer": r.optimizer_class, "n_skipped": len(r.skipped()), **own_loop}
    store.write_meta(_meta(config, raw, status=Status.COMPLETE, provenance=r.provenance, n_params=r.n_params,
                           displacement=r.displacement, final_sha256=params_sha256(r.theta_T), own_loop=own,
                           **extra))
    return Run(store.root)


def _save_probe(store: RunStore, probe: Probe, name: str) -> Run:
    raw = probe.raw_steps()
    if raw.empty:
        raise UserError("save_run: the probe has measured no step (or Probe.take() handed its rows over)")
    epochs = int(raw["epoch"].max()) + 1
    device = str(probe.device)
    config = _config(name, None, torch.get_num_threads(), device, epochs)
    final = _state(probe.model)
    store.write_torch(RunStore.FINAL, {"model": final})
    record_cols = [c for c in ("step", "epoch", "lr", "loss", "update_sq", "grad_sq", "dist0_sq") if c in raw]
    _write_shards(store, RunStore.STEPS, raw[record_cols])
    store.write_parquet(RunStore.EPOCHS, _epochs(raw))
    skipped = probe.skipped()
    if len(skipped):
        store.write_parquet(RunStore.SKIPPED, skipped)
    n_params = int(sum(p.numel() for p in probe.params))
    own: dict[str, Any] = {"recorded_by": "Probe", "model": type(probe.model).__qualname__,
                           "optimizer": type(probe.optimizer).__qualname__, "n_skipped": len(skipped),
                           "mode": probe.mode}
    status = Status.TRAINED
    if probe.mode == "reference":
        missing = [c for c in REFERENCE_COLUMNS if c not in raw]
        assert not missing, missing
        d0 = probe.d0_sq if probe.d0_sq is not None else float(raw["dist_sq"].iloc[0])
        summary = own_loop_summary(raw, probe.sample_steps(), reference="probe", n_params=n_params,
                                   displacement=None, d0_sq=d0, epochs=epochs)
        summary["n_skipped"] = len(skipped)
        _write_analysis(store, "probe", raw, probe.tensor_steps(), probe.sample_steps(), summary, d0)
        _write_curvature(store, "probe", probe.curvature_table())
        own.update(reference="probe", d0_sq=d0, d0_measured_at_step_0=probe.d0_sq is not None)
        status = Status.COMPLETE
    elif len(probe.curvature_table()):
        # A step-hook table belongs to an analysis (DESIGN §4): a record has none to hold it.
        warnings.warn("save_run: a record-mode probe's curvature table is not written (it is kept with an "
                      "analysis: a reference-mode probe or TwoPass); read it from probe.curvature_table()",
                      stacklevel=3)
    prov = {**provenance(RunConfig.model_construct(threads=torch.get_num_threads(), device=device)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    store.write_meta(_meta(config, raw, status=status, provenance=prov, n_params=n_params,
                           final_sha256=params_sha256(final), own_loop=own))
    return Run(store.root)
