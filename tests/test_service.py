"""`corral service node|up`: the systemd units, their environment files, and READY=1.

`systemd-analyze verify` (systemd 252 here; systemd is not PID 1 in this container) checks a unit
offline, from a file in any directory: it parses every line and checks that ExecStart's program
exists and is executable, which it resolves through systemd's own quoting and specifier rules.
It exits 0 on mere warnings (an unknown key, an unknown escape), so the tests also require that
it says nothing at all about the unit. It does not check that the user exists, nor the
environment file. A unit that runs is not checked here: nothing can start one without systemd.

The readiness tests listen on a real AF_UNIX datagram socket (NOTIFY_SOCKET) while a real
`corral up` (with a real ggml-rpc-server and llama-server) or `corral node` (with the
ggml-rpc-server it starts) runs, and look at what it serves the moment READY=1 arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.net.notify import Notifier, NotifyAddressError, notify_address
from corral.rpc.probe import Prober
from corral.service.unit import (
    UnitError,
    UnitSpec,
    exec_line,
    parse_env_file,
    quote_word,
    render_env_file,
    render_unit,
)
from corral.types import Status
from tests.support.corral_cli import corral, corral_script, isolated_env
from tests.support.corral_up import children_of, corral_up
from tests.support.loopback import free_port, next_loopback
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until

SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
NASTY = [
    "with space",
    "it's",
    'say "hi"',
    "back\\slash",
    "per%cent%%n",
    "semi;colon",
    ";",
    "tab\there",
    "new\nline",
    "ünï模型",
    "c1\u0085ls\u2028",
    "dollar$HOME${X}",
    "",
    "-dash",
    "trailing\\",
]

needs_analyze = pytest.mark.skipif(
    not Path(SYSTEMD_ANALYZE).is_file() and not os.environ.get("CI"),
    reason="systemd-analyze is not installed",
)


def verify(unit: Path) -> None:
    """`systemd-analyze verify` passes on `unit` and has nothing to say about it."""
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    said = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and said == [], f"exit {done.returncode}:\n{done.stderr}"


def systemd_words(value: str) -> list[str]:
    """A model of how systemd reads a command line (systemd.syntax(7), systemd.service(5)):
    continued lines joined, `%%` is `%`, words split at whitespace, double or single quotes,
    C escapes; then `$$` is `$` in the arguments (not in the program's path)."""
    text = value.replace("\\\n", " ").replace("%%", "%")
    escapes = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r", "s": " "}
    words: list[str] = []
    i = 0
    while i < len(text):
        if text[i] in " \t\n":
            i += 1
            continue
        word: list[str] = []
        quote: str | None = None
        while i < len(text) and (quote is not None or text[i] not in " \t\n"):
            ch = text[i]
            if ch == "\\" and text[i + 1] == "x":
                word.append(chr(int(text[i + 2 : i + 4], 16)))
                i += 4
                continue
            if ch == "\\":
                word.append(escapes[text[i + 1]])
                i += 2
                continue
            if quote is None and ch in "\"'":
                quote = ch
            elif ch == quote:
                quote = None
            else:
                word.append(ch)
            i += 1
        assert quote is None, f"unbalanced quotes in {value!r}"
        words.append("".join(word))
    return words[:1] + [w.replace("$$", "$") for w in words[1:]]


def exec_start(unit: str) -> list[str]:
    """ExecStart='s words, as systemd reads them (continued lines included)."""
    start = unit.index("\nExecStart=") + len("\nExecStart=")
    end = start
    while unit[end] != "\n" or unit[end - 1] == "\\":
        end += 1
    return systemd_words(unit[start:end])


def directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", " ")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


# --- quoting -------------------------------------------------------------------------------------


def program_named(tmp_path: Path, n: int, word: str) -> Path:
    directory = tmp_path / f"d{n}"
    directory.mkdir()
    program = directory / word
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    return program


@needs_analyze
def test_the_program_path_round_trips_through_systemds_own_parser(tmp_path: Path) -> None:
    """systemd resolves ExecStart's program through its quoting, escapes and specifiers and
    checks it exists: so a program named after each word verifies only if it came back exactly.
    The same path without the specifier escapes does not (the check can fail). Paths systemd
    refuses whatever the quoting (quotes, backslashes, control characters) are refused first."""
    unescaped_fails = 0
    for n, word in enumerate(w for w in NASTY if w):
        program = program_named(tmp_path, n, word)
        spec = UnitSpec("node", (str(program), "node"), tmp_path / "corral-node.env")
        unit = tmp_path / f"corral-node-{n}.service"
        if any(ch in "\"'\\" or ord(ch) < 0x20 for ch in word):
            with pytest.raises(UnitError, match="systemd refuses"):
                render_unit(spec)
            unit.write_text(f"[Service]\nExecStart={quote_word(str(program))}\n")
            with pytest.raises(AssertionError, match="special characters"):
                verify(unit)  # and so does systemd
            continue
        unit.write_text(render_unit(spec))
        verify(unit)
        if "%" in word:
            unit.write_text(render_unit(spec).replace("%%", "%"))
            with pytest.raises(AssertionError):
                verify(unit)
            unescaped_fails += 1
    assert unescaped_fails >= 1


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0")),
        max_size=6,
    )
)
def test_arguments_round_trip(args: list[str]) -> None:
    argv = ["/usr/bin/corral", *args]
    assert systemd_words(exec_line(argv)) == argv


