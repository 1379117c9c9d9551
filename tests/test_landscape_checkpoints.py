"""Landscapes of plain checkpoint files from any training loop: ``--model`` / ``--data``
factories named ``module:attr``, state_dicts saved by ``torch.save``.

The model, data and training loop live in a tiny module written to a temporary folder
put on ``sys.path``; the brute forces load each point into a freshly built model with
``load_state_dict`` and compute the loss by hand.
"""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gammatrace.cli import main
from gammatrace.errors import UserError
from gammatrace.landscape import compute_landscape, filter_normalized_directions, landscape
from gammatrace.landscape.evaluate import evaluation_subset
from tests.landscape_toy import import_factories, sgd_states

MODULE = "gt_landscape_toy"
TOY = textwrap.dedent('''
    """A conv net with batch norm and its data, built from explicit generators."""
    import torch
    from torch import nn


    def net():
        g = torch.Generator().manual_seed(0)
        m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        return m


    def data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(40, 1, 6, 6, generator=g), torch.randint(0, 4, (40,), generator=g)


    class Pairs(torch.utils.data.Dataset):
        def __init__(self):
            self.x, self.y = data()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.y[i]


    def other_net():
        return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5))


    def not_a_module():
        return 3


    NOT_CALLABLE = 3
''')
SAMPLES = 24
STEPS = 4


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The module on sys.path and a path of STEPS+1 checkpoints saved by a plain SGD loop, three ways."""
    root = tmp_path_factory.mktemp("toy")
    mod, mp = import_factories(root, MODULE, TOY)
    files = {"plain": [], "model": [], "state_dict": []}
    for step, state in enumerate(sgd_states(mod, lr=0.3, points=STEPS + 1)):
        for kind in files:
            f = root / kind / f"ckpt_{step}.pt"
            f.parent.mkdir(exist_ok=True)
            obj = {"plain": state, "model": {"model": state, "step": step}, "state_dict": {"state_dict": state}}[kind]
            torch.save(obj, f)
            files[kind].append(f)
    yield root, files, mod
    mp.undo()


def _spec(attr):
    return f"{MODULE}:{attr}"


def _by_hand(mod, file, theta=None, loss="cross_entropy"):
    """Loss of the state in ``file`` (or θ written into it) on the evaluation subset, train mode."""
    model = mod.net()
    state = torch.load(file, weights_only=True)
    state = state.get("model", state)
    if theta is not None:
        at = 0
        for name, p in model.named_parameters():
            state[name] = torch.from_numpy(theta[at:at + p.numel()]).reshape(p.shape).float()
            at += p.numel()
    model.load_state_dict(state)
    model.train()
    x, y = mod.data()
    idx = evaluation_subset(len(x), SAMPLES, 0)
    with torch.no_grad():
        out = model(x[idx])
        per = F.cross_entropy(out, y[idx], reduction="none") if loss == "cross_entropy" else \
            (out - F.one_hot(y[idx], 4).float()).pow(2).mean(1)
    return float(per.double().mean())


def _flat(mod, file):
    state = torch.load(file, weights_only=True)
    state = state.get("model", state)
    return np.concatenate([state[n].double().reshape(-1).numpy() for n, _ in mod.net().named_parameters()])


def test_checkpoint_path_matches_brute_force(toy, tmp_path):
    root, files, mod = toy
    path = files["plain"]
    ls = compute_landscape(path, tmp_path, model=_spec("net"), data=_spec("data"), grid=3, samples=SAMPLES,
                           progress=False)
    assert ls.run_names == ["ckpt_0..ckpt_4"] and ls.run_paths == [str(path[-1].resolve())]
    points = np.stack([_flat(mod, f) for f in path])
    origin = points[-1]  # θ_T = the last file
    M = points - origin
    lam = np.sort(np.linalg.eigvalsh(M @ M.T))[::-1]
    np.testing.assert_allclose(ls.explained, lam[:2] / lam.sum(), rtol=1e-9)
    z = np.load(tmp_path / "landscape_basis.npz")
    np.testing.assert_array_equal(z["origin_0"], origin)
    u, v = z["basis_0"]
    np.testing.assert_allclose(ls.coords[0], M @ z["basis_0"].T, atol=1e-12)
    for j, i in ((0, 0), (1, 1), (2, 1)):
        theta = origin + ls.alphas[i] * u + ls.betas[j] * v
        assert ls.loss[j, i] == pytest.approx(_by_hand(mod, path[-1], theta), rel=1e-12)
    for e, f in enumerate(path):
        assert ls.path_loss[0][e] == pytest.approx(_by_hand(mod, f), rel=1e-12)
    # The SGD direction at θ_0, by autograd on a fresh model.
    model = mod.net()
    model.load_state_dict(torch.load(path[0], weights_only=True))
    x, y = mod.data()
    idx = evaluation_subset(len(x), SAMPLES, 0)
    F.cross_entropy(model(x[idx]), y[idx], reduction="none").double().mean().backward()
    g = -np.concatenate([p.grad.double().reshape(-1).numpy() for p in model.parameters()])
    np.testing.assert_allclose(ls.grad_proj[0][0], z["basis_0"] @ g, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ls.step_proj[0][0], z["basis_0"] @ (points[1] - points[0]), rtol=1e-9, atol=1e-14)


def test_wrapped_checkpoints_and_a_dataset_factory_give_the_same_numbers(toy, tmp_path):
    _, files, _ = toy
    ref = compute_landscape(files["plain"], tmp_path / "ref", model=_spec("net"), data=_spec("data"), grid=3,
                            samples=SAMPLES, progress=False)
    for kind in ("model", "state_dict"):
        other = compute_landscape(files[kind], tmp_path / kind, model=_spec("net"), data=_spec("Pairs"), grid=3,
                                  samples=SAMPLES, progress=False)
        np.testing.assert_array_equal(other.loss, ref.loss)
        np.testing.assert_array_equal(other.grad_proj[0], ref.grad_proj[0])
        np.testing.assert_array_equal(other.interp_loss[0], ref.interp_loss[0])


def test_several_named_checkpoint_paths_per_path_and_mse(toy, tmp_path):
    _, files, mod = toy
    paths = {"first": files["plain"][:3], "all": files["plain"]}
    ls = compute_landscape(paths, tmp_path, plane="per_path", model=_spec("net"), data=_spec("data"), grid=3,
                           samples=SAMPLES, loss="mse", progress=False)
    assert ls.run_names == ["first", "all"] and [p.name for p in ls.planes] == ["first", "all"]
    assert ls.planes[0].loss[1, 1] == pytest.approx(_by_hand(mod, files["plain"][2], loss="mse"), rel=1e-12)
    assert ls.planes[1].loss[1, 1] == pytest.approx(_by_hand(mod, files["plain"][-1], loss="mse"), rel=1e-12)


def test_random_directions_on_a_conv_net_match_brute_force(toy, tmp_path):
    """Li et al.'s use: one checkpoint, two filter-normalised directions; the conv
    layer's filters are its output channels, batch norm and biases are left out."""
    _, files, mod = toy
    last = files["plain"][-1]
    ls = compute_landscape([last], tmp_path, directions="random", dims=2, grid=3, samples=SAMPLES,
                           model=_spec("net"), data=_spec("data"), progress=False)
    center = _flat(mod, last)
    z = np.load(tmp_path / "landscape_random_2d_basis.npz")
    d = z["basis_0"]
    shapes = {n: tuple(p.shape) for n, p in mod.net().named_parameters()}
    np.testing.assert_array_equal(d, filter_normalized_directions(center, list(shapes.values()), n=2, seed=0))
    state = torch.load(last, weights_only=True)
    at = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        for k in range(2):
            dk = d[k, at:at + size].reshape(shape)
            if name == "0.weight":  # conv (3, 1, 3, 3): one filter per output channel
                for c in range(3):
                    assert np.linalg.norm(dk[c]) == pytest.approx(float(state[name][c].double().norm()), rel=1e-13)
            elif name == "4.weight":  # linear (4, 48): one filter per output neuron
                np.testing.assert_allclose(np.linalg.norm(dk, axis=1), state[name].double().norm(dim=1).numpy(),
                                           rtol=1e-13)
            else:  # conv and linear biases, batch-norm weight and bias
                assert (dk == 0).all(), name
        at += size
    for j, i in ((0, 0), (2, 1), (1, 1)):
        theta = center + ls.alphas[i] * d[0] + ls.betas[j] * d[1]
        assert ls.loss[j, i] == pytest.approx(_by_hand(mod, last, theta), rel=1e-12)
    with pytest.raises(UserError, match="at least two points"):  # one point has no PCA plane
        compute_landscape([last], tmp_path, grid=3, model=_spec("net"), data=_spec("data"), progress=False)


