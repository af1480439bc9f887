"""How every command speaks to a person: one line per message, user text never read as markup.

Messages quote user input such as "[fe80::1]:0", which rich would take for markup and swallow;
soft wrap keeps a message on one line whatever the terminal width.
"""

from __future__ import annotations

import time
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape


def error(message: str) -> None:
    Console(stderr=True).print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Say what went wrong and exit: 1 when the job could not be done, 2 for bad input."""
    error(message)
    raise typer.Exit(code)


def say(message: str) -> None:
    """A timestamped progress line, for commands that run for a while."""
    stamp = time.strftime("%H:%M:%S")
    Console().print(f"{stamp} {escape(message)}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    Console(stderr=True).print(
        f"{stamp} [yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True
    )
