"""Numba kernels of the fused CPU arithmetic (see :mod:`gammatrace.probe.kernels`).

One loop per pass reads each float32 (or float64) input once, widens it to float64 in a
register and feeds every inner product of the pass: this is what makes the probe cheap
on CPU, where the cost is memory traffic, not arithmetic.

Exactness: ``float64(a) - float64(b)`` of two float32 values is exact, so e = θ_k − a
and Δ_k = θ_k − θ_{k+1} carry no rounding, and products of such differences accumulate
in float64. ``fastmath={"reassoc"}`` only lets LLVM split each sum into SIMD lanes (the
order of float64 additions changes, the result stays at float64 round-off; it is fixed
by the compiled code, so repeated runs on one machine agree bit for bit). No other
fast-math flag is set: no FMA contraction, NaN and Inf propagate.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
from numpy import float64

_OPTIONS = dict(nogil=True, boundscheck=False, fastmath={"reassoc"})


def _jit(fn):
    """Compile with Numba, cached on disk where Numba finds a writable place (else ~1 s per process)."""
    # numba (and LLVM) load only when the fused kernel is first used
    from numba import njit

    try:
        return njit(cache=True, **_OPTIONS)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available" (read-only installs)
        return njit(cache=False, **_OPTIONS)(fn)


@functools.cache
def compiled() -> SimpleNamespace:
    """The loops below, compiled on first use. ``float64(x)`` is NumPy's cast, which Numba
    compiles to the same register widening as its own."""
    return SimpleNamespace(
        before_step=_jit(before_step), after_step=_jit(after_step), grad_step=_jit(grad_step)
    )


def before_step(theta: np.ndarray, anchor: np.ndarray, grad: np.ndarray, snap: np.ndarray, out: np.ndarray) -> None:
    """snap ← θ_k; out[0:3] = ‖θ_k − a‖², ⟨θ_k − a, g_k⟩, ‖g_k‖²."""
    ee = eg = gg = 0.0
    for i in range(theta.shape[0]):
        x = theta[i]
        snap[i] = x
        e = float64(x) - float64(anchor[i])
        g = float64(grad[i])
        ee += e * e
        eg += e * g
        gg += g * g
    out[0] = ee
    out[1] = eg
    out[2] = gg


def after_step(theta_next: np.ndarray, anchor: np.ndarray, snap: np.ndarray, out: np.ndarray) -> None:
    """out[3:5] = ⟨θ_k − a, Δ_k⟩, ‖Δ_k‖² with θ_k = snap and Δ_k = θ_k − θ_{k+1}."""
    ed = dd = 0.0
    for i in range(theta_next.shape[0]):
        t = float64(snap[i])
        e = t - float64(anchor[i])
        d = t - float64(theta_next[i])
        ed += e * d
        dd += d * d
    out[3] = ed
    out[4] = dd


def grad_step(theta: np.ndarray, anchor: np.ndarray, grad: np.ndarray, out: np.ndarray) -> None:
    """out[0:2] = ⟨θ_k − a, g⟩, ‖g‖² (the raw gradient, read at the end of a backward)."""
    eg = gg = 0.0
    for i in range(theta.shape[0]):
        e = float64(theta[i]) - float64(anchor[i])
        g = float64(grad[i])
        eg += e * g
        gg += g * g
    out[0] = eg
    out[1] = gg