def test_cli_on_checkpoint_files(toy, tmp_path, capsys):
    _, files, _ = toy
    out = tmp_path / "cli"
    argv = ["landscape", *map(str, files["plain"]), "--model", _spec("net"), "--data", _spec("data"), "--out",
            str(out), "--grid", "3", "--samples", str(SAMPLES), "--plane", "per_path", "--quiet"]
    assert main(argv) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert printed["landscape"] == str(out / "landscape_per_path.png") and (out / "landscape_per_path.png").is_file()
    files_api = landscape(files["plain"], out, model=_spec("net"), data=_spec("data"), grid=3, samples=SAMPLES,
                          plane="per_path", progress=False)  # the same settings: reloaded, not recomputed
    assert str(files_api["grid"]) == printed["grid"]


def test_cli_imports_factories_from_the_working_directory(toy, tmp_path, monkeypatch, capsys):
    _, files, _ = toy
    (tmp_path / "gt_cwd_factories.py").write_text(f"from {MODULE} import net, data\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    argv = ["landscape", *map(str, files["plain"]), "--model", "gt_cwd_factories:net", "--data",
            "gt_cwd_factories:data", "--out", "out", "--grid", "3", "--samples", str(SAMPLES), "--quiet",
            "--directions", "random", "--dims", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "landscape_random_1d.png").is_file()


