"""A run's bits belong to the machine kind that recorded them (issue 25).

A run records its machine (run.json provenance); a replay that diverges on a machine of
another kind says so in one line, and says nothing of machines when the kinds agree; a
replay of a run from another kind is warned about before it starts; a resume there is
refused before anything is written. The other machine is planted: the recorded
fingerprint is edited, and — to make the bits differ as another CPU's would — a
checkpoint is moved by one part in a million.
"""

from __future__ import annotations

import json

import pytest
import torch

from gammatrace.cli import main
from gammatrace.engine import ReplayMismatchError, replay, train_pass
from gammatrace.machine import (
    KIND_FIELDS,
    OtherMachineError,
    cross_machine_advice,
    describe,
    differences,
    fingerprint,
    machine_id,
    ray_resource,
)
from gammatrace.store.run import Run, RunStore, recorded_kind, shard
from tests.conftest import tiny_config, tree_hashes

OTHER_CPU = {"cpu": "Intel(R) Xeon(R) Platinum 8480+ (family 6, model 143)", "cpu_capability": "AVX512",
             "llvm_cpu": "sapphirerapids"}


def plant_machine(run: Run, **fields) -> dict:
    """Edit run.json as if the run had been recorded on a machine with ``fields``."""
    meta = run.store.read_meta()
    machine = {**meta.provenance["machine"], **fields}
    run.store.update_meta(provenance={**meta.provenance, "machine": machine})
    return machine


def nudge_checkpoint(run: Run, epoch: int) -> None:
    """Move one tensor of checkpoint ``epoch`` by a relative 1e-6: another CPU's bits."""
    state = run.store.read_torch(shard("checkpoints", epoch, "pt"))
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name] * (1 + 1e-6)
    run.store.write_torch(shard("checkpoints", epoch, "pt"), state)


