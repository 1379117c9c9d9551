"""The probe under ``torch.distributed``: DDP and FSDP2 (gloo on CPU, NCCL on GPU).

The probe measures the *full* parameter vector θ and the objective whose gradient the
distributed step follows. How, per kind of data parallelism:

**DDP** (every rank holds all of θ; gradients are averaged): after the all-reduce every rank
has the same θ_k and g_k, so every rank's probe computes the same inner products (no
communication). The loss is not replicated: DDP's gradient is the mean over ranks of each
rank's mean-loss gradient, so ℓ_k — and ℓ(θ*; B_k) — are that mean of rank means,
all-reduced in float64 (:func:`global_mean`). With ``DistributedSampler`` every rank has
the same batch size, so this is the global batch's sample-weighted mean; the sampler's
padding duplicates (it repeats a few indices so the ranks get equal shares) are counted as
often as the gradient counts them, which is the point: ℓ_k is the loss that was
differentiated. Every rank calls the probe (the loss all-reduces are collectives); only
rank 0 writes (:func:`is_writer`).

A two-rank step equals, bit for bit, one process accumulating gradients over the same two
per-rank micro-batches with each loss divided by 2 (DDP divides each rank's gradient by the
world size and sums two values, which is exact and commutative); it does not equal one
process on the concatenated batch (another float32 reduction order). The tests hold it to
the former.

**FSDP2** (``fully_shard``: each rank holds a dim-0 shard of every parameter, gradients are
reduce-scattered): the probe works on the rank's *local shards* — θ_k, g_k, Δ_k and the
anchor (θ* or θ_0) are local tensors of at most ⌈rows/W⌉ rows per parameter (FSDP's own
padding aside), so its buffers hold about d/W elements — and each inner product
⟨·,·⟩ = Σ_ranks ⟨local, local⟩ is all-reduced (a float64 sum of per-rank float64 partial
sums: the full-vector value to float64 round-off). FSDP modules cannot be deep-copied, so
ℓ(θ*; B_k) comes from a second model of the same architecture, sharded the same way and
loaded with θ* (``reference_model``): its forward is a collective, run on every rank under
the generator and autocast state of the training forward. The first-step consistency check
needs a copy of the model at θ_k and is off under FSDP.

Example (one process is a world of one; the same code runs on every rank of a real job):
    >>> import os, socket, torch, torch.distributed as dist
    >>> s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    >>> model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
    >>> probe = DistributedProbe(model, opt, loss_fn)
    >>> batch = (torch.randn(4, 3), torch.randn(4, 1))
    >>> for _ in range(2):
    ...     opt.zero_grad()
    ...     loss = loss_fn(model, batch)
    ...     loss.backward()
    ...     probe.batch(batch, loss)
    ...     opt.step()
    >>> probe.take()[0]["step"].tolist(), is_writer()
    ([0, 1], True)
    >>> dist.destroy_process_group()
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from gammatrace.errors import IntegrationError
from gammatrace.integrations.ranks import global_loss_fn, global_mean, is_writer, world_size
from gammatrace.principles import derive
from gammatrace.probe import Probe
from gammatrace.probe.matched import canonical_name


def _sharding() -> Any:
    """torch's FSDP2 state-dict and DTensor functions, imported on first use: only a sharded
    model needs them, and importing torch.distributed.checkpoint costs ~0.8 s of CPU — most of
    what ``gammatrace.attach`` would otherwise add to a script's start."""
    state_dict = importlib.import_module("torch.distributed.checkpoint.state_dict")
    tensor = importlib.import_module("torch.distributed.tensor")
    return state_dict.StateDictOptions, state_dict.get_model_state_dict, state_dict.set_model_state_dict, \
        tensor.distribute_tensor


__all__ = ["DistributedProbe", "full_state", "global_loss_fn", "global_mean", "is_writer", "local_shard",
           "shard_bound", "world_size"]

# The measured columns that are sums over parameter entries (so over shards): summed across
# ranks under FSDP. The losses are all-reduced where they are computed.
SUMMED = ("progress", "dist_sq", "update_sq", "grad_dot", "grad_sq", "dist0_sq", "grad_dot_used", "grad_sq_used")


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


