"""corral.toml applied to a command: checked against its options, then click's `default_map`.

Each command that reads the file (`up`, `node`, `coordinator run`) takes an eager `--config`
option (UpConfigOpt, NodeConfigOpt, CoordinatorConfigOpt). Its callback runs before any other
option is read: it finds and reads the file, checks every section against the options of the
command it is for (names, TOML types, then click's own conversion, so ranges and choices are
checked as on the command line), and sets the command's `default_map`. Click then gives each
option, in order: the flag, its environment variable, the file, the default;
`ctx.get_parameter_source` says which (`corral config` shows it). Options added to a command
are in the file at once, under their flag's name.

Sections: `[up]`, `[node]`, `[coordinator]` (for `coordinator run`). Top-level keys are the
options more than one of these commands takes with one meaning: every shared name but host and
port (each command listens or binds somewhere else); a section's value wins over the top level.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from corral.cli.clicks import click
from corral.cli.console import error, fail

if TYPE_CHECKING:
    from corral.cli.config_file import ConfigError, ConfigFile, Origin

# Section -> the command's path under `corral`.
SECTIONS: dict[str, tuple[str, ...]] = {
    "up": ("up",),
    "node": ("node",),
    "coordinator": ("coordinator", "run"),
}
NOT_SHARED = frozenset({"host", "port"})  # the same name, another listener in each command
NOT_IN_FILE = frozenset({"config", "help"})  # parameter names the file cannot set
META = "corral.config"  # ctx.meta key of the config_file.Applied a command took
MAX_SHOWN = 20  # errors listed before "and N more"


def file_key(param: click.Parameter) -> str:
    """The key that sets `param`: its long flag without the dashes (`--ctx-size`: ctx-size)."""
    if param.param_type_name == "option":
        long = [o for o in param.opts if o.startswith("--")]
        if long:
            return long[0][2:]
    return (param.name or "").replace("_", "-")


def file_keys(command: click.Command) -> dict[str, click.Parameter]:
    return {file_key(p): p for p in command.params if p.name and p.name not in NOT_IN_FILE}


def command_for(section: str) -> click.Command:
    """The click command a section configures, built as `corral` builds it."""
    from typer.main import get_command

    from corral.cli.app import make_app

    path = SECTIONS[section]
    command: click.Command = get_command(make_app(path[0]))
    for name in path:
        assert isinstance(command, TyperGroup)
        command = command.commands[name]
    return command


class Commands:
    """The sections' commands, each built once when needed, as `corral` builds them: the file is
    checked against these even when another command carries the option (`corral service up`
    takes every option of `up`, and its own)."""

    def __init__(self) -> None:
        self._built: dict[str, click.Command] = {}
        self._shared: dict[str, list[tuple[str, click.Parameter]]] | None = None

    def __call__(self, section: str) -> click.Command:
        if section not in self._built:
            self._built[section] = command_for(section)
        return self._built[section]

    def shared(self) -> dict[str, list[tuple[str, click.Parameter]]]:
        """Top-level keys -> (section, parameter) of each command that takes it."""
        if self._shared is not None:
            return self._shared
        by_key: dict[str, list[tuple[str, click.Parameter]]] = {}
        for section in SECTIONS:
            for key, param in file_keys(self(section)).items():
                by_key.setdefault(key, []).append((section, param))
        self._shared = {k: ps for k, ps in by_key.items() if len(ps) > 1 and k not in NOT_SHARED}
        return self._shared


# --- checking ----------------------------------------------------------------------------------

_KINDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
_PLURAL = {"bool": "booleans", "int": "integers", "float": "numbers", "str": "strings"}


def _kind(param: click.Parameter) -> str:
    if isinstance(param.type, click.types.BoolParamType):
        return "bool"
    if isinstance(param.type, click.types.IntParamType):
        return "int"
    if isinstance(param.type, click.types.FloatParamType):
        return "float"
    return "str"


def _fits(value: object, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False  # a bool is an int in Python, not in TOML
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, int | float)
    return isinstance(value, str)


def _describe(value: object) -> str:
    from datetime import date, datetime, time

    names = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
        (datetime | date | time, "a date/time"),
    ]
    name = next((n for t, n in names if isinstance(value, t)), type(value).__name__)
    shown = repr(value)
    return f"{name} ({shown[:60]}{'...' if len(shown) > 60 else ''})"


def check_value(param: click.Parameter, value: object, ctx: click.Context) -> str | None:
    """Why `value` (from TOML) cannot set `param`, or None. TOML types first (click would turn
    2.5 into 2 for an int), then click's conversion: ranges, choices, as for a flag."""
    kind = _kind(param)
    if param.multiple or param.nargs != 1:
        if not isinstance(value, list):
            return f"expected an array of {_PLURAL[kind]}, got {_describe(value)}"
        wrong = [v for v in value if not _fits(v, kind)]
        if wrong:
            return f"expected an array of {_PLURAL[kind]}, got {_describe(wrong[0])} in it"
    elif not _fits(value, kind):
        return f"expected {_KINDS[kind]}, got {_describe(value)}"
    try:
        param.type_cast_value(ctx, value)
    except typer.BadParameter as exc:
        return exc.message
    return None


def _unknown(key: str, known: list[str]) -> str:
    import difflib

    dashed = key.replace("_", "-")
    close = [dashed] if dashed in known else difflib.get_close_matches(key, known, n=1)
    return f"unknown key{f' (did you mean {close[0]!r}?)' if close else ''}"


