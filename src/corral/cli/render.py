"""Render backends for people (a rich table) and for programs (the `--json` contract).

rich is imported for the table only: `--json` output does without it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from corral.cli.console import escape
from corral.types import Backend, ProbeResult, Status

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from corral.store.base import BackendRecord

_STYLE = {
    Status.READY: "green",
    Status.BUSY: "yellow",
    Status.OFFLINE: "red",
    Status.INCOMPATIBLE: "magenta",
    Status.NOT_RPC: "bright_black",
}


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def backends_json(backends: Sequence[Backend]) -> str:
    return json.dumps([b.to_json() for b in backends], indent=2)


def backends_table(backends: Sequence[Backend], title: str) -> Table:
    from rich.table import Table

    table = Table(title=escape(title), title_justify="left")
    table.add_column("endpoint", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for col in ("version", "devices (free/total)", "latency", "sources", "note"):
        table.add_column(col)
    for b in backends:
        p = b.probe
        status = p.status if p else Status.OFFLINE
        devices = ", ".join(
            f"#{d.index} {human_bytes(d.free_bytes)}/{human_bytes(d.total_bytes)}"
            for d in (p.devices if p else ())
        )
        latency = f"{p.latency_ms:.1f} ms" if p and p.latency_ms is not None else ""
        # Cells are escaped: "[fe80::1]:50052" or a quoted reply would otherwise be read as markup.
        table.add_row(
            escape(str(b.endpoint)),
            f"[{_STYLE[status]}]{status}[/]",
            escape((p.version if p else None) or ""),
            escape(devices),
            latency,
            ",".join(str(s) for s in b.sources),
            escape((p.error if p else "") or ""),
        )
    return table


def print_backends(console: Console, backends: Sequence[Backend], title: str) -> None:
    if not backends:
        console.print(f"{escape(title)}: none found.")
        return
    console.print(backends_table(backends, title))


def record_to_backend(record: BackendRecord) -> Backend:
    """A stored view shown like a fresh one (the caller says it is stale)."""
    probe = ProbeResult(
        record.endpoint,
        record.status,
        version=record.version,
        devices=record.devices,
        latency_ms=record.latency_ms,
        error=record.error,
    )
    return Backend(record.endpoint, list(record.sources), probe)