def test_dollar_and_percent_are_escaped_the_systemd_way() -> None:
    assert quote_word("a$b") == '"a$$b"'  # else systemd substitutes $b
    assert quote_word("a$b", substitute_env=False) == '"a$b"'
    assert quote_word("100%") == '"100%%"'  # else a specifier
    assert quote_word("--port") == "--port"
    assert quote_word("") == '""'
    with pytest.raises(UnitError, match="absolute path"):
        exec_line(["corral", "up"])
    with pytest.raises(UnitError, match="UTF-8"):
        quote_word("bad\udcff")


# --- the units the command writes --------------------------------------------------------------


UNITS = {
    "node-defaults": ["node"],
    "node-options": ["node", "--host", "127.0.0.1", "--port", "50099", "--threads", "2"],
    "node-low-port": ["node", "--port", "999", "--no-mdns", "--redis", "redis://:pw@h:6379/0"],
    "node-attach": ["node", "--attach", "--register", "http://198.18.0.1:8080"],
    "up-defaults": ["up"],
    "up-no-scan": ["up", "--sources", "file,registry", "--backends-file", "b.conf"],
    "up-model": ["up", "--model", "MODEL", "--host", "0.0.0.0", "--cidr", "198.18.0.0/24"],
    "up-extra": ["up", "--model", "MODEL", "--", "--temp", "0.5", "-fa", "on", "a b$c"],
    "up-hub": ["up", "--model", "hf:owner/repo/tiny 100%.gguf"],
}


@needs_analyze
@pytest.mark.parametrize("name", sorted(UNITS))
async def test_every_unit_passes_systemd_analyze_verify(
    name: str, tmp_path: Path, tiny_model: Path
) -> None:
    model = tmp_path / 'my model\'s "v2" 100%.gguf'
    await asyncio.to_thread(shutil.copyfile, tiny_model, model)
    args = [str(model) if a == "MODEL" else a for a in UNITS[name]]
    run = await corral("service", *args, env=isolated_env(tmp_path / "state"), cwd=tmp_path)
    assert run.code == 0, run.err
    unit = tmp_path / f"corral-{args[0]}.service"
    unit.write_text(run.out)
    verify(unit)
    found = directives(run.out)
    assert found["Type"] == ["notify"] and found["User"] == ["corral"]
    assert found["StateDirectory"] == ["corral"] and found["CacheDirectory"] == ["corral"]
    assert found["EnvironmentFile"] == [f"/etc/corral/corral-{args[0]}.env"]
    env = dict(e.split("=", 1) for e in found["Environment"])
    assert env["XDG_STATE_HOME"] == "/var/lib" and env["XDG_CACHE_HOME"] == "/var/cache"
    assert env["LLAMA_CACHE"] == "/var/cache/corral/llama.cpp"
    families = found["RestrictAddressFamilies"][0].split()
    caps = found["CapabilityBoundingSet"][0].split()
    scans = args[0] == "up" and "--sources" not in args
    assert ("AF_PACKET" in families) == scans and ("CAP_NET_RAW" in caps) == scans
    assert ("CAP_NET_BIND_SERVICE" in caps) == ("999" in args)
    assert "pw@" not in run.out  # the Redis URL goes to the environment file
    words = exec_start(run.out)
    assert Path(words[0]).is_absolute() and os.access(words[0], os.X_OK)
    assert words[1] == args[0]


