"""Schemathesis against the dashboard's own OpenAPI schema: every check, no failures.

The server is the real app on a real socket over a real EmbeddedStore holding a real probed
backend; schemathesis runs in its own process (its CLI), with the token, so both the refusals
(401 without it) and the actions are exercised. `/api/stream` and `/api/logs` are left out:
they never end by design (test_web_api and test_logs cover them).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.dashboard import TOKEN, ProbeLoop, running_dashboard
from tests.support.rpc_backends import StartRpc

ROOT = Path(__file__).resolve().parent.parent


async def test_schemathesis_finds_no_failures(rpc_server: StartRpc, tmp_path: Path) -> None:
    if importlib.util.find_spec("schemathesis") is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs schemathesis (pip install -e '.[dev]')")
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    ep, _ = await rpc_server()
    async with running_dashboard(tmp_path) as dash, ProbeLoop(dash.store, [ep]):
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "NO_COLOR": "1",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{dash.base}/api/openapi.json",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            "--checks",
            "all",
            "--exclude-path",
            "/api/stream",
            "--exclude-path",
            "/api/logs",
            "--max-examples",
            "60",
            "--seed",
            "20240601",
            "--workers",
            "1",
            "--request-timeout",
            "5",
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
        text = out.decode(errors="replace")
        assert proc.returncode == 0, text[-6000:]
        assert "No issues found" in text, text[-3000:]
        assert "Tested: 10" in text, text[-3000:]
        # The fuzzing went through the token-guarded actions and left the server healthy.
        assert dash.rescans, "schemathesis never got a rescan through with the token"
        assert await dash.store.live_nodes(), "no heartbeat was accepted"
        async with httpx.AsyncClient(base_url=dash.base, trust_env=False) as c:
            assert (await c.get("/healthz")).status_code == 200
            items = (await c.get("/api/rpc_backends")).json()
            assert [i["status"] for i in items] == ["ready"]
