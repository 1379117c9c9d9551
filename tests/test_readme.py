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
