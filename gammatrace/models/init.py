"""Weight initializations by name, and a fixed initial point shared across runs.

:func:`apply_init` initializes every Conv/Linear weight of a network with scheme
``name`` (registry :data:`INITS`), sets their biases to 0 and resets norm layers to
weight 1, bias 0 — except ``"default"``, which leaves the framework's own
initialization untouched so "default" means exactly what an unmodified PyTorch
model starts from.

=============== ==================================================================
name            weight distribution (fan_in/fan_out as torch computes them)
=============== ==================================================================
default         PyTorch's own (left as built)
lecun           N(0, gain²/fan_in), LeCun et al. 1998
xavier_normal   N(0, gain²·2/(fan_in+fan_out)), Glorot & Bengio 2010
xavier_uniform  U(±gain·sqrt(6/(fan_in+fan_out)))
kaiming_in      N(0, 2/((1+a²)·fan_in)), He et al. 2015; a = ``negative_slope``
kaiming_out     N(0, 2/((1+a²)·fan_out))
orthogonal      (semi-)orthogonal rows/columns of the flattened weight, times gain
zero            all zeros
lsuv            orthogonal, then each layer in forward order rescaled until its
                output variance on a data batch ``x`` is 1 ± ``tol`` (Mishkin &
                Matas 2016)
=============== ==================================================================

Every entry has the signature ``fn(layers, model, x, **options)`` where ``layers``
is the list of (name, module) pairs to initialize: per-weight schemes ignore the
model and the batch, LSUV needs both.

Weight-normed layers (``apply_weight_norm``) are handled: the scheme is applied to
the effective weight w and written back through the parametrization (g and v are
set so that g·v/‖v‖ = w), so init and weight norm commute.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from gammatrace.models.init import INITS, apply_init
    >>> net = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 10))
    >>> _ = torch.manual_seed(0)
    >>> w = apply_init(net, "kaiming_in")[0].weight
    >>> round(w.std().item() * (400 / 2) ** 0.5, 1), net[0].bias.abs().max().item()
    (1.0, 0.0)
    >>> "lsuv" in INITS
    True
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from gammatrace.errors import ConfigError
from gammatrace.models.activations import check_options
from gammatrace.models.norms import WEIGHTED_LAYERS
from gammatrace.registry import Registry


class InitScheme(Protocol):
    """``scheme(layers, model, x) -> None``: initialize the weighted ``layers`` of ``model`` in
    place (data-dependent schemes such as LSUV use the batch ``x``)."""

    def __call__(self, layers: Layers, model: nn.Module, x: torch.Tensor | None) -> None: ...


INITS: Registry[InitScheme] = Registry("init")

# Norm layers whose affine parameters are reset to the identity map (weight 1, bias 0).
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

Layers = list[tuple[str, nn.Module]]


def weighted_layers(model: nn.Module) -> Layers:
    """The (name, module) pairs of every Conv/Linear layer, in registration order.

    Example:
        >>> [n for n, _ in weighted_layers(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)))]
        ['0', '2']
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHTED_LAYERS)]


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    return nn.init._calculate_fan_in_and_fan_out(weight)


def set_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Write ``value`` as the effective weight of ``module``, also through weight norm.

    Example:
        >>> import torch
        >>> from gammatrace.models.norms import apply_weight_norm
        >>> lin = apply_weight_norm(nn.Sequential(nn.Linear(2, 2)))[0]
        >>> set_weight(lin, torch.eye(2)); lin.weight
        tensor([[1., 0.],
                [0., 1.]], grad_fn=<WeightNormInterfaceBackward0>)
    """
    with torch.no_grad():
        if parametrize.is_parametrized(module, "weight"):
            # Assignment runs the parametrization's right_inverse (weight norm: g, v).
            module.weight = value.to(module.weight.dtype)
            if not bool(torch.isfinite(module.weight).all()):
                # Weight norm of an all-zero output unit is g·0/‖0‖ = NaN: the network
                # would be NaN from the first step, so fail here with the reason.
                raise ConfigError(f"weight {tuple(value.shape)} is not representable by the "
                                  "layer's parametrization (weight norm of an all-zero unit, "
                                  "e.g. init 'zero'); choose another init or drop weight norm")
        else:
            module.weight.copy_(value)


def _per_weight(fn: Callable[..., None]) -> Callable[..., None]:
    """Lift an in-place ``fn(tensor, **options)`` to the registry signature."""

    def apply(layers: Layers, model: nn.Module, x: torch.Tensor | None, **options) -> None:
        for _, module in layers:
            w = torch.empty_like(module.weight, requires_grad=False)
            fn(w, **options)
            set_weight(module, w)

    apply.__doc__ = fn.__doc__
    apply.__wrapped__ = fn  # so inspect.signature shows (and check_options checks) fn's options
    return apply


@INITS.register("default")
def _default(layers: Layers, model: nn.Module, x: torch.Tensor | None) -> None:
    """Leave PyTorch's initialization as built."""


