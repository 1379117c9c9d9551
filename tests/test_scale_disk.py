"""Disk budget (issue 15.1): the estimate against ``du`` of real runs, --dry-run without
data, refusals, checkpoint spacing (resume and verified replay with any spacing), and
pruning after a successful analysis."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from gammatrace.analysis import analyze, train
from gammatrace.cli import main
from gammatrace.config import RunConfig
from gammatrace.engine import budget
from gammatrace.engine.replay import PrunedRunError, ReplayMismatchError, replay, segments
from gammatrace.engine.trainer import train_pass
from gammatrace.store.run import Run, RunStore
from tests.conftest import tiny_config


def du(path) -> int:
    """Bytes the files below ``path`` occupy, as ``du`` counts them."""
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(path) for f in files)


def paper_net_config(model: str, **over) -> dict:
    # A paper network at full width on 256 generated CIFAR-shaped samples, 2 epochs.
    cfg = {"name": model, "seed": 0, "epochs": 2, "batch_size": 128,
           "data": {"name": "synthetic_images", "num_train": 256, "num_test": 64, "size": 32},
           "model": {"name": model}, "optim": {"name": "momentum", "lr": 0.01}, "eval_batch_size": 256}
    return {**cfg, **over}


def _estimate_vs_du(tmp_path, model: str) -> tuple[budget.RunEstimate, int, int]:
    cfg = RunConfig.model_validate(paper_net_config(model))
    est = budget.estimate_run(cfg)
    run = train(cfg, tmp_path / model, progress=False)
    full = du(run.path)
    budget.prune_checkpoints(run.path)
    return est, full, du(run.path)


def test_estimate_within_ten_percent_of_du_smallest_paper_network(tmp_path):
    est, full, pruned = _estimate_vs_du(tmp_path, "alexnet_small")
    print(f"alexnet_small: estimate {est.total} B, du {full} B; pruned: estimate {est.pruned} B, du {pruned} B")
    assert abs(est.total - full) <= 0.10 * full
    assert abs(est.pruned - pruned) <= 0.10 * pruned


@pytest.mark.slow
def test_estimate_within_ten_percent_of_du_resnet34(tmp_path):
    est, full, pruned = _estimate_vs_du(tmp_path, "resnet34")
    print(f"resnet34: estimate {est.total} B, du {full} B; pruned: estimate {est.pruned} B, du {pruned} B")
    assert abs(est.total - full) <= 0.10 * full
    assert abs(est.pruned - pruned) <= 0.10 * pruned


def test_estimate_of_a_tiny_run_with_continuation(tmp_path):
    # Small files: block rounding and the analysis of two references dominate.
    cfg = RunConfig.model_validate(tiny_config(epochs=3, reference={"kind": "continuation", "extra_epochs": 2}))
    est = budget.estimate_run(cfg)
    run = train(cfg, tmp_path / "t", progress=False)
    analyze(run.path, "last", progress=False)
    assert est.n_checkpoints == len(RunStore(run.path).files("checkpoints")) == 6
    assert abs(est.total - du(run.path)) <= 0.10 * du(run.path)


def test_dry_run_prints_the_plan_without_data_or_writes(tmp_path, capsys):
    # A paper network on CIFAR-10 from a folder that does not exist: the plan needs neither.
    config = tmp_path / "paper.yaml"
    config.write_text("name: vgg\nepochs: 150\nbatch_size: 128\nmodel: {name: vgg11}\n"
                      f"data: {{name: cifar10, data_dir: {tmp_path / 'no-such-folder'}}}\n"
                      "optim: {name: momentum, lr: 0.01}\nreference: {kind: continuation, extra_epochs: 10}\n")
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "disk plan for" in text and "vgg11" in text and "150+10" in text and "161 x" in text
    assert "fits" in text.splitlines()[-1] or "does not fit" in text.splitlines()[-1]
    assert not out.exists()


def test_max_disk_refuses_before_training(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("name: t\nseed: 3\nepochs: 2\nbatch_size: 32\ndata: {name: digits, n_train: 96, n_test: 64}\n"
                      "model: {name: mlp, width: 8, depth: 2}\n")
    assert main(["run", str(config), "--out", str(tmp_path / "o"), "--max-disk", "0.00001", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exceeds --max-disk 1e-05 GiB" in err[0] and "checkpoint_every" in err[0]
    assert not (tmp_path / "o").exists()


def test_free_space_is_checked(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("name: t\nseed: 3\nepochs: 2\nbatch_size: 32\ndata: {name: digits, n_train: 96, n_test: 64}\n"
                      "model: {name: mlp, width: 8, depth: 2}\n")
    monkeypatch.setattr(budget, "free_bytes", lambda out: 1000)
    assert main(["run", str(config), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "GiB free at" in err and "exceeds" in err


def test_auto_spacing_is_the_densest_that_fits():
    cfg = RunConfig.model_validate(tiny_config(epochs=12, checkpoint_every="auto"))
    every_epoch = budget.estimate_run(cfg, every=1)
    sparse = budget.estimate_run(cfg, every=4)
    limit = (sparse.total + 0.5 * (every_epoch.total - sparse.total)) / budget.GiB  # between the two
    plan = budget.plan_disk({"a": cfg}, "unused", max_disk=limit)
    k = plan.runs[0].checkpoint_every
    assert plan.fits and 1 < k <= 4
    assert budget.estimate_run(cfg, every=k - 1).total > limit * budget.GiB  # and no denser one fits
    assert budget.resolved({"a": cfg}, plan)["a"].checkpoint_every == k


@pytest.mark.parametrize("every", [2, 3])
def test_resume_and_verified_replay_with_any_spacing(tmp_path, every):
    cfg = tiny_config(epochs=5, checkpoint_every=every, optim={"name": "momentum", "lr": 0.1})
    whole = train_pass(cfg, tmp_path / "whole", progress=False)
    expected = [e for e in range(6) if e % every == 0 or e == 5]
    assert [int(n[6:10]) for n in RunStore(whole.path).files("checkpoints")] == expected
    for kill_after in (1, every + 1):  # killed between checkpoints: resumes from the one before
        path = tmp_path / f"killed{kill_after}"
        train_pass(cfg, path, progress=False, stop_after=kill_after)
        resumed = train_pass(cfg, path, progress=False)
        assert resumed.meta.final_sha256 == whole.meta.final_sha256
        assert resumed.record_steps()["loss"].tolist() == whole.record_steps()["loss"].tolist()
    assert segments(whole) == [(s, min(s + every, 5)) for s in range(0, 5, every)]
    replay(whole.path, "last", progress=False, workers=2)
    killed = Run(tmp_path / "killed1")
    replay(killed.path, "last", progress=False)
    a = RunStore(whole.path).read_shards("analysis/last/steps")
    b = RunStore(killed.path).read_shards("analysis/last/steps")
    assert len(a) == 5 * 3 and a.equals(b)


def test_replay_with_spacing_still_names_the_diverging_step(tmp_path):
    run = train_pass(tiny_config(epochs=4, checkpoint_every=2), tmp_path / "r", progress=False)
    store = run.store
    steps = store.read_parquet(store.shard("steps", 3))
    steps.loc[1, "loss"] += 1e-3  # a recording that the replay cannot reproduce
    store.write_parquet(store.shard("steps", 3), steps)
    with pytest.raises(ReplayMismatchError, match=r"step 10 \(epoch 3\)"):
        replay(run.path, "last", progress=False)
    # The middle of a segment has no checkpoint: its parameters are checked at the segment's end.
    state = store.read_torch(store.checkpoint(4))
    state["model"] = {k: v + 1e-6 if v.is_floating_point() else v for k, v in state["model"].items()}
    store.write_torch(store.checkpoint(4), state)
    store.write_parquet(store.shard("steps", 3), steps.assign(loss=steps["loss"] - 0))
    fresh = train_pass(tiny_config(epochs=4, checkpoint_every=2), tmp_path / "f", progress=False)
    good = fresh.store.read_parquet(fresh.store.shard("steps", 3))
    store.write_parquet(store.shard("steps", 3), good)
    with pytest.raises(ReplayMismatchError, match=r"end of epoch 3\).*checkpoints/epoch_0004.pt"):
        replay(run.path, "last", progress=False)


def test_pruning_keeps_what_reanalysis_needs(tmp_path, capsys):
    cfg = tiny_config(epochs=3, reference={"kind": "last", "extra_epochs": 1})
    run = train(cfg, tmp_path / "r", progress=False)
    analyze(run.path, "continuation", progress=False)
    before = {r: Run(run.path).steps(r)["gamma"].tolist() for r in ("last", "continuation")}
    freed = budget.prune_checkpoints(run.path)
    run = Run(run.path)
    assert freed > 0 and run.store.files("checkpoints") == [] and run.meta.checkpoints_pruned
    assert run.store.exists("final.pt") and run.store.exists("reference.pt")
    assert run.meta.final_sha256 and run.meta.reference_sha256
    # A new tail / ell_inf re-summarises the stored replay.
    for ref in ("last", "continuation"):
        s = analyze(run.path, ref, tail=1, ell_inf=0.01, progress=False)
        assert s["n_steps"] == 8 and Run(run.path).steps(ref)["gamma"].tolist() == before[ref]
    # A new reference, or a landscape, needs the checkpoints: one line, exit status 2.
    other = tmp_path / "theta.pt"
    torch.save(run.store.read_torch("final.pt")["model"], other)
    with pytest.raises(PrunedRunError):
        analyze(run.path, str(other), progress=False)
    capsys.readouterr()
    assert main(["analyze", str(run.path), "--reference", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoints, which were pruned" in err[0]
    assert main(["landscape", str(run.path), "--out", str(tmp_path / "ls"), "--quiet", "--grid", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a landscape needs the epoch checkpoints" in err[0]


def test_run_with_prune_checkpoints(tmp_path, capsys):
    config = tmp_path / "two.yaml"
    config.write_text("base: {seed: 3, epochs: 2, batch_size: 32, data: {name: digits, n_train: 96, n_test: 64}, "
                      "model: {name: mlp, width: 8, depth: 2}}\nruns: {a: {}, b: {optim: {lr: 0.01}}}\n")
    assert main(["run", str(config), "--out", str(tmp_path / "o"), "--prune-checkpoints", "--no-report"]) == 0
    err = capsys.readouterr().err
    assert "estimated disk use" in err and "checkpoints pruned" in err
    for name in "ab":
        run = Run(tmp_path / "o" / name)
        assert run.status == "complete" and run.meta.checkpoints_pruned and not run.store.files("checkpoints")


def test_study_estimate_against_du(tmp_path):
    from gammatrace.experiments.study import make_study, run_study

    study = make_study("s", "?", copy.deepcopy(tiny_config(epochs=3)),
                       {"relu": {"model": {"activation": "relu"}}, "tanh": {"model": {"activation": "tanh"}}})
    runs = study.runs(1)
    plan = budget.plan_disk(runs, tmp_path / "s")
    run_study(study, tmp_path / "s", seeds=1, progress=False)
    runs_du = sum(du(tmp_path / "s" / n) for n in runs)
    print(f"tiny study: estimate {plan.total} B, du of the runs {runs_du} B")
    assert abs(plan.total - runs_du) <= 0.10 * runs_du
