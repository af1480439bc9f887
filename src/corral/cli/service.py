"""`corral service node|up`: print (or `--install`) a systemd unit that runs `corral node` or
`corral up` with the options given.

`corral service up` takes every option `corral up` takes (and `service node` those of
`corral node`): each subcommand is built from the command's own options, so they parse and
check exactly as they will when the service starts, plus the service's own (--install,
--unit-dir, --env-dir, --user). What was given goes into the unit's command line, paths made
absolute; secrets go to the environment file instead: CORRAL_TOKEN (from the environment, else
the one an earlier install wrote; `up` makes one when there is none) and the Redis URL
(--redis or CORRAL_REDIS_URL), which may hold a password.

Exit codes: 0 when the unit was printed or installed, 1 when it could not be installed,
2 on bad usage or input.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from corral.cli.console import bad_input, fail, warnings

if TYPE_CHECKING:
    from corral.service.unit import Command, UnitSpec

UNIT_DIR = Path("/etc/systemd/system")
ENV_DIR = Path("/etc/corral")
# The command each subcommand runs, as the module and name that hold it.
TARGETS: dict[str, tuple[str, str]] = {
    "node": ("corral.cli.node", "node"),
    "up": ("corral.cli.plane", "up"),
}
SECRET_PARAMS = ("redis",)  # given as options, kept out of the unit (the environment file)
PATH_PARAMS = ("backends_file", "config")  # plain strings that are paths: made absolute


def _service_options(
    install: Annotated[
        bool,
        typer.Option(
            help="Write the unit and its environment file, and create the user, instead of"
            " printing the unit. Then: systemctl daemon-reload && systemctl enable --now"
            " corral-NAME.service"
        ),
    ] = False,
    unit_dir: Annotated[
        Path, typer.Option(file_okay=False, help="Where --install writes the unit.")
    ] = UNIT_DIR,
    env_dir: Annotated[
        Path,
        typer.Option(
            file_okay=False, help="Where the environment file with the secrets goes (0600)."
        ),
    ] = ENV_DIR,
    user: Annotated[
        str,
        typer.Option(help="The system user the service runs as (--install creates it)."),
    ] = "corral",
) -> None:
    """The service's own options (their declarations only: ServiceCommand adds them)."""


