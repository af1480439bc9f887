"""The command line imports what a command needs when it runs, and nothing heavy before.

`corral --help`, `corral probe` and `corral discover` must not load the web stack (FastAPI,
Starlette, uvicorn), the Redis client (no --redis given), zeroconf (the mdns source does not run)
or httpx: each command runs in a fresh interpreter through a small wrapper that records
`sys.modules` once the command is done. Also: typer and rich stay inside corral.cli.
"""

from __future__ import annotations

import ast
import inspect
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from corral.cli import app as app_module
from corral.cli import options
from corral.cli.coordinator import run as coordinator_run
from corral.cli.plane import up
from corral.coordinator.policy import OnChange

HEAVY = ("fastapi", "starlette", "uvicorn", "redis", "zeroconf", "httpx")
SRC = Path(__file__).resolve().parent.parent / "src" / "corral"

# Runs `corral ARGS...` in this interpreter, then writes every module it loaded to the file
# named by the first argument; exits with the command's code.
WRAPPER = """
import json, sys
out, sys.argv = sys.argv[1], ["corral", *sys.argv[2:]]
code = 0
try:
    from corral.cli.app import main
    main()
except SystemExit as exc:
    code = exc.code
with open(out, "w") as f:
    json.dump(sorted(sys.modules), f)
sys.exit(code)
"""


def refused_port() -> int:
    """A loopback port nobody listens on: bound, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loaded(tmp_path: Path, *args: str, code: int = 0) -> set[str]:
    """The top-level packages loaded by `corral ARGS...` (run to the end, exit code checked)."""
    out = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == code, done.stdout + done.stderr
    modules: list[str] = json.loads(out.read_text())
    return {m.split(".")[0] for m in modules} | set(modules)


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(m for m in HEAVY if m in modules)


def test_help_imports_nothing_heavy(tmp_path: Path) -> None:
    modules = loaded(tmp_path, "--help")
    assert heavy_in(modules) == []
    assert "corral.plane" not in modules and "corral.web" not in modules


def test_version_builds_no_command(tmp_path: Path) -> None:
    modules = loaded(tmp_path, "--version")
    assert heavy_in(modules) == []
    commands = {m for m in modules if m.startswith("corral.cli.")}
    assert commands == {"corral.cli.app", "corral.cli.version"}


def test_probe_imports_nothing_heavy(tmp_path: Path) -> None:
    modules = loaded(tmp_path, "probe", f"127.0.0.1:{refused_port()}")
    assert heavy_in(modules) == []
    assert "corral.store.sqlite" not in modules  # probe keeps no memory


def test_discover_imports_nothing_heavy(tmp_path: Path) -> None:
    port = refused_port()
    modules = loaded(tmp_path, "discover", "--cidr", "127.0.0.1/32", "--port", str(port))
    assert heavy_in(modules) == []
    assert "corral.store.sqlite" in modules  # it ran to the end: results remembered
    assert "corral.store.redis" not in modules and "corral.net.mdns" not in modules


def test_backends_without_mdns_or_redis_imports_nothing_heavy(tmp_path: Path) -> None:
    port = refused_port()
    args = ("--sources", "file,scan,cache", "--cidr", "127.0.0.1/32", "--port", str(port))
    modules = loaded(tmp_path, "backends", *args)
    assert heavy_in(modules) == []


def test_the_check_sees_a_heavy_import_when_a_command_makes_one(tmp_path: Path) -> None:
    """The control: a dashboard refused at its bind check has loaded the web stack."""
    modules = loaded(tmp_path, "dashboard", "--host", "0.0.0.0", code=2)
    assert "fastapi" in modules


def test_defaults_agree_with_the_servers_they_are_for() -> None:
    from corral.llama import server as llama
    from corral.web import server as web

    assert (options.DASHBOARD_HOST, options.DASHBOARD_PORT) == (web.DEFAULT_HOST, web.DEFAULT_PORT)
    assert (options.LLAMA_HOST, options.LLAMA_PORT) == (llama.DEFAULT_HOST, llama.DEFAULT_PORT)
    assert get_args(options.OnChangeName) == tuple(c.value for c in OnChange)


@pytest.mark.parametrize("command", [coordinator_run, up])
def test_commands_with_coordinator_options_take_every_one(command: object) -> None:
    assert callable(command)
    params = inspect.signature(command).parameters
    assert [p for p in options.COORDINATOR_PARAMS if p not in params] == []


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_command_line_imports_typer_or_rich() -> None:
    outside = [
        f"{path.relative_to(SRC)}: {sorted(_imports(path) & {'typer', 'rich'})}"
        for path in sorted(SRC.rglob("*.py"))
        if "cli" not in path.relative_to(SRC).parts and _imports(path) & {"typer", "rich"}
    ]
    assert outside == []


@pytest.mark.parametrize("name", [*app_module.COMMANDS, *app_module.GROUPS])
def test_a_command_named_first_runs_as_in_the_whole_app(name: str) -> None:
    """main() builds only the command named first: its help and its usage errors are the same."""
    from typer.testing import CliRunner

    runner = CliRunner()
    narrow, full = app_module.make_app(name), app_module.make_app()
    for args in ([name, "--help"], [name, "--no-such-option"]):
        whole = runner.invoke(full, args, env={"COLUMNS": "120"})
        alone = runner.invoke(narrow, args, env={"COLUMNS": "120"})
        assert (alone.exit_code, alone.output) == (whole.exit_code, whole.output), args
