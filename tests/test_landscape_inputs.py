"""What a new user of ``gammatrace landscape`` on checkpoint files runs into: files in
shell order, a path that does not move, data or targets that do not fit the model, a
factory that raises, numpy data, wrapped state_dicts, too large ``--samples``, the
progress bar, and the figures' captions and markers.

A linear model 4 → 3 and its 30 samples live in a module written to a temporary folder;
a plain SGD loop saves 12 checkpoints ``ckpt_0.pt`` … ``ckpt_11.pt``.
"""

from __future__ import annotations

import shutil
import textwrap
import warnings

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

import gammatrace.landscape.compute as compute_mod
from gammatrace.cli import main
from gammatrace.errors import UserError
from gammatrace.landscape import (
    CheckpointSource,
    Landscape,
    compute_landscape,
    figure_interpolation,
    figure_landscape,
)
from gammatrace.landscape.compute import example_landscape
from gammatrace.landscape.evaluate import evaluation_subset
from gammatrace.landscape.sources import LandscapeWarning, training_order_problem
from tests.landscape_toy import import_factories, sgd_states

MODULE = "gt_landscape_trial"
FACTORIES = textwrap.dedent('''
    import numpy as np
    import torch
    from torch import nn


    def net():
        g = torch.Generator().manual_seed(0)
        m = nn.Linear(4, 3)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        return m


    def bn_net():
        return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


    def data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)


    def wide_data():
        x, y = data()
        return torch.cat([x, x[:, :3]], dim=1), y


    def float_targets():
        x, y = data()
        return x, y.float()


    def numpy_data():
        x, y = data()
        return x.double().numpy(), y.numpy()


    def raises():
        raise RuntimeError("boom inside factory")
''')
STEPS = 12
SAMPLES = 16


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The factory module on sys.path and ckpt_0.pt … ckpt_11.pt of a plain SGD loop."""
    root = tmp_path_factory.mktemp("trial")
    mod, mp = import_factories(root, MODULE, FACTORIES)
    files = []
    for step, state in enumerate(sgd_states(mod, lr=0.5, points=STEPS)):
        files.append(root / f"ckpt_{step}.pt")
        torch.save(state, files[-1])
    yield root, files, mod
    mp.undo()


def _spec(attr):
    return f"{MODULE}:{attr}"


def _opts(**kw):
    return {"model": _spec("net"), "data": _spec("data"), "grid": 3, "samples": SAMPLES, "progress": False, **kw}


def _cli_error(argv, capsys):
    """Exit status and stderr lines of the CLI."""
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


# ------------------------------------------------------------------- 1. training order

@pytest.mark.parametrize("names, problem", [
    (["ckpt_0.pt", "ckpt_1.pt", "ckpt_2.pt", "ckpt_10.pt"], None),
    (["ckpt_0.pt", "ckpt_1.pt", "ckpt_10.pt", "ckpt_11.pt", "ckpt_2.pt"], "ckpt_11.pt comes before ckpt_2.pt"),
    (["epoch=0-step=50.ckpt", "epoch=1-step=100.ckpt", "epoch=10-step=550.ckpt"], None),
    (["epoch=0-step=50.ckpt", "epoch=10-step=550.ckpt", "epoch=2-step=150.ckpt"],
     "epoch=10-step=550.ckpt comes before epoch=2-step=150.ckpt"),
    (["run3/step_5.pt", "run3/step_40.pt"], None),  # a constant number in the folder does not matter
    (["start.pt", "middle.pt", "end.pt"], None),  # no numbers: as given
    (["init.pt", "ckpt_9.pt", "final.pt"], None),  # different skeletons: as given
    (["b/ckpt_3.pt", "a/ckpt_1.pt"], None),  # different folders: as given
    (["ckpt_0.pt", "ckpt_5.pt", "ckpt_5.pt"], "ckpt_5.pt is given twice"),
    (["ckpt_0.pt", "ckpt_10.pt", "ckpt_15.pt", "ckpt_5.pt"], "(e.g. ckpt_{0..15..5}.pt, or ls -v)"),
    (["ckpt_000.pt", "ckpt_010.pt", "ckpt_005.pt"], "ckpt_010.pt comes before ckpt_005.pt; give them in order (e.g. ls -v)"),
])
def test_training_order_rule(names, problem):
    got = training_order_problem(names)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


def test_checkpoint_files_in_shell_order_are_refused(toy, tmp_path, capsys):
    root, files, _ = toy
    shell = sorted(map(str, files))  # what `ckpt_*.pt` expands to: ckpt_0 ckpt_1 ckpt_10 ckpt_11 ckpt_2 …
    assert shell[-1].endswith("ckpt_9.pt")
    want = ("checkpoint files are not in training order: ckpt_11.pt comes before ckpt_2.pt; give them in order "
            "(e.g. ckpt_{0..11}.pt, or ls -v)")
    with pytest.raises(UserError) as info:
        compute_landscape(shell, tmp_path / "out", **_opts())
    assert str(info.value) == want
    code, err = _cli_error(["landscape", *shell, "--out", str(tmp_path / "cli"), "--model", _spec("net"),
                            "--data", _spec("data"), "--grid", "3", "--quiet"], capsys)
    assert code == 2 and err == [f"gammatrace: error: {want}"]


def test_path_ending_higher_than_it_starts_warns_once(toy, tmp_path, capsys):
    root, files, mod = toy
    # Names without numbers are taken as given; here they are in reverse training order.
    folder = tmp_path / "named"
    folder.mkdir()
    reverse = []
    for name, f in zip(("end", "middle", "start"), (files[-1], files[5], files[0]), strict=True):
        reverse.append(folder / f"{name}.pt")
        shutil.copy(f, reverse[-1])
    with pytest.warns(LandscapeWarning, match="ends higher than it starts") as record:
        ls = compute_landscape(reverse, tmp_path / "out", **_opts())
    assert len(record) == 1
    assert ls.path_loss[0][-1] > ls.path_loss[0][0]  # what the warning says, by the stored numbers
    with warnings.catch_warnings():
        warnings.simplefilter("error", LandscapeWarning)
        compute_landscape(files, tmp_path / "in_order", **_opts())  # the right order: no warning
    code, err = _cli_error(["landscape", *map(str, reverse), "--out", str(tmp_path / "cli"), "--model",
                            _spec("net"), "--data", _spec("data"), "--grid", "3", "--quiet"], capsys)
    warned = [line for line in err if "ends higher" in line]
    assert code == 0 and len(warned) == 1 and warned[0].startswith("gammatrace: warning: ")


# ------------------------------------------------------------------ 2. a path that does not move

def test_a_path_that_does_not_move_is_refused_on_pca_planes(toy, tmp_path, capsys):
    _, files, _ = toy
    same = []  # a loop that saved without training (frozen parameters, lr 0)
    for i in range(3):
        same.append(str(tmp_path / f"ckpt_{i}.pt"))
        shutil.copy(files[3], same[-1])
    for plane in ("shared", "per_path"):
        with pytest.raises(UserError, match=r"ckpt_0\.\.ckpt_2: the path does not move \(every checkpoint "
                                            r"equals θ_0\)"):
            compute_landscape(same, tmp_path / plane, plane=plane, **_opts())
    code, err = _cli_error(["landscape", *same, "--out", str(tmp_path / "cli"), "--model", _spec("net"),
                            "--data", _spec("data"), "--grid", "3", "--quiet"], capsys)
    assert code == 2 and len(err) == 1 and "the path does not move" in err[0]
    ls = compute_landscape(same, tmp_path / "random", directions="random", dims=1, **_opts())  # one point: fine
    assert ls.planes[0].loss.shape == (3,)


# -------------------------------------------------------------- 3. one line, not a traceback

@pytest.mark.parametrize("kw, message", [
    ({"data": _spec("wide_data")}, "mat1 and mat2 shapes cannot be multiplied"),
    ({"data": _spec("float_targets")}, "expected target dtype to be Long or Byte, but got Float"),
])
def test_data_that_does_not_fit_the_model_is_one_line(toy, tmp_path, capsys, kw, message):
    _, files, _ = toy
    path = [str(f) for f in files[:3]]
    with pytest.raises(UserError) as info:
        compute_landscape(path, tmp_path / "out", **_opts(**kw))
    text = str(info.value)
    assert "\n" not in text and message in text
    for part in (f"--model '{_spec('net')}'", f"--data '{kw['data']}'", "cross_entropy"):
        assert part in text
    code, err = _cli_error(["landscape", *path, "--out", str(tmp_path / "cli"), "--model", _spec("net"),
                            "--data", kw["data"], "--grid", "3", "--quiet"], capsys)
    assert code == 2 and len(err) == 1 and message in err[0]


@pytest.mark.parametrize("option", ["model", "data"])
def test_a_factory_that_raises_is_one_line_with_its_cause_kept(toy, tmp_path, capsys, option):
    _, files, _ = toy
    path = [str(f) for f in files[:3]]
    with pytest.raises(UserError) as info:
        compute_landscape(path, tmp_path / "out", **_opts(**{option: _spec("raises")}))
    want = f"--{option} '{_spec('raises')}' raised RuntimeError: boom inside factory"
    assert str(info.value) == want
    assert isinstance(info.value.__cause__, RuntimeError)  # the chain, for Python users
    kw = {"model": _spec("net"), "data": _spec("data"), option: _spec("raises")}
    code, err = _cli_error(["landscape", *path, "--out", str(tmp_path / "cli"), "--model", kw["model"],
                            "--data", kw["data"], "--grid", "3", "--quiet"], capsys)
    assert code == 2 and err == [f"gammatrace: error: {want}"]


def test_numpy_data_gives_the_numbers_of_tensors(toy, tmp_path):
    _, files, _ = toy
    path = [str(f) for f in files[:4]]
    ref = compute_landscape(path, tmp_path / "tensors", **_opts())
    got = compute_landscape(path, tmp_path / "numpy", **_opts(data=_spec("numpy_data")))
    np.testing.assert_array_equal(got.loss, ref.loss)
    np.testing.assert_array_equal(got.path_loss[0], ref.path_loss[0])


def test_a_checkpoint_file_without_model_and_data_says_what_it_needs(toy, tmp_path, capsys):
    _, files, _ = toy
    with pytest.raises(UserError, match=r"is not a gammatrace run \(no run.json\); checkpoint files of your own "
                                        "loop need --model and --data"):
        compute_landscape([str(files[0]), str(files[1])], tmp_path / "out", grid=3, progress=False)
    code, err = _cli_error(["landscape", str(files[0]), "--out", str(tmp_path / "cli"), "--quiet"], capsys)
    assert code == 2 and len(err) == 1 and err[0].endswith("checkpoint files of your own loop need --model and --data")


@pytest.mark.parametrize("prefix", ["module.", "model.", "_orig_mod."])
def test_a_uniform_wrapper_prefix_is_stripped(toy, tmp_path, prefix):
    """DDP (module.), Lightning (model.) and torch.compile (_orig_mod.) save the wrapped
    model's keys under a prefix: stripped when the rest matches the model exactly."""
    _, files, _ = toy
    wrapped = []
    for f in files[:3]:
        wrapped.append(tmp_path / f.name)
        torch.save({prefix + k: v for k, v in torch.load(f, weights_only=True).items()}, wrapped[-1])
    ref = compute_landscape(files[:3], tmp_path / "plain", **_opts())
    got = compute_landscape(wrapped, tmp_path / "wrapped", **_opts())
    np.testing.assert_array_equal(got.loss, ref.loss)
    np.testing.assert_array_equal(got.path_loss[0], ref.path_loss[0])


