"""The rooms' arrows hold: import-linter's contracts (pyproject.toml) pass on the tree, and
fail when an arrow is drawn the wrong way, so a passing check means something."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
LINT = str(Path(sys.executable).with_name("lint-imports"))


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}  # ahead of the editable install
    return subprocess.run(
        [LINT, "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def broken_copy(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the tree with `line` appended to `module` (a path under src/corral)."""
    shutil.copytree(ROOT / "src", tmp_path / "src")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "src/corral" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    return tmp_path


def test_the_tree_keeps_every_contract() -> None:
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_coordinator_that_imports_the_page_breaks_the_contracts(tmp_path: Path) -> None:
    done = lint(broken_copy(tmp_path, "coordinator/policy.py", "from corral.web import schemas"))
    assert done.returncode == 1
    assert "corral.coordinator.policy -> corral.web.schemas" in done.stdout
    assert "The coordinator is driven; it never knows the page BROKEN" in done.stdout


def test_a_store_import_in_the_protocol_breaks_the_contracts(tmp_path: Path) -> None:
    done = lint(broken_copy(tmp_path, "rpc/protocol.py", "from corral.store import base"))
    assert done.returncode == 1
    assert "The wire protocol and the probe know nothing of the store BROKEN" in done.stdout
