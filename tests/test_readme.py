"""Every command line the README shows still parses: each ``gammatrace SUBCOMMAND ...`` in
its shell blocks is run with ``--help`` through the CLI's ``main``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gammatrace.cli import main
from gammatrace.experiments.study import study_from_yaml

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    found = []
    for block in blocks:
        for line in block.splitlines():
            for m in re.finditer(r"(?:^|&&\s*|\s)(?:\.venv/bin/)?gammatrace\s+([a-z][a-z-]*)", line):
                found.append(m.group(1))
    return sorted(set(found))


def test_readme_shows_commands():
    assert {"study", "run", "analyze", "report"} <= set(readme_commands())


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert command in capsys.readouterr().out


def test_readme_study_yaml_builds(tmp_path):
    """The study YAML the README shows is a valid study: its cells, claims (one over a window)
    and paths build."""
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S) if "variants:" in b]
    path = tmp_path / "my_optimizers.yaml"
    path.write_text(block)
    study = study_from_yaml(path)
    assert sorted(study.cells) == ["adam", "momentum", "sgd"] and study.paths == ["momentum", "adam"]
    assert [c.first_epochs for c in study.claims] == [None, 20] and study.seeds == 4
    assert all(cfg.reference.kind == "continuation" for cfg in study.cells.values())


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            assert version, f"{path.name}: '{line}' is not pinned (an unpinned torch pulls a CUDA build)"
            pins[re.sub(r"\[.*\]", "", name).lower().replace("_", "-")] = version
    return pins


def test_requirements_pin_what_the_two_commands_need():
    """The first command installs requirements.txt: every core dependency, pinned (the main job
    needs nothing else); the test command adds requirements-dev.txt: every optional extra."""
    import tomllib

    root = README.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.match(r"[A-Za-z0-9_.-]+", r)[0].lower().replace("_", "-") for r in reqs}

    core, dev = _pins(root / "requirements.txt"), _pins(root / "requirements-dev.txt")
    assert names(project["dependencies"]) <= set(core) and core["torch"] == "2.13.0"
    extras = set().union(*(names(v) for v in project["optional-dependencies"].values()))
    assert extras <= set(dev) and not set(core) & set(dev)
    assert "-r requirements.txt" in (root / "requirements-dev.txt").read_text()
    lines = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[0].strip().splitlines()
    assert len(lines) == 2 and "-r requirements.txt " in lines[0] and "-r requirements-dev.txt " in lines[1]
    assert lines[1].split("-r requirements-dev.txt")[1] in (root / ".ci" / "run").read_text().replace("\\\n    ", "")
