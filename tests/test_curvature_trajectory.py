"""Curvature along the trajectory (issue 24, item 2) against the slow obvious way: the engine's
``curvature`` table and ``Probe(curvature=...)`` at each measured θ_k against a dense float64
Hessian (``torch.autograd.functional.hessian``, batch norm in train mode), Santurkar's
quantities against a loop over s on fresh copies, the stability ratio against the optimizer's
own state after its step; the trajectory bit for bit unchanged; a resumed analysis's table."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from gammatrace.analysis import analyze, load_hook_table
from gammatrace.engine.hooks import evaluation_subset
from gammatrace.engine.replay import replay
from gammatrace.engine.session import build_session
from gammatrace.engine.trainer import train_pass
from gammatrace.probe import Probe
from gammatrace.store.run import Run
from tests.conftest import tiny_config
from tests.oracle import ParameterHook


def _teacher(**overrides) -> dict:
    """Two epochs of a batch-normalised MLP (34 parameters) on a 48-sample teacher, float64."""
    return tiny_config(**{"loss": "mse", "batch_size": 16, "dtype": "float64",
                          "data": {"name": "teacher", "num_train": 48, "num_test": 8, "dim": 3, "out_dim": 2,
                                   "n_train": None, "n_test": None},
                          "model": {"name": "mlp", "width": 4, "depth": 1, "batchnorm": True},
                          "optim": {"name": "momentum", "lr": 0.05, "momentum": 0.9},
                          "curvature": {"every": 2, "k": 3, "trace_samples": 1000, "subset": 32, "tol": 1e-13},
                          **overrides})


def _set(model: torch.nn.Module, theta: torch.Tensor) -> None:
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, [p for p in model.parameters() if p.requires_grad])


def _loss_at(model, loss_fn, batch, theta, train=True):
    """(ℓ, ∇ℓ) at θ on a fresh copy, the obvious way."""
    twin = copy.deepcopy(model).train(train)
    _set(twin, theta)
    params = [p for p in twin.parameters() if p.requires_grad]
    loss = loss_fn(twin, batch)
    loss = loss.mean() if loss.ndim else loss
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _dense_hessian(model, loss_fn, batch, theta, train=True) -> np.ndarray:
    """The float64 Hessian of the mean loss at θ by torch.autograd.functional.hessian."""
    twin = copy.deepcopy(model).double().train(train)
    names = [n for n, p in twin.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in twin.named_parameters() if p.requires_grad]
    buffers = {n: b.clone() for n, b in twin.named_buffers()}

    def f(flat):
        pieces = dict(zip(names, (c.view(s) for c, s in zip(flat.split([s.numel() for s in shapes]), shapes,
                                                              strict=True)), strict=True))
        # Fresh buffers every call: batch statistics in train mode, never the running ones.
        loss = loss_fn(lambda x: torch.func.functional_call(twin, {**pieces, **{k: v.clone() for k, v in
                                                                                buffers.items()}}, (x,)), batch)
        return loss.mean() if loss.ndim else loss

    return torch.autograd.functional.hessian(f, theta.double()).numpy()


def _santurkar(model, loss_fn, batch, theta, s_values):
    """Santurkar's loss range, gradient change and effective β along −g by a loop over s."""
    _, g = _loss_at(model, loss_fn, batch, theta)
    losses, changes, ratios = [], [], []
    for s in s_values:
        loss_s, g_s = _loss_at(model, loss_fn, batch, theta - s * g)
        losses.append(loss_s)
        changes.append(float((g - g_s).norm()))
        ratios.append(changes[-1] / float((s * g).norm()))
    return min(losses), max(losses), max(changes), max(ratios)


def _mse(m, b):
    return ((m(b[0]) - b[1]) ** 2).mean(dim=1)


