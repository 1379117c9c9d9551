"""``gammatrace.attach``: the probe of a training script, in three lines.

::

    import gammatrace
    probe = gammatrace.attach(model, optimizer, loss_fn=lambda m, b: m(*b)[1])
    probe.batch(batch, loss)            # in the loop, once per micro-batch

Run by ``gammatrace twopass --out DIR -- python train.py`` (or ``-- torchrun ... train.py``),
``attach`` returns the pass's probe: pass 1 records, pass 2 measures against θ_T and is
verified against pass 1 as it goes (:mod:`gammatrace.engine.script`). Run plainly
(``python train.py``), it returns a **record-mode** :class:`gammatrace.Probe` — the loss,
‖Δ_k‖², ‖g_k‖² and ‖θ_k − θ_0‖² of every step, no θ* — and says so in one line on stderr,
so the same script keeps running (and measuring what one pass can) outside the runner.

A DDP model (or any model once ``torch.distributed`` is initialised with more than one rank)
gets a :class:`~gammatrace.integrations.distributed.DistributedProbe`: call it on every rank.
A loop without an optimizer object passes ``None`` and marks its update with
``with probe.update(lr=...):``.

Example (outside the runner: a record-mode probe):
    >>> import torch
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> probe = attach(model, opt, loss_fn=lambda m, b: m(b).pow(2).mean(), quiet=True)
    >>> loss = model(torch.ones(2, 3)).pow(2).mean(); loss.backward()
    >>> probe.batch(torch.ones(2, 3), loss); opt.step()
    >>> probe.mode, len(probe.steps())
    ('record', 1)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gammatrace.curvature import CurvatureConfig
from gammatrace.engine.script import PassContext, ScriptPass
from gammatrace.engine.twopass import _PassProbe, _rng_digest
from gammatrace.errors import UserError
from gammatrace.integrations.distributed import DistributedProbe
from gammatrace.probe import Probe

_ATTACHED: list[ScriptPass] = []  # the pass of this process, once attached
_NOTICE = ("gammatrace.attach: not run by `gammatrace twopass`, so this is a record-mode probe (loss, ‖Δ_k‖², "
           "‖g_k‖² per step; no θ*, no γ); `gammatrace twopass --out DIR -- python SCRIPT ...` measures γ")


def _distributed(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel) or (
        dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def attach(model: nn.Module, optimizer: torch.optim.Optimizer | None,
           loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, *, per_tensor: bool = True,
           kernel: str | None = None, check: bool | int = True, quiet: bool = False,
           curvature: CurvatureConfig | Mapping[str, Any] | None = None,
           curvature_batch: Any = None) -> Probe | DistributedProbe:
    """The probe of this script: the pass's under ``gammatrace twopass``, else a record-mode one.

    Args:
        model: the module the loop trains (a DDP-wrapped one too).
        optimizer: its optimizer, or ``None`` for a manual update marked with
            ``with probe.update(lr=...):``.
        loss_fn: ``loss_fn(model, batch) -> loss``, the loop's loss on the batches given to
            ``probe.batch``; pass 2 evaluates ℓ(θ*; B_k) with it (required there).
        per_tensor, kernel, check: as for :class:`gammatrace.Probe`.
        curvature, curvature_batch: as for :class:`gammatrace.Probe`: curvature along the path
            (not with a distributed model). Under the runner pass 2 measures it (at θ_k,
            which both passes share; pass 1 does not) and the run folder holds it as
            ``analysis/<ref>/curvature/``; outside it, read ``probe.curvature_table()``.
        quiet: no notice outside the runner.

    Attach after the model and optimizer are made and before the first step. See the
    module docstring for an example.
    """
    ctx = PassContext.from_environment()
    distributed = _distributed(model)
    options: dict[str, Any] = {"per_tensor": per_tensor, "kernel": kernel, "check": check}
    if curvature is not None:
        if distributed:
            raise UserError("gammatrace.attach(curvature=...) measures on one process's model: not with a "
                            "distributed (DDP/FSDP) model")
        if ctx is None or ctx.number == 2:  # θ_k is pass 1's too: measured once, by pass 2
            options.update(curvature=curvature, curvature_batch=curvature_batch)
    if ctx is None:
        if not quiet and os.environ.get("RANK", "0") == "0":
            print(_NOTICE, file=sys.stderr)
        if distributed:
            return DistributedProbe(model, optimizer, loss_fn, None, **options)
        return Probe(model, optimizer, loss_fn, None, **options)
    if loss_fn is None:
        raise UserError("gammatrace.attach under `gammatrace twopass` needs loss_fn=lambda model, batch: loss "
                        "(pass 2 evaluates ℓ(θ*; B_k) with it)")
    if _ATTACHED:
        raise UserError("gammatrace.attach was called twice in one pass; attach once, before the first step")
    scripted = ScriptPass(ctx)
    rng = _rng_digest()  # before the probe is made (a reference copy may draw)
    reference = scripted.reference()
    inner_model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if distributed:
        probe: Probe | DistributedProbe = DistributedProbe(model, optimizer, loss_fn, reference,
                                                           probe_class=_PassProbe, **options)
        inner = probe.probe
    else:
        probe = inner = _PassProbe(model, optimizer, loss_fn, reference, **options)
    _ATTACHED.append(scripted)
    scripted.start(inner, inner_model, optimizer, rng)
    return probe
