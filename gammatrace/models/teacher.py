"""The networks of the CS260 teacher–student report (after Li & Yuan, NeurIPS 2017).

**Teacher–student** (model ``teacher_student``), for x ∈ R^d and W ∈ R^{d×d}::

    y(x, W) = Σ_i σ(W x + x)_i     identity mapping on  (the residual form, (I + W) x)
    y(x, W) = Σ_i σ(W x)_i         identity mapping off

σ is any activation of the registry: ``relu`` (Li & Yuan's), ``leaky_relu`` (a fixed
slope, ``activation_options={"negative_slope": a}``) or ``prelu`` (a learned slope).
The output Σ_i σ(·)_i (``output="sum"``, the default) is the report's eq. (4); its eq. (1)
writes ‖σ(Wx + x)‖₁ but defines ‖·‖₁ as "the sum of all elements", and its gradient,
eq. (5)–(6), is the derivative of Σσ: the ReLU indicator 1{⟨e_j + w_j, x⟩ ≥ 0} plus α times
the indicator below zero (Σ|σ| would give −α there). ``output="abs"`` keeps ‖·‖₁ literally,
Σ_i |σ(·)_i|: the same for ReLU, different for PReLU outputs below zero. One difference
from eq. (5) remains at exactly z = 0, where eq. (5) takes slope 1 and PyTorch's leaky
ReLU / PReLU take α; z = 0 exactly happens only at a zero init without the identity
mapping, on its first step (same direction, α times the length).

The teacher is the same function at a known W* (the ``teacher_student`` dataset,
:func:`gammatrace.data.synthetic.planted_teacher`), so the true minimizer of the
population loss is known and the engine can use θ* = W* instead of the last iterate:
:meth:`TeacherStudent.reference_state` gives it as a state dict of the student.

Known minimizer, with care: with the identity mapping each row i of W is tied to
input coordinate x_i, and W* is the unique minimizer near 0 (Li & Yuan's setting,
‖W*‖₂ small). Without it the output is invariant to permuting the rows of W, so
W* is one of d! equivalent minimizers and the run may converge to another one.
A zero init without identity starts where every hidden unit is the same function: with
Σσ and a PReLU every row of W gets the same gradient, so W stays of the form 1·uᵀ (one
hidden unit, d times) and cannot reach W*; with Σ|σ| (|·|'(0) = 0) or a ReLU (σ'(0) = 0)
the gradient is exactly 0 and W never moves.

**One hidden layer with an identity mapping** (model ``identity_mlp``, the report's MNIST
experiment, its Fig. 3): logits = V σ((I + W) x + b) + c, or V σ(W x + b) + c without the
identity mapping; the hidden width is the input dimension, so that I + W is defined.

Example:
    >>> import torch
    >>> from gammatrace.models import build
    >>> from gammatrace.data.synthetic import planted_teacher, teacher_student_targets
    >>> W_star = planted_teacher(5, norm_bound=0.5, seed=0)
    >>> x = torch.randn(8, 5)
    >>> student = build("teacher_student", input_shape=(5,), num_classes=1, init="zero")
    >>> student(x).shape
    torch.Size([8, 1])
    >>> student.load_state_dict(student.reference_state(W_star))
    <All keys matched successfully>
    >>> torch.equal(student(x), teacher_student_targets(x, W_star))
    True
    >>> build("identity_mlp", input_shape=(1, 8, 8), num_classes=10)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from gammatrace.errors import ConfigError
from gammatrace.models.activations import make_activation
from gammatrace.models.init import set_weight
from gammatrace.models.registry import MODELS
from gammatrace.registry import Registry

# How the student's W starts. Each entry: fn(weight, scale) in place, under no_grad.
STUDENT_INITS: Registry[Callable[[torch.Tensor, float], None]] = Registry("teacher_student init")
# The student's output over its hidden units h = σ(z): Σ_i h_i (eq. (4)) or Σ_i |h_i|.
OUTPUTS = ("sum", "abs")


@STUDENT_INITS.register("random")
def _random(weight: torch.Tensor, scale: float) -> None:
    # N(0, scale²/d) entries: ‖W‖₂ ≈ 2·scale for large d, i.e. "small" for scale ≪ 1.
    nn.init.normal_(weight, 0.0, scale / math.sqrt(weight.shape[1]))


@STUDENT_INITS.register("zero")
def _zero(weight: torch.Tensor, scale: float) -> None:
    nn.init.zeros_(weight)


class TeacherStudent(nn.Module):
    """y(x, W) = Σ_i σ(Wx + x)_i (``identity=True``) or Σ_i σ(Wx)_i, output shape (N, 1);
    ``output="abs"`` sums |σ(·)_i| instead (‖·‖₁ taken literally).

    W is ``self.linear.weight`` (an ``nn.Linear(d, d, bias=False)``, so the generic
    init, weight-norm and inspect tools apply to it). The output is (N, 1) whatever
    ``num_classes`` says: one regression channel, as an ``MSELoss`` against the (N, 1)
    targets of the ``teacher_student`` dataset expects.

    Example:
        >>> import torch
        >>> m = TeacherStudent(3)
        >>> with torch.no_grad():
        ...     _ = m.linear.weight.zero_()
        >>> m(torch.tensor([[1.0, -2.0, 3.0]]))  # Σ relu(x) = 1 + 3
        tensor([[4.]], grad_fn=<SumBackward1>)
        >>> m = TeacherStudent(3, activation="leaky_relu", activation_options={"negative_slope": 0.25})
        >>> with torch.no_grad():
        ...     _ = m.linear.weight.zero_()
        >>> m(torch.tensor([[1.0, -2.0, 3.0]])).item(), TeacherStudent(3, output="abs").output
        (3.5, 'abs')
    """

    def __init__(self, d: int, identity: bool = True, activation: str = "relu",
                 activation_options: dict | None = None, output: str = "sum"):
        super().__init__()
        if d <= 0:
            raise ConfigError(f"teacher_student needs d > 0, got {d}")
        if output not in OUTPUTS:
            raise ConfigError(f"teacher_student output must be one of {list(OUTPUTS)}, got {output!r}")
        self.d, self.identity, self.output = d, identity, output
        self.activation, self.activation_options = activation, dict(activation_options or {})
        self.linear = nn.Linear(d, d, bias=False)
        self.act = make_activation(activation, **self.activation_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        z = self.linear(x)
        if self.identity:
            z = z + x
        h = self.act(z)
        return (h.abs() if self.output == "abs" else h).sum(dim=1, keepdim=True)

    def reference_state(self, W_star: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ* as a state dict of this student: W = W*, the activation as the teacher's.

        The teacher's activation parameters (a PReLU slope) are the activation's
        initial values, so a learned slope is reset in θ*; other entries (a weight
        norm's g and v) are derived from W* through the parametrization.

        Example:
            >>> m = TeacherStudent(2)
            >>> m.reference_state(torch.eye(2))["linear.weight"]
            tensor([[1., 0.],
                    [0., 1.]])
        """
        if tuple(W_star.shape) != (self.d, self.d):
            raise ConfigError(f"W_star must be {self.d}x{self.d}, got {tuple(W_star.shape)}")
        ref = copy.deepcopy(self)
        ref.act = make_activation(self.activation, **self.activation_options)
        set_weight(ref.linear, W_star.detach().to(ref.linear.weight.dtype))
        return {k: v.detach().clone() for k, v in ref.state_dict().items()}


