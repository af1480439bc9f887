"""The `corral` command: the typer app, every command registered, and `main()`.

Exit codes: 0 when the command ran (found or not), 1 when it could not do its job (for example
binaries missing), 2 on bad usage or input, with the message on stderr.

Only the command modules' signatures are imported here; each command imports the rest of Corral
when it runs (see corral.cli).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from corral.cli import coordinator, demo, discover, llama, node, plane

HELP = "Find, probe and keep serving distributed llama.cpp RPC backends."

# In the order `corral --help` lists them: the commands, then the groups.
COMMANDS: dict[str, Callable[..., Any]] = {
    "probe": discover.probe,
    "discover": discover.discover,
    "backends": discover.backends,
    "demo": demo.demo,
    "node": node.node,
    "dashboard": plane.dashboard,
    "up": plane.up,
}
GROUPS: dict[str, typer.Typer] = {
    "llama": llama.llama_app,
    "coordinator": coordinator.coordinator_app,
    "model": llama.model_app,
}


def make_app(only: str | None = None) -> typer.Typer:
    """The app with every command, or with the one named `only` (see main)."""
    made = typer.Typer(
        help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )
    if only is not None:
        made.callback()(_group)  # keeps it a group of one: `corral NAME ...`, not `corral ...`
    for name, command in COMMANDS.items():
        if only in (None, name):
            made.command(name)(command)
    for name, group in GROUPS.items():
        if only in (None, name):
            made.add_typer(group, name=name)
    return made


def _group() -> None:
    pass


app = make_app()


def main() -> None:
    import logging
    import sys

    # Stray library warnings get one plain, labelled line; commands that run for long (node, up)
    # set their own, timestamped format.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # typer turns every registered command's signature into options before it parses anything;
    # a command named first (the group itself has no options but --help) needs only its own.
    first = sys.argv[1] if len(sys.argv) > 1 else None
    run = make_app(first) if first in COMMANDS or first in GROUPS else app
    try:
        run()
    except KeyboardInterrupt:
        sys.exit(130)