async def test_the_options_mean_the_same_to_the_command(tmp_path: Path, tiny_model: Path) -> None:
    """Parsed back from the unit, the command line gives `corral up` the values given
    (relative paths made absolute: a service starts in its own directory)."""
    from corral.cli.service import target_command

    model = tmp_path / "dir with space" / 'it\'s "v2" 100% $HOME.gguf'
    model.parent.mkdir()
    await asyncio.to_thread(shutil.copyfile, tiny_model, model)
    given_args = [
        "--model", str(model), "--backends-file", "rel/backends.conf", "--port", "8081",
        "--cidr", "198.18.0.0/24", "--cidr", "198.19.0.0/24", "--no-local-fallback",
        "--debounce", "0.5", "--", "--temp", "0.5", "a b;c\n$d",
    ]  # fmt: skip
    run = await corral(
        "service", "up", *given_args, env=isolated_env(tmp_path / "state"), cwd=tmp_path
    )
    assert run.code == 0, run.err
    words = exec_start(run.out)
    assert words[1] == "up"
    ctx = target_command("up").make_context("up", words[2:])
    assert Path(ctx.params["model"]) == model  # typer makes it a Path when it calls up()
    assert ctx.params["backends_file"] == str(tmp_path / "rel/backends.conf")
    assert ctx.params["port"] == 8081 and ctx.params["debounce"] == 0.5
    assert list(ctx.params["cidr"]) == ["198.18.0.0/24", "198.19.0.0/24"]
    assert ctx.params["local_fallback"] is False
    assert list(ctx.params["extra"]) == ["--temp", "0.5", "a b;c\n$d"]
    sources = {n: ctx.get_parameter_source(n) for n in ctx.params}
    defaults = {n for n, source in sources.items() if source and source.name == "DEFAULT"}
    assert "host" in defaults and "recheck" in defaults  # what was not given is not written


async def test_a_configuration_file_is_named_not_copied(tmp_path: Path) -> None:
    """The service reads the file itself (editing it later counts): its values are not made
    flags, which would override it."""
    (tmp_path / "corral.toml").write_text("[up]\nport = 8090\nrecheck = 3.0\n")
    env = isolated_env(tmp_path / "state")
    run = await corral(
        "service", "up", "--config", "corral.toml", "--recheck", "5", env=env, cwd=tmp_path
    )
    assert run.code == 0, run.err
    words = exec_start(run.out)
    assert words[2:] == ["--config", str(tmp_path / "corral.toml"), "--recheck", "5.0"]


async def test_a_hub_token_goes_to_the_environment_file(tmp_path: Path) -> None:
    where = [
        "--unit-dir",
        str(tmp_path / "u"),
        "--env-dir",
        str(tmp_path / "e"),
        "--user",
        "daemon",
    ]
    env = {**isolated_env(tmp_path / "state"), "CORRAL_TOKEN": "t" * 32, "HF_TOKEN": "hf_secret"}
    run = await corral("service", "up", "--install", *where, "--model", "hf:o/r/m.gguf", env=env)
    assert run.code == 0, run.err
    unit = (tmp_path / "u" / "corral-up.service").read_text()
    assert "hf_secret" not in unit and exec_start(unit)[2:] == ["--model", "hf:o/r/m.gguf"]
    assert parse_env_file((tmp_path / "e" / "corral-up.env").read_text())["HF_TOKEN"] == "hf_secret"


async def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    env = isolated_env(tmp_path / "state")
    unit_dir = tmp_path / "units"
    common = ["--install", "--unit-dir", str(unit_dir), "--env-dir", str(tmp_path / "etc")]
    run = await corral("service", "node", "--host", "0.0.0.0", *common, env=env)
    assert run.code == 2 and "--allow-any-address" in run.err
    run = await corral("service", "up", "--model", str(tmp_path / "none.gguf"), *common, env=env)
    assert run.code == 2 and "no such file" in run.err
    run = await corral("service", "up", "--port", "0", *common, env=env)
    assert run.code == 2 and "--port" in run.err
    run = await corral(
        "service", "up", *common, "--user", "daemon", env={**env, "CORRAL_TOKEN": "a'b"}
    )
    assert run.code == 2 and "CORRAL_TOKEN" in run.err and "single quote" in run.err
    for user in ("root", "nobody"):
        run = await corral("service", "node", *common, "--user", user, env=env)
        assert run.code == 2 and "a user of its own" in run.err
    assert not unit_dir.exists()


# --- --install ---------------------------------------------------------------------------------


