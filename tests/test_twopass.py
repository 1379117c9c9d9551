"""The verified two-pass for your own loop (issue 11, items 4-5): it reproduces the engine's
numbers on the same training, names the first step where a pass 2 differs and why, and its
run folder goes through ``analyze`` and ``report`` like an engine run."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gammatrace
from gammatrace.analysis import analyze
from gammatrace.config import RunConfig
from gammatrace.data.loader import seed_epoch_rng
from gammatrace.engine.session import build_session
from gammatrace.engine.twopass import TwoPass, TwoPassMismatchError, save_run
from gammatrace.errors import UserError
from gammatrace.principles import STEP_COLUMNS
from gammatrace.store.run import OWN_LOOP, RunStore, load_run, params_sha256
from gammatrace.techniques import per_sample_loss

README = Path(__file__).resolve().parents[1] / "README.md"


# --------------------------------------------------------------------------- the engine, as an own loop
def engine_as_own_loop(cfg: RunConfig):
    """The engine's training written as a user's loop from build_session's pieces: same data
    order, initialisation, optimizer, schedule and per-epoch reseeding."""
    per_sample = per_sample_loss(cfg.loss)

    def loss_fn(model, batch):
        return per_sample(model(batch[0]), batch[1])

    def build():
        sess = build_session(cfg)
        return sess.model, sess.optimizer, sess

    def train(model, opt, probe, sess):
        for epoch in range(cfg.epochs):
            seed_epoch_rng(cfg.seed, epoch)
            model.train()
            for i, idx in enumerate(sess.batches(epoch)):
                for group in opt.param_groups:
                    group["lr"] = cfg.optim.lr * sess.schedule(epoch * sess.steps_per_epoch + i)
                batch = (sess.x[idx], sess.y[idx])
                opt.zero_grad(set_to_none=True)
                per = loss_fn(model, batch)
                loss = per.mean()
                loss.backward()
                probe.batch(batch, loss, indices=idx, sample_losses=per)
                opt.step()
            probe.end_epoch()

    return build, train, loss_fn


@pytest.fixture(scope="module")
def engine_and_two_pass(tmp_path_factory):
    cfg = RunConfig.model_validate({
        "name": "tiny", "seed": 3, "epochs": 3, "batch_size": 32,
        "data": {"name": "digits", "n_train": 96, "n_test": 64},
        "model": {"name": "mlp", "width": 8, "depth": 2},
        "optim": {"name": "momentum", "lr": 0.1, "clip_grad_norm": None},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
    })
    run = gammatrace.train(cfg, tmp_path_factory.mktemp("engine") / "tiny", progress=False)
    build, train, loss_fn = engine_as_own_loop(cfg)
    result = TwoPass(build, train, loss_fn=loss_fn, seed=cfg.seed, threads=cfg.threads).run()
    return cfg, run, result


def test_two_pass_reproduces_the_engine(engine_and_two_pass):
    _, run, result = engine_and_two_pass
    engine, own = run.steps(), result.steps()
    assert len(own) == len(engine) == 9
    for column in STEP_COLUMNS:  # bit for bit: the same trajectory, the same probe, the same θ*
        np.testing.assert_array_equal(own[column].to_numpy(), engine[column].to_numpy(), err_msg=column)
    np.testing.assert_array_equal(result.record_steps()["loss"], run.record_steps()["loss"])
    tensors = run.tensor_steps()
    np.testing.assert_array_equal(result.tensor_steps()["progress"], tensors["progress"])
    assert result.d0_sq == engine["dist_sq"].iloc[0]
    assert result.displacement == pytest.approx(run.meta.displacement, rel=1e-12)
    summary, expected = result.summary(), run.summary()
    for key in ("gamma_min", "gamma_median", "gamma_frac_positive", "gamma_rp_median", "gamma_eff",
                "star_min", "dist_n_increase", "rate_tightness", "path_ratio", "cos_align_mean", "no_progress"):
        assert summary[key] == pytest.approx(expected[key], rel=1e-12, nan_ok=True), key
    assert params_sha256(result.theta_T) == run.meta.final_sha256


def test_saved_run_analyses_like_the_engine_run(engine_and_two_pass, tmp_path):
    _, run, result = engine_and_two_pass
    saved = save_run(result, tmp_path / "own")
    assert saved.meta.source == OWN_LOOP and saved.status == "complete"
    assert saved.meta.final_sha256 == params_sha256(result.theta_T)
    assert saved.store.exists(RunStore.FINAL) and saved.store.exists(RunStore.checkpoint(0))
    assert saved.meta.horizon_epochs == 3 and saved.meta.steps_per_epoch == 3
    pd.testing.assert_frame_equal(saved.record_steps(), run.record_steps().astype(saved.record_steps().dtypes))
    assert json.loads((tmp_path / "own" / "run.json").read_text())["own_loop"]["reference"] == "last"
    for tail, ell_inf in ((0, 0.0), (2, 0.1)):
        ours = analyze(saved.path, tail=tail, ell_inf=ell_inf, progress=False)
        theirs = analyze(run.path, tail=tail, ell_inf=ell_inf, progress=False)
        shared = [k for k in theirs if k in ours and not k.startswith(("train_", "test_"))]
        assert len(shared) > 40
        for key in shared:
            if isinstance(theirs[key], float):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-12, nan_ok=True), key
            else:
                assert ours[key] == theirs[key], key
    np.testing.assert_array_equal(load_run(saved.path).steps()["gamma"], run.steps()["gamma"])


def test_another_reference_needs_the_two_pass_again(engine_and_two_pass, tmp_path, capsys):
    _, _, result = engine_and_two_pass
    saved = save_run(result, tmp_path / "own")
    with pytest.raises(UserError, match="holds the analysis against 'last' only; measuring against "
                                        "'continuation' needs the two-pass again: gammatrace.TwoPass"):
        analyze(saved.path, "continuation", progress=False)
    from gammatrace.cli import main  # the command line: one line on stderr, exit status 2

    assert main(["analyze", str(saved.path), "--reference", "continuation"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TwoPass" in err
    with pytest.raises(Exception, match="already holds a run"):
        save_run(result, tmp_path / "own")


def test_report_draws_an_own_loop_run(engine_and_two_pass, tmp_path):
    _, _, result = engine_and_two_pass
    saved = result.save(tmp_path / "own")
    html = gammatrace.report([saved.path], tmp_path / "report")
    assert html.is_file() and (tmp_path / "report" / "trajectory.png").is_file()
    assert "own" in (tmp_path / "report" / "summary.md").read_text()


# --------------------------------------------------------------------------- a pass 2 that differs
def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)


X, Y = _data()


def _loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _build(dropout=0.1):
    model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(dropout), nn.Tanh(), nn.Linear(32, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _loop(perturb=None, epochs=2, perturb_loss=None):
    """A loop with shuffling from the global generator; ``perturb(pass_number, step, x)`` and
    ``perturb_loss(pass_number, step, loss)`` may change what pass 2 does."""
    calls = []

    def train(model, opt, probe):
        calls.append(1)
        k = 0
        for _ in range(epochs):
            for idx in torch.randperm(96).split(16):
                x, y = X[idx], Y[idx]
                if perturb is not None:
                    x = perturb(len(calls), k, x)
                opt.zero_grad()
                loss = _loss_fn(model, (x, y))
                if perturb_loss is not None:
                    loss = perturb_loss(len(calls), k, loss)
                loss.backward()
                probe.batch((x, y), loss)
                opt.step()
                k += 1
            probe.end_epoch()

    return train


def test_a_clean_two_pass_verifies_and_restores_the_setup():
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    result = TwoPass(_build, _loop(), loss_fn=_loss_fn, seed=5, threads=2).run()
    assert len(result.steps()) == 12 and result.reference_name == "last"
    assert result.threads == 2 and result.provenance["threads"] == 2
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, det)
    # θ* = θ_T: the progress telescopes to ½ D_0² (DESIGN §1)
    assert result.steps()["progress"].sum() == pytest.approx(result.d0_sq / 2, rel=1e-9)


def test_one_input_value_changed_at_step_7_is_named():
    def perturb(pass_number, k, x):
        if pass_number == 2 and k == 7:
            x = x.clone()
            x[3, 2] += 1e-3
        return x

    with pytest.raises(TwoPassMismatchError, match=r"at step 7 \(epoch 1\): loss .* likely cause: the batch of "
                                                   r"step 7 differs from pass 1's") as err:
        TwoPass(_build, _loop(perturb), loss_fn=_loss_fn, seed=0, threads=1).run()
    assert (err.value.step, err.value.cause) == (7, "batch")
    assert isinstance(err.value, UserError)


def test_another_thread_count_in_pass_2_is_named():
    calls = []
    inner = _loop()

    def train(model, opt, probe):
        calls.append(1)
        if len(calls) == 2:
            torch.set_num_threads(2)  # e.g. a library call inside the loop
        inner(model, opt, probe)

    with pytest.raises(TwoPassMismatchError, match=r"at step 0 .*likely cause: the torch thread count: step 0 ran "
                                                   r"with 1 thread\(s\) in pass 1 and 2 in pass 2") as err:
        TwoPass(_build, train, loss_fn=_loss_fn, seed=0, threads=1).run()
    assert err.value.cause == "threads"
    assert torch.get_num_threads() == 1  # restored


def test_a_random_stream_drawn_differently_is_named():
    def perturb(pass_number, k, x):
        if pass_number == 2 and k == 4:
            torch.rand(1)  # one extra draw: the next dropout masks differ
        return x

    with pytest.raises(TwoPassMismatchError, match="at step 4 .*random generators were in another state") as err:
        TwoPass(_build, _loop(perturb), loss_fn=_loss_fn, seed=0, threads=1).run()
    assert err.value.cause == "rng"


def test_same_inputs_different_result_is_blamed_on_a_kernel():
    def perturb_loss(pass_number, k, loss):
        # what a nondeterministic kernel does: same inputs, another last bit
        return loss * (1 + 1e-6) if pass_number == 2 and k == 5 else loss

    with pytest.raises(TwoPassMismatchError, match="at step 5 .*batches, thread count and random stream all "
                                                   "agree, so a nondeterministic kernel") as err:
        TwoPass(_build, _loop(perturb_loss=perturb_loss), loss_fn=_loss_fn, seed=0, threads=1).run()
    assert (err.value.step, err.value.cause) == (5, "nondeterministic")


def test_a_build_that_is_not_seeded_is_named():
    def build():
        model, opt = _build()
        with torch.no_grad():
            model[0].weight.add_(torch.randn(1, generator=torch.Generator().manual_seed(len(seen))).item())
        seen.append(1)
        return model, opt

    seen: list = []
    with pytest.raises(TwoPassMismatchError, match="build\\(\\) made another θ_0") as err:
        TwoPass(build, _loop(), loss_fn=_loss_fn, seed=0, threads=1).run()
    assert err.value.cause == "init" and err.value.step is None


ITERATION = {"n": 0}  # a module-level counter, as a script keeps its iter_num: not reset between passes


def test_state_carried_between_passes_is_named_with_plain_numbers():
    """Issue 21 item 9: an iteration counter kept at module level across the passes (pass 2
    starts where pass 1 stopped) is named as such, and the numbers print as plain numbers."""
    data = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 96, 16)]

    def train(model, opt, probe):
        for _ in range(8):
            it = ITERATION["n"]
            ITERATION["n"] += 1
            for group in opt.param_groups:
                group["lr"] = 0.01 * (1 + it) / 16  # a warm-up written with the counter
            batch = data[it % len(data)]
            opt.zero_grad()
            loss = _loss_fn(model, batch)
            loss.backward()
            probe.batch(batch, loss)
            opt.step()

    ITERATION["n"] = 0
    with pytest.raises(TwoPassMismatchError, match=r"at step 0 \(epoch 0\): lr 0\.000625 in pass 1, 0\.005625 in "
                                                   r"pass 2; likely cause: state carried between the passes") as err:
        TwoPass(_build, train, loss_fn=_loss_fn, seed=0, threads=1).run()
    assert (err.value.step, err.value.cause) == (0, "carried")
    assert "pass 2's first batch is the one pass 1 used at step 2" in str(err.value)
    assert "np.float64" not in str(err.value)

    def counted_data(model, opt, probe):  # the counter moves the data only
        for _ in range(4):
            it = ITERATION["n"]
            ITERATION["n"] += 1
            batch = (data[it % len(data)][0] + it, data[it % len(data)][1])
            opt.zero_grad()
            loss = _loss_fn(model, batch)
            loss.backward()
            probe.batch(batch, loss)
            opt.step()

    with pytest.raises(TwoPassMismatchError, match=r"at step 0 .*state carried between the passes.*the first batch "
                                                   r"differs") as err:
        TwoPass(_build, counted_data, loss_fn=_loss_fn, seed=0, threads=1).run()
    assert err.value.cause == "carried"


def test_a_taken_output_folder_is_refused_before_any_compute(tmp_path):
    """Issue 21 item 9: ``TwoPass(out=...)`` checks the folder before pass 1, not after both."""
    ran = []
    loop = _loop()

    def train(model, opt, probe):
        ran.append(1)
        loop(model, opt, probe)

    result = TwoPass(_build, train, loss_fn=_loss_fn, seed=0, threads=1, out=tmp_path / "run").run()
    assert len(ran) == 2 and load_run(tmp_path / "run").status.value == "complete"
    assert len(load_run(tmp_path / "run").steps()) == len(result.steps())
    with pytest.raises(gammatrace.engine.RunConflictError, match="already holds a run"):
        TwoPass(_build, train, loss_fn=_loss_fn, seed=0, threads=1, out=tmp_path / "run").run()
    assert len(ran) == 2  # refused before any training
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        TwoPass(_build, train, loss_fn=_loss_fn, seed=0, threads=1, out=tmp_path / "file").run()
    assert len(ran) == 2


def test_a_loop_that_makes_its_optimizer_attaches_the_pending_probe():
    """``build()`` may return no optimizer; ``train`` attaches the pending probe to the one it makes."""
    loop = _loop()

    def build():
        model, _ = _build()
        return model, None

    def train(model, _none, pending):
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        loop(model, opt, pending.attach(opt))

    result = TwoPass(build, train, loss_fn=_loss_fn, seed=5, threads=2).run()
    plain = TwoPass(_build, _loop(), loss_fn=_loss_fn, seed=5, threads=2).run()
    assert all(torch.equal(result.theta_T[k], plain.theta_T[k]) for k in plain.theta_T)
    pd.testing.assert_frame_equal(result.steps(), plain.steps())
    assert result.optimizer_class == "AdamW"
    with pytest.raises(UserError, match="never called probe.attach"):
        TwoPass(build, lambda m, o, p: None, loss_fn=_loss_fn, seed=5, threads=2).run()


def test_continuation_and_given_references(tmp_path):
    loop = _loop(epochs=2)
    cont = TwoPass(_build, loop, loss_fn=_loss_fn, seed=1, threads=1, continuation=_loop(epochs=1)).run()
    assert cont.reference_name == "continuation"
    steps = cont.steps()
    # θ* beyond the horizon: the progress no longer telescopes to ½ D_0²
    assert steps["progress"].sum() != pytest.approx(cont.d0_sq / 2, rel=1e-3)
    assert not all(torch.equal(cont.reference[n], cont.theta_T[n]) for n in cont.names)
    run = save_run(cont, tmp_path / "cont")
    assert run.references() == ["continuation"] and run.meta.reference_sha256 == params_sha256(cont.reference)
    assert analyze(run.path, progress=False)["reference"] == "continuation"
    with pytest.raises(UserError, match="measuring against 'last' needs the two-pass again"):
        analyze(run.path, "last", progress=False)

    given = TwoPass(_build, loop, loss_fn=_loss_fn, seed=1, threads=1, reference=cont.reference).run()
    assert given.reference_name.startswith("given-")
    np.testing.assert_array_equal(given.steps()["gamma"], steps["gamma"])  # same trajectory, same θ*
    torch.save({"model": cont.reference}, tmp_path / "star.pt")
    from_file = TwoPass(_build, loop, loss_fn=_loss_fn, seed=1, threads=1, reference=tmp_path / "star.pt").run()
    assert from_file.reference_name.startswith("file-star-")
    with pytest.raises(UserError, match="either reference= .* or continuation="):
        TwoPass(_build, loop, loss_fn=_loss_fn, seed=1, threads=1, reference=cont.reference, continuation=loop)


def test_build_may_return_extras_and_misuse_is_one_line():
    def build():
        model, opt = _build(0.0)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)

    def train(model, opt, probe, sched):
        _loop(epochs=1)(model, opt, probe)
        sched.step()

    assert len(TwoPass(build, train, loss_fn=_loss_fn, seed=0, threads=1).run().steps()) == 6
    with pytest.raises(UserError, match="build\\(\\) must return"):
        TwoPass(lambda: nn.Linear(2, 1), train, loss_fn=_loss_fn, seed=0, threads=1).run()
    with pytest.raises(UserError, match="no measured step"):
        TwoPass(_build, lambda m, o, p: None, loss_fn=_loss_fn, seed=0, threads=1).run()
    with pytest.raises(UserError, match="has not run yet"):
        save_run(TwoPass(_build, train, loss_fn=_loss_fn, seed=0, threads=1), "x")


# --------------------------------------------------------------------------- a lone probe
def _probe_loop(probe, model, opt, epochs=2):
    for _ in range(epochs):
        for idx in torch.arange(96).split(16):
            opt.zero_grad()
            loss = _loss_fn(model, (X[idx], Y[idx]))
            loss.backward()
            probe.batch((X[idx], Y[idx]), loss)
            opt.step()
        probe.end_epoch()


def test_probe_measures_d0_and_derives_per_epoch():
    torch.manual_seed(0)
    model, opt = _build(0.0)
    star = {k: v + 0.1 for k, v in model.state_dict().items()}
    probe = gammatrace.Probe(model, opt, _loss_fn, reference=star)
    d0 = sum(float((p.detach().double() - star[n].double()).pow(2).sum()) for n, p in model.named_parameters())
    opt.zero_grad()
    loss = _loss_fn(model, (X[:16], Y[:16]))
    loss.backward()
    probe.batch((X[:16], Y[:16]), loss)
    opt.step()
    first = probe.end_epoch()
    assert probe.d0_sq == pytest.approx(d0, rel=1e-12)
    probe.take()  # the early rows handed over: D_0 stays known
    _probe_loop(probe, model, opt, epochs=1)
    steps = probe.steps()
    assert steps["step"].iloc[0] == 1
    expected = gammatrace.principles.derive(probe.raw_steps(), d0_sq=probe.d0_sq)
    np.testing.assert_array_equal(steps["gamma"], expected["gamma"])
    assert {"gamma", "gamma_rp", "gamma_rc", "star", "cos_align"} <= set(first.columns)
    assert list(probe.end_epoch(derived=False).columns) == ["step", "epoch", "lr", *probe.columns]

    probe.close()
    late = gammatrace.Probe(model, opt, _loss_fn, reference=star, step=10)  # attached after θ_0
    with pytest.warns(RuntimeWarning, match="never saw θ_0"):
        _probe_loop(late, model, opt, epochs=1)  # end_epoch() derives γ: D_0 is unknown
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        late.steps(d0_sq=d0)


def test_save_run_of_a_probe(tmp_path):
    torch.manual_seed(0)
    model, opt = _build(0.0)
    star = {k: v - 0.05 for k, v in model.state_dict().items()}
    reference_probe = gammatrace.Probe(model, opt, _loss_fn, reference=star)
    _probe_loop(reference_probe, model, opt)
    run = save_run(reference_probe, tmp_path / "ref")
    assert run.references() == ["probe"] and run.status == "complete" and run.meta.source == OWN_LOOP
    assert analyze(run.path, tail=1, progress=False)["n_steps"] == 11
    reference_probe.close()

    record_probe = gammatrace.Probe(model, opt)
    _probe_loop(record_probe, model, opt, epochs=1)
    run = save_run(record_probe, tmp_path / "rec")
    assert run.status == "trained" and len(run.record_steps()) == 6
    with pytest.raises(UserError, match="without a reference \\(record mode\\); measuring against θ\\* needs the "
                                        "two-pass"):
        analyze(run.path, progress=False)


# --------------------------------------------------------------------------- the README example
def test_readme_two_pass_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    [code] = [b for b in blocks if "gammatrace.TwoPass(" in b]
    assert "probe.batch(batch, loss)" in code and "clip_grad_norm_" in code and "AdamW" in code
    code, n = re.subn(r"(CTX, BATCH, ACCUM, STEPS, WARMUP = \d+, \d+, \d+), \d+, \d+", r"\1, 12, 3", code)
    assert n == 1
    code = code.replace("% 25 == 0", "% 6 == 0")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert len(namespace["steps"]) == 12
    run = load_run(tmp_path / "runs" / "char-transformer")
    assert run.meta.source == OWN_LOOP and run.references() == ["last"]
    assert namespace["result"].summary()["gamma_n_steps"] > 0