def test_engine_table_equals_a_dense_hessian_and_a_loop_over_s_with_batch_norm_in_train_mode(tmp_path):
    run = train_pass(_teacher(), tmp_path / "run", progress=False)
    replay(run.path, "last", hooks=(ParameterHook,), progress=False)
    analyze(run.path, progress=False)  # reuses that replay: the curvature table is not recomputed
    table = load_hook_table(run, "curvature")
    thetas = run.store.read_shards("analysis/last/params")
    # Steps 0, 2, 4 (every 2) and the epoch ends 2 and 5 (3 steps per epoch).
    assert table["step"].tolist() == [0, 2, 4, 5]
    assert table["at_epoch_end"].tolist() == [False, True, False, True]
    assert set(table["bn_mode"]) == {"train"} and set(table["stability_threshold_kind"]) == {"heavy_ball"}

    sess = build_session(run.config)
    model, loss_fn = sess.model, sess.loss_fn
    idx = evaluation_subset(len(sess.x), 32, run.config.seed)
    assert len(set(idx.tolist())) == 32
    evaluation = (sess.x[idx], sess.y[idx])
    n = sum(p.numel() for p in model.parameters())
    for _, row in table.iterrows():
        k = int(row["step"])
        theta = torch.tensor(thetas.set_index("step").loc[k, [f"p{i}" for i in range(n)]].to_numpy(np.float64))
        h = _dense_hessian(model, _mse, evaluation, theta)
        eig = np.sort(np.linalg.eigvalsh(h))[::-1]
        for i in range(3):
            assert row[f"lambda_{i + 1}"] == pytest.approx(eig[i], rel=1e-6, abs=1e-9 * eig[0])
        assert row["trace"] == pytest.approx(np.trace(h), rel=1e-10) and row["trace_se"] == 0.0  # exact: 1000 ≥ 34
        lr = row["lr"]
        assert row["stability_ratio"] == pytest.approx(lr * eig[0] / (2 * (1 + 0.9)), rel=1e-6)
        assert row["outlier_ratio"] == pytest.approx(eig[0] / eig[2], rel=1e-5)
        # Batch norm in train mode matters here: the eval-mode Hessian's top eigenvalue differs.
        assert abs(np.linalg.eigvalsh(_dense_hessian(model, _mse, evaluation, theta, train=False))[-1] - eig[0]) \
            > 1e-3 * eig[0]
        # Santurkar's line on the step's own mini-batch.
        epoch, i = divmod(k, sess.steps_per_epoch)
        b_idx = sess.batches(epoch)[i]
        step_batch = (sess.x[b_idx], sess.y[b_idx])
        lo, hi, change, beta = _santurkar(model, loss_fn, step_batch, theta, [c * lr for c in (0.25, 0.5, 1, 2, 4)])
        assert (row["loss_range_min"], row["loss_range_max"]) == pytest.approx((lo, hi), rel=1e-10)
        assert row["grad_change_max"] == pytest.approx(change, rel=1e-9)
        assert row["beta_eff"] == pytest.approx(beta, rel=1e-9)
        # The direction is the step's raw gradient: its norm is the probe's ‖g_k‖.
        assert row["grad_norm"] ** 2 == pytest.approx(run.steps().set_index("step").loc[k, "grad_sq"], rel=1e-10)


def test_curvature_leaves_the_trajectory_bit_for_bit_alone(tmp_path):
    with_curv = Run(train_pass(_teacher(), tmp_path / "with", progress=False).path)
    without = Run(train_pass(_teacher(curvature=None), tmp_path / "without", progress=False).path)
    analyze(with_curv.path, progress=False)  # the replay verifies every loss and θ at every epoch end
    analyze(without.path, progress=False)
    assert len(load_hook_table(with_curv, "curvature")) == 4 and load_hook_table(without, "curvature").empty
    pd.testing.assert_frame_equal(with_curv.steps(), without.steps(), check_exact=True)
    pd.testing.assert_frame_equal(with_curv.record_steps(), without.record_steps(), check_exact=True)