@needs_analyze
async def test_install_keeps_the_secrets_in_a_root_only_file(tmp_path: Path) -> None:
    env = isolated_env(tmp_path / "state")
    token = secrets.token_urlsafe(24)
    unit_dir, env_dir = tmp_path / "units", tmp_path / "etc" / "corral"
    where = ["--install", "--unit-dir", str(unit_dir), "--env-dir", str(env_dir)]
    run = await corral(
        "service", "up", *where, "--user", "daemon", "--redis", "redis://:hunter2@198.18.0.9/0",
        env={**env, "CORRAL_TOKEN": token},
    )  # fmt: skip
    assert run.code == 0, run.err
    unit, env_file = unit_dir / "corral-up.service", env_dir / "corral-up.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert env_file.stat().st_uid == os.getuid()
    values = parse_env_file(env_file.read_text())
    assert values == {"CORRAL_TOKEN": token, "CORRAL_REDIS_URL": "redis://:hunter2@198.18.0.9/0"}
    text = unit.read_text()
    assert token not in text and "hunter2" not in text
    assert directives(text)["EnvironmentFile"] == [str(env_file)]
    assert directives(text)["User"] == ["daemon"]
    verify(unit)

    # Installed again without CORRAL_TOKEN: the cluster keeps its token.
    run = await corral("service", "up", *where, "--user", "daemon", env=env)
    assert run.code == 0, run.err
    assert parse_env_file(env_file.read_text()) == {"CORRAL_TOKEN": token}

    # A first install of `up` without any token makes one; a node without one writes none.
    run = await corral(
        "service", "up", *where, "--env-dir", str(tmp_path / "e2"), "--user", "daemon", env=env
    )
    assert run.code == 0, run.err
    made = parse_env_file((tmp_path / "e2" / "corral-up.env").read_text())["CORRAL_TOKEN"]
    assert len(made) >= 32 and made not in run.out + run.err
    run = await corral("service", "node", *where, "--user", "daemon", env=env)
    assert run.code == 0, run.err
    assert parse_env_file((env_dir / "corral-node.env").read_text()) == {}
    verify(unit_dir / "corral-node.service")


def test_env_file_refuses_what_systemd_would_read_otherwise() -> None:
    text = render_env_file("up", {"CORRAL_TOKEN": 'a"b\\c$d `e` #f'})
    assert parse_env_file(text) == {"CORRAL_TOKEN": 'a"b\\c$d `e` #f'}
    for value in ("it's", "two\nlines", "tab\tbed"):
        with pytest.raises(UnitError, match="CORRAL_TOKEN"):
            render_env_file("up", {"CORRAL_TOKEN": value})


@pytest.fixture
def new_user_name() -> Iterator[str]:
    """A system user name nobody has; removed afterwards if a test created it."""
    if os.geteuid() != 0:
        pytest.skip("creating a user needs root")
    name = f"corral-t{secrets.token_hex(4)}"
    yield name
    with contextlib.suppress(KeyError):
        pwd.getpwnam(name)
        subprocess.run(["userdel", name], check=True, timeout=30, capture_output=True)


async def test_install_creates_the_service_user(tmp_path: Path, new_user_name: str) -> None:
    with pytest.raises(KeyError):
        pwd.getpwnam(new_user_name)
    where = ["--unit-dir", str(tmp_path / "u"), "--env-dir", str(tmp_path / "e")]
    run = await corral(
        "service", "node", "--install", *where, "--user", new_user_name,
        env=isolated_env(tmp_path / "state"),
    )  # fmt: skip
    assert run.code == 0, run.err
    entry = pwd.getpwnam(new_user_name)
    assert entry.pw_shell.endswith("nologin")
    assert not await asyncio.to_thread(Path(entry.pw_dir).exists)  # --no-create-home
    assert entry.pw_uid < 1000  # a system user
    assert f"User={new_user_name}\n" in (tmp_path / "u" / "corral-node.service").read_text()


# --- sd_notify ---------------------------------------------------------------------------------


def notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.setblocking(False)
    return sock, str(path)


def fields_of(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().splitlines())


