"""``gammatrace twopass`` on training scripts written as researchers write them (issue 23).

The stand-ins live in ``tests/fixtures/scripts/``, each kept unmodified beside its attached copy:
a module-level GPT-style loop (gradient accumulation, a GradScaler disabled on CPU, clipping, a
cosine schedule, a global iteration counter, a prefetched batch), an LSTM language model with
truncated BPTT and a hand-written SGD update (no optimizer object), and a 2-rank torchrun script.
For each: the attachment is a few added lines (counted with difflib); the trajectory is bitwise
the plain script's (its own checkpoint against the run's θ_T); every §6 column equals the brute
force (``tests/oracle.py``, run on the same script through ``tests/script_oracle.py``) to ≤ 1e-9
relative; and an unseeded draw in pass 2 only stops pass 2 at its step with the cause named.
"""

from __future__ import annotations

import difflib
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import gammatrace
from gammatrace.cli import main
from gammatrace.engine.script import ENV_PASS, pass_environment, run_twopass
from gammatrace.engine.twopass import TwoPassMismatchError
from gammatrace.errors import UserError
from tests.oracle import assert_matches_brute_force, brute_force_table, weighted_mean

SCRIPTS = Path(__file__).resolve().parent / "fixtures" / "scripts"
ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def added_lines(name: str) -> tuple[int, int]:
    """(lines the attached copy adds, lines it only re-indents) against the plain script; any
    other change (a line removed or edited) fails."""
    plain = (SCRIPTS / f"{name}.py").read_text().splitlines()
    attached = (SCRIPTS / f"{name}_attached.py").read_text().splitlines()
    diff = [d for d in difflib.ndiff(plain, attached) if d[:2] in ("+ ", "- ")]
    removed = [d[2:] for d in diff if d.startswith("- ")]
    added = [d[2:] for d in diff if d.startswith("+ ")]
    reindented = 0
    for line in removed:
        match = next((a for a in added if a.strip() == line.strip() and a != line), None)
        assert match is not None, f"{name}_attached.py changes the line {line!r}"
        added.remove(match)
        reindented += 1
    return len(added), reindented


def test_attachments_are_a_few_added_lines():
    assert added_lines("gpt_train") == (3, 0)
    assert added_lines("ddp_train") == (3, 0)
    added, reindented = added_lines("lstm_train")
    assert added <= 4 and reindented == 2  # the manual update's two lines, under `with probe.update(lr=lr):`


# --------------------------------------------------------------------------- helpers
def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", PYTHONWARNINGS="ignore")
    return env


def _plain_env(tmp_path: Path) -> dict[str, str]:
    """The start-up a pass gets (seeds, threads, deterministic kernels), without a pass."""
    env = pass_environment(1, tmp_path / "plain-state", seed=0, threads=1, deterministic="on", base=_env(tmp_path))
    env.pop(ENV_PASS)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: Path, *args: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port()), str(script), *args]