@MODELS.register("teacher_student")
def teacher_student(
    input_shape: tuple[int, ...],
    num_classes: int = 1,
    identity: bool = True,
    activation: str = "relu",
    activation_options: dict | None = None,
    init: str = "random",
    init_scale: float = 0.1,
    output: str = "sum",
) -> nn.Module:
    """The student network for inputs of shape (d,); ``num_classes`` is ignored (output (N, 1)).

    ``init``: ``"random"`` (entries N(0, init_scale²/d)) or ``"zero"``. ``output``: ``"sum"``
    (Σσ, the report's eq. (4)) or ``"abs"`` (Σ|σ|).

    Example:
        >>> from gammatrace.models import build
        >>> build("teacher_student", input_shape=(4,), num_classes=10, init="zero").linear.weight.abs().sum()
        tensor(0., grad_fn=<SumBackward0>)
    """
    d = math.prod(input_shape)
    model = TeacherStudent(d, identity=identity, activation=activation,
                           activation_options=activation_options, output=output)
    with torch.no_grad():
        STUDENT_INITS.get(init)(model.linear.weight, init_scale)
    return model


class IdentityMLP(nn.Module):
    """One hidden layer of width d = the input size: logits = V σ((I + W) x + b) + c with the
    identity mapping (``identity=True``), V σ(W x + b) + c without.

    ``hidden`` (d×d, with bias b) and ``out`` (d → classes, with bias c) are ordinary
    ``nn.Linear`` layers, so the engine's init schemes (``zero`` included: every weight and
    bias 0) apply to them; the identity mapping adds the input itself, no parameter.

    Example:
        >>> m = IdentityMLP(3, 2, activation="prelu")
        >>> with torch.no_grad():
        ...     _ = m.hidden.weight.zero_(), m.hidden.bias.zero_()
        ...     m.hidden_features(torch.tensor([[1.0, -2.0, 3.0]]))  # σ(x): the identity mapping alone
        tensor([[ 1.0000, -0.5000,  3.0000]])
    """

    def __init__(self, d: int, num_classes: int, identity: bool = True, activation: str = "prelu",
                 activation_options: dict | None = None):
        super().__init__()
        if d <= 0 or num_classes <= 0:
            raise ConfigError(f"identity_mlp needs d > 0 and num_classes > 0, got {d}, {num_classes}")
        self.identity = identity
        self.hidden = nn.Linear(d, d)
        self.act = make_activation(activation, **dict(activation_options or {}))
        self.out = nn.Linear(d, num_classes)

    def hidden_features(self, x: torch.Tensor) -> torch.Tensor:
        """σ((I + W) x + b), or σ(W x + b) without the identity mapping, for (N, ...) inputs."""
        x = x.flatten(1)
        z = self.hidden(x)
        if self.identity:
            z = z + x
        return self.act(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden_features(x))


@MODELS.register("identity_mlp")
def identity_mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    identity: bool = True,
    activation: str = "prelu",
    activation_options: dict | None = None,
) -> nn.Module:
    """The report's MNIST network (its Fig. 3): one hidden layer as wide as the input
    (784 for MNIST, 64 for the 8×8 digits), with or without the identity mapping, then a
    linear output layer. ``activation``: ``prelu`` (one learned slope shared by the layer,
    initially 0.25 — He et al. 2015's channel-shared variant) or ``relu``.

    Example:
        >>> net = identity_mlp((1, 28, 28), 10, identity=False, activation="relu")
        >>> net.hidden.weight.shape, net.out.weight.shape, type(net.act).__name__
        (torch.Size([784, 784]), torch.Size([10, 784]), 'ReLU')
    """
    return IdentityMLP(math.prod(input_shape), num_classes, identity=identity, activation=activation,
                       activation_options=activation_options)
