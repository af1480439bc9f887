"""The real `corral` console script, run as a subprocess, and what its --json output promises.

- `corral_script()`: the installed script beside this Python (fails the test if missing).
- `corral(*args, env=...)`: run it to the end; a `Run` holds the exit code, stdout and stderr.
- `Run.json()`: stdout as the list of backend objects, each checked by `check_contract`.
- `isolated_env(state_home)`: this environment minus whatever would point Corral at other state
  or another Redis, with its own state and config directories.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from corral.types import Status

STATUSES = {s.value for s in Status}
TYPES: dict[str, tuple[type, ...]] = {
    "host": (str,),
    "port": (int,),
    "status": (str,),
    "version": (str, type(None)),
    "devices": (list,),
    "latency_ms": (int, float, type(None)),
    "sources": (list,),
    "error": (str, type(None)),
    "names": (list,),
}


def corral_script() -> str:
    beside = Path(sys.executable).parent / "corral"
    found = str(beside) if beside.is_file() else shutil.which("corral")
    if not found:
        pytest.fail("the `corral` console script is not installed (pip install -e .)")
    return found


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> list[dict[str, Any]]:
        data = json.loads(self.out)
        assert isinstance(data, list)
        for item in data:
            check_contract(item)
        return data


async def corral(*args: str, env: dict[str, str], cwd: Path | None = None) -> Run:
    proc = await asyncio.create_subprocess_exec(
        corral_script(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=env,
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()  # our own child, by PID
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def check_contract(item: dict[str, Any]) -> None:
    """One backend object: exactly these keys, these types, these values."""
    assert set(item) == set(TYPES), sorted(item)
    for key, types in TYPES.items():
        assert isinstance(item[key], types), (key, item[key])
        assert not isinstance(item[key], bool), (key, item[key])  # bool is an int in Python
    assert item["host"]
    assert 1 <= item["port"] <= 65535
    assert item["status"] in STATUSES
    for dev in item["devices"]:
        assert isinstance(dev, dict) and set(dev) == {"index", "free_bytes", "total_bytes"}
        assert all(type(v) is int and v >= 0 for v in dev.values()), dev
        assert dev["free_bytes"] <= dev["total_bytes"]
    assert [d["index"] for d in item["devices"]] == list(range(len(item["devices"])))
    assert all(isinstance(s, str) for s in item["sources"])
    if item["error"] is not None:
        assert 0 < len(item["error"]) <= 120 and "\n" not in item["error"]
    if item["status"] == Status.READY:
        assert item["version"] is not None and item["latency_ms"] is not None
    else:
        assert item["devices"] == []


def isolated_env(state_home: Path) -> dict[str, str]:
    """This environment, minus whatever would point Corral at other state or another Redis."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CORRAL_", "SOLLOL_")) or k == "CORRAL_LLAMA_BIN_DIR"
    }
    env["XDG_STATE_HOME"] = str(state_home)
    env["XDG_CONFIG_HOME"] = str(state_home / "config")
    env["CORRAL_SYSTEM_CONFIG_DIR"] = str(state_home / "etc_corral")  # not the machine's /etc
    env["COLUMNS"] = "200"
    return env
