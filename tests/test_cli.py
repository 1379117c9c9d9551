"""The command line end to end: a small multi-run config trains, replays, analyses and
reports; the other commands print what they promise."""

from __future__ import annotations

import pytest
import yaml

import gammatrace
from gammatrace.cli import main
from tests.conftest import tiny_config


def test_run_multi_config_end_to_end(tmp_path, capsys):
    base = tiny_config()
    base.pop("name")
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(yaml.safe_dump({"base": base, "runs": {"relu": {"model": {"activation": "relu"}},
                                                          "tanh": {"model": {"activation": "tanh"}}}}))
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'out' / 'report' / 'report.html'}" in out
    for name in ("relu", "tanh"):
        run = gammatrace.load_run(tmp_path / "out" / name)
        assert run.status == "complete" and run.config.model.switches()["activation"] == name
    summary = (tmp_path / "out" / "report" / "summary.md").read_text()
    assert "| relu |" in summary and "| tanh |" in summary
    # Rerunning is a no-op resume, not a conflict.
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet", "--no-report"]) == 0


def test_analyze_prints_summary(tmp_path, capsys):
    gammatrace.train(tiny_config(), tmp_path / "r", progress=False)
    assert main(["analyze", str(tmp_path / "r"), "--tail", "1", "--quiet"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    s = gammatrace.load_run(tmp_path / "r").summary("last/tail=1")  # another tail: an analysis of its own
    assert int(lines["n_steps"]) == s["n_steps"] == 5
    assert float(lines["gamma_min"]) == pytest.approx(s["gamma_min"], rel=1e-5)


def test_models_prints_parameter_count(capsys):
    assert main(["models", "resnet18", "--num-classes", "10", "--norm", "all", "--skip", "all"]) == 0
    assert "11,173,962" in capsys.readouterr().out


def test_quickstart_preset_is_valid():
    from gammatrace.cli import _preset_path, expand_runs
    from gammatrace.config import load_yaml

    runs = expand_runs(load_yaml(_preset_path("quickstart")))
    assert set(runs) == {"relu", "tanh", "sigmoid"}
    for cfg in runs.values():
        cfg.check_names()


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    assert main(["run", "quickstart", "--out", str(tmp_path / "qs"), "--quiet"]) == 0
    s = gammatrace.load_run(tmp_path / "qs" / "sigmoid").summary()
    assert s["no_progress"] is True


def test_inspect_flags_vanishing_sigmoid(tmp_path, capsys):
    cfg = tmp_path / "deep.yaml"
    cfg.write_text(yaml.safe_dump({"base": {"data": {"name": "digits", "n_train": 128}, "batch_size": 64,
                                            "model": {"name": "mlp", "width": 32, "depth": 10}},
                                   "runs": {"sigmoid": {"model": {"activation": "sigmoid"}},
                                            "relu_kaiming": {"model": {"activation": "relu", "init": "kaiming_in"}}}}))
    assert main(["inspect", str(cfg), "--out", str(tmp_path / "insp")]) == 0
    out = capsys.readouterr().out
    # The table of each run, without its "figure: PATH" line (the path holds the test's name).
    sections = {part.split("\n", 1)[0].strip(): part.split("figure:")[0] for part in out.split("== ")[1:]}
    sigmoid, relu = sections["sigmoid"], sections["relu_kaiming"]
    assert "vanishing" in sigmoid and "vanishing" not in relu
    assert (tmp_path / "insp" / "inspect_sigmoid.png").stat().st_size > 1000


def _defaults(fn) -> dict:
    import inspect

    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_cli_options_are_the_functions_own_defaults(monkeypatch):
    """Issue 9.6: each option is defined once, by the function the command calls; the CLI
    takes its defaults (and help) from there. Changing a default in the function changes
    the CLI — shown by patching one."""
    from gammatrace.analysis import analyze, train
    from gammatrace.cli import build_parser
    from gammatrace.experiments.identity.study import run_identity_mapping
    from gammatrace.experiments.study import run_study
    from gammatrace.landscape.compute import LandscapeConfig

    p = build_parser()
    cases = [(["landscape", "r", "--out", "o"], LandscapeConfig, set()),
             (["study", "activation", "--out", "o"], run_study, {"progress"}),
             (["identity-mapping", "--out", "o"], run_identity_mapping, {"progress"}),
             (["analyze", "r"], analyze, {"progress", "tail", "ell_inf"}),
             (["run", "c.yaml", "--out", "o"], train, {"progress", "replay"})]
    for argv, fn, skip in cases:
        ns = vars(p.parse_args(argv))
        for name, default in _defaults(fn).items():
            if name not in skip:
                assert ns[name] == default, (argv[0], name)
    # tail and ell_inf default to "the run config's" (None), their help is AnalysisConfig's
    assert vars(p.parse_args(["analyze", "r"]))["tail"] is None

    class Patched(LandscapeConfig):
        grid: int = 7

    import gammatrace.landscape.cli as landscape_cli

    monkeypatch.setattr(landscape_cli, "LandscapeConfig", Patched)
    assert build_parser().parse_args(["landscape", "r", "--out", "o"]).grid == 7