def check_file(file: ConfigFile, commands: Commands) -> list[ConfigError]:
    """Everything wrong with the file, for every section (a typo under [node] stops `up` too:
    nothing starts from a file that is partly wrong)."""
    errors: list[ConfigError] = []
    for key, value in file.data.items():
        if key in SECTIONS:
            errors += _check_section(file, key, value, commands)
            continue
        shared = commands.shared()
        if key in shared:
            problem = next(
                filter(None, (_check_in(s, p, value, commands) for s, p in shared[key])), None
            )
        elif isinstance(value, dict):
            import difflib

            close = difflib.get_close_matches(key, list(SECTIONS), n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            problem = f"unknown section{hint}; the sections are {_SECTION_LIST}"
        else:
            problem = _unknown_top_level(key, shared, commands)
        if problem:
            what = f"[{key}]" if isinstance(value, dict) and key not in shared else None
            errors.append(file.error((key,), problem, what))
    return errors


_SECTION_LIST = ", ".join(f"[{s}]" for s in SECTIONS)


def _check_section(
    file: ConfigFile, section: str, table: object, commands: Commands
) -> list[ConfigError]:
    if not isinstance(table, dict):
        return [file.error((section,), f"expected a table [{section}], got {_describe(table)}")]
    ctx = click.core.Context(commands(section))
    keys = file_keys(commands(section))
    errors = []
    for name, value in table.items():
        param = keys.get(name)
        problem: str | None
        if param is None:
            problem = _unknown(name, sorted(keys))
            others = [f"[{s}]" for s in SECTIONS if name in file_keys(commands(s))]
            if others and "?" not in problem:
                problem += f" (an option of {' and '.join(others)})"
        else:
            problem = check_value(param, value, ctx)
        if problem:
            errors.append(file.error((section, name), problem))
    return errors


def _check_in(
    section: str, param: click.Parameter, value: object, commands: Commands
) -> str | None:
    return check_value(param, value, click.core.Context(commands(section)))


def _unknown_top_level(key: str, shared: Mapping[str, object], commands: Commands) -> str:
    dashed = key.replace("_", "-")
    homes = [f"[{s}]" for s in SECTIONS if {key, dashed} & set(file_keys(commands(s)))]
    if homes:
        return f"not a top-level key: set it under {' or '.join(homes)}"
    return _unknown(key, sorted(shared)) + f" at the top level (sections: {_SECTION_LIST})"


# --- applying ----------------------------------------------------------------------------------


def section_defaults(
    file: ConfigFile, section: str, command: click.Command
) -> tuple[dict[str, Any], dict[str, Origin]]:
    """The section's default_map (parameter name -> value from TOML) and each one's line: the
    top level's shared keys first, the section's own over them. The file is checked already."""
    keys = file_keys(command)
    values: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    table = file.data.get(section, {})
    found: list[tuple[tuple[str, ...], Any]]
    found = [((k,), v) for k, v in file.data.items() if k not in SECTIONS]
    found += [((section, k), v) for k, v in table.items()]
    for path, value in found:
        param = keys.get(path[-1])
        if param is not None and param.name:
            values[param.name] = value
            origins[param.name] = (file.path, file.line(*path))
    return values, origins


def apply_config(ctx: click.Context, section: str, explicit: str | None, named_by: str) -> None:
    """Read the file and make it the command's defaults; exit 1 naming file, line and key on
    anything wrong, before anything starts."""
    from corral.cli.config_file import Applied, ConfigError, find_config, read_config

    try:
        path = find_config(explicit, named_by)
        if path is None:
            ctx.meta[META] = Applied(None, {})
            return
        file = read_config(path)
    except ConfigError as exc:
        fail(str(exc))
    commands = Commands()
    errors = check_file(file, commands)
    if len(errors) == 1:
        fail(str(errors[0]))
    for problem in errors[:MAX_SHOWN]:
        error(str(problem))
    if errors:
        more = len(errors) - MAX_SHOWN
        fail(f"{path}: {len(errors)} errors" + (f" ({more} not shown)" if more > 0 else ""))
    values, origins = section_defaults(file, section, commands(section))
    ctx.default_map = values
    ctx.meta[META] = Applied(path, origins)


def _loader(section: str) -> Callable[[typer.Context, typer.CallbackParam, str | None], str | None]:
    def load(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
        if not ctx.resilient_parsing:  # shell completion reads no file
            source = ctx.get_parameter_source(param.name or "")
            by = "CORRAL_CONFIG" if source is click.core.ParameterSource.ENVIRONMENT else "--config"
            apply_config(ctx, section, value, by)
        return value

    return load


def config_option(section: str) -> Any:
    return typer.Option(
        "--config",
        envvar="CORRAL_CONFIG",
        is_eager=True,  # read before every other option, so the file can be their default
        callback=_loader(section),
        show_default=False,
        help=f"corral.toml to read (else $XDG_CONFIG_HOME/corral/corral.toml, then"
        f" /etc/corral/corral.toml): its {section} section and top-level keys. Flags and"
        " environment variables override it.",
    )


UpConfigOpt = Annotated[str | None, config_option("up")]
NodeConfigOpt = Annotated[str | None, config_option("node")]
CoordinatorConfigOpt = Annotated[str | None, config_option("coordinator")]
