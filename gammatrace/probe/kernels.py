"""The probe's per-step arithmetic, as interchangeable kernels.

Every kernel computes, per parameter tensor, the five float64 inner products the
principles need (DESIGN.md §1, §6), in two passes around ``optimizer.step()``::

    before the step:  ee = ‖θ_k − a‖²,  eg = ⟨θ_k − a, g_k⟩,  gg = ‖g_k‖²   (and keeps θ_k)
    after the step:   ed = ⟨θ_k − a, Δ_k⟩,  dd = ‖Δ_k‖²,   Δ_k = θ_k − θ_{k+1}

where a is the anchor: θ* in reference mode, θ_0 in record mode. ``after`` returns a
``(n_tensors, 5)`` float64 array (or device tensor) in the order of :data:`QUANTITIES`.
``raw`` reduces eg and gg alone, for a gradient read elsewhere (the probe reads the raw
gradient at the end of each backward, before the loop clips it): ``(n_tensors, 2)``.
Reading g_k before the step makes the result independent of what the optimizer does to
``.grad``; keeping θ_k makes it independent of anything that touches the parameters
between two steps.

Two kernels, one contract (both are held to the brute-force oracle in the tests):

* ``fused`` (CPU, float32/float64 parameters): one Numba loop per pass reads each input
  once and keeps only a copy of θ_k and the anchor, in the parameters' own dtype
  (≈ 20 bytes of memory traffic per parameter per step, 2 x 4 bytes held per parameter
  for float32). The probe's cost on CPU is memory bandwidth, so this is what keeps it a
  few percent of a step (``benchmarks/probe_overhead.py``).
* ``torch`` (any device and dtype): float64 flat buffers and per-tensor Gram matrices,
  a handful of large kernels per step, which is what a GPU wants.

:func:`choose_kernel` picks ``fused`` where it applies and ``torch`` elsewhere.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from gammatrace.errors import ConfigError
from gammatrace.probe import _fused
from gammatrace.registry import Registry

QUANTITIES = ("ee", "eg", "gg", "ed", "dd")

class Kernel(Protocol):
    """What :class:`~gammatrace.probe.Probe` needs from its arithmetic."""

    def before(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        """Take θ_k and reduce ee, eg, gg (``None`` gradient: a tensor the loss did not reach, g = 0)."""

    def after(self, params: Sequence[torch.Tensor]) -> np.ndarray | torch.Tensor:
        """Reduce ed, dd against θ_{k+1}; return the step's ``(n_tensors, 5)`` float64 values."""

    def raw(
        self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
    ) -> np.ndarray | torch.Tensor:
        """⟨θ − a, g⟩ and ‖g‖² per tensor, ``(n_tensors, 2)`` float64, keeping nothing."""

    def nbytes(self) -> int:
        """Bytes of the O(d) buffers the kernel holds."""


class KernelFactory(Protocol):
    """``factory(params, anchor) -> Kernel``: a kernel's class, registered in :data:`KERNELS`."""

    def __call__(self, params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor]) -> Kernel: ...


KERNELS: Registry[KernelFactory] = Registry("probe kernel")


def _flat_numpy(t: torch.Tensor) -> np.ndarray:
    """A 1-D NumPy view of a CPU tensor (a copy only if it is not contiguous)."""
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    return t.numpy().reshape(-1)


