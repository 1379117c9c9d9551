"""Same config + seed + threads => same trajectory, bit for bit; resume == uninterrupted;
replay is verified and a perturbation is caught at the right step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import gammatrace
from gammatrace.engine import ReplayMismatchError, replay, train_pass
from gammatrace.engine.session import Session
from gammatrace.store.run import RunStore, load_run, shard
from tests.conftest import tiny_config


def assert_same_trajectory(a: Path, b: Path) -> None:
    sa, sb = RunStore(a), RunStore(b)
    ra, rb = sa.read_shards("steps"), sb.read_shards("steps")
    assert len(ra) > 0
    pd.testing.assert_frame_equal(ra, rb, check_exact=True)
    fa, fb = sa.read_torch("final.pt")["model"], sb.read_torch("final.pt")["model"]
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k
    ea, eb = sa.read_parquet("epochs.parquet"), sb.read_parquet("epochs.parquet")
    cols = [c for c in ea.columns if c != "seconds"]
    pd.testing.assert_frame_equal(ea[cols], eb[cols], check_exact=True)


def test_two_runs_are_bitwise_equal(tmp_path):
    cfg = tiny_config(epochs=3, model={"batchnorm": True}, optim={"name": "momentum", "lr": 0.1})
    train_pass(cfg, tmp_path / "a", progress=False)
    train_pass(cfg, tmp_path / "b", progress=False)
    assert_same_trajectory(tmp_path / "a", tmp_path / "b")
    meta = RunStore(tmp_path / "a").read_json("run.json")
    assert meta["provenance"]["threads"] == 1 and meta["provenance"]["torch"] == torch.__version__


def test_seed_changes_trajectory(tmp_path):
    train_pass(tiny_config(), tmp_path / "a", progress=False)
    train_pass(tiny_config(seed=4), tmp_path / "b", progress=False)
    with pytest.raises(AssertionError):
        assert_same_trajectory(tmp_path / "a", tmp_path / "b")


def test_resume_after_interrupt_mid_epoch(tmp_path, monkeypatch):
    cfg = tiny_config(epochs=3, data={"augment": "flip"}, optim={"name": "adam", "lr": 0.01})
    train_pass(cfg, tmp_path / "full", progress=False)

    calls = {"n": 0}
    original = Session.run_epoch

    def dying(self, epoch, probe, check_finite):
        if epoch == 1:
            step = probe.step

            def step_then_die(*a, **k):
                calls["n"] += 1
                if calls["n"] == 2:  # mid-epoch: one step of epoch 1 done
                    raise KeyboardInterrupt
                return step(*a, **k)

            probe.step = step_then_die
        return original(self, epoch, probe, check_finite)

    monkeypatch.setattr(Session, "run_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        train_pass(cfg, tmp_path / "resumed", progress=False)
    assert RunStore(tmp_path / "resumed").read_json("run.json")["epochs_done"] == 1
    monkeypatch.setattr(Session, "run_epoch", original)
    train_pass(cfg, tmp_path / "resumed", progress=False)
    assert_same_trajectory(tmp_path / "full", tmp_path / "resumed")


_KILL_SCRIPT = """
import sys, torch
from gammatrace.engine import train_pass
sys.path.insert(0, {root!r})
from tests.conftest import tiny_config
train_pass(tiny_config(epochs=40, data={{"n_train": 256}}), {out!r}, progress=False)
"""


def test_resume_after_sigkill(tmp_path):
    """A real kill -9 at an arbitrary moment; the resumed run equals an uninterrupted one."""
    out = tmp_path / "killed"
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT.format(root=root, out=str(out))],
                            env={**os.environ, "PYTHONPATH": root})
    deadline = time.time() + 120
    while not (out / shard("checkpoints", 3, "pt")).exists():
        assert proc.poll() is None, "training process ended early"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside a later epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = RunStore(out).read_json("run.json")["epochs_done"]
    assert 3 <= done < 40
    cfg = tiny_config(epochs=40, data={"n_train": 256})
    train_pass(cfg, out, progress=False)
    train_pass(cfg, tmp_path / "full", progress=False)
    assert_same_trajectory(tmp_path / "full", out)


def test_perturbed_recording_is_detected_at_the_right_step(tmp_path):
    run = train_pass(tiny_config(epochs=3), tmp_path / "r", progress=False)
    store = run.store
    steps = store.read_parquet(shard("steps", 1))
    k = int(steps["step"].iloc[2])
    steps.loc[2, "loss"] = np.nextafter(steps.loc[2, "loss"], np.inf)  # one ulp
    store.write_parquet(shard("steps", 1), steps)
    with pytest.raises(ReplayMismatchError, match=rf"at step {k} \(epoch 1\)"):
        replay(run.path, progress=False)


def test_perturbed_checkpoint_is_detected(tmp_path):
    run = train_pass(tiny_config(epochs=3), tmp_path / "r", progress=False)
    store = run.store
    state = store.read_torch(shard("checkpoints", 2, "pt"))
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name] * (1 + 1e-6)
    store.write_torch(shard("checkpoints", 2, "pt"), state)
    # Epoch 1 replays into the perturbed checkpoint: caught by the end-of-segment check;
    # epoch 2 starts from it: caught at its first step.
    with pytest.raises(ReplayMismatchError, match=r"epoch [12]"):
        replay(run.path, progress=False)


def test_replay_in_worker_processes_equals_inline(tmp_path):
    cfg = tiny_config(epochs=2)
    a = gammatrace.train(cfg, tmp_path / "a", progress=False)
    train_pass(cfg, tmp_path / "b", progress=False)
    gammatrace.analyze(tmp_path / "b", workers=2, progress=False)
    pd.testing.assert_frame_equal(a.steps(), gammatrace.load_run(tmp_path / "b").steps(), check_exact=True)


def test_stop_at_target_and_continuation_reference(tmp_path):
    cfg = tiny_config(epochs=30, target_loss=1.5, optim={"lr": 0.5}, reference={"kind": "continuation", "extra_epochs": 2})
    run = gammatrace.train(cfg, tmp_path / "r", progress=False)
    meta = run.meta
    assert meta.reached_target is True and meta.horizon_epochs < 30
    assert meta.epochs_done == meta.horizon_epochs + 2
    epochs = run.epochs()
    assert epochs.loc[epochs.epoch == meta.horizon_epochs - 1, "train_loss"].item() <= 1.5
    assert (epochs.loc[epochs.epoch < meta.horizon_epochs - 1, "train_loss"] > 1.5).all()
    steps = run.steps("continuation")
    assert len(steps) == meta.horizon_steps
    # θ* beyond the horizon: the progress no longer telescopes to ½D_0².
    d_T = run.store.read_torch("final.pt")["model"]
    ref = run.store.read_torch("reference.pt")["model"]
    gap_sq = sum(float((d_T[k].double() - ref[k].double()).pow(2).sum()) for k in ref if "weight" in k or "bias" in k)
    np.testing.assert_allclose(steps["progress"].sum(), 0.5 * (steps["dist_sq"].iloc[0] - gap_sq), rtol=1e-9)
    assert gap_sq > 0
    s_last = gammatrace.analyze(run.path, "last", progress=False)
    np.testing.assert_allclose(gammatrace.load_run(run.path).steps("last")["progress"].sum(),
                               0.5 * s_last["d0_sq"], rtol=1e-9)


def test_tail_exclusion(tmp_path):
    run = gammatrace.train(tiny_config(), tmp_path / "r", progress=False)
    full = run.summary()
    cut = gammatrace.analyze(run.path, tail=2, progress=False)
    assert full["n_steps"] == 6 and cut["n_steps"] == 4
    steps = run.steps()
    assert cut["gamma_min"] == pytest.approx(steps["gamma"].iloc[:4].min(), rel=1e-12)


def test_fixed_initial_point_and_file_reference(tmp_path):
    from gammatrace.engine.session import build_session
    from gammatrace.models.init import save_init

    cfg = tiny_config(model={"init": "orthogonal"})
    sess = build_session(gammatrace.RunConfig.model_validate(cfg))
    init = save_init(sess.model, tmp_path / "init.pt")
    with torch.no_grad():
        for p in sess.model.parameters():
            p.mul_(0.5)
    # A run started from the saved point has it as θ_0, whatever its own seed.
    run = gammatrace.train(tiny_config(seed=11, model={"init_from": str(init)}), tmp_path / "r", progress=False)
    theta0 = run.store.read_torch(shard("checkpoints", 0, "pt"))["model"]
    saved = torch.load(init, weights_only=True)
    assert all(torch.equal(theta0[k], saved[k]) for k in saved)
    # θ* from a user file: the checkpoint of epoch 1.
    ref = run.path / shard("checkpoints", 1, "pt")
    s = gammatrace.analyze(run.path, str(ref), progress=False)
    # the analysis is named by the file's stem and its content's SHA-256 (issue 10)
    from gammatrace.store.run import params_sha256

    assert s["reference"] == "file-epoch_0001-" + params_sha256(torch.load(ref, weights_only=True)["model"])[:16]
    steps = gammatrace.load_run(run.path).steps(s["reference"])
    first_of_epoch1 = steps[steps.epoch == 1].iloc[0]
    assert first_of_epoch1["dist_sq"] == 0.0  # θ_k = θ* at the start of epoch 1


def test_run_folder_of_the_flat_optimizer_format_loads_resumes_and_analyses(tmp_path):
    """tests/fixtures/legacy_rmsprop_run was written by gammatrace 0.1.0 before optimizer
    configs became variants (run.json's optim section held every optimizer's fields, and
    rmsprop took alpha from betas[1]), stopped after epoch 1 of 3. Resumed and analysed by
    today's code, it must end where an uninterrupted run of the upgraded config ends.

    The fixture's checkpoints, steps and losses carry the bits of the CPU that wrote them,
    and bits are one machine kind's (issue 25): replayed bit for bit elsewhere they diverge
    (tests/test_machine.py checks that error). So the bit-carrying files of epoch 0 are
    made here, by today's code from the upgraded config, in the fixture's own shard
    columns; the fixture's run.json — the format under test — is kept as written. The
    final point and step table that 0.1.0 stored for the uninterrupted run are compared
    with a cross-machine tolerance: they pin the upgrade's meaning (alpha = 0.999, where
    0.99 moves the largest weight by 100 % of its size, CPU bits by ~1e-5), not the last bit."""
    import shutil

    fixtures = Path(__file__).parent / "fixtures"
    run_dir = tmp_path / "legacy"
    shutil.copytree(fixtures / "legacy_rmsprop_run", run_dir)
    stored = json.loads((run_dir / "run.json").read_text())["config"]["optim"]
    assert set(stored) == {"name", "lr", "momentum", "betas", "eps", "weight_decay", "clip_grad_norm"}

    run = load_run(run_dir)
    assert run.status == "running" and run.meta.epochs_done == 1
    assert (run.config.optim.alpha, run.config.optim.momentum) == (0.999, 0.0)

    here = train_pass(run.config, tmp_path / "here", progress=False, stop_after=1).path
    for old in sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != "run.json"):
        new = here / old.relative_to(run_dir)
        if old.suffix == ".parquet":  # the fixture's columns: the 0.1.0 shard format stays under test
            pd.read_parquet(new)[list(pd.read_parquet(old).columns)].to_parquet(old)
        else:
            shutil.copyfile(new, old)

    resumed = gammatrace.train(run.config, run_dir, progress=False)
    whole = gammatrace.train(run.config, tmp_path / "whole", progress=False)
    assert resumed.status == whole.status == "complete" and resumed.meta.epochs_done == 3
    final = torch.load(run_dir / "final.pt", weights_only=True)["model"]
    uninterrupted = torch.load(whole.path / "final.pt", weights_only=True)["model"]
    assert final.keys() == uninterrupted.keys() and all(torch.equal(final[k], uninterrupted[k]) for k in final)
    steps = resumed.steps()
    pd.testing.assert_frame_equal(steps, whole.steps(), check_exact=True)

    # 0.1.0's uninterrupted run, recorded on another machine: equal up to that machine's bits.
    expected = torch.load(fixtures / "legacy_rmsprop_expected_final.pt", weights_only=True)["model"]
    assert all(torch.allclose(final[k], expected[k], rtol=1e-3, atol=1e-3) for k in expected)
    want = pd.read_parquet(fixtures / "legacy_rmsprop_expected_steps.parquet")
    pd.testing.assert_frame_equal(steps[want.columns].reset_index(drop=True), want, check_exact=False,
                                  rtol=1e-3, atol=1e-6)