class _LocalShards(nn.Module):
    """The rank's shards of an FSDP2 model's parameters, as plain parameters sharing their
    storage (the optimizer's in-place updates of the DTensors are updates of these).

    Calling it does nothing; it is called from a forward pre-hook of the real model so the
    probe's own forward hook records the training forward's generator and autocast state.
    """

    def __init__(self, named: list[tuple[str, torch.Tensor]]):
        super().__init__()
        self._names = [n for n, _ in named]
        self.shards = nn.ParameterList([nn.Parameter(p.to_local().detach(), requires_grad=True)
                                        for _, p in named])

    def forward(self) -> None:
        return None


def local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a full tensor, placed as the DTensor ``like`` (any other tensor: itself)."""
    if not _is_dtensor(like):
        return full
    distribute_tensor = _sharding()[3]
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements).to_local()


class DistributedProbe:
    """A :class:`gammatrace.Probe` for a DDP or FSDP2 model (see the module docstring).

    Call it on every rank exactly as the probe: ``probe.batch(batch, loss)`` once per
    micro-batch with the rank's own loss, then the loop's ``optimizer.step()``. Tables
    (:meth:`take`, :meth:`steps`) are collective and hold the full-vector values on every rank.

    Args:
        model: a ``DistributedDataParallel`` model, a ``fully_shard``-ed module, or a plain one.
        optimizer: the optimizer over ``model``'s parameters.
        loss_fn: ``loss_fn(module, batch)`` on the rank's batch (its mean is all-reduced).
        reference: θ* (a state dict or file of *full* tensors, as :func:`full_state` gives),
            or ``None`` for record mode.
        reference_model: FSDP2 only, in reference mode: a second model of the same
            architecture, sharded the same way; θ* is loaded into it.
        group: the process group (default: the world).
        probe_class: the probe made inside (a :class:`gammatrace.Probe` subclass; the script
            runner's pass probe records what its verification needs).
        probe_options: more :class:`gammatrace.Probe` arguments (``per_tensor``, ``kernel``, ...).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                 reference: Mapping[str, torch.Tensor] | str | Path | None = None, *,
                 reference_model: nn.Module | None = None, group: Any = None, probe_class: type[Probe] = Probe,
                 **probe_options: Any):
        self.group = group
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        named = [(canonical_name(n), p) for n, p in inner.named_parameters() if p.requires_grad]
        self.sharded = any(_is_dtensor(p) for _, p in named)
        wrapped = global_loss_fn(loss_fn, group) if loss_fn is not None else None
        if reference is not None and not isinstance(reference, Mapping):
            reference = torch.load(reference, map_location="cpu", weights_only=True)
            reference = reference.get("model", reference)
        if not self.sharded:
            self.probe = probe_class(inner, optimizer, wrapped, reference, **probe_options)
            return
        # FSDP2: the probe measures the local shards; see the module docstring.
        self._params = [p for _, p in named]
        shards = _LocalShards(named)
        self._shards = list(shards.shards)
        self._handles = [optimizer.register_step_pre_hook(self._read_grads)]  # before the probe's hooks
        local_ref = None
        if reference is not None:
            if reference_model is None or loss_fn is None:
                raise IntegrationError("FSDP2 reference mode needs loss_fn and reference_model: a second model "
                                       "of the same architecture, sharded the same way (FSDP modules cannot be copied)")
            full = {canonical_name(k): v for k, v in reference.items()}
            options, _, set_model_state_dict, _ = _sharding()
            set_model_state_dict(reference_model, full, options=options(full_state_dict=True))
            local_ref = {f"shards.{i}": local_shard(full[n], p) for i, (n, p) in enumerate(named)}
            ref_model = reference_model

            def wrapped(_copy: nn.Module, batch: Any) -> torch.Tensor:  # noqa: F811 - the sharded reference
                return global_mean(loss_fn(ref_model, batch), group)

        probe_options.setdefault("check", False)  # needs a copy of the model at θ_k; FSDP has none
        self.probe = probe_class(shards, optimizer, wrapped, local_ref, **probe_options)
        self._names = [n for n, _ in named]
        self._handles.append(model.register_forward_pre_hook(lambda _m, _a: shards()))

    def _read_grads(self, _optimizer: torch.optim.Optimizer, _args: tuple, _kwargs: dict) -> None:
        for shard, p in zip(self._shards, self._params, strict=True):
            shard.grad = None if p.grad is None else p.grad.to_local()

    # ------------------------------------------------------------------ the loop
    def batch(self, batch: Any, loss: torch.Tensor | None = None, **kwargs: Any) -> None:
        """:meth:`gammatrace.Probe.batch` with the loss averaged over ranks (a collective)."""
        self.probe.batch(batch, None if loss is None else global_mean(loss, self.group), **kwargs)

    def update(self, lr: float) -> Any:
        """:meth:`gammatrace.Probe.update`: a manual update (``optimizer=None``), on every rank."""
        return self.probe.update(lr)

    @property
    def mode(self) -> str:
        return self.probe.mode

    @property
    def step_index(self) -> int:
        return self.probe.step_index

    @property
    def epoch(self) -> int:
        return self.probe.epoch

    def end_epoch(self) -> None:
        self.probe.end_epoch()

    def local_numel(self) -> int:
        """Parameter entries this rank's probe holds per buffer (θ_k snapshot, anchor)."""
        return sum(p.numel() for p in self.probe.params)

    # ------------------------------------------------------------------ tables
    def _summed(self, frame: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
        """FSDP2: per-rank partial sums to full-vector values (an all-reduce; every rank calls it)."""
        if not self.sharded or world_size(self.group) == 1:
            return frame
        cols = [c for c in columns if c in frame.columns]
        values = torch.tensor(frame[cols].to_numpy(dtype="float64") if len(frame) else [[0.0] * len(cols)],
                              dtype=torch.float64).reshape(-1, len(cols))
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
        out = frame.copy()
        if len(frame):
            out[cols] = values.numpy()
        return out

    def _rename(self, tensors: pd.DataFrame) -> pd.DataFrame:
        if not self.sharded or not len(tensors):
            return tensors
        names = {f"shards.{i}": n for i, n in enumerate(self._names)}
        return tensors.assign(tensor=tensors["tensor"].map(names))

    def take(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """:meth:`gammatrace.Probe.take` with full-vector values (collective under FSDP2)."""
        steps, tensors, samples = self.probe.take()
        return (self._summed(steps, SUMMED), self._rename(self._summed(tensors, ("progress",))), samples)

    def raw_steps(self) -> pd.DataFrame:
        return self._summed(self.probe.raw_steps(), SUMMED)

    def steps(self, ell_inf: float = 0.0) -> pd.DataFrame:
        """The DESIGN §6 table (reference mode) or the record-mode rows, full-vector values."""
        raw = self.raw_steps()
        return derive(raw, ell_inf=ell_inf) if self.mode == "reference" and len(raw) else raw

    def skipped(self) -> pd.DataFrame:
        return self.probe.skipped()

    def close(self) -> None:
        self.probe.close()
        for handle in getattr(self, "_handles", []):
            handle.remove()


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on CPU, names without wrappers — a collective
    under FSDP2 (every rank calls it; every rank gets it). θ_T for pass 2.

    Example:
        >>> sorted(full_state(torch.nn.Linear(2, 1)))
        ['bias', 'weight']
    """
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if any(_is_dtensor(p) for p in inner.parameters()):
        # Without cpu_offload every rank gets the full tensors (an all-gather), as pass 2 needs.
        options, get_model_state_dict, _, _ = _sharding()
        state = get_model_state_dict(inner, options=options(full_state_dict=True))
    else:
        state = inner.state_dict()
    return {canonical_name(k): v.detach().to("cpu").clone() for k, v in state.items()}


def shard_bound(model: nn.Module) -> int:
    """An upper bound on this rank's share of the parameters: Σ ⌈rows/W⌉ · (entries per row)
    over the trainable tensors (the whole count without sharding).

    Example:
        >>> shard_bound(torch.nn.Linear(3, 2))
        8
    """
    n = world_size()
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        shape = tuple(p.shape)
        if not _is_dtensor(p) or not shape:
            total += p.numel()
            continue
        total += math.ceil(shape[0] / n) * (p.numel() // max(shape[0], 1))
    return total
