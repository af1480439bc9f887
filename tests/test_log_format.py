"""`--log-format json`: Corral's own log as one JSON object a line, from a real command.

`corral dashboard --log-format json` runs as a user runs it (a subprocess, its own state), is
asked to stop with SIGTERM, and everything it wrote on stderr must parse line by line, carrying
its progress lines and the control plane's own records; stdout stays empty.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

import httpx

from corral.cli.log_format import JsonFormatter
from tests.support.corral_cli import isolated_env
from tests.support.loopback import free_port
from tests.support.waiting import until

KEYS = {"time", "level", "logger", "message"}


def test_a_record_with_a_traceback_is_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "corral.x", logging.ERROR, __file__, 1, "failed: %s", ("why",), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "ERROR" and data["logger"] == "corral.x"
    assert data["message"] == "failed: why"
    assert data["exc_info"].startswith("Traceback") and "ValueError: boom" in data["exc_info"]
    assert data["time"].endswith("Z") and len(data["time"]) == len("2024-01-01T00:00:00.000Z")


async def test_dashboard_log_lines_parse_as_json(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    backends = tmp_path / "rpc_backends.conf"
    backends.write_text("")
    err_path, out_path = tmp_path / "stderr", tmp_path / "stdout"
    with err_path.open("wb") as err, out_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "corral",
            "dashboard",
            "--log-format",
            "json",
            "--port",
            str(port),
            "--sources",
            "file",
            "--backends-file",
            str(backends),
            env=isolated_env(tmp_path / "state"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    try:

        async def announced() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"exited {proc.returncode}: {err_path.read_text()}")
            return "dashboard: http://" in err_path.read_text()

        await until(announced, 30, "the dashboard to say where it listens")
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
        proc.send_signal(signal.SIGTERM)  # the process this test started, by its PID
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert out_path.read_text() == ""
    lines = err_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line, or this raises naming it
    assert all(set(r) >= KEYS for r in records), records
    said = [r for r in records if r["logger"] == "corral.cli" and r["level"] == "INFO"]
    assert f"dashboard: http://127.0.0.1:{port}/" in [r["message"] for r in said], records
    assert any(
        r["logger"] == "corral.plane.plane" and "SIGTERM received" in r["message"] for r in records
    ), records