def test_notifier_speaks_sd_notify(tmp_path: Path) -> None:
    sock, path = notify_socket(tmp_path)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"corral-test-{secrets.token_hex(4)}"
    abstract.bind(f"\0{name}")  # systemd writes an abstract name with a leading '@'
    with sock, abstract:
        for notifier, receiver in (
            (Notifier.from_environ({"NOTIFY_SOCKET": path}), sock),
            (Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}), abstract),
        ):
            assert notifier is not None
            notifier.ready("serving\nnow")
            notifier.ready("serving again")
            notifier.status("serving again")  # unchanged: not sent
            notifier.stopping()
            notifier.stopping()
            notifier.status("late")  # after STOPPING: not sent
            receiver.setblocking(False)
            got = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    got.append(fields_of(receiver.recv(4096)))
            assert got == [
                {"READY": "1", "STATUS": "serving now"},
                {"STATUS": "serving again"},
                {"STOPPING": "1", "STATUS": "stopping"},
            ]
    assert Notifier.from_environ({}) is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1"}) is None
    with pytest.raises(NotifyAddressError):
        notify_address("/" + "x" * 200)
    gone = Notifier(str(tmp_path / "nobody-listens"))
    assert gone.send({"READY": "1"}) is False  # a missing manager never stops the service


@dataclass
class Heard:
    fields: dict[str, str]
    serving: bool | None  # what the test found the moment READY=1 arrived


@contextlib.asynccontextmanager
async def listening(
    tmp_path: Path, serving: Callable[[], Awaitable[bool]]
) -> AsyncIterator[tuple[str, list[Heard]]]:
    """NOTIFY_SOCKET's address and what arrives there; on READY=1, `serving()` at once."""
    sock, address = notify_socket(tmp_path)
    heard: list[Heard] = []

    async def listen() -> None:
        loop = asyncio.get_running_loop()
        while True:
            fields = fields_of(await loop.sock_recv(sock, 4096))
            heard.append(Heard(fields, await serving() if "READY" in fields else None))

    task = asyncio.create_task(listen())
    try:
        yield address, heard
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


def with_key(heard: list[Heard], key: str) -> list[Heard]:
    return [h for h in heard if key in h.fields]


async def test_up_is_ready_only_once_its_dashboard_answers(
    tmp_path: Path, rpc_server: StartRpc, tiny_model: Path
) -> None:
    ep, _ = await rpc_server()
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"

    async def dashboard_answers() -> bool:
        try:
            async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
                return (await client.get(f"{url}/healthz")).status_code == 200
        except httpx.HTTPError:
            return False

    async with (
        listening(tmp_path, dashboard_answers) as (address, heard),
        corral_up(
            tmp_path, [ep], tiny_model, token="t" * 24, port=port, env={"NOTIFY_SOCKET": address}
        ) as up,
    ):
        await until(lambda: with_key(heard, "READY"), 30, "READY=1")
        [ready] = with_key(heard, "READY")
        assert ready.serving is True, up.output()
        assert ready.fields == {"READY": "1", "STATUS": f"serving: dashboard on {url}/"}
        up.proc.send_signal(signal.SIGTERM)  # the process this test started, by PID
        await until(lambda: with_key(heard, "STOPPING"), 30, "STOPPING=1")
        assert await asyncio.wait_for(up.proc.wait(), 60) == 0, up.output()
    assert len(with_key(heard, "READY")) == 1 and len(with_key(heard, "STOPPING")) == 1


async def test_node_is_ready_only_once_its_backend_answers_a_probe(
    tmp_path: Path, llama_bins: LlamaBinaries
) -> None:
    host = next_loopback()
    ep = Endpoint(host, free_port(host))
    prober = Prober(timeout=2.0)

    async def backend_answers() -> bool:
        return (await prober.probe(ep)).status is Status.READY

    env = isolated_env(tmp_path / "state")
    env["CORRAL_LLAMA_BIN_DIR"] = str(llama_bins.bin_dir)
    log = tmp_path / "node.out"
    async with listening(tmp_path, backend_answers) as (address, heard):
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                corral_script(), "node", "--host", host, "--port", str(ep.port), "--no-mdns",
                "--threads", "1", env={**env, "NOTIFY_SOCKET": address},
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        children: set[int] = set()
        try:

            async def ready() -> bool:
                children.update(children_of(proc.pid))
                assert proc.returncode is None, log.read_text()
                return bool(with_key(heard, "READY"))

            await until(ready, 30, "READY=1 from corral node")
            [first] = with_key(heard, "READY")
            assert first.serving is True, log.read_text()
            assert first.fields == {"READY": "1", "STATUS": f"backend {ep} ready"}
            proc.send_signal(signal.SIGTERM)  # the process this test started, by PID
            await until(lambda: with_key(heard, "STOPPING"), 30, "STOPPING=1 from corral node")
            assert await asyncio.wait_for(proc.wait(), 30) == 0, log.read_text()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for pid in children:  # its ggml-rpc-server, by PID
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).kill()
    assert len(with_key(heard, "READY")) == 1
