"""scripts/setup.sh installs what each README command needs and nothing more, without
recommended packages, does nothing on a machine already set up, and says how long each phase took.

A fresh machine cannot be had here, and the real installers would change this one, so the script
runs in a copy of the repository's layout with stand-ins for what it calls: apt-get, sudo and the
venv's python/pip and corral record their arguments; a tool counts as installed when its name is
on PATH. Everything else it runs (bash, awk, sha256sum, ...) is the real thing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORDER = '#!/bin/sh\necho "{name} $*" >> "{log}"\n{tail}'
REAL_TOOLS = ("bash", "date", "awk", "sha256sum", "cut", "cat", "env", "id", "dirname")
SYSTEM_TOOLS = ("cmake", "make", "g++", "redis-server", "chromium", "ip", "systemd-analyze")


class Machine:
    """A repository copy with stand-in installers; `run()` runs its setup.sh, returns the calls."""

    def __init__(self, tmp: Path) -> None:
        self.repo, self.bin, self.log = tmp / "repo", tmp / "bin", tmp / "calls.log"
        (self.repo / "scripts").mkdir(parents=True)
        shutil.copy(ROOT / "scripts" / "setup.sh", self.repo / "scripts" / "setup.sh")
        shutil.copy(ROOT / "pyproject.toml", self.repo / "pyproject.toml")
        self.bin.mkdir()
        for tool in REAL_TOOLS:
            real = shutil.which(tool)
            assert real, tool
            (self.bin / tool).symlink_to(real)
        venv_bin = self.repo / ".venv" / "bin"
        venv_bin.mkdir(parents=True)
        self.stub(self.bin / "apt-get", "apt-get")
        self.stub(self.bin / "sudo", "sudo", tail='exec "$@"\n')
        self.stub(self.bin / "python3", "python3")  # has ensurepip and venv
        self.stub(
            venv_bin / "python", "python", tail='if [ "$1" = -V ]; then echo "Python 3.11.7"; fi\n'
        )
        self.stub(venv_bin / "corral", "corral", tail='echo "/cache/llama.cpp/build/bin"\n')

    def stub(self, path: Path, name: str, tail: str = "") -> None:
        path.write_text(RECORDER.format(name=name, log=self.log, tail=tail))
        path.chmod(0o755)

    def install(self, *tools: str) -> None:
        for tool in tools:
            self.stub(self.bin / tool, tool)

    def run(self, *args: str) -> tuple[list[str], str]:
        self.log.unlink(missing_ok=True)
        done = subprocess.run(
            ["bash", str(self.repo / "scripts" / "setup.sh"), *args],
            env={"PATH": str(self.bin), "HOME": str(self.repo)},
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        calls = self.log.read_text().splitlines() if self.log.exists() else []
        return calls, done.stdout


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def apt_installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("apt-get install")]


def test_the_main_job_installs_build_tools_only_without_recommends(machine: Machine) -> None:
    calls, out = machine.run()
    assert apt_installs(calls) == ["apt-get install -y -q --no-install-recommends cmake make g++"]
    assert "python -m pip install -q -e ." in calls  # no dev extras
    assert "corral llama install" in calls
    assert "setup: llama.cpp binaries in /cache/llama.cpp/build/bin" in out
    last = out.splitlines()[-1]
    assert last.startswith("setup: took system packages ") and "llama.cpp" in last, out


def test_the_test_setup_adds_the_test_services_without_recommends(machine: Machine) -> None:
    calls, _ = machine.run("--tests")
    assert apt_installs(calls) == [
        "apt-get install -y -q --no-install-recommends "
        "cmake make g++ redis-server chromium iproute2 systemd"
    ]
    assert "python -m pip install -q -e .[dev]" in calls


def test_a_machine_already_set_up_is_only_checked(machine: Machine) -> None:
    machine.install(*SYSTEM_TOOLS)
    first, _ = machine.run("--tests")
    assert apt_installs(first) == [] and not [c for c in first if c.startswith("apt-get")]
    assert "python -m pip install -q -e .[dev]" in first
    again, _ = machine.run("--tests")
    assert [c for c in again if "pip install" in c] == []  # pyproject.toml unchanged
    main_job, _ = machine.run()
    assert [c for c in main_job if "pip install" in c] == []  # the test set-up covers it
    assert "corral llama install" in main_job  # the cache is asked every time (it answers fast)
    pyproject = machine.repo / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + "\n# a new dependency, say\n")
    changed, _ = machine.run("--tests")
    assert "python -m pip install -q -e .[dev]" in changed


def test_without_root_it_asks_sudo(machine: Machine) -> None:
    (machine.bin / "id").unlink()
    machine.stub(machine.bin / "id", "id", tail="echo 1000\n")
    calls, _ = machine.run()
    assert "sudo apt-get update -q" in calls
    assert (
        "sudo env DEBIAN_FRONTEND=noninteractive "
        "apt-get install -y -q --no-install-recommends cmake make g++" in calls
    )
