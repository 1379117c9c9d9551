"""The probe's per-step quantities to TensorBoard and Weights & Biases, every step or every N.

A :class:`StepLog` reads the rows a :class:`~gammatrace.Probe` measured since its last
call (:meth:`gammatrace.Probe.flush`: one host synchronisation per call, so ``log_every``
also sets how often a GPU run synchronises) and hands the steps ``0, N, 2N, …`` to its
sinks as ``{name: value}``:

* record mode (pass 1): ``loss``, ``update_sq`` (‖Δ_k‖²), ``grad_sq`` (‖g_k‖²) and
  ``skipped`` (optimizer steps skipped so far, e.g. GradScaler overflows);
* reference mode (pass 2): ``loss``, ``loss_ref``, ``gamma``, ``gamma_rp`` (γ^RP / D_0²),
  ``dist_ratio`` (d_k / D_0) and ``cos_align``.

NaN (an undefined γ_k) is logged as NaN, never dropped. The rows stay in the probe:
:meth:`gammatrace.Probe.steps` still has every step, and the values logged are exactly its
values (TensorBoard scalars are written in float64).

Sinks are callables ``sink(step, values)``: :class:`TensorBoardSink` (a ``SummaryWriter``;
torch's writer needs the ``tensorboard`` package, ``pip install 'gammatrace[loggers]'``),
:class:`WandbSink` (a W&B run; ``mode="offline"`` keeps it off the network), or any
function, e.g. Lightning's ``pl_module.log_dict``.

Example (a plain function as the sink; TensorBoard and W&B take the same place):
    >>> import torch, gammatrace
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> probe = gammatrace.Probe(model, opt)
    >>> seen = []
    >>> log = StepLog(probe, [lambda step, values: seen.append((step, sorted(values)))], log_every=2)
    >>> for _ in range(5):
    ...     opt.zero_grad()
    ...     loss = model(torch.ones(2, 3)).pow(2).mean()
    ...     loss.backward()
    ...     probe.batch(None, loss)
    ...     opt.step()
    ...     _ = log.update()
    >>> [step for step, _ in seen], seen[0][1]
    ([0, 2, 4], ['gammatrace/grad_sq', 'gammatrace/loss', 'gammatrace/skipped', 'gammatrace/update_sq'])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gammatrace.errors import ConfigError, UserError
from gammatrace.principles import derive
from gammatrace.probe import Probe

Sink = Callable[[int, Mapping[str, float]], Any]

RECORD_LOGGED = ("loss", "update_sq", "grad_sq", "skipped")
REFERENCE_LOGGED = ("loss", "loss_ref", "gamma", "gamma_rp", "dist_ratio", "cos_align")


def step_values(rows: pd.DataFrame, mode: str, *, d0_sq: float | None = None, skipped: int = 0,
                ell_inf: float = 0.0) -> list[tuple[int, dict[str, float]]]:
    """``(step, {name: value})`` for each raw probe row (:meth:`gammatrace.Probe.flush`).

    In reference mode the derived columns come from :func:`gammatrace.principles.derive`
    with ``d0_sq`` (D_0², the first step's d_k²); ``dist_ratio`` is d_k / D_0.

    Example:
        >>> rows = pd.DataFrame({"step": [0], "epoch": [0], "lr": [0.1], "loss": [1.0], "loss_ref": [0.5],
        ...                      "progress": [0.1], "dist_sq": [4.0], "update_sq": [0.01], "grad_dot": [1.0],
        ...                      "grad_sq": [1.0]})
        >>> step_values(rows, "reference")[0][1]["gamma"], step_values(rows, "reference")[0][1]["dist_ratio"]
        (0.5, 1.0)
    """
    if not len(rows):
        return []
    if mode == "record":
        table = rows.assign(skipped=float(skipped))
        names = RECORD_LOGGED
    else:
        d0 = float(rows["dist_sq"].iloc[0]) if d0_sq is None else d0_sq
        table = derive(rows, d0_sq=d0, ell_inf=ell_inf)
        with np.errstate(invalid="ignore", divide="ignore"):
            table["dist_ratio"] = np.sqrt(table["dist_sq"].to_numpy(np.float64) / d0) if d0 > 0 else math.nan
        names = REFERENCE_LOGGED
    steps = table["step"].to_numpy()
    columns = {n: table[n].to_numpy(np.float64) for n in names}
    return [(int(s), {n: float(columns[n][i]) for n in names}) for i, s in enumerate(steps)]


class StepLog:
    """Hands a probe's newly measured steps to sinks, every ``log_every`` steps.

    Call :meth:`update` after each optimizer step (or as often as you like: it logs each
    step ``k`` with ``k % log_every == 0`` once, as soon as it is measured) and :meth:`close`
    at the end. Names are ``f"{prefix}/{quantity}"``.

    Args:
        probe: the probe whose steps are logged.
        sinks: callables ``sink(step, {name: value})``.
        log_every: log steps 0, N, 2N, ….
        prefix: the name prefix (a TensorBoard / W&B section).
        ell_inf: ℓ_inf of the regularity principle (γ^RP).
    """

    def __init__(self, probe: Probe, sinks: Iterable[Sink] = (), *, log_every: int = 1,
                 prefix: str = "gammatrace", ell_inf: float = 0.0):
        if not isinstance(log_every, int) or log_every < 1:
            raise ConfigError(f"log_every must be a positive integer, got {log_every!r}")
        self.probe, self.sinks, self.log_every = probe, list(sinks), log_every
        self.prefix, self.ell_inf = prefix, ell_inf
        self._next = -(-probe.step_index // log_every) * log_every  # the first step to log
        self._d0_sq: float | None = None

    def update(self) -> list[int]:
        """Log the steps due since the last call; returns their indices."""
        if self.probe.step_index <= self._next:
            return []  # the next step to log is not measured yet: no flush, no sync
        rows = self.probe.flush()
        if self.probe.mode == "reference" and self._d0_sq is None and len(rows):
            self._d0_sq = float(rows["dist_sq"].iloc[0])
        due = rows[(rows["step"] >= self._next) & (rows["step"] % self.log_every == 0)]
        skipped = len(self.probe.skipped()) if self.probe.mode == "record" and len(due) else 0
        logged = []
        for step, values in step_values(due, self.probe.mode, d0_sq=self._d0_sq, skipped=skipped,
                                        ell_inf=self.ell_inf):
            named = {f"{self.prefix}/{k}": v for k, v in values.items()}
            for sink in self.sinks:
                sink(step, named)
            logged.append(step)
        last = int(rows["step"].iloc[-1]) if len(rows) else self._next - 1
        self._next = (last // self.log_every + 1) * self.log_every
        return logged

    def close(self) -> None:
        """Log what is still due and close the sinks that can be closed."""
        self.update()
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if callable(close):
                close()


class TensorBoardSink:
    """Scalars to a ``torch.utils.tensorboard.SummaryWriter``, in float64, so what TensorBoard
    reads back is the probe's value exactly.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> sink = TensorBoardSink(SummaryWriter(tempfile.mkdtemp()))
        >>> sink(0, {"gammatrace/gamma": 0.25}); sink.close()
    """

    def __init__(self, writer: Any):
        if isinstance(writer, (str, Path)):
            raise TypeError("TensorBoardSink takes a SummaryWriter: TensorBoardSink(SummaryWriter(logdir))")
        self.writer = writer

    def __call__(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step, new_style=True, double_precision=True)

    def close(self) -> None:
        self.writer.flush()


class WandbSink:
    """Values to a Weights & Biases run, against their own step axis ``{prefix}/step``
    (so the run's own ``wandb.log`` calls and their steps are left alone).

    Example:
        >>> import tempfile, wandb
        >>> run = wandb.init(mode="offline", dir=tempfile.mkdtemp(), project="demo",  # never reaches the network
        ...                  settings=wandb.Settings(console="off", silent=True))
        >>> WandbSink(run)(0, {"gammatrace/gamma": 0.25}); run.finish()
    """

    def __init__(self, run: Any = None, prefix: str = "gammatrace"):
        if run is None:
            # wandb is an optional extra (gammatrace[loggers]): imported only when used
            import wandb

            run = wandb.run
            if run is None:
                raise UserError("no active W&B run: call wandb.init(...) first, or pass the run")
        self.run, self.prefix = run, prefix
        self._defined = False

    def __call__(self, step: int, values: Mapping[str, float]) -> None:
        if not self._defined:
            self.run.define_metric(f"{self.prefix}/step")
            self.run.define_metric(f"{self.prefix}/*", step_metric=f"{self.prefix}/step")
            self._defined = True
        self.run.log({**values, f"{self.prefix}/step": step})
