"""A systemd unit for `corral node` or `corral up`, and its environment file: pure text.

The unit runs the command as `Type=notify` (Corral says READY=1 once it serves: corral.net.notify)
under a dedicated system user, sandboxed, with Corral's state and caches in the directories
systemd makes for it. Secrets (the token, a Redis URL that may hold a password) never go in the
unit, which anyone may read: they go in an environment file only root reads (`EnvironmentFile=`).

Quoting follows systemd's rules, not a shell's (systemd.service(5), "Command lines";
systemd.syntax(7)): a word is taken as is when it holds only safe characters, else it is
double-quoted with C-style escapes; `%` is written `%%` everywhere (specifiers) and `$` is written
`$$` in arguments (environment variable substitution; the program path itself is not
substituted). Environment files are read by systemd's own parser: a single-quoted value is taken
literally up to the next single quote, so values holding one, or a control character, are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Command = Literal["node", "up"]

STATE_ROOT = Path("/var/lib")  # StateDirectory=corral -> /var/lib/corral = Corral's state_dir()
CACHE_ROOT = Path("/var/cache")  # CacheDirectory=corral -> /var/cache/corral = its cache_dir()
DEFAULT_USER = "corral"
# Words made only of these need no quotes: none is special to systemd's command-line parser.
_SAFE = re.compile(r"[A-Za-z0-9_@+=:,./-]+")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

DESCRIPTIONS: dict[Command, str] = {
    "node": "Corral node: a ggml-rpc-server, supervised and announced",
    "up": "Corral control plane: dashboard, monitor and llama-server coordinator",
}
# Corral's own shutdown bound (plane.SHUTDOWN_S for the coordinator, STOP_S for the rest) and
# some room: systemd kills whatever is left after this.
STOP_TIMEOUT_S = 45


class UnitError(ValueError):
    pass


def service_name(command: Command) -> str:
    return f"corral-{command}.service"


def env_file_name(command: Command) -> str:
    return f"corral-{command}.env"


def _text(word: str, what: str) -> str:
    try:
        word.encode("utf-8")
    except UnicodeEncodeError:
        raise UnitError(f"{what} {word!r}: not valid UTF-8, which a unit file must be") from None
    if "\0" in word:
        raise UnitError(f"{what} {word!r}: holds a NUL byte")
    return word


def quote_word(word: str, *, substitute_env: bool = True) -> str:
    """Pure: one word of a command line (or an `Environment=` assignment, with
    `substitute_env=False`) as systemd reads it back unchanged."""
    _text(word, "argument")
    if _SAFE.fullmatch(word):
        return word
    out = []
    for ch in word:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        elif ch == "%":
            out.append("%%")
        elif ch == "$" and substitute_env:
            out.append("$$")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def exec_line(argv: Sequence[str]) -> str:
    """Pure: the value of `ExecStart=` for `argv`, one option per continued line."""
    if not argv or not argv[0].startswith("/"):
        raise UnitError(f"the program to run must be an absolute path, not {argv[:1]!r}")
    if any(ch in "\"'\\\x7f" or ord(ch) < 0x20 for ch in argv[0]):
        # systemd refuses these in a program's path whatever the quoting ("Executable name
        # contains special characters"), though it takes them in arguments
        raise UnitError(
            f"{argv[0]!r}: systemd refuses a program path with quotes, backslashes or control"
            " characters; install corral at a plainer path"
        )
    words = [quote_word(argv[0], substitute_env=False)]
    words += [quote_word(arg) for arg in argv[1:]]
    parts = [words[0]]
    for word in words[1:]:
        # A line of its own for each option (and for what follows `--`): cosmetic only,
        # systemd joins continued lines with a space.
        parts.append(" \\\n    " if word.startswith("-") else " ")
        parts.append(word)
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class UnitSpec:
    command: Command
    argv: tuple[str, ...]  # the absolute program, then its arguments
    env_file: Path
    user: str = DEFAULT_USER
    # Set only for what needs them: raw ARP frames for the scan's sweep (CAP_NET_RAW and
    # AF_PACKET), a port below 1024 (CAP_NET_BIND_SERVICE).
    capabilities: tuple[str, ...] = ()
    packet_sockets: bool = False
    environment: Mapping[str, str] = field(default_factory=dict)  # besides the defaults


def unit_environment(spec: UnitSpec) -> dict[str, str]:
    """Pure: the environment the unit sets (not secret): Corral's state and caches in the
    directories systemd makes; llama.cpp's cache (rpc-server `-c`) and the models fetched from
    a hub beside them (the service user has no home for their defaults under ~/.cache)."""
    env = {
        "XDG_STATE_HOME": str(STATE_ROOT),
        "XDG_CACHE_HOME": str(CACHE_ROOT),
        "LLAMA_CACHE": str(CACHE_ROOT / "corral" / "llama.cpp"),
        "HF_HOME": str(CACHE_ROOT / "corral" / "huggingface"),  # models fetched by --model
        "PYTHONUNBUFFERED": "1",  # log lines reach the journal as they are written
    }
    env.update(spec.environment)
    return env


def render_unit(spec: UnitSpec) -> str:
    """Pure: the unit file's text."""
    if not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", spec.user):
        raise UnitError(f"--user {spec.user!r}: not a valid user name")
    if spec.user in ("root", "nobody"):
        # root undoes the sandbox; nobody is shared with whatever else runs as nobody
        raise UnitError(f"--user {spec.user}: run the service as a user of its own")
    for cap in spec.capabilities:
        if not re.fullmatch(r"CAP_[A-Z_]+", cap):
            raise UnitError(f"capability {cap!r}: expected CAP_NAME")
    if not spec.env_file.is_absolute() or not _SAFE.fullmatch(str(spec.env_file)):
        # systemd takes this path as written (no quotes), so it keeps to plain characters
        raise UnitError(
            f"environment file {spec.env_file}: use an absolute path of plain"
            " characters (letters, digits, _@+=:,./-)"
        )
    env = unit_environment(spec)
    for name in env:
        if not _ENV_NAME.fullmatch(name):
            raise UnitError(f"environment variable name {name!r}: not a valid name")
    families = "AF_UNIX AF_INET AF_INET6 AF_NETLINK" + (" AF_PACKET" if spec.packet_sockets else "")
    caps = " ".join(spec.capabilities)
    lines = [
        f"# Written by `corral service {spec.command}`: write it again with that command rather",
        "# than edit it. Secrets are in EnvironmentFile= (root only), never here.",
        "[Unit]",
        f"Description={DESCRIPTIONS[spec.command]}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        # READY=1 once it serves: the dashboard answers HTTP (up), the backend answers a probe
        # (node); STOPPING=1 when it begins to stop. Only the main process may say so.
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_line(spec.argv)}",
        f"EnvironmentFile={spec.env_file}",
        *(
            f"Environment={quote_word(f'{name}={value}', substitute_env=False)}"
            for name, value in env.items()
        ),
        f"User={spec.user}",
        "StateDirectory=corral",
        "CacheDirectory=corral",
        "WorkingDirectory=/var/lib/corral",
        "UMask=0077",
        "Restart=on-failure",
        "RestartSec=2",
        # SIGTERM to Corral alone: it drains and stops its llama.cpp children itself, in order;
        # whatever is left at the timeout is killed.
        "KillMode=mixed",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        "",
        "# Sandbox. Devices stay visible (no PrivateDevices=, no ProtectClock=, which would",
        "# restrict them): a GPU backend needs /dev/nvidia*, /dev/dri, /dev/kfd.",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectHostname=yes",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        # AF_NETLINK: the interfaces' addresses (psutil) and the neighbour table.
        f"RestrictAddressFamilies={families}",
        f"CapabilityBoundingSet={caps}",
        *([f"AmbientCapabilities={caps}"] if caps else []),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def render_env_file(command: Command, values: Mapping[str, str]) -> str:
    """Pure: the environment file's text (KEY='value' lines, systemd's syntax)."""
    lines = [f"# Secrets for {service_name(command)}: read by systemd as root; keep it 0600."]
    for name, value in values.items():
        if not _ENV_NAME.fullmatch(name):
            raise UnitError(f"environment variable name {name!r}: not a valid name")
        _text(value, name)
        if "'" in value or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise UnitError(
                f"{name}: a single quote or a control character cannot be written to an"
                " environment file safely; choose a value without one"
            )
        lines.append(f"{name}='{value}'")
    return "\n".join(lines) + "\n"


def parse_env_file(text: str) -> dict[str, str]:
    """Pure: the values of an environment file render_env_file wrote (other lines ignored)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)='([^']*)'", line.strip())
        if match:
            values[match.group(1)] = match.group(2)
    return values