class ServiceGroup(TyperGroup):
    """`service`'s subcommands, built when one is asked for (each imports its command)."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(TARGETS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        return service_command(cmd_name) if cmd_name in TARGETS else None


service_app = typer.Typer(
    cls=ServiceGroup,
    no_args_is_help=True,
    help="Run Corral as a systemd service: print its unit, or --install it.",
)


@service_app.callback()
def _service() -> None:
    """Run Corral as a systemd service: print its unit, or --install it."""


def _command(name: str, function: Any) -> TyperCommand:
    made = typer.Typer(add_completion=False)
    made.command(name)(function)
    command = typer.main.get_command(made)
    assert isinstance(command, TyperCommand)
    return command


def target_command(name: str) -> TyperCommand:
    """`corral NAME` as the command line parses it."""
    module, attr = TARGETS[name]
    return _command(name, getattr(importlib.import_module(module), attr))


class ServiceCommand(TyperCommand):
    """`corral service NAME`: NAME's options and the service's; prints or installs a unit."""

    def __init__(self, name: str, target: TyperCommand) -> None:
        own = _command(name, _service_options).params
        clash = {p.name for p in target.params} & {p.name for p in own}
        assert not clash, f"corral {name} has options named like the service's: {clash}"
        super().__init__(
            name,
            params=[*target.params, *own],
            help=f"A systemd unit that runs `corral {name}` with these options (see `corral"
            f" {name} --help`); printed, or written with --install.",
        )
        self.target = target

    def invoke(self, ctx: Any) -> None:
        assert self.name is not None
        run_service(self.name, self.target, ctx, dict(ctx.params))


def service_command(name: str) -> ServiceCommand:
    return ServiceCommand(name, target_command(name))


# --- from the parsed options to the unit's command line ---------------------------------------


def _word(param: TyperOption | TyperArgument, value: object) -> str:
    from enum import Enum

    if param.name == "model" and is_hub_model(str(value)):
        return str(value)
    if isinstance(value, Path) or param.name in PATH_PARAMS:
        return str(Path(str(value)).absolute())
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _option_words(param: TyperOption, value: object) -> list[str]:
    flag = max(param.opts, key=len)  # the long spelling
    if value is None:
        return []
    if param.is_flag:
        if param.secondary_opts:
            return [flag] if value else [max(param.secondary_opts, key=len)]
        return [flag] if value else []
    if param.multiple:
        assert isinstance(value, list | tuple)
        return [w for item in value for w in (flag, _word(param, item))]
    return [flag, _word(param, value)]


def is_hub_model(text: str) -> bool:
    """`--model` names a model to fetch (hf:OWNER/REPO/FILE.gguf, OWNER/REPO:QUANT), not a file."""
    return ":" in text and not Path(text).is_file()


def command_args(target: TyperCommand, ctx: Any, values: dict[str, Any]) -> list[str]:
    """The arguments of `corral NAME` for what was given on the command line or in the
    environment. Defaults are left out, and so are values from a configuration file (the
    service reads the file itself, so editing it later still counts), and secrets."""
    args: list[str] = []
    after: list[str] = []
    for param in target.params:
        name = param.name
        if name is None or name in SECRET_PARAMS:
            continue
        source = ctx.get_parameter_source(name)
        if source is None or source.name not in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        value = values[name]
        if isinstance(param, TyperOption):
            args += _option_words(param, value)
        elif isinstance(param, TyperArgument) and value:  # the extra llama-server flags, after `--`
            after += [_word(param, v) for v in value]
    return args + (["--", *after] if after else [])


def program() -> list[str]:
    """The absolute path of the running `corral` (else `python -m corral`)."""
    import os
    import shutil
    import sys

    argv0 = Path(sys.argv[0])
    if argv0.name != "__main__.py" and argv0.is_file() and os.access(argv0, os.X_OK):
        return [str(argv0.resolve())]
    found = shutil.which("corral")
    if found:
        return [str(Path(found).resolve())]
    return [str(Path(sys.executable).absolute()), "-m", "corral"]  # a venv's python: no resolve


# --- what the unit needs besides the command line ---------------------------------------------


def _capabilities(name: str, values: dict[str, Any]) -> tuple[tuple[str, ...], bool]:
    """The capabilities the service needs, and whether it opens packet sockets."""
    caps: list[str] = []
    raw = False
    if name == "up":
        from corral.sources.chain import ChainError, parse_source_names
        from corral.types import SourceName

        try:
            raw = SourceName.SCAN in parse_source_names(values["sources"])
        except ChainError as exc:
            bad_input(str(exc))
        if raw:  # the scan's ARP sweep sends raw frames (corral.net.neighbours.arp_sweep)
            caps.append("CAP_NET_RAW")
        ports = [values["port"], values["coordinator_port"]]
    else:
        ports = [values["port"]]
    if min(ports) < 1024:
        caps.append("CAP_NET_BIND_SERVICE")
    return tuple(caps), raw


def _check(name: str, values: dict[str, Any]) -> None:
    """What the command checks before it starts, checked now rather than at boot."""
    if name == "node":
        from corral.node.run import NodeOptionsError, check_bind_host

        try:
            check_bind_host(values["host"], values["allow_any_address"])
        except NodeOptionsError as exc:
            bad_input(str(exc))
    elif values["model"] is not None:
        model = str(values["model"])
        if not is_hub_model(model) and not Path(model).is_file():
            bad_input(f"--model {model}: no such file")


def _llama_bin_dir(name: str, values: dict[str, Any]) -> Path | None:
    from corral.llama.binaries import BinariesNotFound, find_binaries

    if name == "node" and values["attach"]:
        return None
    try:
        return find_binaries().bin_dir.absolute()
    except BinariesNotFound:
        return None


def _unreachable(spec: UnitSpec, values: dict[str, Any]) -> list[str]:
    from corral.service.install import hidden_from_service, interpreter

    paths = [Path(spec.argv[0])]
    script = interpreter(paths[0])
    if script is not None:
        paths.append(script)
    if "CORRAL_LLAMA_BIN_DIR" in spec.environment:
        paths.append(Path(spec.environment["CORRAL_LLAMA_BIN_DIR"]))
    for key in ("model", "backends_file"):
        if values.get(key):
            paths.append(Path(str(values[key])))
    return [
        f"{p}{'' if p.resolve() == p.absolute() else f' (that is {p.resolve()})'} is in a home"
        f" directory: the service cannot reach it (ProtectHome=yes, and user {spec.user!r} may"
        " not enter it); install it elsewhere, e.g. under /opt or /srv"
        for p in paths
        if hidden_from_service(p)
    ]


def _secrets(
    name: Command, values: dict[str, Any], existing: dict[str, str]
) -> tuple[dict[str, str], bool]:
    """The environment file's values, and whether the token was made just now."""
    import os
    import secrets

    found: dict[str, str] = {}
    token = os.environ.get("CORRAL_TOKEN") or existing.get("CORRAL_TOKEN")
    made = not token and name == "up"
    if made:  # actions and /v1 need one, and so does a dashboard beyond loopback
        token = secrets.token_urlsafe(32)
    if token:
        found["CORRAL_TOKEN"] = token
    redis = values.get("redis") or os.environ.get("CORRAL_REDIS_URL")
    if redis:
        found["CORRAL_REDIS_URL"] = redis
    model = values.get("model")
    if model is not None and is_hub_model(str(model)) and os.environ.get("HF_TOKEN"):
        found["HF_TOKEN"] = os.environ["HF_TOKEN"]  # a gated model's download needs it
    return found, made


