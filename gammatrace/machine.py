"""The machine a trajectory's bits belong to: its fingerprint, and how two compare.

Bitwise determinism (same config + seed + thread count ⇒ same trajectory) holds on one
*kind* of machine only. Which kernels ATen dispatches to (its CPU capability: AVX2,
AVX512, …), the BLAS and oneDNN builds, the microarchitecture the probe's numba kernel is
compiled for, and on a GPU the device and its libraries all change the low bits of a float
sum. A run records the :func:`fingerprint` of the machine that trained it (``run.json``,
``provenance.machine``); a resume or replay elsewhere is then refused, scheduled where the
kind matches, or — where it still diverges — explained, never left as a bare mismatch.

The *kind* (:func:`machine_id`) is a hash of the fields that decide the bits; the thread
count is recorded beside it but is not part of the kind (it is the run config's, and a
node serves runs of any thread count). Environment switches that change dispatch
(``ATEN_CPU_CAPABILITY`` through the capability itself, ``MKL_CBWR``, ``ONEDNN_MAX_CPU_ISA``)
are part of the kind when set.

Example:
    >>> fp = fingerprint("cpu")
    >>> sorted(k for k in fp if k in KIND_FIELDS) == sorted(k for k in KIND_FIELDS if k in fp)
    True
    >>> len(machine_id(fp)), machine_id(fp) == machine_id({**fp, "threads": 99})
    (12, True)
    >>> differences({"cpu": "A", "torch": "2"}, {"cpu": "B", "torch": "2"})
    ['cpu A here, B there']
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from collections.abc import Mapping
from functools import cache
from typing import Any

import torch

from gammatrace.errors import UserError

# The fields that decide a trajectory's bits; everything else in a fingerprint is a record.
KIND_FIELDS = ("cpu", "cpu_capability", "llvm_cpu", "blas", "onednn", "torch", "dispatch_env",
               "gpu", "cuda", "cudnn")
# Environment switches that change which kernels run (recorded when set). Measured on one
# machine by benchmarks/portable_bits.py: ATEN_CPU_CAPABILITY and MKL_CBWR change θ_T,
# ONEDNN_MAX_CPU_ISA a conv net's θ_T, NUMBA_CPU_NAME the probe's columns (not θ_T).
DISPATCH_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                "DNNL_MAX_CPU_ISA", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")
RAY_RESOURCE_PREFIX = "gammatrace-machine-"


class OtherMachineError(UserError, RuntimeError):
    """Work that must continue a recorded trajectory bit for bit was asked of a machine of
    another kind (a resume: its epochs would mix two machines' bits)."""


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def _cpu_name() -> str:
    """Vendor, model name and family/model numbers: a virtual machine's model name may be
    generic ("AMD EPYC"), the family and model numbers still tell the generations apart."""
    info = _cpuinfo()
    if not info:
        return platform.processor() or platform.machine()
    name = info.get("model name", "unknown CPU")
    return f"{name} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def _llvm_cpu() -> str | None:
    """The microarchitecture numba compiles the probe's kernel for (None without numba)."""
    try:
        # llvmlite comes with numba, an optional and costly-to-load package
        import llvmlite.binding as llvm
    except ImportError:
        return None
    return str(llvm.get_host_cpu_name())


@cache
def _libraries() -> tuple[str | None, str | None]:
    """(BLAS, oneDNN) as torch's build reports them."""
    shown = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", shown)
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", shown)
    onednn = re.search(r"(?:MKL-DNN|oneDNN) v([\w.]+)", shown)
    blas_text = (f"{blas.group(1)} {mkl.group(1)}" if blas and mkl and blas.group(1) == "mkl"
                 else blas.group(1) if blas else None)
    return blas_text, (onednn.group(1) if onednn else None)


def fingerprint(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """What decides a trajectory's bits on this machine for ``device``, as JSON-able fields.

    For a CPU run: the CPU, ATen's capability, numba's target, BLAS and oneDNN builds,
    torch; for a CUDA run the GPU, CUDA and cuDNN instead of the CPU's kernels. ``threads``
    (default: torch's current count) is recorded, not part of the kind.

    Example:
        >>> fp = fingerprint("cpu", threads=1)
        >>> fp["threads"], fp["torch"] == torch.__version__, fp["cpu_capability"] != ""
        (1, True, True)
    """
    fp: dict[str, Any] = {"torch": torch.__version__}
    env = {k: os.environ[k] for k in DISPATCH_ENV if os.environ.get(k)}
    if env:
        fp["dispatch_env"] = env
    if str(device).startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        fp.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda,
                  cudnn=str(torch.backends.cudnn.version()))
    else:
        blas, onednn = _libraries()
        fp.update(cpu=_cpu_name(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                  llvm_cpu=_llvm_cpu(), blas=blas, onednn=onednn)
    fp["threads"] = int(threads if threads is not None else torch.get_num_threads())
    return fp


def machine_id(fp: Mapping[str, Any]) -> str:
    """The kind of a fingerprint: 12 hex digits over its :data:`KIND_FIELDS`."""
    kind = {k: fp[k] for k in KIND_FIELDS if fp.get(k) is not None}
    return hashlib.sha256(json.dumps(kind, sort_keys=True).encode()).hexdigest()[:12]


def ray_resource(fp_or_id: Mapping[str, Any] | str) -> str:
    """The Ray custom resource a node declares to take tasks of this machine kind.

    Example:
        >>> ray_resource("0123456789ab")
        'gammatrace-machine-0123456789ab'
    """
    kid = fp_or_id if isinstance(fp_or_id, str) else machine_id(fp_or_id)
    return RAY_RESOURCE_PREFIX + kid


def describe(fp: Mapping[str, Any] | None) -> str:
    """One phrase for a fingerprint, e.g. 'AMD EPYC (family 25, model 17), AVX512, mkl 2024.2, torch 2.13.0'."""
    if not fp:
        return "a machine the run does not name (recorded before gammatrace recorded machines)"
    parts = [fp.get("gpu") or fp.get("cpu"), fp.get("cpu_capability"), fp.get("llvm_cpu"),
             fp.get("blas"), fp.get("onednn") and f"oneDNN {fp['onednn']}",
             fp.get("cuda") and f"CUDA {fp['cuda']}", f"torch {fp.get('torch')}"]
    text = ", ".join(str(p) for p in parts if p)
    if fp.get("dispatch_env"):
        text += " with " + " ".join(f"{k}={v}" for k, v in sorted(fp["dispatch_env"].items()))
    return text


def differences(here: Mapping[str, Any], there: Mapping[str, Any] | None) -> list[str]:
    """The kind fields in which two fingerprints differ ('field HERE here, THERE there');
    empty when they are of one kind. A missing recording counts as a difference."""
    if not there:
        return ["the recording names no machine"]
    return [f"{k} {here.get(k)} here, {there.get(k)} there" for k in KIND_FIELDS
            if here.get(k) != there.get(k)]


def cross_machine_advice(recorded: Mapping[str, Any] | None, here: Mapping[str, Any], doing: str = "replaying",
                         there: str = "analyse it") -> str:
    """The sentence a divergence or refusal ends with when the machines differ; '' when
    they are of one kind (then the cause is elsewhere: the run, the code, or the library).

    Example:
        >>> a = {"cpu": "A", "cpu_capability": "AVX2", "torch": "2.13.0"}
        >>> cross_machine_advice(a, {**a, "threads": 4})
        ''
        >>> print(cross_machine_advice(a, {**a, "cpu_capability": "AVX512"}))
        recorded on A, AVX2, torch 2.13.0, replaying on A, AVX512, torch 2.13.0: bitwise replay needs the same CPU kind (and BLAS, oneDNN, torch); rerun pass 1 here (a new --out) or analyse it where it was recorded
    """
    if recorded and machine_id(recorded) == machine_id(here):
        return ""
    return (f"recorded on {describe(recorded)}, {doing} on {describe(here)}: bitwise replay needs the same "
            f"CPU kind (and BLAS, oneDNN, torch); rerun pass 1 here (a new --out) or {there} where it was recorded")
