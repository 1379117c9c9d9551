"""Matched randomness: evaluate ℓ(θ*; B_k) under the state ℓ(θ_k; B_k) was computed in.

A reference loss drawn with other dropout masks, or in float32 while the training
forward ran under bf16 autocast, is a different function of θ: the loss gap ℓ_k − ℓ*_k
then mixes the effect of θ with the effect of the noise (on a dropout Transformer the
late median γ_k came out +40 %). So the probe captures, at every forward of the
trained model, the CPU (and CUDA) generator state and the autocast state, and runs
the reference forward on its private copy under exactly that state, inside
``fork_rng`` so the live generators, and with them the trained trajectory, are left
as they were.

Helpers here are torch-only and stateless; :class:`~gammatrace.probe.Probe` wires them
to its hooks.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

COMPILED_PREFIX = "_orig_mod"  # the attribute torch.compile's wrapper keeps the module under


@dataclass(frozen=True, slots=True)
class ForwardState:
    """What a forward's randomness and precision depend on, besides θ and the batch."""

    cpu_rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    # (device type, enabled, dtype) for every device type the model's forward can autocast on
    autocast: tuple[tuple[str, bool, torch.dtype], ...]


def autocast_device_types(device: torch.device) -> tuple[str, ...]:
    """Device types whose autocast state can change a forward on ``device`` ("cpu" always:
    a CUDA model's CPU-side ops autocast on the CPU's own state)."""
    return ("cpu",) if device.type == "cpu" else ("cpu", device.type)


def capture(device_types: tuple[str, ...], cuda_index: int | None) -> ForwardState:
    """The current generator and autocast state (about 2 µs on CPU: one 5 kB state copy).

    Example:
        >>> import torch
        >>> state = capture(("cpu",), None)
        >>> a = torch.rand(2)
        >>> with replaying(state, None):
        ...     b = torch.rand(2)
        >>> torch.equal(a, b)
        True
    """
    cuda_rng = None if cuda_index is None else torch.cuda.get_rng_state(cuda_index)
    autocast = tuple(
        (t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in device_types
    )
    return ForwardState(torch.get_rng_state(), cuda_rng, autocast)


@contextlib.contextmanager
def replaying(state: ForwardState, cuda_index: int | None) -> Iterator[None]:
    """Run the block under ``state`` (generators and autocast) and without autograd; the live
    generators are restored afterwards, so whatever the block draws leaves the caller's
    random stream untouched."""
    devices = [] if cuda_index is None else [cuda_index]
    with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
        torch.set_rng_state(state.cpu_rng)
        if state.cuda_rng is not None:
            torch.cuda.set_rng_state(state.cuda_rng, cuda_index)
        for device_type, enabled, dtype in state.autocast:
            # Entered only where the state differs (an autocast context costs ~5 µs), and
            # enabled=False too: a reference computed inside the user's autocast block must
            # still run in full precision when the training forward did.
            if torch.is_autocast_enabled(device_type) != enabled or (
                enabled and torch.get_autocast_dtype(device_type) != dtype
            ):
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
        stack.enter_context(torch.no_grad())
        yield


def replayed_loss(
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    model: nn.Module,
    batch: Any,
    state: ForwardState,
    cuda_index: int | None,
) -> torch.Tensor:
    """``loss_fn(model, batch)``, detached, evaluated under ``state`` (see :func:`replaying`)."""
    with replaying(state, cuda_index):
        return loss_fn(model, batch).detach()


def private_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without autograd state: θ, buffers and modes as now.

    Example:
        >>> import torch
        >>> twin = private_copy(torch.nn.Linear(2, 1))
        >>> [p.requires_grad for p in twin.parameters()]
        [False, False]
    """
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
        p.grad = None
    return twin


def canonical_name(name: str) -> str:
    """A parameter or state-dict name without torch.compile's ``_orig_mod.`` segments.

    Example:
        >>> canonical_name("_orig_mod.encoder._orig_mod.0.weight")
        'encoder.0.weight'
    """
    return ".".join(part for part in name.split(".") if part != COMPILED_PREFIX)


def canonical_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` keyed by canonical names, so a compiled model's state dict fits an eager one."""
    return {canonical_name(k): v for k, v in state.items()}


def is_compiled(module: nn.Module) -> bool:
    # By name: importing torch._dynamo to test the type costs about a second.
    return type(module).__name__ == "OptimizedModule" and isinstance(
        getattr(module, COMPILED_PREFIX, None), nn.Module
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The eager module inside torch.compile wrappers (the model itself otherwise)."""
    while is_compiled(model):
        model = getattr(model, COMPILED_PREFIX)
    return model


def module_pairs(source: nn.Module, copy: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Corresponding submodules of a model and its deep copy, for copying train/eval modes
    module by module (``copy.train(source.training)`` would override a frozen, eval-mode
    batch norm inside a training model)."""
    return list(zip(source.modules(), copy.modules(), strict=True))


def copy_modes(pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    for src, dst in pairs:
        if dst.training != src.training:  # nn.Module.__setattr__ costs µs; modes rarely change
            dst.training = src.training


def batch_size(batch: Any) -> int | None:
    """Leading dimension of the first tensor in ``batch`` (a tensor, sequence or mapping).

    Example:
        >>> import torch
        >>> batch_size({"x": torch.zeros(5, 3), "y": torch.zeros(5)}), batch_size(None)
        (5, None)
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        items = batch.values()
    elif isinstance(batch, (list, tuple)):
        items = batch
    else:
        return None
    for item in items:
        n = batch_size(item)
        if n is not None:
            return n
    return None
