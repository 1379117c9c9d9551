"""The teacher–student model of the CS260 study (after Li & Yuan, NeurIPS 2017).

Student, for x ∈ R^d and W ∈ R^{d×d}::

    y(x, W) = ‖σ(W x + x)‖₁     identity mapping on  (the residual form, (I + W) x)
    y(x, W) = ‖σ(W x)‖₁         identity mapping off

σ is any activation of the registry: ``relu`` (the paper's), ``leaky_relu`` (a
fixed slope, ``activation_options={"negative_slope": a}``) or ``prelu`` (a learned
slope). ‖·‖₁ is taken literally, Σ|σ(z)_i|, so it equals Σσ(z)_i for ReLU.

The teacher is the same function at a known W* (the ``teacher_student`` dataset,
:func:`gammatrace.data.synthetic.planted_teacher`), so the true minimizer of the
population loss is known and the engine can use θ* = W* instead of the last iterate:
:meth:`TeacherStudent.reference_state` gives it as a state dict of the student.

Known minimizer, with care: with the identity mapping each row i of W is tied to
input coordinate x_i, and W* is the unique minimizer near 0 (Li & Yuan's setting,
‖W*‖₂ small). Without it the output is invariant to permuting the rows of W, so
W* is one of d! equivalent minimizers and the run may converge to another one;
a zero init without identity starts at a saddle where ReLU gets no gradient at all
(σ'(0) = 0), which is the point of that comparison, not a bug.

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
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from gammatrace.models.activations import make_activation
from gammatrace.models.init import set_weight
from gammatrace.models.registry import MODELS
from gammatrace.registry import Registry

# How the student's W starts. Each entry: fn(weight, scale) in place, under no_grad.
STUDENT_INITS = Registry("teacher_student init")


@STUDENT_INITS.register("random")
def _random(weight: torch.Tensor, scale: float) -> None:
    # N(0, scale²/d) entries: ‖W‖₂ ≈ 2·scale for large d, i.e. "small" for scale ≪ 1.
    nn.init.normal_(weight, 0.0, scale / math.sqrt(weight.shape[1]))


@STUDENT_INITS.register("zero")
def _zero(weight: torch.Tensor, scale: float) -> None:
    nn.init.zeros_(weight)


class TeacherStudent(nn.Module):
    """y(x, W) = ‖σ(Wx + x)‖₁ (``identity=True``) or ‖σ(Wx)‖₁, output shape (N, 1).

    W is ``self.linear.weight`` (an ``nn.Linear(d, d, bias=False)``, so the generic
    init, weight-norm and inspect tools apply to it). The output is (N, 1) whatever
    ``num_classes`` says: one regression channel, as an ``MSELoss`` against the (N, 1)
    targets of the ``teacher_student`` dataset expects.

    Example:
        >>> import torch
        >>> m = TeacherStudent(3)
        >>> with torch.no_grad():
        ...     _ = m.linear.weight.zero_()
        >>> m(torch.tensor([[1.0, -2.0, 3.0]]))  # ‖relu(x)‖₁ = 1 + 3
        tensor([[4.]], grad_fn=<SumBackward1>)
    """

    def __init__(self, d: int, identity: bool = True, activation: str = "relu",
                 activation_options: dict | None = None):
        super().__init__()
        if d <= 0:
            raise ValueError(f"teacher_student needs d > 0, got {d}")
        self.d, self.identity = d, identity
        self.activation, self.activation_options = activation, dict(activation_options or {})
        self.linear = nn.Linear(d, d, bias=False)
        self.act = make_activation(activation, **self.activation_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        z = self.linear(x)
        if self.identity:
            z = z + x
        return self.act(z).abs().sum(dim=1, keepdim=True)

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
            raise ValueError(f"W_star must be {self.d}x{self.d}, got {tuple(W_star.shape)}")
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
) -> nn.Module:
    """The student network for inputs of shape (d,); ``num_classes`` is ignored (output (N, 1)).

    ``init``: ``"random"`` (entries N(0, init_scale²/d)) or ``"zero"``.

    Example:
        >>> from gammatrace.models import build
        >>> build("teacher_student", input_shape=(4,), num_classes=10, init="zero").linear.weight.abs().sum()
        tensor(0., grad_fn=<SumBackward0>)
    """
    d = math.prod(input_shape)
    model = TeacherStudent(d, identity=identity, activation=activation,
                           activation_options=activation_options)
    with torch.no_grad():
        STUDENT_INITS.get(init)(model.linear.weight, init_scale)
    return model
