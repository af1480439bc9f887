"""The `corral` command: the typer app, every command registered, and `main()`.

Exit codes: 0 when the command ran (found or not), 1 when it could not do its job (for example
binaries missing), 2 on bad usage or input, with the message on stderr.

Only the command modules' signatures are imported here; each command imports the rest of Corral
when it runs (see corral.cli).
"""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

HELP = "Find, probe and keep serving distributed llama.cpp RPC backends."

# In the order `corral --help` lists them: the commands, then the groups, each as the module
# that holds it and its name there. A module is imported only when its command is built.
COMMANDS: dict[str, tuple[str, str]] = {
    "probe": ("corral.cli.discover", "probe"),
    "discover": ("corral.cli.discover", "discover"),
    "backends": ("corral.cli.discover", "backends"),
    "demo": ("corral.cli.demo", "demo"),
    "node": ("corral.cli.node", "node"),
    "dashboard": ("corral.cli.plane", "dashboard"),
    "up": ("corral.cli.plane", "up"),
    "plan": ("corral.cli.plan", "plan"),
    "config": ("corral.cli.config", "config"),
}
GROUPS: dict[str, tuple[str, str]] = {
    "llama": ("corral.cli.llama", "llama_app"),
    "coordinator": ("corral.cli.coordinator", "coordinator_app"),
    "model": ("corral.cli.llama", "model_app"),
    "service": ("corral.cli.service", "service_app"),
}


def _load(where: tuple[str, str]) -> typer.models.CommandFunctionType | typer.Typer:
    module, name = where
    loaded: typer.models.CommandFunctionType | typer.Typer = getattr(
        importlib.import_module(module), name
    )
    return loaded


def make_app(only: str | None = None) -> typer.Typer:
    """The app with every command, or with the one named `only` (see main)."""
    made = typer.Typer(
        help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )
    if only is not None:
        made.callback()(_group)  # keeps it a group of one: `corral NAME ...`, not `corral ...`
    else:
        made.callback()(_root)
    for name, where in COMMANDS.items():
        if only in (None, name):
            command = _load(where)
            assert not isinstance(command, typer.Typer)
            made.command(name)(command)
    for name, where in GROUPS.items():
        if only in (None, name):
            group = _load(where)
            assert isinstance(group, typer.Typer)
            made.add_typer(group, name=name)
    return made


def _group() -> None:
    pass


def _print_version() -> None:
    from corral.cli.version import gather, version_lines

    print("\n".join(version_lines(gather())))


def _version_option(value: bool) -> None:
    if value:
        _print_version()
        raise typer.Exit()


def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_version_option,
            help="Print Corral's version, the llama.cpp build it runs and the RPC protocol it "
            "speaks, and exit.",
        ),
    ] = False,
) -> None:
    pass


def main() -> None:
    import logging
    import sys

    # Stray library warnings get one plain, labelled line; commands that run for long (node, up)
    # set their own, timestamped format.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # typer turns every registered command's signature into options before it parses anything;
    # a command named first (the group itself has no options but --help) needs only its own
    # module and signature.
    first = sys.argv[1] if len(sys.argv) > 1 else None
    if sys.argv[1:] == ["--version"]:  # answered before any command is built: it stays fast
        _print_version()
        return
    run = make_app(first if first in COMMANDS or first in GROUPS else None)
    try:
        run()
    except KeyboardInterrupt:
        sys.exit(130)
