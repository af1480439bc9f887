"""The coordinator's small pure pieces: link judging, llama-server argv/env/log/metrics, pidfile."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from corral.coordinator.links import Link, judge, read_links, resolve
from corral.coordinator.pidfile import AlreadyRunning, claim, read_owner, release
from corral.endpoint import Endpoint
from corral.llama.server import (
    Load,
    ServerOptions,
    describe_exit,
    explain_log,
    parse_load,
    server_argv,
    server_env,
)
from corral.llama.split import parse_tensor_split

A = Endpoint("127.0.0.5", 50052)
B = Endpoint("127.0.0.6", 50052)


def test_judge_needs_an_established_link_before_calling_a_backend_lost() -> None:
    addrs = resolve([A, B])
    seen: set[Endpoint] = set()
    # Not connected yet (still loading, or no layer offloaded to it): not lost.
    assert judge([], addrs, seen) == {}
    links = [Link("127.0.0.5", 50052, "ESTABLISHED"), Link("127.0.0.6", 50052, "ESTABLISHED")]
    assert judge(links, addrs, seen) == {}
    assert seen == {A, B}
    links = [Link("127.0.0.5", 50052, "ESTABLISHED"), Link("127.0.0.6", 50052, "CLOSE_WAIT")]
    assert judge(links, addrs, seen) == {B: "backend closed its connection (CLOSE_WAIT)"}
    assert judge(links[:1], addrs, seen) == {B: "connection to it is gone"}


def test_judge_matches_ipv4_mapped_addresses_and_ports() -> None:
    addrs = resolve([A])
    seen: set[Endpoint] = set()
    judge([Link("::ffff:127.0.0.5", 50052, "ESTABLISHED")], addrs, seen)
    assert seen == {A}
    # Same address, other port: another connection, not the backend's.
    assert judge([Link("127.0.0.5", 50053, "CLOSE_WAIT")], addrs, seen) == {
        A: "connection to it is gone"
    }


def test_server_argv_has_rpc_metrics_and_passthrough() -> None:
    opts = ServerOptions(
        port=19000,
        ctx_size=512,
        parallel=2,
        tensor_split=parse_tensor_split("1,1"),
        extra_args=("--temp", "0"),
    )
    argv = server_argv(Path("/bin/llama-server"), Path("/m.gguf"), opts, [A, B])
    assert argv[:7] == [
        "/bin/llama-server",
        "-m",
        "/m.gguf",
        "--host",
        "127.0.0.1",
        "--port",
        "19000",
    ]
    assert argv[argv.index("--rpc") + 1] == "127.0.0.5:50052,127.0.0.6:50052"
    assert "--metrics" in argv and argv[argv.index("-ngl") + 1] == "99"
    assert argv[argv.index("--tensor-split") + 1] == "1,1"
    assert argv[-2:] == ["--temp", "0"]
    assert "--rpc" not in server_argv(Path("x"), Path("m"), opts, [])


def test_server_env_drops_llama_arg_and_silences_gdb() -> None:
    env = server_env({"PATH": "/bin", "LLAMA_ARG_RPC": "10.0.0.9:1", "LLAMA_ARG_PORT": "1"})
    assert env == {"PATH": "/bin", "GGML_NO_BACKTRACE": "1"}


def test_describe_exit() -> None:
    assert describe_exit(-6) == "killed by SIGABRT (exit status 134 in a shell)"
    assert describe_exit(1) == "exited with status 1"
    assert "unknown" in describe_exit(None)


def test_explain_log_picks_the_lines_that_say_why() -> None:
    log = "main: loading model\nllama_model_load: error loading model: bad magic\nmain: exiting\n"
    assert explain_log(log) == "llama_model_load: error loading model: bad magic"
    assert explain_log("a\nb\n\nc\n", lines=2) == "b | c"


def test_parse_load() -> None:
    text = (
        "# HELP x\nllamacpp:requests_processing 2\nllamacpp:requests_deferred 1\n"
        "llamacpp:n_decode_total 40\nllamacpp:tokens_predicted_total 30\n"
    )
    assert parse_load(text) == Load(in_flight=3, work_done=70.0)
    assert parse_load("other 1\n") is None


def test_parse_tensor_split_says_which_entry_is_wrong() -> None:
    plain = parse_tensor_split("3,1")
    assert plain is not None and not plain.named and plain.text == "3,1"
    assert parse_tensor_split(None) is None
    named = parse_tensor_split("127.0.0.5:50052=3, [::1]:50053=0.5")
    assert named is not None
    assert named.weights == ((A, 3.0), (Endpoint("::1", 50053), 0.5))
    for bad, why in (
        ("1,x", "entry 2 ('x') is not a number"),
        ("0,0", "all zero"),
        ("-1,2", "entry 1 ('-1') must be a finite number >= 0"),
        ("1,inf", "entry 2"),
        ("", "entry 1"),
        ("127.0.0.5:50052=3,1", "entry 2 ('1') has no 'host:port='"),
        ("127.0.0.5:50052=3,127.0.0.5:50052=1", "named twice"),
        ("coordinator:0=1", "entry 1"),
        ("127.0.0.5:50052=x", "entry 1 ('x') is not a number"),
    ):
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_tensor_split(bad)


def test_named_split_follows_its_backends_through_a_failover() -> None:
    c = Endpoint("127.0.0.7", 50052)
    split = parse_tensor_split(f"{A}=2,{B}=1,{c}=1")
    assert split is not None
    assert split.argument([A, B, c], {}) == "2,1,1"
    # A is lost: B and C keep their own weights, not A's and B's.
    assert split.argument([B, c], {}) == "1,1"
    assert split.argument([A, c], {}) == "2,1"
    # A backend with two devices shares its weight; one not named weighs 1.
    d = Endpoint("127.0.0.8", 50052)
    assert split.argument([A, d], {A: 2}) == "1,1,1"
    assert split.argument([], {}) is None
    zero = parse_tensor_split(f"{A}=0")
    assert zero is not None and zero.argument([A], {}) is None  # llama-server decides
    # The plain form goes through as given, whatever the set.
    plain = parse_tensor_split("3,1")
    assert plain is not None and plain.argument([B], {}) == "3,1"
    argv = server_argv(Path("x"), Path("m"), ServerOptions(tensor_split=split), [B, c, d], {c: 2})
    assert argv[argv.index("--tensor-split") + 1] == "1,0.5,0.5,1"


def test_pidfile_claims_once_and_ignores_dead_or_reused_pids(tmp_path: Path) -> None:
    path = tmp_path / "c" / "18080.pid"
    claim(path)
    owner = read_owner(path)
    assert owner is not None and owner.pid == os.getpid()
    claim(path)  # ourselves again: fine
    # A live process that holds it: refused.
    child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    try:
        import psutil

        ct = psutil.Process(child.pid).create_time()
        path.write_text(f'{{"pid": {child.pid}, "create_time": {ct}}}')
        with pytest.raises(AlreadyRunning):
            claim(path)
        # Same PID but another start time (a reused PID): not the owner.
        path.write_text(f'{{"pid": {child.pid}, "create_time": {ct - 100}}}')
        assert read_owner(path) is None
    finally:
        child.kill()
        child.wait()
    claim(path)
    release(path)
    assert not path.exists()


def test_the_links_of_a_dead_unreaped_llama_server_read_as_unknown() -> None:
    """Between its death and its reaping, llama-server is a zombie without sockets. That must
    read as "cannot tell" (None), never as "no connections", which judge() takes as every held
    backend gone."""
    child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    try:
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, and left unreaped
        assert read_links(child.pid) is None
    finally:
        child.kill()
        child.wait()


CONNECTED = """
import signal, socket, sys
listener = socket.create_server(("127.0.0.1", 0))
peer = socket.create_connection(listener.getsockname())
if sys.argv[1] == "close":
    listener.close()  # what a dying llama-server looks like: connections, no listener
print("ready", flush=True)
signal.pause()  # until the test kills it
"""


@pytest.mark.parametrize("listening", [True, False])
def test_links_are_read_only_from_a_process_that_still_listens(listening: bool) -> None:
    """A killed llama-server loses its sockets before it becomes a zombie; read mid-way, it
    shows its backend links without its HTTP listener. That must read as "cannot tell"."""
    child = subprocess.Popen(
        [sys.executable, "-c", CONNECTED, "keep" if listening else "close"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        links = read_links(child.pid)
        if listening:
            assert links is not None and any(link.status == "ESTABLISHED" for link in links)
        else:
            assert links is None
    finally:
        child.kill()
        child.wait()