def _bad_state(good, folder, name, edit):
    state = {k: v.clone() for k, v in torch.load(good, weights_only=True).items()}
    edit(state)
    f = folder / f"{name}.pt"
    torch.save(state, f)
    return f


@pytest.mark.parametrize("case, message", [
    ("missing file", "nope.pt: no such checkpoint file"),
    ("no colon", "expected 'package.module:factory'"),
    ("no module", "cannot import module 'gt_no_such_module'"),
    ("no attribute", "has no attribute 'nothing'"),
    ("not callable", "is a int, not a callable factory"),
    ("not a module", "returned a int, not a torch.nn.Module"),
    ("missing key", "does not fit the model of gt_landscape_toy:net: missing key '4.bias'"),
    ("unexpected key", "unexpected key 'extra.weight'"),
    ("wrong shape", "'4.weight' has shape (5, 48) in the file, (4, 48) in the model"),
    ("not a tensor file", "is not a tensor file readable with weights_only=True"),
    ("model without data", "--model and --data go together"),
    ("unknown loss", "unknown loss 'hinge'"),
])
def test_checkpoint_mistakes_are_one_line_user_errors(toy, tmp_path, capsys, case, message):
    _, files, _ = toy
    path = [str(f) for f in files["plain"][:2]]
    kw = {"model": _spec("net"), "data": _spec("data")}
    if case == "missing file":
        path.append(str(tmp_path / "nope.pt"))
    elif case == "no colon":
        kw["model"] = MODULE
    elif case == "no module":
        kw["model"] = "gt_no_such_module:net"
    elif case == "no attribute":
        kw["data"] = _spec("nothing")
    elif case == "not callable":
        kw["model"] = _spec("NOT_CALLABLE")
    elif case == "not a module":
        kw["model"] = _spec("not_a_module")
    elif case == "missing key":
        path.append(str(_bad_state(path[0], tmp_path, "missing", lambda s: s.pop("4.bias"))))
    elif case == "unexpected key":
        path.append(str(_bad_state(path[0], tmp_path, "extra", lambda s: s.update({"extra.weight": torch.zeros(1)}))))
    elif case == "wrong shape":
        path.append(str(_bad_state(path[0], tmp_path, "shape", lambda s: s.update({"4.weight": torch.zeros(5, 48)}))))
    elif case == "not a tensor file":
        (tmp_path / "notes.pt").write_text("not a checkpoint")
        path.append(str(tmp_path / "notes.pt"))
    elif case == "model without data":
        del kw["data"]
    elif case == "unknown loss":
        kw["loss"] = "hinge"
    with pytest.raises(UserError) as info:
        compute_landscape(path, tmp_path / "out", grid=3, samples=SAMPLES, progress=False, **kw)
    assert message in str(info.value)
    argv = ["landscape", *path, "--out", str(tmp_path / "cli"), "--grid", "3", "--quiet"]
    argv += [a for k, v in kw.items() if k != "loss" for a in (f"--{k}", v)]
    if case != "unknown loss":  # argparse itself refuses a loss outside the registry's choices
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]


@pytest.mark.slow
def test_parallel_rows_import_the_factories_in_workers(toy, tmp_path):
    # Spawned workers import the factory module from the parent's sys.path.
    _, files, _ = toy
    opts = dict(model=_spec("net"), data=_spec("data"), grid=3, samples=SAMPLES, plane="per_path", progress=False)
    paths = {"a": files["plain"][:3], "b": files["plain"]}
    serial = compute_landscape(paths, tmp_path / "s", **opts)
    parallel = compute_landscape(paths, tmp_path / "p", workers=2, **opts)
    for a, b in zip(serial.planes, parallel.planes, strict=True):
        np.testing.assert_array_equal(a.loss, b.loss)
