"""Bad input gives one clear line and loses nothing already on disk."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import gammatrace
from gammatrace.cli import main
from gammatrace.data.base import DataError
from gammatrace.engine import RunConflictError, train_pass
from gammatrace.registry import UnknownNameError
from gammatrace.store.run import RunStore, StoreError, shard
from tests.conftest import tiny_config


@pytest.mark.parametrize("override, message", [
    ({"model": {"activation": "swishy"}}, "unknown activation 'swishy'"),
    ({"optim": {"name": "sgdd"}}, "unknown optimizer 'sgdd'"),
    ({"data": {"name": "imagenet"}}, "unknown dataset 'imagenet'"),
    ({"model": {"name": "resnet9000"}}, "unknown model 'resnet9000'"),
    ({"schedule": {"name": "wiggle"}}, "unknown schedule 'wiggle'"),
])
def test_unknown_names_fail_before_anything_is_written(tmp_path, override, message):
    # The optimizer's name selects its config variant, so an unknown one is a validation
    # error of the config (same message); the others are caught by the registries.
    with pytest.raises((UnknownNameError, ValidationError), match=message):
        train_pass(tiny_config(**override), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("lr", [0, -0.1])
def test_nonpositive_lr_is_rejected(lr):
    with pytest.raises(ValidationError, match="greater than 0"):
        gammatrace.RunConfig.model_validate(tiny_config(optim={"lr": lr}))


def test_missing_dataset_folder(tmp_path):
    cfg = tiny_config(data={"name": "cifar10", "n_train": None, "data_dir": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match="never downloads"):
        train_pass(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_nan_loss_marks_run_diverged_and_keeps_earlier_data(tmp_path):
    # Epoch 0 is fine at a small lr; then the step schedule multiplies it by 1e6.
    cfg = tiny_config(epochs=4, loss="mse", optim={"lr": 0.01},
                      schedule={"name": "step", "step_epochs": 1, "factor": 1e6})
    run = train_pass(cfg, tmp_path / "r", progress=False)
    assert run.status == "diverged"
    k = run.meta.diverged_at_step
    steps = run.record_steps()
    assert steps["step"].max() == k and not pd_isfinite(steps["loss"].iloc[-1])
    assert pd_isfinite(steps["loss"].iloc[:-1]).all()
    assert (run.path / shard("checkpoints", 1, "pt")).exists()
    assert run.store.read_torch(shard("checkpoints", 1, "pt"))["epoch"] == 1
    with pytest.raises(StoreError, match="diverged at step"):
        gammatrace.analyze(run.path, progress=False)


def pd_isfinite(values):
    import numpy as np

    return np.isfinite(values)


def test_corrupt_checkpoint_on_resume(tmp_path, monkeypatch):
    cfg = tiny_config(epochs=3)
    train_pass(cfg, tmp_path / "r", progress=False, stop_after=2)
    store = RunStore(tmp_path / "r")
    ckpt = store.path(shard("checkpoints", 2, "pt"))
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # truncated
    before = sorted(p.name for p in (tmp_path / "r").rglob("*") if p.name != ".lock")
    with pytest.raises(StoreError, match="corrupt, truncated"):
        train_pass(cfg, tmp_path / "r", progress=False)
    # (the run folder's lock file is infrastructure, kept as lock files are)
    assert sorted(p.name for p in (tmp_path / "r").rglob("*") if p.name != ".lock") == before
    assert ckpt.read_bytes() == data[: len(data) // 2]
    assert store.read_json("run.json")["epochs_done"] == 2


def test_other_config_in_same_folder_is_refused(tmp_path):
    train_pass(tiny_config(), tmp_path / "r", progress=False)
    with pytest.raises(RunConflictError, match="different config"):
        train_pass(tiny_config(seed=99), tmp_path / "r", progress=False)


def test_load_run_of_a_non_run(tmp_path):
    with pytest.raises(StoreError, match="not a gammatrace run"):
        gammatrace.load_run(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["run", "nonexistent.yaml", "--out", "X"], "does not exist"),
    (["analyze", "/nonexistent/run"], "not a gammatrace run"),
])
def test_cli_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gammatrace: error:") and message in err[0]


def test_cli_invalid_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: -1}\nepochs: 0\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr" in err[0] and "epochs" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_bug_keeps_its_traceback_and_exits_1(tmp_path, capsys, monkeypatch):
    """A ValueError raised deep in a command is a bug, not a user error: its traceback, one
    line saying it is a bug and where to report it, exit status 1 (never a one-line exit 2)."""
    def planted(*args, **kwargs):
        raise ValueError("planted bug deep in the loader")

    monkeypatch.setattr("gammatrace.engine.session.epoch_batches", planted)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: bug\ndata: {name: digits, n_train: 64, n_test: 32}\nmodel: {name: mlp, width: 8, depth: 1}\n"
                   "epochs: 1\nbatch_size: 32\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--no-report", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: planted bug deep in the loader" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("gammatrace: this is a bug in gammatrace") and "report it" in last
    assert "gammatrace: error:" not in err


def test_a_bug_in_a_real_process_exits_1_with_its_traceback(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from gammatrace import cli\n"
            "def boom(args): raise ValueError('planted bug')\n"
            "cli.cmd_machine = boom\n"
            "sys.exit(cli.main(['machine']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr and "ValueError: planted bug" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("gammatrace: this is a bug")


def test_every_user_fixable_error_is_a_user_error():
    """One hierarchy (errors.py): the errors defined beside their code are UserErrors and
    keep the built-in base their callers catch."""
    from gammatrace.engine.session import DivergedError
    from gammatrace.errors import ConfigError, IntegrationError, OptionError, UserError
    from gammatrace.executors import MissingDependencyError
    from gammatrace.probe import BadReferenceError, ConsistencyError, ProbeUsageError
    from gammatrace.store.integrity import DamagedTable

    for cls, builtin in [(BadReferenceError, ValueError), (ConsistencyError, ValueError),
                         (ProbeUsageError, RuntimeError), (DivergedError, RuntimeError),
                         (DamagedTable, ValueError), (MissingDependencyError, ImportError),
                         (IntegrationError, RuntimeError), (ConfigError, ValueError), (OptionError, TypeError),
                         (UnknownNameError, KeyError), (DataError, ValueError), (StoreError, RuntimeError),
                         (RunConflictError, RuntimeError)]:
        assert issubclass(cls, UserError) and issubclass(cls, builtin), cls
    assert not hasattr(gammatrace.probe, "ReferenceError_")


@pytest.mark.parametrize("argv, message", [
    (["models", "mlp", "--widht", "8"], "has no switch 'widht'"),
    (["models", "mlp", "--width", "0"], "mlp needs depth >= 0 and width > 0"),
    (["models", "mlp", "8"], "expected --SWITCH VALUE"),
    (["models", "mlp", "--width"], "needs a value"),
    (["run", "no-such-preset", "--out", "X"], "config no-such-preset does not exist"),
])
def test_user_input_once_a_bare_value_error_is_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gammatrace: error:") and message in err[0], err


def test_a_multi_run_config_with_other_keys_is_one_line(tmp_path, capsys):
    bad = tmp_path / "multi.yaml"
    bad.write_text("base: {}\nruns: {a: {}}\nepochs: 3\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only 'base' and 'runs'" in err[0]
    assert not (tmp_path / "out").exists()