@INITS.register("lecun")
@_per_weight
def _lecun(w: torch.Tensor, gain: float = 1.0) -> None:
    fan_in, _ = _fans(w)
    nn.init.normal_(w, 0.0, gain / math.sqrt(fan_in))


@INITS.register("xavier_normal")
@_per_weight
def _xavier_normal(w: torch.Tensor, gain: float = 1.0) -> None:
    nn.init.xavier_normal_(w, gain=gain)


@INITS.register("xavier_uniform")
@_per_weight
def _xavier_uniform(w: torch.Tensor, gain: float = 1.0) -> None:
    nn.init.xavier_uniform_(w, gain=gain)


@INITS.register("kaiming_in")
@_per_weight
def _kaiming_in(w: torch.Tensor, negative_slope: float = 0.0) -> None:
    # negative_slope=0 is the ReLU gain sqrt(2); set it for leaky ReLU / PReLU nets.
    nn.init.kaiming_normal_(w, a=negative_slope, mode="fan_in", nonlinearity="leaky_relu")


@INITS.register("kaiming_out")
@_per_weight
def _kaiming_out(w: torch.Tensor, negative_slope: float = 0.0) -> None:
    nn.init.kaiming_normal_(w, a=negative_slope, mode="fan_out", nonlinearity="leaky_relu")


@INITS.register("orthogonal")
@_per_weight
def _orthogonal(w: torch.Tensor, gain: float = 1.0) -> None:
    nn.init.orthogonal_(w, gain=gain)


@INITS.register("zero")
@_per_weight
def _zero(w: torch.Tensor) -> None:
    nn.init.zeros_(w)


@INITS.register("lsuv")
def _lsuv(
    layers: Layers,
    model: nn.Module,
    x: torch.Tensor | None,
    tol: float = 0.1,
    max_iter: int = 10,
    eps: float = 1e-8,
) -> None:
    """Layer-sequential unit-variance init (Mishkin & Matas 2016, Algorithm 1).

    The batch is pushed through the model in its current mode (train-mode batch norm
    uses batch statistics, as the network will see them in training).
    """
    if x is None:
        raise ConfigError("init 'lsuv' needs a data batch: apply_init(model, 'lsuv', x=batch)")
    _orthogonal(layers, model, x)
    # Biases are 0 (apply_init zeroes them first) and a layer's input does not depend
    # on its own weight, so one rescale by 1/std is exact; the loop, as in the paper,
    # covers layers whose input does (a module reused in the forward pass).
    with preserved_buffers(model):
        ordered = _forward_order(model, x, [m for _, m in layers])
        for module in ordered:
            for _ in range(max_iter):
                var = _output_variance(model, x, module)
                # A layer whose output is constant on the batch cannot be rescaled to
                # unit variance; dividing by ~0 would only blow the weights up.
                if abs(var - 1.0) < tol or var < eps:
                    break
                set_weight(module, module.weight.detach() / math.sqrt(var + eps))


@contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s buffers (batch-norm running statistics) on exit.

    Forward passes that only measure (LSUV, :func:`inspect_init`) must not move the
    running statistics, or the run would not start from the state that was saved.

    Example:
        >>> import torch
        >>> bn = nn.BatchNorm1d(3)
        >>> with preserved_buffers(bn):
        ...     _ = bn(torch.randn(8, 3) + 5)
        >>> bn.running_mean
        tensor([0., 0., 0.])
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


class _Captured(Exception):
    """Raised by a hook to stop a forward pass once the wanted output is seen."""