def test_a_wrapper_prefix_that_does_not_fit_gets_a_hint(toy, tmp_path):
    _, files, _ = toy
    bad = []
    for f in files[:2]:
        state = torch.load(f, weights_only=True)
        state.pop("bias")
        bad.append(tmp_path / f.name)
        torch.save({"module." + k: v for k, v in state.items()}, bad[-1])
    with pytest.raises(UserError, match=r"missing key 'weight'.*the file's keys start with 'module.': saved from "
                                        r"a DDP wrapper\? save model.module.state_dict\(\)"):
        compute_landscape(bad, tmp_path / "out", **_opts())


# --------------------------------------------------------------- 4. more samples than data

def test_samples_beyond_the_training_set_are_capped_and_reported(toy, tmp_path):
    _, files, _ = toy
    ls = compute_landscape(files[:3], tmp_path / "out", **_opts(samples=100_000))
    assert ls.samples_used == [30]  # the whole set, as evaluation_subset takes it
    assert len(evaluation_subset(30, 100_000)) == 30
    meta = Landscape.load(tmp_path / "out")
    assert meta.samples_used == [30]
    for fig in (figure_landscape(ls), figure_interpolation(ls), figure_landscape(meta)):
        title = fig.get_suptitle()
        assert "30" in title and "100000" not in title and "100,000" not in title
    small = compute_landscape(files[:3], tmp_path / "small", **_opts(samples=8))
    assert small.samples_used == [8] and "loss on 8 fixed training samples" in figure_landscape(small).get_suptitle()


