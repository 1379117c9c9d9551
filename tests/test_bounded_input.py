"""Issue 22, item 4: hostile or absurd input has a bound. Each test was written before its
fix and failed on the code as it was (an alias bomb that never finished, a MemoryError or
torch traceback for an absurd count, a RuntimeError for an lr beyond float32, a folder
named ``abc\\n``, ENAMETOOLONG for a long name).

Every refusal is one line on stderr, exit status 2, and nothing written.
"""

from __future__ import annotations

import time

import pytest
import yaml

from gammatrace.cli import main
from gammatrace.config import (
    MAX_CONFIG_NODES,
    MAX_EPOCHS,
    MAX_NAME,
    MAX_SEEDS,
    deep_merge,
    load_yaml,
)
from gammatrace.errors import UserError
from gammatrace.models.registry import MAX_PARAMETERS

BASE = "data: {name: digits, n_train: 64, n_test: 32}\nmodel: {name: mlp, width: 8, depth: 1}\nepochs: 1\n"


def _one_line(capsys, *words: str) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("gammatrace: error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    return err[0]


def _bomb(levels: int = 8) -> tuple[list[str], str]:
    """YAML lines for 10**(levels + 1) leaves in a few hundred bytes, and the last anchor."""
    lines, prev = ["a: &a [x, x, x, x, x, x, x, x, x, x]"], "a"
    for i in range(levels):
        name = chr(ord("b") + i)
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]")
        prev = name
    return lines, prev


@pytest.mark.parametrize("where", ["unknown key", "data.classes", "multi-run override"])
def test_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys, where):
    lines, last = _bomb()
    if where == "unknown key":
        text = BASE + "zz:\n  " + "\n  ".join(lines) + "\n"
    elif where == "data.classes":
        text = "bomb:\n  " + "\n  ".join(lines) + f"\ndata: {{name: digits, classes: *{last}}}\nepochs: 1\n"
    else:
        text = "defs:\n  " + "\n  ".join(lines) + f"\nbase: {{epochs: 1}}\nruns: {{a: {{x: *{last}}}}}\n"
    assert len(text.encode()) < 1000
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(text)
    t0 = time.monotonic()
    with pytest.raises(UserError, match="aliases expand to more than"):
        load_yaml(cfg)
    assert time.monotonic() - t0 < 5.0
    t0 = time.monotonic()
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    assert time.monotonic() - t0 < 5.0
    _one_line(capsys, "bomb.yaml", f"{MAX_CONFIG_NODES:,}")
    assert not (tmp_path / "out").exists()


def test_a_config_that_contains_itself_is_refused(tmp_path, capsys):
    cfg = tmp_path / "loop.yaml"
    cfg.write_text(BASE + "zz: &a [1, *a]\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    _one_line(capsys, "loop.yaml")


def test_shared_aliases_within_the_budget_still_load(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("common: &c {name: digits, n_train: 64}\ndata: *c\n")
    assert load_yaml(cfg)["data"] == {"name": "digits", "n_train": 64}


@pytest.mark.parametrize("line, words", [
    ("epochs: 1000000000000", ["epochs", f"{MAX_EPOCHS}"]),
    ("epochs: 1\nreference: {kind: continuation, extra_epochs: 1000000000000}", ["extra_epochs", f"{MAX_EPOCHS}"]),
    ("epochs: 1000000\nreference: {kind: continuation, extra_epochs: 1000000}", ["extra_epochs", f"{MAX_EPOCHS:,}"]),
    ("optim: {lr: 1.0e+308}", ["optim.lr"]),
    ("optim: {weight_decay: 1.0e+308}", ["optim.weight_decay"]),
    ("optim: {name: adam, eps: 1.0e+308}", ["optim.eps"]),
    ("optim: {name: adam, betas: [0.9, 1.0e+300]}", ["optim.betas"]),
    ("optim: {clip_grad_norm: 1.0e+308}", ["optim.clip_grad_norm"]),
    ("batch_size: 1000000000000", ["batch_size"]),
    ("threads: 1000000000", ["threads"]),
    ("model: {name: mlp, width: 1000000000}", ["width", f"{MAX_PARAMETERS:,}"]),
    ("model: {name: mlp, width: 100000, depth: 1000}", ["parameters", f"{MAX_PARAMETERS:,}"]),
    ("data: {name: digits, n_train: 10000000000}", ["data.n_train"]),
    ("data: {name: mnist1d, num_samples: 1000000000000}", ["data.num_samples"]),
])
def test_absurd_values_are_one_line_before_any_allocation(tmp_path, capsys, line, words):
    cfg = tmp_path / "absurd.yaml"
    cfg.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(BASE), yaml.safe_load(line))))
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    _one_line(capsys, *words)
    assert not (tmp_path / "out").exists()


def test_a_large_but_sane_horizon_plans_without_running_out_of_memory(tmp_path, capsys):
    cfg = tmp_path / "long.yaml"
    cfg.write_text(BASE.replace("epochs: 1", f"epochs: {MAX_EPOCHS}") + "checkpoint_every: 1000\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--dry-run", "--no-check-free"]) in (0, 2)
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("seeds", [10**9, MAX_SEEDS + 1])
def test_absurd_seed_count_is_one_line(tmp_path, capsys, seeds):
    out = tmp_path / "study"
    assert main(["study", "activation", "--preset", "quick", "--seeds", str(seeds), "--dry-run",
                 "--out", str(out)]) == 2
    _one_line(capsys, "seeds", f"{MAX_SEEDS:,}")
    assert not out.exists()


NAMES = ["abc\n", "abc\r", "ab\tc", "abc\x00", "abc\x1b[31m", "a" * 300, "é" * 10]


@pytest.mark.parametrize("name", NAMES, ids=repr)
@pytest.mark.parametrize("where", ["config name", "multi-run name", "study variant", "study cell"])
def test_names_are_printable_and_bounded(tmp_path, capsys, name, where):
    base = {"data": {"name": "digits", "n_train": 64, "n_test": 32}, "epochs": 1}
    cmd = "study" if where.startswith("study") else "run"
    data = {"config name": {**base, "name": name},
            "multi-run name": {"base": base, "runs": {name: {}}},
            "study variant": {"name": "s", "question": "q", "base": base, "variants": {name: {}, "ok": {}}},
            "study cell": {"name": "s", "question": "q", "base": base, "cells": {name: {}, "ok": {}}}}[where]
    text = yaml.safe_dump(data, allow_unicode=True)
    assert yaml.safe_load(text) == data  # the name reaches the tool as written
    cfg = tmp_path / "names.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    assert main([cmd, str(cfg), "--out", str(out), "--dry-run"]) == 2
    line = _one_line(capsys, "name")
    assert "\n" not in line.rstrip("\n") and "\x1b" not in line and "\x00" not in line
    assert len(line) < 400
    assert not out.exists()


def test_a_name_at_the_ceiling_is_accepted(tmp_path, capsys):
    cfg = tmp_path / "long.yaml"
    cfg.write_text(BASE + f"name: {'a' * MAX_NAME}\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--dry-run", "--no-check-free"]) == 0
