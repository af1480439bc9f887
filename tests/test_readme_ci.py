"""The README's quickstart is two commands, and CI runs exactly the second one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command_and_nothing_else() -> None:
    commands = quickstart_commands()
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"], commands
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    steps = [line.strip() for line in ci if line.strip() and not line.lstrip().startswith("#")]
    # Strict mode, then the README's command and nothing else.
    assert steps == ["set -euo pipefail", commands[1]], steps
    for command in commands:
        assert (ROOT / command.split()[1]).is_file(), command