def test_a_resumed_analysis_leaves_the_same_curvature_table(tmp_path):
    cfg = _teacher(epochs=3, optim={"name": "sgd", "lr": 0.05}, curvature={"every": 2, "k": 2, "trace_samples": 3})
    run = Run(train_pass(cfg, tmp_path / "run", progress=False).path)
    analyze(run.path, progress=False)
    first = load_hook_table(run, "curvature")
    assert set(first["stability_threshold_kind"]) == {"sgd"}
    np.testing.assert_allclose(first["stability_ratio"], first["lr"] * first["lambda_1"] / 2, rtol=1e-12)
    assert first["trace_se"].gt(0).all()  # 3 Hutchinson vectors < 34 parameters: an estimate
    # An analysis interrupted in epoch 1: its steps shard (written last) never landed, and
    # a half-written curvature shard of epoch 2 neither.
    (run.path / "analysis/last/steps/epoch_0001.parquet").unlink()
    (run.path / "analysis/last/curvature/epoch_0002.parquet").unlink()
    analyze(run.path, progress=False)
    pd.testing.assert_frame_equal(load_hook_table(run, "curvature"), first, check_exact=True)


class _Net(torch.nn.Module):
    """Batch norm and dropout: a measurement that touched the running statistics or the
    random stream would move the trajectory."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(),
                                        torch.nn.Dropout(0.2), torch.nn.Linear(5, 2))

    def forward(self, x):
        return self.body(x)


def _loop(curvature, steps=5, optimizer="adam", dropout=True):
    torch.manual_seed(0)
    model = _Net().double()
    if not dropout:
        model.body[3].p = 0.0
    opt = (torch.optim.Adam(model.parameters(), lr=0.01) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5, nesterov=True))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(12, 3, generator=gen, dtype=torch.float64),
                torch.randn(12, 2, generator=gen, dtype=torch.float64)) for _ in range(steps)]
    evaluation = (torch.randn(20, 3, generator=gen, dtype=torch.float64),
                  torch.randn(20, 2, generator=gen, dtype=torch.float64))
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    probe = Probe(model, opt, loss_fn, curvature=curvature, curvature_batch=evaluation) if curvature else None
    record = []
    for b in batches:
        theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        opt.zero_grad()
        loss = loss_fn(model, b)
        loss.backward()
        if probe is not None:
            probe.batch(b, loss)
        opt.step()
        state = [(opt.state[p].get("exp_avg_sq"), opt.state[p].get("step")) for p in model.parameters()]
        record.append((theta, b, copy.deepcopy(state)))
    end = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    buffers = [b.clone() for b in model.buffers()]
    return probe, model, loss_fn, evaluation, record, end, buffers, torch.get_rng_state()


def test_probe_curvature_leaves_a_plain_loop_with_dropout_and_batch_norm_bit_for_bit_alone():
    *_, end_a, buffers_a, rng_a = _loop(None)
    *_, end_b, buffers_b, rng_b = _loop({"every": 1, "k": 2, "trace_samples": 4})
    assert torch.equal(end_a, end_b) and torch.equal(rng_a, rng_b)
    assert all(torch.equal(a, b) for a, b in zip(buffers_a, buffers_b, strict=True))


def test_probe_in_a_plain_loop_against_the_dense_oracle_and_adams_own_preconditioner():
    probe, model, loss_fn, evaluation, record, *_ = _loop({"every": 2, "k": 3, "tol": 1e-13}, dropout=False)
    table = probe.curvature_table()
    assert table["step"].tolist() == [0, 2, 4] and not table["at_epoch_end"].any()
    assert set(table["stability_threshold_kind"]) == {"adam_preconditioned"} and set(table["bn_mode"]) == {"train"}
    beta1, beta2, eps, lr = 0.9, 0.999, 1e-8, 0.01
    for _, row in table.iterrows():
        theta, batch, state = record[int(row["step"])]
        h = _dense_hessian(model, lambda m, b: loss_fn(m, b), evaluation, theta)
        eig = np.sort(np.linalg.eigvalsh(h))[::-1]
        for i in range(3):
            assert row[f"lambda_{i + 1}"] == pytest.approx(eig[i], rel=1e-6, abs=1e-9 * eig[0])
        # P_t as Adam divided by it, read from the optimizer's state after the step.
        t = float(state[0][1])
        v = torch.cat([s[0].reshape(-1) for s in state]).numpy()
        p = (1 - beta1 ** t) * (np.sqrt(v / (1 - beta2 ** t)) + eps)
        sharp = max(np.linalg.eigvals(np.diag(1 / p) @ h).real)
        assert row["sharpness"] == pytest.approx(sharp, rel=1e-6)
        assert row["stability_ratio"] == pytest.approx(lr * sharp * (1 - beta1) / (2 + 2 * beta1), rel=1e-6)
        lo, hi, change, beta = _santurkar(model, loss_fn, batch, theta, [c * lr for c in (0.25, 0.5, 1, 2, 4)])
        assert (row["loss_range_min"], row["loss_range_max"]) == pytest.approx((lo, hi), rel=1e-10)
        assert (row["grad_change_max"], row["beta_eff"]) == pytest.approx((change, beta), rel=1e-9)


def test_nesterov_threshold_and_probe_without_its_own_evaluation_batch():
    probe, model, loss_fn, _, record, *_ = _loop({"every": 3, "k": 1, "tol": 1e-13}, optimizer="nesterov",
                                                 dropout=False)
    # The default evaluation batch was given here; the threshold is Nesterov's (2 + 2β)/((1 + 2β)η).
    row = probe.curvature_table().iloc[0]
    assert row["stability_threshold_kind"] == "nesterov"
    assert row["stability_threshold"] == pytest.approx((2 + 2 * 0.5) / ((1 + 2 * 0.5) * 0.05))
    model2 = _Net().double()
    model2.body[3].p = 0.0  # the dense oracle draws no dropout masks
    opt = torch.optim.SGD(model2.parameters(), lr=0.1)
    probe2 = Probe(model2, opt, loss_fn, curvature={"every": 1, "k": 1, "tol": 1e-13})
    first = record[0][1]
    opt.zero_grad()
    loss = loss_fn(model2, first)
    loss.backward()
    theta = torch.nn.utils.parameters_to_vector(model2.parameters()).detach().clone()
    probe2.batch(first, loss)
    opt.step()
    h = _dense_hessian(model2, loss_fn, first, theta)  # the first micro-batch became the evaluation batch
    assert probe2.curvature_table()["lambda_1"].iloc[0] == pytest.approx(np.linalg.eigvalsh(h)[-1], rel=1e-6)
    with pytest.raises(ValueError, match="needs loss_fn"):
        Probe(_Net(), torch.optim.SGD(_Net().parameters(), lr=0.1), curvature={"every": 1})


def test_report_shows_curvature_rows_and_summary_and_skips_runs_without_them(tmp_path):
    from gammatrace.reporting.build import report
    from gammatrace.reporting.collect import collect
    from gammatrace.reporting.figures import trajectory_figure

    with_curv = analyze(train_pass(_teacher(name="bn"), tmp_path / "bn", progress=False).path, progress=False)
    assert with_curv["reference"] == "last"
    without = train_pass(_teacher(name="plain", curvature=None), tmp_path / "plain", progress=False)
    analyze(without.path, progress=False)
    entries = collect([tmp_path / "bn", tmp_path / "plain"])
    assert len(entries[0].curvature) == 4 and entries[1].curvature.empty
    notes: list[str] = []
    (tmp_path / "fig").mkdir()
    (tmp_path / "fig2").mkdir()
    assert trajectory_figure(entries, tmp_path / "fig", notes) is not None
    assert "plain: sharpness row skipped (missing curvature.step, curvature.sharpness, curvature.stability_threshold, " \
           "curvature.stability_threshold_kind)" in notes
    assert not any(n.startswith("bn:") and "row skipped" in n for n in notes)
    # Without any curvature table the figure keeps its five rows and says nothing of curvature.
    plain_notes: list[str] = []
    trajectory_figure(entries[1:], tmp_path / "fig2", plain_notes)
    assert not any("sharpness" in n for n in plain_notes)
    html = report([tmp_path / "bn", tmp_path / "plain"], tmp_path / "report")
    md = (html.parent / "summary.md").read_text()
    assert "## Curvature along the trajectory" in md and "| bn | 4 | heavy_ball |" in md and "| plain |" not in \
        md.split("## Curvature along the trajectory")[1].split("\n\n")[1]


def test_a_second_reference_shares_the_curvature_table_instead_of_measuring_it_again(tmp_path):
    # A study analyses θ_T and the continuation θ*: λ_1 at θ_k does not depend on θ*.
    cfg = _teacher(reference={"kind": "continuation", "extra_epochs": 1},
                   curvature={"every": 3, "k": 1, "at_epoch_end": False})
    run = Run(train_pass(cfg, tmp_path / "run", progress=False).path)
    analyze(run.path, "last", progress=False)
    analyze(run.path, "continuation", progress=False)
    assert not (run.path / "analysis/continuation/curvature").exists()
    last = load_hook_table(run, "curvature", "last")
    assert last["step"].tolist() == [0, 3]
    pd.testing.assert_frame_equal(load_hook_table(run, "curvature", "continuation"), last, check_exact=True)
    # A table that depends on θ* is never borrowed from another reference.
    assert load_hook_table(run, "params", "continuation").empty


def test_probe_curvature_through_a_closure_and_a_manual_update():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Probe(model, opt, loss_fn, curvature={"every": 1, "k": 2, "tol": 1e-13})
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, (x, y))
        loss.backward()
        return loss

    probe.batch((x, y))
    opt.step(closure)
    row = probe.curvature_table().iloc[0]
    eig = np.sort(np.linalg.eigvalsh(_dense_hessian(model, loss_fn, (x, y), theta)))[::-1]
    assert (row["lambda_1"], row["lambda_2"]) == pytest.approx((eig[0], eig[1]), rel=1e-6)
    assert row["stability_ratio"] == pytest.approx(0.1 * eig[0] / 2, rel=1e-6)
    # A loop that updates θ itself: the rule is unknown, the ratio NaN (never a guessed one).
    manual = Probe(model, None, loss_fn, curvature={"every": 1, "k": 1})
    opt.zero_grad()
    loss = loss_fn(model, (x, y))
    loss.backward()
    manual.batch((x, y), loss)
    with manual.update(lr=0.1), torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    row = manual.curvature_table().iloc[0]
    assert row["stability_threshold_kind"] == "unknown" and np.isnan(row["stability_ratio"])
    assert row["lambda_1"] > 0


def test_a_curvature_column_no_run_measured_is_one_note_not_a_row_of_skips(tmp_path):
    # trace_samples: 0 (the presets' setting) leaves the trace NaN in every row of every run: the
    # figure draws no empty trace row and says so once, not once per run.
    from gammatrace.reporting.collect import collect
    from gammatrace.reporting.figures import trajectory_figure

    curv = {"every": 2, "k": 3, "trace_samples": 0, "subset": 32, "tol": 1e-13}
    for name in ("a", "b"):
        analyze(train_pass(_teacher(name=name, curvature=curv), tmp_path / name, progress=False).path,
                progress=False)
    entries = collect([tmp_path / "a", tmp_path / "b"])
    assert all(e.curvature["trace"].isna().all() for e in entries)
    notes: list[str] = []
    (tmp_path / "fig").mkdir()
    assert trajectory_figure(entries, tmp_path / "fig", notes) is not None
    assert not any("trace row skipped" in n for n in notes), notes
    assert sum("trace" in n for n in notes) == 1, notes
    assert "trace row not drawn: no run measured it (trace_samples: 0)" in notes


_SCRIPT = '''
import torch, gammatrace
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(),
                            torch.nn.Dropout(0.2), torch.nn.Linear(5, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
data = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(6)]
probe = gammatrace.attach(model, opt, loss_fn=loss_fn, curvature={"every": 2, "k": 2}, curvature_batch=data[0])
for b in data:
    opt.zero_grad(); loss = loss_fn(model, b); loss.backward(); probe.batch(b, loss); opt.step()
'''


def _build():
    """The script's model and optimizer (seeded as the script seeds them)."""
    torch.manual_seed(0)
    model = _Net()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _train(model, opt, probe, data=None):
    """The script's loop over its six batches (drawn here, after the model, when not given)."""
    for b in data if data is not None else [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(6)]:
        opt.zero_grad()
        loss = _mse_mean(model, b)
        loss.backward()
        probe.batch(b, loss)
        opt.step()


