"""`--log-format`: Corral's own log as text for people, or one JSON object a line for collectors.

A JSON line holds `time` (UTC, ISO 8601, milliseconds), `level`, `logger`, `message`, and
`exc_info` (the traceback's text) when there is one. In JSON mode the progress lines a command
says (`say`, `warn`) are log records too (logger `corral.cli`, INFO and WARNING), so everything
on stderr parses; stdout stays empty.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Literal

LogFormat = Literal["text", "json"]
Say = Callable[[str], None]
CLI_LOGGER = "corral.cli"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def use_json(level: int = logging.INFO) -> None:
    """Every record from `level` up, as one JSON line on stderr (replaces any earlier setup)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def speakers(fmt: LogFormat, say: Say, warn: Say) -> tuple[Say, Say]:
    """The command's `say` and `warn`: as given for text; log records in JSON mode."""
    if fmt == "text":
        return say, warn
    log = logging.getLogger(CLI_LOGGER)
    return log.info, log.warning
