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


def test_the_tree_keeps_every_contract() -> None:
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_coordinator_that_imports_the_page_breaks_the_contracts(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "src", tmp_path / "src")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    policy = tmp_path / "src/corral/coordinator/policy.py"
    policy.write_text(policy.read_text() + "\nfrom corral.web import schemas  # noqa\n")
    done = lint(tmp_path)
    assert done.returncode == 1
    assert "corral.coordinator.policy -> corral.web.schemas" in done.stdout
    assert "The coordinator is driven; it never knows the page BROKEN" in done.stdout


def test_a_store_import_in_the_protocol_breaks_the_contracts(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "src", tmp_path / "src")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    protocol = tmp_path / "src/corral/rpc/protocol.py"
    protocol.write_text(protocol.read_text() + "\nfrom corral.store import base  # noqa\n")
    done = lint(tmp_path)
    assert done.returncode == 1
    assert "The wire protocol and the probe know nothing of the store BROKEN" in done.stdout
