"""Source `file`: `rpc_backends.conf`, one `host:port` a line.

`#` starts a comment (whole line or inline), blank lines are skipped, IPv6 goes in brackets.
A bad line is reported as file:line with the reason; the good lines are still used.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

from corral.endpoint import Endpoint, EndpointError, parse_endpoint
from corral.sources.base import SourceReport
from corral.types import Sighting, SourceName

FILE_NAME = "rpc_backends.conf"
MAX_FILE_BYTES = 1_000_000


def parse_backends_file(text: str, path: str) -> tuple[list[tuple[int, Endpoint]], list[str]]:
    """Pure: (line number, endpoint) for every good line, and one message per bad line."""
    good: list[tuple[int, Endpoint]] = []
    errors: list[str] = []
    seen: set[Endpoint] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        value = raw.split("#", 1)[0].strip()
        if not value:
            continue
        try:
            ep = parse_endpoint(value, where=f"{path}:{number}")
        except EndpointError as exc:
            errors.append(str(exc))
            continue
        if ep in seen:
            errors.append(f"{path}:{number}: duplicate of an earlier line: {value!r}")
            continue
        seen.add(ep)
        good.append((number, ep))
    return good, errors


def candidate_paths(explicit: str | None, env: dict[str, str], cwd: Path) -> list[Path]:
    """Where to look, in order: flag/env; ./; $XDG_CONFIG_HOME/corral/; /etc/corral/."""
    if explicit:
        return [Path(explicit)]
    if env.get("CORRAL_BACKENDS_FILE"):
        return [Path(env["CORRAL_BACKENDS_FILE"])]
    xdg = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return [
        cwd / FILE_NAME,
        Path(xdg) / "corral" / FILE_NAME,
        Path("/etc/corral") / FILE_NAME,
    ]


def read_backends_file(paths: list[Path], explicit: bool) -> SourceReport:
    """Blocking: read the first existing file of `paths`."""
    report = SourceReport(SourceName.FILE)
    for path in paths:
        if not path.exists():
            continue
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                report.warnings.append(f"{path}: larger than {MAX_FILE_BYTES} bytes, not read")
                return report
            # utf-8-sig: a byte-order mark (Windows editors write one) is not part of line 1.
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            report.warnings.append(f"{path}: cannot read: {exc}")
            return report
        good, errors = parse_backends_file(text, str(path))
        report.warnings.extend(errors)
        for number, ep in good:
            report.sightings.append(Sighting(ep, SourceName.FILE, f"{path}:{number}"))
        return report
    if explicit:
        report.warnings.append(f"{paths[0]}: backends file not found")
    return report


@dataclass
class FileSource:
    path: str | None = None
    name: SourceName = field(default=SourceName.FILE, init=False)

    async def collect(self) -> SourceReport:
        env = dict(os.environ)
        paths = candidate_paths(self.path, env, Path.cwd())
        explicit = bool(self.path or env.get("CORRAL_BACKENDS_FILE"))
        return await asyncio.to_thread(read_backends_file, paths, explicit)
