"""corral.toml: flags over environment over file over defaults, key by key; every mistake in
the file named by file, line and key, exit 1, before anything starts; where the file is looked
for; only the commands that take it read it.

The precedence table runs `corral config SECTION --json -- FLAGS` in this process (typer's
runner over the real app: the same parsing as the console script, a few milliseconds a run);
lookup, bounds and the commands' own behaviour run the installed `corral` script as a
subprocess. Nothing here is faked.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from corral.cli.app import make_app
from corral.cli.config_file import MAX_BYTES
from corral.cli.configured import NOT_IN_FILE, SECTIONS, Commands, command_for, file_keys
from corral.cli.toml_lines import key_lines, line_of
from tests.support.corral_cli import corral, corral_script, isolated_env
from tests.support.loopback import free_port
from tests.support.waiting import until

# --- helpers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dirs:
    xdg: Path  # XDG_CONFIG_HOME
    system: Path  # CORRAL_SYSTEM_CONFIG_DIR, standing in for /etc/corral

    @property
    def user_file(self) -> Path:
        return self.xdg / "corral" / "corral.toml"

    @property
    def system_file(self) -> Path:
        return self.system / "corral.toml"

    def env(self, **extra: str | None) -> dict[str, str | None]:
        """For the in-process runner: None unsets (nothing of the caller's leaks in)."""
        base: dict[str, str | None] = {
            "XDG_CONFIG_HOME": str(self.xdg),
            "CORRAL_SYSTEM_CONFIG_DIR": str(self.system),
            "COLUMNS": "200",
        }
        unset = [k for k in os.environ if k.startswith(("CORRAL_", "SOLLOL_"))]
        return {**dict.fromkeys(unset), **base, **extra}


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    return Dirs(tmp_path / "xdg", tmp_path / "etc_corral")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run_config(env: dict[str, str | None], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(make_app(), ["config", *args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def settings(env: dict[str, str | None], section: str, *flags: str) -> dict[str, Any]:
    code, out, err = run_config(env, section, "--json", "--", *flags)
    assert code == 0, err
    shown: dict[str, Any] = json.loads(out)[section]
    return shown


# --- precedence, key by key -----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    section: str
    key: str
    default: object
    toml: str  # the value as written in the file
    from_file: object
    flags: tuple[str, ...]  # () for a flag that cannot be turned back (--insecure)
    from_flag: object = None
    env: tuple[str, str] | None = None  # variable, value
    from_env: object = None


CASES = [
    Case("up", "port", 8080, "9001", 9001, ("--port", "9002"), 9002),  # int, ranged
    Case("coordinator", "debounce", 10.0, "2.5", 2.5, ("--debounce", "4"), 4.0),  # float
    Case("node", "mdns", True, "false", False, ("--mdns",), True),  # bool pair, on by default
    Case(
        "up", "include-loopback", False, "true", True, ("--no-include-loopback",), False
    ),  # bool pair, off by default
    Case("up", "insecure", False, "true", True, ()),  # bool, a flag alone
    Case("node", "devices", None, '"Vulkan0"', "Vulkan0", ("--devices", "CPU"), "CPU"),  # str
    Case(
        "coordinator",
        "backend",
        [],
        '["127.0.0.1:50052", "10.0.0.2:50052"]',
        ["127.0.0.1:50052", "10.0.0.2:50052"],
        ("--backend", "127.0.0.1:50099"),
        ["127.0.0.1:50099"],
    ),  # list: a repeatable option
    Case("up", "on-change", "restart", '"ignore"', "ignore", ("--on-change", "restart"), "restart"),
    Case(
        "coordinator",
        "extra",
        [],
        '["--flash-attn", "on"]',
        ["--flash-attn", "on"],
        ("--", "-lv", "4"),
        ["-lv", "4"],
    ),  # llama-server's own flags, the argument after --
    Case(
        "node",
        "redis",
        None,
        '"redis://file.invalid:6379"',
        "redis://file.invalid:6379",
        ("--redis", "redis://flag.invalid:6379"),
        "redis://flag.invalid:6379",
        ("CORRAL_REDIS_URL", "redis://env.invalid:6379"),
        "redis://env.invalid:6379",
    ),  # str with an environment variable
    Case(
        "coordinator",
        "redis",
        None,
        '"redis://file.invalid:6379"',
        "redis://file.invalid:6379",
        ("--redis", "redis://flag.invalid:6379"),
        "redis://flag.invalid:6379",
        ("SOLLOL_REDIS_URL", "redis://old.invalid:6379"),
        "redis://old.invalid:6379",
    ),  # the older variable's name
    Case(
        "coordinator",
        "model",
        None,
        '"/models/file.gguf"',
        "/models/file.gguf",
        ("--model", "/models/flag.gguf"),
        "/models/flag.gguf",
        ("CORRAL_MODEL", "/models/env.gguf"),
        "/models/env.gguf",
    ),  # a path
    Case(
        "up",
        "backends-file",
        None,
        '"/srv/file.conf"',
        "/srv/file.conf",
        ("--backends-file", "/srv/flag.conf"),
        "/srv/flag.conf",
        ("CORRAL_BACKENDS_FILE", "/srv/env.conf"),
        "/srv/env.conf",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.section}-{c.key}")
def test_flag_over_env_over_file_over_default(case: Case, dirs: Dirs) -> None:
    key = case.key
    default = settings(dirs.env(), case.section)
    assert default["file"] is None
    assert default["settings"][key] == {"value": case.default, "source": "default", "where": None}

    # Line 4: the comment and the blank line before the table count.
    write(dirs.user_file, f"# corral\n\n[{case.section}]\n{key} = {case.toml}\n")
    filed = settings(dirs.env(), case.section)
    assert filed["file"] == str(dirs.user_file)
    where = f"{dirs.user_file}:4"
    assert filed["settings"][key] == {"value": case.from_file, "source": "file", "where": where}

    env = dirs.env()
    if case.env is not None:
        variable, value = case.env
        env = dirs.env(**{variable: value})
        envd = settings(env, case.section)["settings"][key]
        assert envd == {"value": case.from_env, "source": "env", "where": variable}

    if case.flags:
        flagged = settings(env, case.section, *case.flags)["settings"][key]
        flag = "after --" if case.flags[0] == "--" else case.flags[0]
        assert flagged == {"value": case.from_flag, "source": "flag", "where": flag}


def test_top_level_keys_reach_every_command_that_takes_them_and_a_section_wins(
    dirs: Dirs,
) -> None:
    conf = write(
        dirs.user_file,
        'redis = "redis://top.invalid:6379"\n'
        "debounce = 3.0\n"
        "\n"
        "[node]\n"
        'redis = "redis://node.invalid:6379"\n',
    )
    up, node, run = (settings(dirs.env(), s)["settings"] for s in ("up", "node", "coordinator"))
    top = {"value": "redis://top.invalid:6379", "source": "file", "where": f"{conf}:1"}
    assert up["redis"] == top and run["redis"] == top
    assert node["redis"] == {
        "value": "redis://node.invalid:6379",
        "source": "file",
        "where": f"{conf}:5",
    }
    assert up["debounce"]["value"] == run["debounce"]["value"] == 3.0  # both run a coordinator


def test_the_table_says_where_each_value_came_from(dirs: Dirs) -> None:
    conf = write(dirs.user_file, "[up]\nport = 9001\n")
    code, out, err = run_config(dirs.env(CORRAL_MODEL="/m.gguf"), "up", "--", "--recheck", "3")
    assert code == 0, err
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert f"file {conf}:2" in rows["port"] and "9001" in rows["port"]
    assert "env CORRAL_MODEL" in rows["model"]
    assert "flag --recheck" in rows["recheck"]
    assert "default" in rows["host"]


def test_every_option_of_the_three_commands_has_one_key() -> None:
    """Options others add are in the file at once: each has a key, no two share one."""
    for section in SECTIONS:
        command = command_for(section)
        params = [p for p in command.params if p.name not in NOT_IN_FILE]
        assert len(file_keys(command)) == len(params), section


def test_host_and_port_are_never_top_level_keys() -> None:
    shared = Commands().shared()
    assert "redis" in shared and "model" in shared
    assert not {"host", "port", "config"} & set(shared)


# --- a bad file: file, line and key named, exit 1 -------------------------------------------------

BAD = [
    ("syntax", "[up]\nport = \n", ":2: key 'port': invalid TOML"),
    ("unknown key", "[up]\n\nprot = 1\n", ":3: [up] prot: unknown key (did you mean 'port'?)"),
    ("underscores", "[coordinator]\nctx_size = 1\n", ":2: [coordinator] ctx_size: unknown key"),
    ("other section's key", "[up]\nmdns = false\n", ":2: [up] mdns: unknown key (an option of"),
    ("unknown section", "[upp]\nport = 1\n", ":1: [upp]: unknown section (did you mean [up]?)"),
    ("top-level host", "port = 1\n", ":1: port: not a top-level key: set it under [up]"),
    ("string for int", '[up]\nport = "80"\n', ":2: [up] port: expected an integer, got a string"),
    ("float for int", "[up]\ngpu-layers = 2.5\n", ":2: [up] gpu-layers: expected an integer"),
    ("out of range", "[node]\nport = 70000\n", ":2: [node] port: 70000 is not in the range"),
    ("below the minimum", "[up]\nrecheck = 0\n", ":2: [up] recheck: 0.0 is not in the range 0.1"),
    ("bad choice", '[up]\non-change = "often"\n', ":2: [up] on-change: 'often' is not one of"),
    ("string for bool", '[node]\nmdns = "no"\n', ":2: [node] mdns: expected true or false"),
    ("string for list", '[up]\nbackend = "a:1"\n', ":2: [up] backend: expected an array of"),
    ("int in a list", "[up]\nscan-port = [1, true]\n", ":2: [up] scan-port: expected an array"),
    ("not a table", "up = 3\n", ":1: up: expected a table [up]"),
    (
        "after a multi-line string",
        '[coordinator]\ntensor-split = """\nprot = 1\n"""\nprot = 2\n',
        ":5: [coordinator] prot: unknown key",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_file_names_file_line_and_key(dirs: Dirs, text: str, expected: str) -> None:
    conf = write(dirs.user_file, text)
    code, out, err = run_config(dirs.env(), "up", "--json")
    assert code == 1 and out == ""
    assert f"{conf}{expected}" in err.replace("\n", "")


def test_every_mistake_is_listed_with_a_count(dirs: Dirs) -> None:
    conf = write(dirs.user_file, '[up]\nport = "x"\nprot = 1\n[node]\nheartbeat = 100\n')
    code, _, err = run_config(dirs.env(), "node")
    assert code == 1
    lines = err.replace("\n ", " ").splitlines()  # rich may wrap; one message per "error:"
    assert [line.split(": ")[1] for line in lines] == [
        f"{conf}:2",
        f"{conf}:3",
        f"{conf}:5",
        str(conf),
    ]
    assert lines[-1].endswith("3 errors")


def test_bounds_size_directory_and_encoding(dirs: Dirs) -> None:
    write(dirs.user_file, "# x\n" * (MAX_BYTES // 4 + 1))
    code, _, err = run_config(dirs.env(), "up")
    assert code == 1 and "larger than 1048576 bytes" in err

    dirs.user_file.unlink()
    dirs.user_file.mkdir()  # a directory where the file is looked for is an error, not skipped
    code, _, err = run_config(dirs.env(), "up")
    assert code == 1 and f"{dirs.user_file}: not a regular file" in err

    code, _, err = run_config(dirs.env(), "up", "--config", str(write_bytes(dirs)))
    assert code == 1 and ":3: key 'sources': not UTF-8 text" in err

    deep = write(dirs.xdg / "deep.toml", "x = " + "[" * 100_000)
    code, _, err = run_config(dirs.env(), "up", "--config", str(deep))
    assert code == 1 and str(deep) in err


def write_bytes(dirs: Dirs) -> Path:
    path = dirs.xdg / "latin1.toml"
    path.write_bytes(b'[up]\nport = 9001\nsources = "caf\xe9"\n')
    return path


async def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "corral.toml"
    os.mkfifo(fifo)
    run = await corral("config", "up", "--config", str(fifo), env=isolated_env(tmp_path / "s"))
    assert run.code == 1 and f"{fifo}: not a regular file" in run.err


# --- where the file is looked for ----------------------------------------------------------------


async def test_lookup_order_flag_env_user_system(tmp_path: Path) -> None:
    env = isolated_env(tmp_path / "state")
    dirs = Dirs(Path(env["XDG_CONFIG_HOME"]), Path(env["CORRAL_SYSTEM_CONFIG_DIR"]))

    async def port_and_file(*args: str, **extra: str) -> tuple[int, str | None]:
        run = await corral("config", "up", "--json", *args, env=env | extra)
        assert run.code == 0, run.err
        up = json.loads(run.out)["up"]
        return up["settings"]["port"]["value"], up["file"]

    assert await port_and_file() == (8080, None)
    write(dirs.system_file, "[up]\nport = 9001\n")
    assert await port_and_file() == (9001, str(dirs.system_file))
    write(dirs.user_file, "[up]\nport = 9002\n")
    assert await port_and_file() == (9002, str(dirs.user_file))
    named = write(tmp_path / "named.toml", "[up]\nport = 9003\n")
    assert await port_and_file(CORRAL_CONFIG=str(named)) == (9003, str(named))
    flagged = write(tmp_path / "flagged.toml", "[up]\nport = 9004\n")
    got = await port_and_file("--config", str(flagged), CORRAL_CONFIG=str(named))
    assert got == (9004, str(flagged))


async def test_a_named_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    env = isolated_env(tmp_path / "state")
    missing = tmp_path / "nope.toml"
    run = await corral("node", "--config", str(missing), env=env)
    assert run.code == 1 and f"{missing}: no such file (given by --config)" in run.err
    run = await corral("coordinator", "run", env=env | {"CORRAL_CONFIG": str(missing)})
    assert run.code == 1 and f"{missing}: no such file (given by CORRAL_CONFIG)" in run.err


async def test_only_up_node_and_coordinator_run_read_the_file(tmp_path: Path) -> None:
    """A broken file stops them, and nothing else: not --help, not probe."""
    env = isolated_env(tmp_path / "state")
    conf = write(Path(env["XDG_CONFIG_HOME"]) / "corral" / "corral.toml", "[up\n")
    for args in (["up"], ["node", "--attach"], ["coordinator", "run"]):
        run = await corral(*args, env=env)
        assert run.code == 1 and f"{conf}:1" in run.err, (args, run.err)
    assert (await corral("up", "--help", env=env)).code == 0
    run = await corral("probe", f"127.0.0.1:{free_port('127.0.0.1')}", "--json", env=env)
    assert run.code == 0 and json.loads(run.out)[0]["status"] == "offline"


def test_help_imports_no_toml_parser(tmp_path: Path) -> None:
    from tests.test_cli_imports import loaded

    modules = loaded(tmp_path, "--help")
    assert "tomllib" not in modules and "corral.cli.config_file" not in modules


# --- the commands themselves --------------------------------------------------------------------


async def test_coordinator_run_refuses_a_bad_port_in_the_file_before_starting(
    tmp_path: Path,
) -> None:
    env = isolated_env(tmp_path / "state")
    conf = write(tmp_path / "c.toml", "[coordinator]\nmin-backends = 1\nport = 0\n")
    run = await corral("coordinator", "run", "--config", str(conf), env=env)
    assert run.code == 1
    assert f"{conf}:3: [coordinator] port: 0 is not in the range 1<=x<=65535" in run.err
    assert not (tmp_path / "state" / "corral").exists()  # no pidfile, no log: nothing started


async def test_up_listens_on_the_port_the_file_gives(tmp_path: Path) -> None:
    env = isolated_env(tmp_path / "state")
    port = free_port("127.0.0.1")
    backends = write(tmp_path / "rpc_backends.conf", "")
    write(
        Path(env["XDG_CONFIG_HOME"]) / "corral" / "corral.toml",
        f'[up]\nport = {port}\nsources = "file"\nbackends-file = "{backends}"\n',
    )
    proc = await asyncio.create_subprocess_exec(
        corral_script(),
        "up",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def answers() -> bool:
            if proc.returncode is not None:
                assert proc.stderr is not None
                raise AssertionError(f"corral up exited: {(await proc.stderr.read()).decode()}")
            try:
                async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
                    reply = await client.get(f"http://127.0.0.1:{port}/healthz")
            except httpx.HTTPError:
                return False
            return reply.status_code == 200

        await until(answers, 30, f"corral up's dashboard on port {port} (from the file)")
        proc.send_signal(signal.SIGTERM)  # by PID: the process this test started
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- where each key is (pure) ---------------------------------------------------------------------


def test_key_lines_follow_tables_dotted_keys_and_skip_values() -> None:
    text = (
        "top = 1  # [not a table]\n"  # 1
        "[up]\n"  # 2
        'sources = "a#b"\n'  # 3
        "backend = [\n"  # 4
        '  "x:1",  # port = 3\n'  # 5
        "]\n"  # 6
        "tensor-split = '''\n"  # 7
        "[node]\n"  # 8
        "'''\n"  # 9
        "coordinator.port = 5\n"  # 10
        '[ "node" ]\n'  # 11
        "inline = { port = 1 }\n"  # 12
        'esc = "q\\"port = 2"\n'  # 13
    )
    lines = key_lines(text)
    assert lines[("top",)] == 1
    assert lines[("up",)] == 2
    assert lines[("up", "sources")] == 3
    assert lines[("up", "backend")] == 4
    assert lines[("up", "tensor-split")] == 7
    assert lines[("up", "coordinator", "port")] == 10
    assert lines[("node",)] == 11
    assert line_of(lines, ("node", "inline", "port")) == 12  # inside an inline table: its line
    assert lines[("node", "esc")] == 13
    assert ("up", "port") not in lines and ("node", "port") not in lines


def test_the_readme_example_is_a_valid_file(dirs: Dirs) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Configuration", 1)[1].split("\n### ", 1)[0]
    example = write(dirs.xdg / "readme.toml", section.split("```toml\n", 1)[1].split("```")[0])
    code, out, err = run_config(dirs.env(), "--json", "--config", str(example))
    assert code == 0, err
    shown = json.loads(out)
    assert {s: shown[s]["settings"]["redis"]["source"] for s in SECTIONS} == dict.fromkeys(
        SECTIONS, "file"
    )
    assert shown["node"]["settings"]["mdns"]["value"] is False
