"""The page in a real headless Chromium (Debian's), driven by Playwright, against real processes.

Two real ggml-rpc-servers; a real llama-server (tiny model, `--rpc` to the first, `-ngl 99`) as
the coordinator; the real app over a real EmbeddedStore; a small probe loop standing in for the
monitor. The page must list the backends, turn a killed backend's badge offline without a
reload, and get an answer to a prompt through the coordinator. Nothing may come from anywhere
but the dashboard itself.

And under a real `corral up` serving on two backends: those two read "serving" in the serving
colour (not an orange "busy": a held rpc-server cannot be probed, so the API says busy with
in_use), with a bar of the memory our llama-server used there (from its log) over the total,
not the stale "free" of a probe made before it loaded; one another client holds reads busy,
one nothing listens on offline, and the count says so.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from corral.endpoint import Endpoint
from corral.llama.binaries import LlamaBinaries
from corral.store.base import BackendRecord
from corral.store.sqlite import EmbeddedStore
from corral.types import Status
from tests.support.corral_up import corral_up, held_by_another_client
from tests.support.dashboard import TOKEN, LlamaController, ProbeLoop, running_dashboard
from tests.support.loopback import free_port, next_loopback
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000


def _need_browser() -> None:
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("playwright (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs {', '.join(missing)}")
        pytest.skip(f"needs {', '.join(missing)}")


@dataclass
class Browser:
    """A fresh page; every request not for the dashboard on loopback is refused and recorded in
    `foreign_requests`, every console error in `console_errors`."""

    page: Any
    foreign_requests: list[str]
    console_errors: list[str]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    _need_browser()
    from playwright.async_api import Route, async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(viewport={"width": 1360, "height": 1000})
            page = await context.new_page()
            foreign: list[str] = []
            errors: list[str] = []

            async def guard(route: Route) -> None:
                host = urlsplit(route.request.url).hostname or ""
                if host == "127.0.0.1":
                    await route.continue_()
                else:
                    foreign.append(route.request.url)
                    await route.abort()

            await page.route("**/*", guard)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.set_default_timeout(TIMEOUT_MS)
            yield Browser(page, foreign, errors)
        finally:
            await browser.close()


def row(ep: Endpoint) -> str:
    return f'#backends-body tr[data-endpoint="{ep}"]'


async def css_colour(page: Any, variable: str) -> str:
    """The page's CSS variable `variable` (a #rrggbb colour) as a computed style reads it."""
    value = await page.evaluate(
        "v => getComputedStyle(document.documentElement).getPropertyValue(v).trim()", variable
    )
    assert isinstance(value, str) and len(value) == 7 and value.startswith("#"), value
    red, green, blue = (int(value[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({red}, {green}, {blue})"


async def test_page_lists_backends_follows_a_death_live_and_answers_a_prompt(
    browser: Browser,
    rpc_server: StartRpc,
    llama_bins: LlamaBinaries,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    page = browser.page
    (used, _), (doomed, doomed_child) = await rpc_server(), await rpc_server()
    steady, _ = await rpc_server()
    store = await EmbeddedStore.open(tmp_path / "state.db")
    ctl = LlamaController(llama_bins, tiny_model, [used], tmp_path, store)
    try:
        await ctl.start()
        async with (
            running_dashboard(
                tmp_path, store=store, coordinator=ctl, coordinator_url=ctl.base_url
            ) as dash,
            ProbeLoop(store, [used, doomed, steady]),
        ):
            await page.goto(dash.base + "/")

            # The backends, with their live status, version, devices and who uses them.
            await page.wait_for_selector(f'{row(used)}[data-status="busy"][data-in-use="true"]')
            await page.wait_for_selector(f'{row(doomed)}[data-status="ready"]')
            await page.wait_for_selector(f'{row(steady)}[data-status="ready"][data-in-use="false"]')
            assert await page.is_hidden("#empty-state")
            doomed_row = page.locator(row(doomed))
            assert await doomed_row.locator('[data-role="status"]').text_content() == "ready"
            assert await doomed_row.locator("td").nth(2).text_content() == "7.0.0"
            assert await doomed_row.locator(".device").count() >= 1
            assert "free" in (await doomed_row.locator(".device .label").first.text_content() or "")
            assert await page.locator(f"{row(used)} td.inuse").text_content() == "in use"
            assert await page.locator(f'{row(used)} [data-role="status"]').text_content() == (
                "serving"
            )

            # The coordinator panel.
            await page.wait_for_selector('#coordinator-state[data-state="serving"]')
            backends_text = await page.text_content('#coordinator [data-field="backends"]')
            assert backends_text == str(used)
            assert await page.text_content('#coordinator [data-field="model"]') == "tiny.gguf"
            await page.wait_for_selector('#live-indicator[data-mode="live"]')

            # Kill a backend (a process this test started, by PID): once the store says offline,
            # the open page shows it, without a reload.
            await page.evaluate("window.__not_reloaded = true")
            assert doomed_child.pid is not None
            os.kill(doomed_child.pid, signal.SIGKILL)

            async def store_says_offline() -> bool:
                recs = {r.endpoint: r for r in await store.backends()}
                return recs[doomed].status is Status.OFFLINE

            await until(store_says_offline, 10, "the store to say offline")
            await page.wait_for_selector(f'{row(doomed)}[data-status="offline"]', timeout=5000)
            badge = doomed_row.locator('[data-role="status"]')
            assert await badge.text_content() == "offline"
            assert await page.evaluate("window.__not_reloaded === true")
            await page.wait_for_selector(
                f'#events li[data-kind="backend_status_changed"][data-endpoint="{doomed}"]'
                " >> text=-> offline"
            )

            # A prompt without the token is refused, and the page says why ...
            await page.fill("#prompt-input", "Say something, tiny model.")
            await page.click("#prompt-send")
            await page.wait_for_selector('#prompt-answer[data-state="error"]')
            assert "token" in (await page.text_content("#prompt-error") or "")
            # ... with it, the coordinator answers (nonsense, from random weights).
            await page.fill("#token-input", TOKEN)
            await page.click("#prompt-send")
            await page.wait_for_selector('#prompt-answer[data-state="done"]', timeout=30_000)
            answer = await page.text_content("#prompt-answer")
            assert answer, await page.text_content("#prompt-error")
            assert await page.text_content("#prompt-error") == ""
            # llama-server's own timings, seen on the way through, become the tokens/s shown.
            await page.wait_for_function(
                "parseFloat(document.querySelector("
                "'#coordinator [data-field=\"tokens_per_second\"]').textContent) > 0"
            )
            assert await page.locator(f'{row(steady)}[data-status="ready"]').count() == 1

            shots = ROOT / "test-artifacts"
            shots.mkdir(exist_ok=True)
            await page.screenshot(path=str(shots / "dashboard.png"), full_page=True)
            assert browser.foreign_requests == []
            assert [e for e in browser.console_errors if "Content Security Policy" in e] == []
    finally:
        await ctl.stop()
        await store.close()


async def test_empty_state_then_polling_when_the_stream_fails(
    browser: Browser, tmp_path: Path
) -> None:
    page = browser.page
    async with running_dashboard(tmp_path) as dash:
        # The event stream is made to fail: the page must fall back to polling every 3 s.
        await page.route("**/api/stream", lambda route: route.abort())
        await page.goto(dash.base + "/")
        await page.wait_for_selector("#empty-state", state="visible")
        text = await page.text_content("#empty-state") or ""
        assert "No RPC backends found" in text and "ggml-rpc-server" in text
        assert "Rescan" in text
        assert await page.is_hidden("#backends-table")
        await page.wait_for_selector('#live-indicator[data-mode="poll"]')
        shots = ROOT / "test-artifacts"
        shots.mkdir(exist_ok=True)
        await page.screenshot(path=str(shots / "dashboard-empty.png"))

        ep = Endpoint("127.0.0.1", 1)
        await dash.store.put_backends([BackendRecord(ep, Status.OFFLINE, error="refused")])
        await page.wait_for_selector(f'{row(ep)}[data-status="offline"]', timeout=8000)
        assert await page.is_hidden("#empty-state")

        # Rescan without the token is refused and the page says so; with it, it runs.
        await page.click("#rescan-btn")
        await page.wait_for_selector("#action-status >> text=needs the token")
        assert dash.rescans == []
        await page.fill("#token-input", TOKEN)
        await page.click("#rescan-btn")
        await page.wait_for_selector("#action-status >> text=discovery run started")
        assert len(dash.rescans) == 1
        assert browser.foreign_requests == []


async def test_backends_our_coordinator_holds_show_as_serving_not_busy(
    browser: Browser, rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    page = browser.page
    (a, _), (b, _), (other, _) = await rpc_server(), await rpc_server(), await rpc_server()
    host = next_loopback()
    nobody = Endpoint(host, free_port(host))
    async with (
        held_by_another_client(other),  # before corral up starts: it never gets this one
        corral_up(
            tmp_path, [a, b, other, nobody], tiny_model, "--tensor-split", "1,1", token=TOKEN
        ) as up,
    ):
        await page.goto(up.base + "/")
        await page.wait_for_selector('#coordinator-state[data-state="serving"]', timeout=30_000)

        # The two our llama-server holds: the API's status stays `busy` (the contract), with
        # in_use; the page shows them serving, in the serving colour (not the busy one).
        for ep in (a, b):
            held = page.locator(f'{row(ep)}[data-status="busy"][data-in-use="true"]')
            await expect(held).to_have_count(1, timeout=TIMEOUT_MS)
            badge = held.locator('[data-role="status"]')
            await expect(badge).to_have_text("serving")
            serving_colour = await css_colour(page, "--serving")
            busy_colour = await css_colour(page, "--busy")
            assert serving_colour != busy_colour
            await expect(badge).to_have_css("background-color", serving_colour)
            # Its memory: what our llama-server allocated there (its log, published with the
            # coordinator), as a bar of used / total, free = total - used; not the "free" a
            # probe saw before the model loaded.
            device = held.locator('.device[data-device="0"]')
            await expect(device).to_have_attribute("data-held", "true")
            await expect(device).to_have_attribute("data-used", re.compile(r"^[1-9]\d*$"))
            await expect(device).to_contain_text("used by the coordinator")
            used_bytes = int(await device.get_attribute("data-used") or "")
            total_bytes = int(await device.get_attribute("data-total") or "")
            memory = {(m["backend"], m["device"]): m for m in (await up.coordinator())["memory"]}
            assert used_bytes == memory[(str(ep), "0")]["used_bytes"]
            assert total_bytes == (await up.backends())[str(ep)]["devices"][0]["total_bytes"]
            width = await device.locator(".bar > div").evaluate("n => parseFloat(n.style.width)")
            # (Chromium keeps 7 decimals of a percentage in the style)
            assert width == pytest.approx(100 * used_bytes / total_bytes, abs=1e-6)
            free = total_bytes - used_bytes
            label = await device.locator(".label").text_content() or ""
            assert f"{free / 2**30:.1f} GiB free" in label, label
            devices = await held.locator(".device").count()
            assert await held.locator(".device .bar").count() == devices
            assert await held.locator(".err").count() == 0  # nothing reads as trouble

        # Held by another client: busy, in orange, not ours. Nothing listening: offline.
        theirs = page.locator(f'{row(other)}[data-in-use="false"] [data-role="status"]')
        await expect(theirs).to_have_text("busy", timeout=TIMEOUT_MS)
        await expect(theirs).to_have_css("background-color", busy_colour)
        down = page.locator(f'{row(nobody)} [data-role="status"]')
        await expect(down).to_have_text("offline", timeout=TIMEOUT_MS)

        await expect(page.locator("#backends-count")).to_have_text(
            "4 known: 2 serving, 0 ready, 1 busy, 1 offline"
        )
        coordinator_backends = page.locator('#coordinator [data-field="backends"]')
        await expect(coordinator_backends).to_have_text(f"{a}, {b}")

        # The figures count them the same way; the status counts keep the contract's values.
        async with httpx.AsyncClient(base_url=up.base, timeout=5, trust_env=False) as client:
            counts = (await client.get("/api/metrics")).json()["backends"]
            exposition = (await client.get("/metrics")).text
        assert counts["serving"] == 2 and counts["in_use"] == 2, counts
        assert counts["by_status"]["busy"] == 3, counts
        assert "\ncorral_backends_serving 2.0\n" in exposition
        assert '\ncorral_backends{status="busy"} 3.0\n' in exposition

        shots = ROOT / "test-artifacts"
        shots.mkdir(exist_ok=True)
        await page.screenshot(path=str(shots / "dashboard-serving.png"), full_page=True)
        assert browser.foreign_requests == []
        assert browser.console_errors == []


async def test_history_shows_a_backend_offline_and_back_and_the_log_needs_the_token(
    browser: Browser, rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    """Under a real `corral up` (its history sampled every 0.5 s: `--history-step`), a real
    ggml-rpc-server the coordinator does not hold (`--on-change ignore`) is killed and started
    again on the same port: the charts draw, and its status timeline shows the offline interval
    between two ready ones. llama-server's log shows only once the token is given."""
    page = browser.page
    a, _ = await rpc_server()
    host = next_loopback()
    b = Endpoint(host, free_port(host))
    extra = ("--history-step", "0.5", "--recheck", "0.5", "--on-change", "ignore")
    async with corral_up(tmp_path, [a, b], tiny_model, *extra, token=TOKEN) as up:
        await up.wait_serving({a}, seconds=30)
        _, b_child = await rpc_server(b.host, b.port)
        await page.goto(up.base + "/")

        # The log: locked until the token is given.
        await page.wait_for_selector('#log-lines[data-state="locked"]', state="attached")
        assert await page.text_content("#log-lines") == ""
        assert "token" in (await page.text_content("#log-state") or "")

        timeline = f'#timelines .timeline[data-endpoint="{b}"]'
        statuses = (
            "sel => [...document.querySelectorAll(sel + ' .seg')].map(s => s.dataset.status)"
            ".join(',')"
        )

        async def shows(tail: str) -> None:
            await page.wait_for_function(
                f"([sel, tail]) => ({statuses})(sel).endsWith(tail)", arg=[timeline, tail]
            )

        await shows("ready")
        assert b_child.pid is not None
        killed_at = time.time()
        os.kill(b_child.pid, signal.SIGKILL)  # a process this test started, by its PID
        await shows("ready,offline")
        await rpc_server(b.host, b.port)  # the same port again
        back_at = time.time()
        await shows("ready,offline,ready")

        history = await up.get("/api/history")
        (mine,) = [x for x in history["backends"] if x["endpoint"] == str(b)]
        offline = mine["timeline"][-2]
        assert offline["status"] == "offline"
        assert killed_at <= offline["from"] < offline["to"], offline
        # Back once it answered again, after it was started.
        assert mine["timeline"][-1]["from"] == offline["to"] >= back_at
        assert any(v is not None for v in mine["latency_ms"])
        # The charts, drawn by the vendored uPlot from the same data.
        for chart in ("#chart-traffic", "#chart-latency"):
            await page.wait_for_selector(f"{chart} canvas")
            points = int(await page.get_attribute(chart, "data-points") or "0")
            assert points >= 2, points
        assert int(await page.get_attribute("#chart-latency", "data-series") or "0") == 2
        legend = await page.text_content("#chart-latency .u-legend") or ""
        assert str(a) in legend and str(b) in legend, legend

        # With the token: llama-server's own lines, as its log file has them.
        await page.fill("#token-input", TOKEN)
        await page.wait_for_selector('#log-lines[data-state="following"]')
        listening = f"listening on http://127.0.0.1:{up.coordinator_port}"
        await page.wait_for_selector(f"#log-lines >> text={listening}")

        shots = ROOT / "test-artifacts"
        shots.mkdir(exist_ok=True)
        await page.screenshot(path=str(shots / "dashboard-history.png"), full_page=True)
        assert browser.foreign_requests == []
        assert browser.console_errors == []
