"""The one integration core: the state a framework callback holds, what it does at the end
of training, and its results, shared by the Lightning and Hugging Face adapters.

Each adapter (:mod:`gammatrace.integrations.lightning`, :mod:`gammatrace.integrations.hf`)
is a thin translation of its framework's events into these calls: ``_open`` when training
begins (the probe, made here unless one was given), ``_end_step`` and ``_end_epoch`` as
training goes, ``_end_training`` (or ``_abort`` on an exception) at the end. What an adapter
patches on the framework's objects for the duration of training it sets with ``_patch``
(or registers with ``_on_end``); the end of training (or ``_restore``, e.g. from the HF adapter's
``attach(...).detach()``) undoes it.

Example (the core without a framework: a plain loop, two epochs of one step each):
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> core = TraceCore()
    >>> probe = core._open(model, opt, lambda m, b: m(b).pow(2).mean())
    >>> restored = []
    >>> core._on_end(lambda: restored.append("restored"))
    >>> core._patch(model, "extra_repr", lambda: "measured")  # a patch, undone at the end
    >>> repr(model)
    'Linear(measured)'
    >>> for _ in range(2):
    ...     x = torch.ones(4, 2)
    ...     loss = model(x).pow(2).mean()
    ...     loss.backward()
    ...     probe.batch(x, loss)
    ...     opt.step()
    ...     opt.zero_grad()
    ...     core._end_step()
    ...     core._end_epoch()
    >>> core._end_training()
    >>> restored, repr(model), list(core.steps()["step"])
    (['restored'], 'Linear(in_features=2, out_features=1, bias=True)', [0, 1])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from gammatrace.engine.twopass import save_run
from gammatrace.integrations import ranks as D
from gammatrace.integrations.loggers import Sink, StepLog
from gammatrace.probe import Probe


class TraceCore:
    """What every framework's ``GammaTrace`` callback holds and does, whatever calls it.

    Args:
        reference: θ* (a state dict or file; e.g. the θ_T of an earlier run) for reference
            mode, or ``None`` to record (pass 1).
        out: write the measured run folder here when training ends (:func:`gammatrace.save_run`;
            rank 0 only; not with a given ``probe``, whose owner writes it).
        log_every: log to the sinks every this many optimizer steps.
        sinks: where to log (:mod:`gammatrace.integrations.loggers`).
        check, per_tensor, kernel: as for :class:`gammatrace.Probe`.
        probe: a probe made elsewhere (by a two-pass helper's :class:`gammatrace.TwoPass`),
            which its owner closes.
    """

    def __init__(self, reference: Any = None, *, out: str | Path | None = None, log_every: int = 1,
                 sinks: Iterable[Sink] = (), check: bool | int = True, per_tensor: bool = True,
                 kernel: str | None = None, probe: Probe | None = None):
        super().__init__()  # the framework's callback class, next in the adapter's MRO
        self.reference, self.out = reference, out
        self.log_every, self.sinks = log_every, list(sinks)
        self.check, self.per_tensor, self.kernel = check, per_tensor, kernel
        self.probe: Probe | None = probe
        self._given = probe is not None
        self._log: StepLog | None = None
        self._world = 1
        self._undo: list[Callable[[], None]] = []

    # ---------------------------------------------------------------- the events
    def _open(self, model: nn.Module, optimizer: torch.optim.Optimizer,
              loss_fn: Callable[[nn.Module, Any], torch.Tensor], sinks: Iterable[Sink] | None = None) -> Probe:
        """Training begins: the probe (made on ``model`` and ``optimizer`` unless one was
        given; the adapter checks a given one fits) and the step log to ``sinks`` (default:
        this callback's)."""
        self._world = D.world_size()
        if self.probe is None:
            self.probe = Probe(model, optimizer, loss_fn, reference=self.reference, per_tensor=self.per_tensor,
                               kernel=self.kernel, check=self.check)
        sinks = self.sinks if sinks is None else list(sinks)
        self._log = StepLog(self.probe, sinks, log_every=max(self.log_every, 1)) if sinks else None
        return self.probe

    def _on_end(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` when training ends or fails, or at :meth:`_restore`."""
        self._undo.append(undo)

    def _patch(self, obj: Any, name: str, value: Any) -> None:
        """``obj.name = value`` until training ends; then the instance's own attribute, if it
        had one, is back (else the class's shows through again)."""
        had_own, own = name in vars(obj), vars(obj).get(name)
        setattr(obj, name, value)

        def restore() -> None:
            if had_own:
                setattr(obj, name, own)
            else:
                vars(obj).pop(name, None)

        self._on_end(restore)

    def _end_step(self) -> None:
        if self._log is not None:
            self._log.update()

    def _end_epoch(self) -> None:
        self._end_step()
        self.probe.end_epoch()

    def _end_training(self) -> None:
        """Undo the patches, close the log; close the probe this callback made and write its run."""
        self._restore()
        if self._log is not None:
            self._log.close()
        if not self._given:
            self.probe.close()
            if self.out is not None and D.is_writer():
                save_run(self.probe, self.out)

    def _abort(self) -> None:
        """Training raised: undo the patches and close the probe this callback made."""
        self._restore()
        if self.probe is not None and not self._given:
            self.probe.close()

    def _restore(self) -> None:
        """Undo what the adapter patched on the framework's objects (safe to call twice)."""
        undo, self._undo = self._undo, []
        for fn in reversed(undo):
            fn()

    # ---------------------------------------------------------------- results
    def steps(self, ell_inf: float = 0.0) -> pd.DataFrame:
        """Every measured step: the DESIGN §6 table (reference mode) or the record-mode rows."""
        return self.probe.steps(ell_inf) if self.probe is not None else pd.DataFrame()

    def skipped(self) -> pd.DataFrame:
        """Steps the optimizer skipped (a GradScaler overflow), as :meth:`gammatrace.Probe.skipped`."""
        return self.probe.skipped() if self.probe is not None else pd.DataFrame()