def _anchor_copy(anchor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The anchor as a private contiguous CPU copy in ``dtype`` if that is exact, else float64.

    A θ* file in float64 keeps its values; a float32 θ* of a float32 model costs 4 bytes
    per parameter, not 8.
    """
    a = anchor.detach().cpu()
    narrow = a.to(dtype)
    if narrow.dtype.is_floating_point and torch.equal(narrow.to(a.dtype), a):
        return narrow.reshape(-1).clone(memory_format=torch.contiguous_format)
    return a.to(torch.float64).reshape(-1).clone(memory_format=torch.contiguous_format)


@KERNELS.register("fused")
class FusedKernel:
    """Numba loops over the parameters in place (CPU, float32/float64)."""

    def __init__(self, params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor]):
        self._k = _fused.compiled()  # numba is imported (and compiles) only when used
        self.snap = [torch.empty(p.numel(), dtype=p.dtype) for p in params]  # θ_k
        self.anchor = [_anchor_copy(a, p.dtype) for a, p in zip(anchor, params, strict=True)]
        self._snap_np = [s.numpy() for s in self.snap]
        self._anchor_np = [a.numpy() for a in self.anchor]
        self._out = np.zeros((len(self.snap), len(QUANTITIES)))
        self._zero_grads: dict[int, np.ndarray] = {}  # g = 0 for tensors the loss did not reach

    def before(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        self._out = out = np.empty((len(self.snap), len(QUANTITIES)))
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if g is None:
                if i not in self._zero_grads:
                    self._zero_grads[i] = np.zeros_like(self._snap_np[i])
                g_np = self._zero_grads[i]
            else:
                g_np = _flat_numpy(g)
            self._k.before_step(_flat_numpy(p), self._anchor_np[i], g_np, self._snap_np[i], out[i])

    def after(self, params: Sequence[torch.Tensor]) -> np.ndarray:
        out = self._out
        for i, p in enumerate(params):
            self._k.after_step(_flat_numpy(p), self._anchor_np[i], self._snap_np[i], out[i])
        return out

    def raw(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> np.ndarray:
        out = np.zeros((len(self.snap), 2))
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if g is not None:  # a tensor the loss did not reach: g = 0, both products 0
                self._k.grad_step(_flat_numpy(p), self._anchor_np[i], _flat_numpy(g), out[i])
        return out

    def nbytes(self) -> int:
        return (sum(t.numel() * t.element_size() for t in [*self.snap, *self.anchor])
                + sum(z.nbytes for z in self._zero_grads.values()))


@KERNELS.register("torch")
class TorchKernel:
    """float64 flat buffers on the parameters' device (any device, any floating dtype)."""

    def __init__(self, params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor]):
        sizes = [p.numel() for p in params]
        device = params[0].device
        # Rows: e_k = θ_k − a, g_k, θ_k (becomes Δ_k after the step). A float32/bfloat16
        # value is exact in float64, and so is the difference of two of them.
        self.block = torch.zeros(3, sum(sizes), dtype=torch.float64, device=device)
        self.anchor = torch.cat([a.detach().reshape(-1).to(device=device, dtype=torch.float64) for a in anchor])
        self._g, self._theta = ([v.view_as(p) for v, p in zip(row.split(sizes), params, strict=True)] for row in self.block[1:])
        ends = np.cumsum(sizes).tolist()
        self._bounds = list(zip([0, *ends[:-1]], ends, strict=True))
        # (row, column) of ee, eg, gg, ed, dd in the Gram matrix of the rows (e, g, Δ).
        self._pick = (torch.tensor([0, 0, 1, 0, 2], device=device), torch.tensor([0, 1, 1, 2, 2], device=device))

    def before(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        torch._foreach_copy_(self._theta, [p.detach() for p in params])
        for view, g in zip(self._g, grads, strict=True):
            if g is None:
                view.zero_()
            else:  # a sparse gradient (nn.Embedding(sparse=True)) cannot copy_ into a dense view
                view.copy_(g.detach().to_dense() if g.is_sparse else g.detach())
        torch.sub(self.block[2], self.anchor, out=self.block[0])

    def after(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        torch._foreach_sub_(self._theta, [p.detach() for p in params])  # Δ_k, exact
        # One 3x3 Gram matrix per tensor: all five products in one pass over its slice.
        return torch.stack([(x @ x.T)[self._pick] for x in (self.block[:, a:b] for a, b in self._bounds)])

    def raw(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        # The buffers are rewritten by the step's own ``before``, so they can be borrowed here.
        self.before(params, grads)
        return torch.stack([x[:2] @ x[1] for x in (self.block[:, a:b] for a, b in self._bounds)])

    def nbytes(self) -> int:
        return (self.block.numel() + self.anchor.numel()) * 8


_FUSED_DTYPES = (torch.float32, torch.float64)


def _fused_applies(params: Sequence[torch.Tensor]) -> bool:
    return all(p.device.type == "cpu" and p.dtype in _FUSED_DTYPES for p in params)


def choose_kernel(params: Sequence[torch.Tensor]) -> str:
    """``fused`` for CPU float32/float64 parameters when Numba is installed, else ``torch``.

    Example:
        >>> import torch
        >>> choose_kernel([torch.zeros(3)])
        'fused'
        >>> choose_kernel([torch.zeros(3, dtype=torch.bfloat16)])
        'torch'
    """
    if not _fused_applies(params):
        return "torch"
    if importlib.util.find_spec("numba") is None:
        warnings.warn("numba is not installed: the probe falls back to its slower 'torch' kernel on CPU",
                      stacklevel=3)
        return "torch"
    return "fused"


def make_kernel(name: str | None, params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor]) -> Kernel:
    """Build kernel ``name`` (``None``: :func:`choose_kernel`) over ``params`` with ``anchor``."""
    name = name or choose_kernel(params)
    cls = KERNELS.get(name)
    if name == "fused" and not _fused_applies(params):
        raise ConfigError("the 'fused' probe kernel needs CPU float32/float64 parameters; use kernel='torch'")
    return cls(params, anchor)