def _measure(tmp_path: Path, name: str, command: list[str], run: Callable[[list[str]], None], ranks: int = 1,
             launch: Callable[..., list[str]] | None = None) -> list[dict]:
    """``run`` the attached script's ``gammatrace twopass`` while the plain script and the brute
    force (the attached script with the read-only recorder in place of gammatrace.attach) run
    beside it, in the start-up a pass gets; returns the brute force's records, one per rank."""
    launch = launch or (lambda script, *args: [PY, str(script), *args])
    env = _plain_env(tmp_path)
    env["GT_ORACLE_OUT"] = str(tmp_path / "oracle")
    side = [subprocess.Popen(c, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for c in (launch(SCRIPTS / f"{name}.py", str(tmp_path / "plain-out")),
                      launch(ROOT / "tests" / "script_oracle.py", str(SCRIPTS / f"{name}_attached.py"),
                             str(tmp_path / "oracle-out")))]
    try:
        run(command)
    finally:
        for p in side:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()[-3000:]
    return [torch.load(tmp_path / f"oracle.rank{r}.pt", weights_only=False) for r in range(ranks)]


def _expected(records: list[dict], decay: float | None):
    """The brute-force table; over ranks, ℓ_k and ℓ*_k are the mean of the ranks' means (DDP).
    ``decay``: the coupled weight decay folded into grad_*_wd (None: NaN, none to fold)."""
    first = records[0]
    losses = [np.mean([weighted_mean(r["losses"][k], r["ns"][k]) for r in records]) for k in range(len(first["lrs"]))]
    refs = [np.mean([weighted_mean(r["losses_ref"][k], r["ns"][k]) for r in records])
            for k in range(len(first["lrs"]))]
    raw = first["raw"]
    if len(records) > 1:
        # Under DDP each rank's .grad hooks see its local gradient, before the all-reduce; the
        # gradient of ℓ_k is their average, which is .grad at the step when the loop does not clip
        # (the DDP stand-in does not): the mean of the local ones, to float32 rounding, shows it.
        raw = first["used"]
        for k, g in enumerate(raw):
            local = sum(r["raw"][k] for r in records) / len(records)
            torch.testing.assert_close(g, local, rtol=1e-5, atol=1e-7)
    return brute_force_table(first["thetas"], first["thetas"][-1], raw, first["used"], first["lrs"],
                             losses, refs, names=first["names"], sizes=first["sizes"], epochs=first["epochs"],
                             decay=decay)


def _check_run(run_dir: Path, records: list[dict], plain_final: dict[str, torch.Tensor],
               decay: float | None = None) -> None:
    run = gammatrace.load_run(run_dir)
    final = torch.load(run_dir / "final.pt", weights_only=True)["model"]
    # The trajectory is the plain script's, bit for bit: its own checkpoint is the run's θ_T, and
    # the brute force's θ_T (a third process) is too.
    assert final.keys() == plain_final.keys()
    for k in final:
        assert torch.equal(final[k], plain_final[k]), k
    theta_T = torch.cat([final[n].reshape(-1).double() for n in records[0]["names"]])
    assert torch.equal(theta_T, records[0]["thetas"][-1])
    expected, expected_tensors = _expected(records, decay)
    steps = run.steps()
    assert_matches_brute_force(steps, expected, run.tensor_steps(), expected_tensors)
    summary = gammatrace.analyze(run_dir, tail=1)
    assert summary["n_steps"] == len(expected) - 1 and run.meta.own_loop["recorded_by"] == "gammatrace twopass"
    assert not (run_dir / ".twopass").exists()  # the working folder is gone once the run is written


# --------------------------------------------------------------------------- the GPT-style script
def test_gpt_script_measured_exactly_through_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    records = _measure(tmp_path, "gpt_train", [PY, str(SCRIPTS / "gpt_train_attached.py"), str(tmp_path / "gpt-out")],
                       lambda command: main(["twopass", "--out", str(run_dir), "--quiet", "--", *command]) == 0 or
                       pytest.fail("gammatrace twopass failed"))
    plain = torch.load(tmp_path / "plain-out" / "ckpt.pt", weights_only=True)["model"]
    assert len(records[0]["lrs"]) == 21 and all(len(m) == 2 for m in records[0]["losses"])  # accumulation
    _check_run(run_dir, records, plain)  # AdamW: decoupled decay (NaN)

def _perturbed(tmp_path: Path, name: str, after: str, line: str) -> Path:
    """The attached script with one line inserted after ``after``: a deliberate nondeterminism."""
    text = (SCRIPTS / f"{name}_attached.py").read_text()
    assert text.count(after) == 1
    indent = after[: len(after) - len(after.lstrip())]
    path = tmp_path / f"{name}_perturbed.py"
    path.write_text(text.replace(after, f"{after}\n{indent}{line}"))
    return path


@pytest.mark.slow  # ~11-19 s; the default run keeps one of each kind (GPT measured, LSTM stopped)
def test_gpt_script_with_an_unseeded_draw_in_pass_2_stops_at_its_step(tmp_path, capsys):
    # Pass 2 only, at iteration 4: one draw from torch's global generator that pass 1 never made.
    script = _perturbed(tmp_path, "gpt_train", "    lr = get_lr(iter_num)",
                        "if os.environ['GAMMATRACE_PASS'] == '2' and iter_num == 4: torch.rand(1)")
    assert main(["twopass", "--out", str(tmp_path / "run"), "--quiet", "--", PY, str(script),
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # The draw changes step 4's dropout masks and the batch prefetched during it.
    assert err.startswith("gammatrace: error: pass 2 diverged from pass 1 at step 4 (epoch 0): loss "), err
    assert "likely cause: the batch of step 4 differs from pass 1's" in err
    assert "GAMMATRACE_PASS" not in err and "build()" not in err  # worded for a script, not TwoPass
    assert not (tmp_path / "run" / "run.json").exists()


# --------------------------------------------------------------------------- the LSTM, manual update
@pytest.mark.slow  # ~11-19 s; the default run keeps one of each kind (GPT measured, LSTM stopped)
def test_lstm_script_with_a_manual_update_measured_exactly(tmp_path):
    run_dir = tmp_path / "run"
    records = _measure(tmp_path, "lstm_train", [PY, str(SCRIPTS / "lstm_train_attached.py"), str(tmp_path / "out")],
                       lambda command: run_twopass(command, run_dir, quiet=True, env=_env(tmp_path)))
    plain = torch.load(tmp_path / "plain-out" / "last.pt", weights_only=True)
    assert len(records[0]["lrs"]) == 9 and len(set(records[0]["lrs"])) == 2  # the lr was annealed
    _check_run(run_dir, records, plain)  # no optimizer: no decay to fold (NaN)
    assert gammatrace.load_run(run_dir).meta.own_loop["optimizer"] == "manual update"

def test_lstm_script_with_an_unseeded_draw_in_pass_2_names_the_random_stream(tmp_path):
    script = _perturbed(tmp_path, "lstm_train", "        data, targets = get_batch(train_data, i)",
                        "if os.environ['GAMMATRACE_PASS'] == '2' and epoch == 2 and i == 3: torch.rand(1)")
    with pytest.raises(TwoPassMismatchError, match=r"at step 4 \(epoch 0\): loss .*likely cause: the random "
                                                   "generators were in another state when step 4 began") as err:
        run_twopass([PY, str(script), str(tmp_path / "out")], tmp_path / "run", quiet=True, env=_env(tmp_path))
    assert (err.value.step, err.value.cause) == (4, "rng")


# --------------------------------------------------------------------------- what the runner refuses
def test_a_script_that_never_attaches_or_leaves_by_os_exit_is_one_loud_line(tmp_path, capsys):
    plain = tmp_path / "plain.py"
    plain.write_text("print('training without gammatrace')\n")
    assert main(["twopass", "--out", str(tmp_path / "a"), "--quiet", "--", PY, str(plain)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gammatrace: error: pass 1: `{PY} {plain}` never called gammatrace.attach(model, optimizer, "
                   "loss_fn=...) (it exited with status 0), so nothing was measured"], err
    with pytest.raises(UserError, match="never called gammatrace.attach"):
        run_twopass([PY, str(plain)], tmp_path / "b", quiet=True)
    killed = tmp_path / "killed.py"
    killed.write_text("import os, torch, gammatrace\nm = torch.nn.Linear(2, 1)\n"
                      "probe = gammatrace.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), loss_fn=None or "
                      "(lambda m, b: m(b).sum()))\nos._exit(0)\n")
    with pytest.raises(UserError, match=r"pass 1: .* ended \(status 0\) without writing rank 0's record at exit: the "
                                        "process was killed .* or left through os._exit, so there is no θ_T"):
        run_twopass([PY, str(killed)], tmp_path / "c", quiet=True)
    idle = tmp_path / "idle.py"
    idle.write_text("import torch, gammatrace\nm = torch.nn.Linear(2, 1)\n"
                    "probe = gammatrace.attach(m, None, loss_fn=lambda m, b: m(b).sum())\n")
    with pytest.raises(UserError, match=r"pass 1: .* made no measured step; call probe.batch"):
        run_twopass([PY, str(idle)], tmp_path / "e", quiet=True)
    with pytest.raises(UserError, match="needs a command after --"):
        run_twopass([], tmp_path / "d")


def test_attach_outside_the_runner_is_a_record_mode_probe_and_says_so(capsys, monkeypatch):
    monkeypatch.delenv("GAMMATRACE_TWOPASS_DIR", raising=False)
    model = torch.nn.Linear(2, 1)
    probe = gammatrace.attach(model, None, loss_fn=lambda m, b: m(b).pow(2).mean())
    assert "not run by `gammatrace twopass`, so this is a record-mode probe" in capsys.readouterr().err
    loss = model(torch.ones(3, 2)).pow(2).mean()
    loss.backward()
    probe.batch(torch.ones(3, 2), loss)
    with probe.update(lr=0.1), torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-0.1)
    assert probe.mode == "record" and probe.steps()["lr"].tolist() == [0.1]


# --------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_script_on_two_ranks_measured_exactly(tmp_path):
    run_dir = tmp_path / "run"
    records = _measure(tmp_path, "ddp_train", _torchrun(SCRIPTS / "ddp_train_attached.py", str(tmp_path / "out")),
                       lambda command: run_twopass(command, run_dir, quiet=True, env=_env(tmp_path)), ranks=2,
                       launch=_torchrun)
    plain = torch.load(tmp_path / "plain-out" / "model.pt", weights_only=True)
    assert len(records[0]["lrs"]) == 18
    # Each rank its own batches, one all-reduced gradient.
    assert records[0]["losses"] != records[1]["losses"] and torch.equal(records[0]["used"][5], records[1]["used"][5])
    _check_run(run_dir, records, plain, decay=0.0)  # SGD without weight decay: g_k + 0·θ_k
    assert gammatrace.load_run(run_dir).meta.own_loop["world_size"] == 2

@pytest.mark.slow
def test_torchrun_script_with_an_unseeded_draw_in_pass_2_stops_it(tmp_path):
    script = _perturbed(tmp_path, "ddp_train", "    sampler.set_epoch(epoch)",
                        "if os.environ['GAMMATRACE_PASS'] == '2' and epoch == 1: torch.rand(1)")
    with pytest.raises(TwoPassMismatchError, match="at step 6 ") as err:
        run_twopass(_torchrun(script, str(tmp_path / "out")), tmp_path / "run", quiet=True, env=_env(tmp_path))
    assert err.value.step == 6 and err.value.cause in ("rng", "batch"), str(err.value)


def test_the_start_up_seeds_before_the_first_line_and_chains_a_sitecustomize(tmp_path):
    """What a pass's processes get before user code: Python's random seeded, PYTHONHASHSEED, and a
    sitecustomize the user already had still runs (this one is first on the path). No torch here:
    its settings wait for its import (test_twopass_script's runs cover them)."""
    theirs = tmp_path / "site"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import os\nos.environ['THEIRS'] = 'ran'\n")
    script = tmp_path / "first_line.py"
    script.write_text("import os, random, sys, sitecustomize\n"
                      "print(random.random(), hash('x'), os.environ.get('THEIRS'), sitecustomize.__file__,"
                      " 'torch' in sys.modules)\n")

    def first_line(seed: int) -> list[str]:
        base = {**_env(tmp_path), "PYTHONPATH": str(theirs)}
        base.pop("PYTHONHASHSEED", None)  # the runner's, from the seed
        env = pass_environment(1, tmp_path / "state", seed=seed, threads=1, deterministic="on", base=base)
        return subprocess.run([PY, str(script)], env=env, capture_output=True, text=True, check=True).stdout.split()

    a, b, c = first_line(3), first_line(3), first_line(4)
    assert a == b and a[0] != c[0] and a[1] != c[1]  # the same seed, the same first draw and string hash
    assert a[2] == "ran" and a[3] == str(theirs / "sitecustomize.py") and a[4] == "False"
