"""How every command speaks to a person: one line per message, user text never read as markup.

Messages quote user input such as "[fe80::1]:0", which rich would take for markup and swallow;
soft wrap keeps a message on one line whatever the terminal width.

Code below the command line never prints: it takes `say`/`warn` callables (these) or returns
warnings for the command to show.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:
    from rich.console import Console

# rich is imported when something is printed: `--json` output never loads it.


def stdout() -> Console:
    from rich.console import Console

    return Console()


def stderr() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def escape(text: str) -> str:
    """User text, never read as markup."""
    from rich.markup import escape

    return escape(text)


def error(message: str) -> None:
    stderr().print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Say what went wrong and exit: 1 when the job could not be done, 2 for bad input."""
    error(message)
    raise typer.Exit(code)


def bad_input(message: str) -> NoReturn:
    fail(message, 2)


def warnings(messages: Iterable[str]) -> None:
    """Warnings a one-shot command collected (no timestamp), one line each on stderr."""
    shown = list(messages)
    if not shown:
        return
    err = stderr()
    for m in shown:
        err.print(f"[yellow]warning:[/] {escape(m)}", highlight=False, soft_wrap=True)


def say(message: str) -> None:
    """A timestamped progress line, for commands that run for a while."""
    stamp = time.strftime("%H:%M:%S")
    stdout().print(f"{stamp} {escape(message)}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    stderr().print(
        f"{stamp} [yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True
    )