def _forward_order(model: nn.Module, x: torch.Tensor, modules: list[nn.Module]) -> list[nn.Module]:
    """``modules`` in the order the forward pass calls them (uncalled ones dropped)."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m) if m not in order else None) for m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return order


def _output_variance(model: nn.Module, x: torch.Tensor, module: nn.Module) -> float:
    def capture(m: nn.Module, inputs, output: torch.Tensor) -> None:
        # The layers after this one are irrelevant: skipping them makes LSUV cost
        # O(L²/2) layer evaluations instead of O(L²).
        raise _Captured(float(output.detach().float().var()))

    hook = module.register_forward_hook(capture)
    try:
        with torch.no_grad():
            model(x)
    except _Captured as c:
        return c.args[0]
    finally:
        hook.remove()
    raise RuntimeError("the layer was not called by the forward pass")


def apply_init(model: nn.Module, name: str, x: torch.Tensor | None = None, **options) -> nn.Module:
    """Initialize every Conv/Linear weight of ``model`` with scheme ``name``, in place.

    Biases become 0 and norm layers weight 1, bias 0 (except for ``"default"``, which
    changes nothing). ``x`` is a data batch, needed by ``"lsuv"`` only; ``options``
    go to the scheme (``gain``, ``negative_slope``, ``tol``, ...). Draws from the
    global torch RNG, so seed it for a reproducible start. Returns ``model``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 5))
        >>> w = apply_init(net, "orthogonal")[0].weight
        >>> torch.allclose(w @ w.T, torch.eye(20), atol=1e-5)
        True
        >>> out = apply_init(net, "lsuv", x=torch.randn(256, 20))(torch.randn(256, 20))
        >>> 0.8 < out.var().item() < 1.2
        True
    """
    scheme = INITS.get(name)
    layers = weighted_layers(model)
    if name != "default":
        with torch.no_grad():
            for _, module in layers:
                if module.bias is not None:
                    module.bias.zero_()
            for module in model.modules():
                if isinstance(module, _NORM_LAYERS):
                    if getattr(module, "weight", None) is not None:
                        module.weight.fill_(1.0)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
    check_options("init", name, scheme, options, fixed=("w", "layers", "model", "x"))
    scheme(layers, model, x, **options)
    return model


# --- a fixed initial point ------------------------------------------------------------


@dataclass
class InitLoadReport:
    """What :func:`load_init` did, entry by entry of the state dict."""

    loaded: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)  # in both, shapes differ
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model

    @property
    def complete(self) -> bool:
        """True when every entry of the model came from the file."""
        return not (self.shape_mismatch or self.missing)

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)}"]
        for label, names in (("shape mismatch", self.shape_mismatch), ("missing", self.missing),
                             ("unexpected", self.unexpected)):
            if names:
                parts.append(f"{label} {len(names)}: {', '.join(names)}")
        return "; ".join(parts)


def save_init(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model``'s state dict (parameters and buffers) as a shared initial point.

    Written atomically (temp file + rename) so a crash never leaves a half file that a
    sweep would then load. Returns the path.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> p = Path(tempfile.mkdtemp()) / "init.pt"
        >>> save_init(nn.Linear(3, 2), p).exists()
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_init(model: nn.Module, path: str | os.PathLike) -> InitLoadReport:
    """Copy the saved initial point into ``model`` wherever names and shapes match.

    Runs with different switches (width of one layer, a norm layer more or less)
    then share one initial point where shapes allow; the report lists what was
    loaded and what was skipped, so a caller can refuse a partial load
    (``report.complete``). Loads with ``weights_only=True``: the file is never
    unpickled as arbitrary objects.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> p = save_init(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), Path(tempfile.mkdtemp()) / "i.pt")
        >>> print(load_init(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5)), p))
        loaded 2; shape mismatch 2: 1.weight, 1.bias
    """
    saved = torch.load(Path(path), map_location="cpu", weights_only=True)
    report = InitLoadReport()
    own = model.state_dict()
    with torch.no_grad():
        for name, target in own.items():
            if name not in saved:
                report.missing.append(name)
            elif saved[name].shape != target.shape:
                report.shape_mismatch.append(name)
            else:
                # state_dict tensors share storage with the parameters/buffers.
                target.copy_(saved[name])
                report.loaded.append(name)
    report.unexpected = [n for n in saved if n not in own]
    return report