def _script_loop(curvature=None, reference=None):
    """The script's loop in-process: a probe (with curvature when asked) against ``reference``."""
    model, opt = _build()
    data = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(6)]
    probe = Probe(model, opt, _mse_mean, reference=reference, curvature=curvature, curvature_batch=data[0])
    _train(model, opt, probe, data)
    return model, probe


def _mse_mean(m, b):
    return torch.nn.functional.mse_loss(m(b[0]), b[1])


def test_a_two_pass_run_folder_holds_the_curvature_pass_2_measured(tmp_path):
    # TwoPass and `gammatrace twopass` measure curvature in pass 2 and write it with the run as
    # the engine's table; equal to a plain reference-mode probe's against the same θ_T, and
    # pass 2 still verifies bit for bit (dropout and batch norm in the loop).
    import gammatrace
    from gammatrace.engine.script import run_twopass
    from gammatrace.engine.twopass import save_run

    model, _ = _script_loop()
    theta_T = {k: v.clone() for k, v in model.state_dict().items()}
    _, direct = _script_loop({"every": 2, "k": 2}, reference=theta_T)
    expected = direct.curvature_table()
    assert expected["step"].tolist() == [0, 2, 4]

    gammatrace.TwoPass(_build, _train, loss_fn=_mse_mean, seed=0, threads=1, out=tmp_path / "tp",
                       curvature={"every": 2, "k": 2}).run()
    table = load_hook_table(tmp_path / "tp", "curvature")
    assert table["step"].tolist() == [0, 2, 4] and np.isfinite(table["lambda_1"]).all()

    # save_run of a reference-mode probe writes it as analysis/probe/curvature/; a record-mode
    # probe's table has no analysis to live in, and saying so beats dropping it silently.
    save_run(direct, tmp_path / "saved")
    pd.testing.assert_frame_equal(load_hook_table(tmp_path / "saved", "curvature"), expected, check_dtype=False)
    _, record = _script_loop({"every": 2, "k": 2})
    with pytest.warns(UserWarning, match="record-mode probe's curvature table is not written"):
        save_run(record, tmp_path / "record")

    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    run_twopass([sys.executable, str(script)], tmp_path / "script", quiet=True, threads=1)
    scripted = load_hook_table(tmp_path / "script", "curvature")
    assert scripted["step"].tolist() == [0, 2, 4]
    # The script's loop is the in-process one (same seed, model, data): the same numbers.
    for col in ("lambda_1", "lambda_2", "sharpness", "beta_eff", "loss_range_min"):
        np.testing.assert_allclose(scripted[col].to_numpy(float), expected[col].to_numpy(float), rtol=1e-6,
                                   err_msg=col)