def run_service(name: str, target: TyperCommand, ctx: Any, values: dict[str, Any]) -> None:
    from corral.service.unit import (
        UnitError,
        UnitSpec,
        env_file_name,
        render_unit,
        service_name,
    )

    command: Command = "node" if name == "node" else "up"
    _check(name, values)
    caps, raw = _capabilities(name, values)
    env_file = Path(values["env_dir"]).absolute() / env_file_name(command)
    bin_dir = _llama_bin_dir(name, values)
    spec = UnitSpec(
        command=command,
        argv=(*program(), name, *command_args(target, ctx, values)),
        env_file=env_file,
        user=values["user"],
        capabilities=caps,
        packet_sockets=raw,
        environment={"CORRAL_LLAMA_BIN_DIR": str(bin_dir)} if bin_dir else {},
    )
    try:
        unit = render_unit(spec)
    except UnitError as exc:
        bad_input(str(exc))
    warnings(_unreachable(spec, values))
    if not values["install"]:
        typer.echo(unit, nl=False)  # plain: the text must reach a file byte for byte
        typer.echo(
            f"# secrets (CORRAL_TOKEN, a Redis URL, HF_TOKEN) go in {env_file}: --install"
            " writes it",
            err=True,
        )
        return
    _install(command, spec, unit, values)
    unit_path = Path(values["unit_dir"]).absolute() / service_name(command)
    typer.echo(f"now: systemctl daemon-reload && systemctl enable --now {unit_path.name}")


def _install(command: Command, spec: UnitSpec, unit: str, values: dict[str, Any]) -> None:
    from corral.service.install import InstallError, ensure_user, read_small, write_file
    from corral.service.unit import (
        UnitError,
        parse_env_file,
        render_env_file,
        service_name,
    )

    unit_path = Path(values["unit_dir"]).absolute() / service_name(command)
    try:
        existing = read_small(spec.env_file)
        secrets, made = _secrets(command, values, parse_env_file(existing or ""))
        env_text = render_env_file(command, secrets)
    except InstallError as exc:
        fail(str(exc))
    except UnitError as exc:
        bad_input(str(exc))
    try:
        if ensure_user(spec.user):
            typer.echo(f"created the system user {spec.user}")
        write_file(spec.env_file, env_text, 0o600)
        write_file(unit_path, unit, 0o644)
    except InstallError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.filename or unit_path}: {exc.strerror or exc} (--install needs root)")
    typer.echo(f"wrote {spec.env_file} (mode 0600: {', '.join(secrets) or 'no secrets'})")
    typer.echo(f"wrote {unit_path}")
    if made:
        typer.echo(f"made a new CORRAL_TOKEN: nodes that --register need it ({spec.env_file})")