# --------------------------------------------------------------------- 5. the progress bar

def test_one_worker_runs_one_task_per_row_and_builds_once(toy, tmp_path, monkeypatch):
    _, files, _ = toy
    real = compute_mod.make_executor
    tasks_seen = []

    def recording(*args, **kwargs):
        ex = real(*args, **kwargs)

        class Recorder:
            def map(self, fn, tasks, **kw):
                tasks_seen.append(len(tasks))
                return ex.map(fn, tasks, **kw)
        return Recorder()

    monkeypatch.setattr(compute_mod, "make_executor", recording)
    calls = {"final_buffers": 0}
    real_buffers = CheckpointSource.final_buffers

    def counting(self, ev):
        calls["final_buffers"] += 1
        return real_buffers(self, ev)

    monkeypatch.setattr(CheckpointSource, "final_buffers", counting)
    ls = compute_landscape(files[:4], tmp_path / "out", **_opts(grid=5))
    assert tasks_seen == [5]  # one task per row: the bar moves with every row
    assert calls["final_buffers"] == 1  # θ_T's buffers read once per process, not per row
    ref = compute_landscape(files[:4], tmp_path / "ref", **_opts(grid=5, workers=1))
    np.testing.assert_array_equal(ls.loss, ref.loss)


def test_resuming_says_how_many_rows_were_on_disk(toy, tmp_path, monkeypatch, capsys):
    _, files, _ = toy
    real = compute_mod.row_loss
    seen = []

    def dies_after_two(*args):
        if len(seen) >= 2:
            raise KeyboardInterrupt
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(compute_mod, "row_loss", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        compute_landscape(files[:4], tmp_path / "out", **_opts(grid=5))
    monkeypatch.setattr(compute_mod, "row_loss", real)
    capsys.readouterr()
    compute_landscape(files[:4], tmp_path / "out", **_opts(grid=5, progress=True))
    err = capsys.readouterr().err
    assert "landscape grid: 2 of 5 rows already on disk, computing the other 3" in err


# ------------------------------------------------------------------------------ 6. figures

def _inside(fig):
    """Whether the suptitle's drawn box lies inside the figure."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = fig._suptitle.get_window_extent(canvas.get_renderer())
    return box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


def test_random_2d_caption_fits_the_figure(toy, tmp_path):
    _, files, _ = toy
    ls = compute_landscape(files[-1:], tmp_path / "out", directions="random", dims=2, **_opts())
    fig = figure_landscape(ls)
    assert _inside(fig)
    assert "filter-normalised random directions" in fig.get_suptitle().replace("\n", " ")
    one = compute_landscape(files[-1:], tmp_path / "out", directions="random", dims=1, **_opts())
    assert _inside(figure_landscape(one))
    assert _inside(figure_interpolation(example_landscape())) and _inside(figure_landscape(example_landscape()))


def test_theta_T_star_is_drawn_above_the_arrows():
    fig = figure_landscape(example_landscape())
    ax = next(a for a in fig.axes if a.get_label() == "plane")
    stars = [line for line in ax.lines if line.get_marker() == "*"]
    assert len(stars) == 1 and stars[0].get_xydata().tolist() == [[0.0, 0.0]]  # θ_T, the stored last point
    arrows = [c for c in ax.collections if (c.get_gid() or "").startswith(("step:", "grad:"))]
    assert len(arrows) == 2 and stars[0].get_zorder() > max(a.get_zorder() for a in arrows)


def test_bn_mode_is_named_only_for_models_with_running_statistics(toy, tmp_path):
    _, files, mod = toy
    ls = compute_landscape(files[:3], tmp_path / "plain", **_opts())
    assert not ls.running_stats
    for fig in (figure_landscape(ls), figure_interpolation(ls)):
        assert "BN mode" not in fig.get_suptitle() and "module mode: train" in fig.get_suptitle()
    torch.save(mod.bn_net().state_dict(), tmp_path / "bn.pt")
    bn = compute_landscape([tmp_path / "bn.pt"], tmp_path / "bn", directions="random", dims=1,
                           **_opts(model=_spec("bn_net")))
    assert bn.running_stats and "BN mode: train" in figure_landscape(bn).get_suptitle()
    assert Landscape.load(tmp_path / "bn", "landscape_random_1d").running_stats