def test_fingerprint_names_what_decides_the_bits():
    fp = fingerprint("cpu", threads=3)
    assert fp["threads"] == 3 and fp["torch"] == torch.__version__
    assert fp["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert fp["cpu"] and fp["blas"]
    # The kind: the bit-deciding fields only, stable, 12 hex digits; threads are the config's.
    assert machine_id(fp) == machine_id(fingerprint("cpu", threads=1))
    assert len(machine_id(fp)) == 12 and int(machine_id(fp), 16) >= 0
    for field in ("cpu", "cpu_capability", "blas", "torch"):
        assert field in KIND_FIELDS and machine_id({**fp, field: "other"}) != machine_id(fp), field
    assert ray_resource(fp) == f"gammatrace-machine-{machine_id(fp)}"
    assert fp["cpu"] in describe(fp) and fp["cpu_capability"] in describe(fp)
    assert differences(fp, {**fp, "cpu_capability": "AVX2"}) == [f"cpu_capability {fp['cpu_capability']} here, "
                                                                  "AVX2 there"]
    assert differences(fp, dict(fp)) == [] and cross_machine_advice(fp, fingerprint("cpu", threads=7)) == ""


@pytest.mark.parametrize("switch", ["MKL_CBWR=COMPATIBLE", "NUMBA_CPU_NAME=generic", "ONEDNN_MAX_CPU_ISA=AVX2"])
def test_dispatch_switches_are_part_of_the_kind(monkeypatch, switch):
    """Each switch changed some bits in benchmarks/portable_bits.py (NUMBA_CPU_NAME: the
    probe's columns, not θ_T), so each makes another kind."""
    key, value = switch.split("=")
    for name in ("MKL_CBWR", "NUMBA_CPU_NAME", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    plain = fingerprint("cpu")
    monkeypatch.setenv(key, value)
    switched = fingerprint("cpu")
    assert switched["dispatch_env"] == {key: value} and machine_id(switched) != machine_id(plain)
    assert switch in describe(switched)


def test_a_run_records_its_machine(tmp_path):
    run = train_pass(tiny_config(threads=1), tmp_path / "r", progress=False)
    recorded = json.loads((run.path / "run.json").read_text())["provenance"]["machine"]
    assert recorded == fingerprint("cpu", threads=1)
    assert run.meta.machine_kind == machine_id(fingerprint()) == recorded_kind(run.path)
    assert recorded_kind(tmp_path / "nothing-here") is None


def test_divergence_on_another_machine_kind_says_so_in_one_line(tmp_path, capsys):
    run = train_pass(tiny_config(epochs=3), tmp_path / "r", progress=False)
    plant_machine(run, **OTHER_CPU)
    nudge_checkpoint(run, 2)
    with pytest.raises(ReplayMismatchError) as caught:
        replay(run.path, progress=False)
    text = str(caught.value)
    assert "replay diverged from the recording" in text and "\n" not in text
    assert f"recorded on {OTHER_CPU['cpu']}" in text
    assert f"replaying on {fingerprint()['cpu']}" in text
    assert "bitwise replay needs the same CPU kind" in text and "rerun pass 1 here" in text
    # ... and the warning came before the work started.
    assert "was recorded on" in capsys.readouterr().err
    # The command line: the same, one line, exit 2.
    assert main(["analyze", str(run.path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gammatrace: error: replay diverged") and "bitwise replay needs the same CPU kind" in err[-1]


def test_divergence_on_the_same_machine_kind_blames_no_machine(tmp_path, capsys):
    run = train_pass(tiny_config(epochs=3), tmp_path / "r", progress=False)
    nudge_checkpoint(run, 2)
    with pytest.raises(ReplayMismatchError) as caught:
        replay(run.path, progress=False)
    assert "recorded on" not in str(caught.value) and "CPU kind" not in str(caught.value)
    assert "warning" not in capsys.readouterr().err


def test_a_run_from_another_kind_whose_bits_agree_replays_with_a_warning(tmp_path, capsys):
    run = train_pass(tiny_config(epochs=2), tmp_path / "r", progress=False)
    twin = train_pass(tiny_config(epochs=2), tmp_path / "twin", progress=False)
    plant_machine(run, **OTHER_CPU)
    replay(run.path, progress=False)  # the bits agree: verified, so accepted
    replay(twin.path, progress=False)
    steps = [RunStore(p).read_shards("analysis/last/steps") for p in (run.path, twin.path)]
    assert len(steps[0]) == 6 and steps[0].equals(steps[1])
    assert f"{run.path} was recorded on {OTHER_CPU['cpu']}" in capsys.readouterr().err


def test_a_run_that_names_no_machine_says_so_when_it_diverges(tmp_path):
    run = train_pass(tiny_config(epochs=3), tmp_path / "r", progress=False)
    meta = run.store.read_meta()
    run.store.update_meta(provenance={k: v for k, v in meta.provenance.items() if k != "machine"})
    nudge_checkpoint(run, 2)
    with pytest.raises(ReplayMismatchError, match="recorded on a machine the run does not name"):
        replay(run.path, progress=False)


def test_resume_on_another_machine_kind_is_refused_before_writing(tmp_path, capsys):
    cfg = tiny_config(epochs=4)
    run = train_pass(cfg, tmp_path / "r", progress=False, stop_after=2)
    assert run.status == "running"
    plant_machine(run, cpu_capability="AVX2")
    before = tree_hashes(run.path)
    with pytest.raises(OtherMachineError, match=r"cannot resume: recorded on .*AVX2.*resuming on .*"
                                                rf"{fingerprint()['cpu_capability']}.*resume it where it was recorded"):
        train_pass(cfg, run.path, progress=False)
    assert tree_hashes(run.path) == before
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(cfg))
    assert main(["run", str(config), "--out", str(run.path), "--quiet", "--no-report"]) == 2
    assert "cannot resume" in capsys.readouterr().err and tree_hashes(run.path) == before
    # On the recording's kind it resumes, and equals an uninterrupted run.
    plant_machine(run, cpu_capability=fingerprint()["cpu_capability"])
    resumed = train_pass(cfg, run.path, progress=False)
    whole = train_pass(cfg, tmp_path / "whole", progress=False)
    assert resumed.meta.final_sha256 == whole.meta.final_sha256
    assert RunStore(run.path).read_meta().machine_kind == machine_id(fingerprint())


def test_machine_command_prints_the_kind_and_its_ray_resource(capsys):
    assert main(["machine"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"machine kind {machine_id(fingerprint())}: ") and ray_resource(fingerprint()) in out
    assert main(["machine", "--ray"]) == 0
    assert json.loads(capsys.readouterr().out) == {ray_resource(fingerprint()): 1}
