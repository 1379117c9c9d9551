"""Every command line the README shows still parses: each ``gammatrace SUBCOMMAND ...`` in
its shell blocks is run with ``--help`` through the CLI's ``main``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gammatrace.cli import main

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
