"""`corral config [up|node|coordinator] [-- FLAGS...]`: the settings a command would run with.

The command's own options are resolved exactly as when it runs (its click context is made, not
invoked: corral.toml, environment and FLAGS applied by the same code), and each value is shown
with where it came from: default, file:PATH:LINE, env VAR or flag.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from corral.cli.console import bad_input
from corral.cli.options import JsonOpt

if TYPE_CHECKING:
    from corral.cli.clicks import click

SectionName = Literal["up", "node", "coordinator"]  # corral.cli.configured.SECTIONS


def config(
    section: Annotated[
        SectionName | None,
        typer.Argument(
            help="The command whose settings to show (default: all three).", show_default=False
        ),
    ] = None,
    flags: Annotated[
        list[str] | None,
        typer.Argument(
            help="That command's own flags, after `--`: what they would change.",
            show_default=False,
        ),
    ] = None,
    config_file: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="Settings file to read instead of the one found (CORRAL_CONFIG, ~/.config/corral,"
            " /etc/corral).",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the effective settings of `up`, `node` or `coordinator run`, and where each came from.

    Exits 1 naming the file, line and key when corral.toml is wrong, as those commands do.
    """
    from corral.cli.configured import SECTIONS

    if flags and section is None:
        bad_input("flags after -- need the command: corral config up -- --port 9000")
    args = [*(["--config", config_file] if config_file is not None else []), *(flags or [])]
    shown = {name: _settings(name, args) for name in ([section] if section else SECTIONS)}
    if json_out:
        import json

        print(json.dumps(shown, indent=2))
        return
    _print(shown)


def _settings(section: str, args: list[str]) -> dict[str, Any]:
    """{"command", "file", "settings": {key: {"value", "source", "where"}}} of one section."""
    from corral.cli.clicks import click
    from corral.cli.config_file import Applied
    from corral.cli.configured import META, NOT_IN_FILE, SECTIONS, command_for, file_key

    command = command_for(section)
    name = " ".join(("corral", *SECTIONS[section]))
    try:
        ctx = command.make_context(name, list(args))
    except click.ClickException as exc:  # a bad flag after --, as the command would say it
        exc.show()
        raise typer.Exit(exc.exit_code) from None
    applied = ctx.meta.get(META)
    assert isinstance(applied, Applied)
    settings: dict[str, Any] = {}
    for param in command.params:
        if not param.name or param.name in NOT_IN_FILE:
            continue
        source, where = _origin(ctx, param, applied)
        value = _plain(ctx.params.get(param.name))
        settings[file_key(param)] = {"value": value, "source": source, "where": where}
    path = None if applied.path is None else str(applied.path)
    return {"command": name, "file": path, "settings": settings}


def _origin(ctx: click.Context, param: click.Parameter, applied: Any) -> tuple[str, str | None]:
    from corral.cli.clicks import click

    ParameterSource = click.core.ParameterSource

    assert param.name
    source = ctx.get_parameter_source(param.name)
    if source is ParameterSource.COMMANDLINE:
        if param.param_type_name != "option":
            return "flag", "after --"
        negative = getattr(param, "secondary_opts", None)  # --no-mdns of --mdns/--no-mdns
        return "flag", negative[0] if negative and ctx.params.get(
            param.name
        ) is False else param.opts[0]
    if source is ParameterSource.ENVIRONMENT:
        names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
        return "env", next((n for n in names if os.environ.get(n)), None)
    if source is ParameterSource.DEFAULT_MAP:
        path, line = applied.origins[param.name]
        return "file", f"{path}:{line}" if line is not None else str(path)
    return "default", None


def _plain(value: object) -> object:
    """A value as JSON holds it."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _print(shown: dict[str, dict[str, Any]]) -> None:
    import json

    from rich.table import Table

    from corral.cli.console import escape, stdout

    out = stdout()
    for info in shown.values():
        table = Table(title=escape(f"{info['command']}: {info['file'] or 'no config file'}"))
        for column in ("setting", "value", "from"):
            table.add_column(column)
        for key, setting in info["settings"].items():
            value = setting["value"]
            text = "-" if value is None else value if isinstance(value, str) else json.dumps(value)
            origin = setting["source"] + (f" {setting['where']}" if setting["where"] else "")
            table.add_row(escape(key), escape(text), escape(origin))
        out.print(table)
