"""`corral demo`: a local cluster in one command (the cluster itself is corral.plane.demo)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from corral.cli.options import DASHBOARD_PORT, LLAMA_PORT, DashboardPortOpt, LlamaPortOpt

if TYPE_CHECKING:
    from rich.console import Console

    from corral.plane.demo import DemoOutput


def demo(
    once: Annotated[
        bool, typer.Option("--once", help="Exit after the first answer instead of running on.")
    ] = False,
    dashboard_port: DashboardPortOpt = DASHBOARD_PORT,
    coordinator_port: LlamaPortOpt = LLAMA_PORT,
) -> None:
    """A local cluster in one command: two backends, the dashboard, the coordinator, an answer.

    Runs until Ctrl-C (or --once). POSTs need the token it prints (or CORRAL_TOKEN).
    """
    import asyncio

    from rich.console import Console

    from corral.cli.llama import binaries_missing
    from corral.llama.binaries import BinariesNotFound, find_binaries
    from corral.plane.demo import DemoPorts, run_demo

    try:
        binaries = find_binaries()
    except BinariesNotFound as exc:
        binaries_missing(exc)
    ports = DemoPorts(dashboard_port, coordinator_port)
    # Soft wrap: log lines and the answer stay one line each, whatever the width.
    code = asyncio.run(run_demo(binaries, demo_output(Console(soft_wrap=True)), once, ports))
    raise typer.Exit(code)


def demo_output(console: Console) -> DemoOutput:
    """The demo's lines on one console (stdout): plain text escaped, tables as `backends`."""
    import time

    from rich.markup import escape

    from corral.cli.render import print_backends
    from corral.plane.demo import DemoOutput

    return DemoOutput(
        say=lambda m: console.print(escape(m)),
        stress=lambda lead, strong: console.print(f"{escape(lead)}[bold]{escape(strong)}[/]"),
        error=lambda m: console.print(f"[red]error:[/] {escape(m)}"),
        backends=lambda found, title: print_backends(console, found, title),
        log=lambda m: console.print(f"{time.strftime('%H:%M:%S')} {escape(m)}"),
        warn=lambda m: console.print(f"[yellow]warning:[/] {escape(m)}"),
    )
