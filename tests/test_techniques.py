"""Table-driven tests of the technique registries (activations, norms, inits) and of
the analytic models (teacher–student, scalar chain) and the init inspector.

A new registry entry fails ``test_*_table_covers_registry`` until it has a row here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gammatrace.data.synthetic import planted_teacher, teacher_student_targets
from gammatrace.models import build
from gammatrace.models.activations import ACTIVATIONS, make_activation
from gammatrace.models.chain import ScalarChain, chain_objective
from gammatrace.models.init import INITS, apply_init, load_init, save_init
from gammatrace.models.inspect import inspect_init, plot_inspect
from gammatrace.models.norms import NORMS, apply_weight_norm, make_norm, uses_weight_norm
from gammatrace.registry import UnknownNameError


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- activations ------------------------------------------------------------------------

# name -> (options, reference function of x)
ACTIVATION_TABLE = {
    "sigmoid": ({}, torch.sigmoid),
    "tanh": ({}, torch.tanh),
    "relu": ({}, torch.relu),
    "leaky_relu": ({}, lambda x: torch.where(x > 0, x, 0.01 * x)),  # default slope 0.01
    "prelu": ({"init": 0.3}, lambda x: torch.where(x > 0, x, 0.3 * x)),
    "elu": ({"alpha": 0.5}, lambda x: torch.where(x > 0, x, 0.5 * torch.expm1(x))),
    "gelu": ({}, lambda x: x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))),
    "silu": ({}, lambda x: x * torch.sigmoid(x)),
    "softplus": ({}, lambda x: torch.log1p(torch.exp(x))),
    "identity": ({}, lambda x: x),
}


def test_activation_table_covers_registry():
    assert sorted(ACTIVATION_TABLE) == ACTIVATIONS.names()


@pytest.mark.parametrize("name", sorted(ACTIVATION_TABLE))
def test_activation(name):
    options, reference = ACTIVATION_TABLE[name]
    act = make_activation(name, **options)
    x = torch.randn(4, 3, 5, requires_grad=True)
    y = act(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, reference(x.detach()), atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    # Each call is a fresh module: stateful activations (PReLU) must not be shared.
    assert make_activation(name, **options) is not act


def test_activation_options_and_errors():
    assert make_activation("leaky_relu").negative_slope == 0.01
    assert make_activation("prelu", num_parameters=6).weight.shape == (6,)
    with pytest.raises(TypeError, match="relu.*negative_slope"):
        make_activation("relu", negative_slope=0.1)
    with pytest.raises(UnknownNameError):
        make_activation("swish2")


# --- norms ------------------------------------------------------------------------------

C = 64
SHAPES = {0: (32, C), 1: (8, C, 12), 2: (8, C, 4, 5)}


def _groups_batch(out, module):  # per channel, over batch and positions
    return out.transpose(0, 1).reshape(out.shape[1], -1)


def _groups_layer(out, module):  # per sample, over channels and positions
    return out.reshape(out.shape[0], -1)


def _groups_group(out, module):  # per sample and group
    return out.reshape(out.shape[0] * module.num_groups, -1)


def _groups_instance(out, module):  # per sample and channel, over positions
    return out.reshape(out.shape[0] * out.shape[1], -1)


# name -> how to split the output into the sets that must have mean 0 / var 1
# (None: the layer is the identity), and the dims it refuses.
NORM_TABLE = {
    "batch": (_groups_batch, ()),
    "layer": (_groups_layer, ()),
    "group": (_groups_group, ()),
    "instance": (_groups_instance, (0,)),
    "weight": (None, ()),
    "none": (None, ()),
}


def test_norm_table_covers_registry():
    assert sorted(NORM_TABLE) == NORMS.names()


@pytest.mark.parametrize("dim", sorted(SHAPES))
@pytest.mark.parametrize("name", sorted(NORM_TABLE))
def test_norm(name, dim):
    split, refused = NORM_TABLE[name]
    if dim in refused:
        with pytest.raises(ValueError):
            make_norm(name, C, dim)
        return
    norm = make_norm(name, C, dim).train()
    x = 3.0 * torch.randn(SHAPES[dim]) + 5.0
    out = norm(x)
    assert out.shape == x.shape
    if split is None:
        assert isinstance(norm, nn.Identity)
        return
    sets = split(out.detach(), norm)
    torch.testing.assert_close(sets.mean(dim=1), torch.zeros(len(sets)), atol=1e-4, rtol=0)
    # Variance 1 up to the eps in the denominator, which matters for small sets (the
    # two-channel groups on (N, C) features): s / (s + eps) with s the input's variance.
    s = split(x, norm).var(dim=1, unbiased=False)
    torch.testing.assert_close(sets.var(dim=1, unbiased=False), s / (s + norm.eps), atol=1e-4, rtol=1e-4)
    out.sum().backward()  # builds a graph to its parameters


def test_norm_options_and_defaults():
    assert make_norm("group", 48, dim=2).num_groups == 24  # largest divisor of 48 up to 32
    assert make_norm("group", 64, dim=2, num_groups=4).num_groups == 4
    assert make_norm("group", 8, dim=0).num_groups == 4  # >= 2 channels per group on (N, C)
    with pytest.raises(ValueError, match="divide"):
        make_norm("group", 10, dim=2, num_groups=4)
    with pytest.raises(ValueError):
        make_norm("group", 8, dim=0, num_groups=8)
    assert make_norm("instance", 5, dim=2).affine
    assert isinstance(make_norm("layer", 5, dim=0), nn.LayerNorm)
    with pytest.raises(ValueError, match="dim"):
        make_norm("batch", 5, dim=3)
    with pytest.raises(TypeError, match="num_groups"):
        make_norm("batch", 5, dim=2, num_groups=2)


def test_weight_norm():
    assert [n for n in NORMS.names() if uses_weight_norm(n)] == ["weight"]
    with pytest.raises(UnknownNameError):
        uses_weight_norm("wieght")
    net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.ConvTranspose1d(4, 3, 2, stride=2),
                        nn.Flatten(), nn.Linear(3 * 16, 5))
    x = torch.randn(6, 2, 10)
    before = net(x)
    apply_weight_norm(apply_weight_norm(net))  # idempotent
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-5)
    names = {n for n, _ in net.named_parameters()}
    assert {"0.parametrizations.weight.original0", "4.parametrizations.weight.original1"} <= names
    assert "0.weight" not in names
    # One g per output unit, also for the transposed conv (weight stored as (in, out, k)).
    assert net[2].parametrizations.weight.original0.shape == (1, 3, 1)
    # Init writes through the parametrization, so init and weight norm commute.
    apply_init(net, "orthogonal")
    w = net[4].weight
    torch.testing.assert_close(w @ w.T, torch.eye(5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="weight norm"):
        apply_init(net, "zero")


# --- inits ------------------------------------------------------------------------------


# name -> (options, promised weight std as a function of (fan_in, fan_out));
# None: checked by its own test below.
INIT_TABLE = {
    "default": ({}, None),
    "lecun": ({}, lambda fi, fo: 1 / math.sqrt(fi)),
    "xavier_normal": ({}, lambda fi, fo: math.sqrt(2 / (fi + fo))),
    "xavier_uniform": ({}, lambda fi, fo: math.sqrt(2 / (fi + fo))),
    "kaiming_in": ({}, lambda fi, fo: math.sqrt(2 / fi)),
    "kaiming_out": ({}, lambda fi, fo: math.sqrt(2 / fo)),
    "orthogonal": ({}, None),
    "zero": ({}, lambda fi, fo: 0.0),
    "lsuv": ({}, None),
}


def test_init_table_covers_registry():
    assert sorted(INIT_TABLE) == INITS.names()


@pytest.mark.parametrize("name", [n for n, (_, std) in INIT_TABLE.items() if std is not None])
def test_init_promised_std(name):
    options, promised = INIT_TABLE[name]
    # Conv fan_in 32·25 = 800, fan_out 64·25 = 1600; linear fan_in 800, fan_out 400.
    net = nn.Sequential(nn.Conv2d(32, 64, 5), nn.BatchNorm2d(64), nn.Linear(800, 400))
    with torch.no_grad():
        net[1].weight.fill_(3.0), net[1].bias.fill_(2.0)
    apply_init(net, name, **options)
    for layer, (fan_in, fan_out) in ((net[0], (800, 1600)), (net[2], (800, 400))):
        expected = promised(fan_in, fan_out)
        assert layer.weight.std().item() == pytest.approx(expected, rel=0.03, abs=1e-12)
        assert layer.weight.mean().item() == pytest.approx(0.0, abs=0.05 * expected + 1e-12)
        assert layer.bias.abs().max().item() == 0.0
    assert (net[1].weight == 1).all() and (net[1].bias == 0).all()


def test_init_kaiming_leaky_slope():
    lin = nn.Sequential(nn.Linear(1000, 500))
    apply_init(lin, "kaiming_in", negative_slope=0.5)
    assert lin[0].weight.std().item() == pytest.approx(math.sqrt(2 / (1.25 * 1000)), rel=0.03)
    with pytest.raises(TypeError, match="kaiming_in.*gain"):
        apply_init(lin, "kaiming_in", gain=2.0)
    with pytest.raises(UnknownNameError):
        apply_init(lin, "he")


def test_init_default_leaves_model_alone():
    net = nn.Sequential(nn.Linear(10, 10), nn.BatchNorm1d(10))
    with torch.no_grad():
        net[1].weight.fill_(3.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    apply_init(net, "default")
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_init_orthogonal():
    net = nn.Sequential(nn.Linear(400, 200), nn.Conv1d(8, 16, 3))
    apply_init(net, "orthogonal")
    w = net[0].weight  # (200, 400): orthonormal rows
    torch.testing.assert_close(w @ w.T, torch.eye(200), atol=1e-4, rtol=0)
    wc = net[1].weight.reshape(16, -1)  # flattened (16, 24)
    torch.testing.assert_close(wc @ wc.T, torch.eye(16), atol=1e-5, rtol=0)


def test_init_lsuv_unit_variance_per_layer():
    net = build("mlp", input_shape=(1, 40), num_classes=10, width=64, depth=6, activation="tanh")
    x = 4.0 * torch.randn(256, 1, 40)
    apply_init(net, "lsuv", x=x, tol=0.05)
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.var().item()))
             for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    assert len(outputs) == 7
    assert all(abs(v - 1) < 0.05 for v in outputs), outputs
    with pytest.raises(ValueError, match="batch"):
        apply_init(net, "lsuv")


def test_measuring_passes_leave_running_stats_alone():
    # LSUV and inspect_init only measure: the saved initial point must be the one used.
    net = build("mlp", input_shape=(1, 40), num_classes=10, width=16, depth=3, batchnorm=True)
    x, y = 2.0 + torch.randn(32, 1, 40), torch.randint(0, 10, (32,))
    apply_init(net, "lsuv", x=x)
    inspect_init(net, x, y, nn.CrossEntropyLoss())
    for name, buf in net.named_buffers():
        expected = 1.0 if name.endswith("running_var") else 0.0
        assert (buf == expected).all(), name


def test_save_load_init_round_trip_and_partial(tmp_path):
    def net(width, head=3, bn=False):
        layers = [nn.Linear(4, width)] + ([nn.BatchNorm1d(width)] if bn else []) + [nn.Linear(width, head)]
        return nn.Sequential(*layers)

    src = net(8)
    path = save_init(src, tmp_path / "sub" / "init.pt")
    assert path.exists() and not list(path.parent.glob("*.tmp"))

    same = net(8)
    report = load_init(same, path)
    assert report.complete and sorted(report.loaded) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    for k, v in same.state_dict().items():
        assert torch.equal(v, src.state_dict()[k])

    other_head = net(8, head=5)  # first layer shares the initial point, the head cannot
    report = load_init(other_head, path)
    assert sorted(report.loaded) == ["0.bias", "0.weight"]
    assert sorted(report.shape_mismatch) == ["1.bias", "1.weight"]
    assert not report.complete and "shape mismatch 2" in str(report)
    assert torch.equal(other_head[0].weight, src[0].weight)

    with_bn = net(8, bn=True)  # names shift by the inserted layer: '1.' is now the norm
    report = load_init(with_bn, path)
    assert "0.weight" in report.loaded and "2.weight" in report.missing
    assert "1.running_mean" in report.missing


# --- teacher–student --------------------------------------------------------------------


def test_teacher_norm_bound_and_identity_switch():
    W = planted_teacher(6, norm_bound=0.4, seed=3)
    assert torch.linalg.matrix_norm(W, ord=2).item() == pytest.approx(0.4, rel=1e-5)
    assert torch.equal(W, planted_teacher(6, norm_bound=0.4, seed=3))  # seeded, global RNG unused
    W_off = planted_teacher(6, norm_bound=0.4, seed=3, identity=False)
    x = torch.randn(50, 6)
    # Same teacher function written for a student with / without the identity mapping.
    torch.testing.assert_close(teacher_student_targets(x, W), teacher_student_targets(x, W_off, identity=False))
    W_F = planted_teacher(6, norm_bound=1.0, seed=3, norm="frobenius")
    assert torch.linalg.matrix_norm(W_F).item() == pytest.approx(1.0, rel=1e-5)
    # Σσ and Σ|σ| agree for ReLU and differ for a leaky slope wherever some σ(z_i) < 0.
    torch.testing.assert_close(teacher_student_targets(x, W), teacher_student_targets(x, W, output="abs"))
    s, a = (teacher_student_targets(x, W, negative_slope=0.25, output=o) for o in ("sum", "abs"))
    assert (a >= s).all() and (a > s).any()


@pytest.fixture
def one_thread():
    # Tiny tensors: thread hand-off would dominate the GD loop. Restored for the tests
    # after, whose trajectories depend on the thread count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_teacher_student_gd_converges_to_w_star(one_thread):
    d, n = 5, 500
    W_star = planted_teacher(d, norm_bound=0.5, seed=0)
    x = torch.randn(n, d)
    t = teacher_student_targets(x, W_star)
    student = build("teacher_student", input_shape=(d,), num_classes=1, init="zero")
    W = student.linear.weight
    assert W.abs().max().item() == 0
    start = (W - W_star).norm().item()
    for _ in range(200):
        loss = 0.5 * (student(x) - t).square().mean()
        (g,) = torch.autograd.grad(loss, [W])
        with torch.no_grad():
            W -= 0.5 * g
    assert (W - W_star).norm().item() < 0.01 * start
    # θ* = W*: the reference state has zero loss.
    student.load_state_dict(student.reference_state(W_star))
    assert (student(x) - t).abs().max().item() < 1e-5


@pytest.mark.parametrize("identity", [True, False])
@pytest.mark.parametrize("activation,options,slope", [("relu", {}, 0.0), ("leaky_relu", {"negative_slope": 0.2}, 0.2)])
@pytest.mark.parametrize("output", ["sum", "abs"])
def test_teacher_student_gradient_formula(identity, activation, options, slope, output):
    d = 4
    model = build("teacher_student", input_shape=(d,), num_classes=1, identity=identity,
                  activation=activation, activation_options=options, init="random", init_scale=0.5, output=output)
    x, t = torch.randn(30, d), torch.randn(30, 1)
    out = model(x)
    assert out.shape == (30, 1)
    loss = 0.5 * (out - t).square().mean()
    (g,) = torch.autograd.grad(loss, [model.linear.weight])
    # By hand: y = Σ_i σ(z_i) (the report's eq. (4); its eq. (5) gradient: 1 for z > 0, slope
    # below) or Σ_i |σ(z_i)| (d|σ(z)|/dz = -slope below zero), z = Wx (+ x).
    W = model.linear.weight.detach()
    z = x @ W.T + (x if identity else 0)
    below = -slope if output == "abs" else slope
    y = torch.where(z > 0, z, below * z).sum(dim=1, keepdim=True)
    torch.testing.assert_close(out.detach(), y)
    dy_dz = torch.where(z > 0, 1.0, below)
    expected = ((y - t) * dy_dz).T @ x / len(x)
    torch.testing.assert_close(g, expected, atol=1e-6, rtol=1e-5)


def test_teacher_student_gradcheck_and_prelu_reference():
    model = build("teacher_student", input_shape=(3,), num_classes=1, activation="prelu").double()
    x = torch.randn(7, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(model, {"linear.weight": w}, (x,)),
                                    (model.linear.weight.detach().clone().requires_grad_(),))
    with torch.no_grad():
        model.act.weight.fill_(0.9)  # "trained" slope; θ* has the teacher's (the init)
    ref = model.reference_state(torch.eye(3, dtype=torch.float64))
    assert ref["act.weight"].item() == 0.25 and torch.equal(ref["linear.weight"], torch.eye(3, dtype=torch.float64))


# --- scalar chain -----------------------------------------------------------------------


def test_scalar_chain_objective_and_gradient():
    values = [0.9, 1.3, -0.7, 1.1, 0.8, 2.0]
    chain = build("scalar_chain", input_shape=(3,), num_classes=7, depth=6)
    with torch.no_grad():
        for p, v in zip(chain.parameters(), values, strict=True):
            p.fill_(v)
    prod = math.prod(values)
    F = 0.5 * (prod - 1) ** 2
    assert chain.objective().item() == pytest.approx(F, rel=1e-6)
    assert chain_objective(torch.tensor(values)).item() == pytest.approx(F, rel=1e-6)
    out = chain(torch.randn(5, 3))
    assert out.shape == (5, 1)
    loss = 0.5 * nn.functional.mse_loss(out, torch.ones(5, 1))  # ½·MSE to 1 is F
    assert loss.item() == pytest.approx(F, rel=1e-6)
    grads = torch.autograd.grad(loss, list(chain.parameters()))
    for i, g in enumerate(grads):
        others = math.prod(v for j, v in enumerate(values) if j != i)
        assert g.item() == pytest.approx((prod - 1) * others, rel=1e-5)


def test_scalar_chain_vanishing_and_exploding():
    small, large = ScalarChain(depth=12, init_value=0.5), ScalarChain(depth=12, init_value=2.0)
    g_small = torch.autograd.grad(small.objective(), [small.w[0]])[0].abs().item()
    g_large = torch.autograd.grad(large.objective(), [large.w[0]])[0].abs().item()
    assert g_small < 1e-3 < 1e3 < g_large


# --- inspect ----------------------------------------------------------------------------


def _mnist1d_batch():
    return torch.randn(64, 1, 40), torch.randint(0, 10, (64,))


def test_inspect_flags_vanishing_sigmoid(tmp_path):
    net = build("mlp", input_shape=(1, 40), num_classes=10, width=32, depth=10, activation="sigmoid")
    x, y = _mnist1d_batch()
    df = inspect_init(net, x, y, nn.CrossEntropyLoss())
    assert len(df) == 11 and list(df.depth) == list(range(11))
    assert df.grad_norm.iloc[0] < 1e-3 * df.grad_norm.iloc[-1]
    assert df.flag.iloc[0] == "vanishing" and df.backward_flag.iloc[0] == "vanishing"
    assert df.flag.iloc[-1] == ""
    assert (df.act_var > 0).all() and df.forward_ratio.iloc[0] == 1.0
    path = plot_inspect(df, tmp_path / "inspect.png", title="sigmoid")
    assert path.stat().st_size > 1000


def test_inspect_relu_kaiming_not_flagged():
    net = build("mlp", input_shape=(1, 40), num_classes=10, width=32, depth=10, activation="relu")
    apply_init(net, "kaiming_in")
    x, y = _mnist1d_batch()
    df = inspect_init(net, x, y, nn.CrossEntropyLoss())
    assert (df.flag == "").all(), df


def test_inspect_forward_order_and_weight_norm():
    class Reversed(nn.Module):
        # Registered b, a; called a, b: rows must follow the call order.
        def __init__(self):
            super().__init__()
            self.b = nn.Linear(6, 2)
            self.a = nn.Linear(4, 6)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    net = apply_weight_norm(Reversed())
    for p in net.parameters():
        p.grad = None
    df = inspect_init(net, torch.randn(9, 4), torch.randn(9, 2), nn.MSELoss())
    assert list(df.name) == ["a", "b", "unused"]
    assert df.grad_norm.iloc[:2].gt(0).all() and math.isnan(df.grad_norm.iloc[2])
    assert df.flag.iloc[2] == ""
    assert all(p.grad is None for p in net.parameters())  # .grad untouched
