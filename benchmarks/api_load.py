"""Load on the dashboard's hottest read, `GET /api/rpc_backends`, measured from outside.

    python benchmarks/api_load.py                      # 200 clients, 30 s, open + saturation
    python benchmarks/api_load.py --duration 10 --rate 4000

Three processes: the dashboard (real app, real uvicorn, real EmbeddedStore holding --backends
records that a writer inside the server process rewrites every --churn-s, as a monitor would, so
the cached body is refreshed from store notifications during the run), and a load generator in
its own process, so the server is what gets measured:

- open loop (the target check): --clients connections, each sending at a fixed pace so that
  together they send --rate requests/s; latency counts from when a request was *due*, so a
  stalled server cannot hide its stall (no coordinated omission). Targets: p99 <= 10 ms, no errors.
- saturation: `wrk` (Debian's package) with --clients connections in a closed loop, as fast as
  the server answers: its throughput. Latency there is clients / throughput (Little's law).

The server's resident memory is sampled throughout (target <= 100 MB).

`--offline` measures instead a real backend's death (SIGKILL) to `offline` in the API, with the
real monitor over a real rpc_backends.conf; `time_to_offline()` takes any monitor as a callable.

`--flood` measures instead the node API under a registration flood, against the real control
plane (`run_plane`: dashboard + monitor with the registry and cache sources, as `corral up`
runs them): --flood-count registrations (each a new node, its backend a refused loopback port)
sent as fast as a client bounded to --flood-concurrency connections can, from --flood-addresses
client addresses, while GET /api/rpc_backends is sampled open-loop (--flood-rate requests/s)
during the flood and --flood-settle seconds after it. It prints how many were accepted and
refused (429), the reads' p50/p99 against the 10 ms target, the backends listed and the memory:

    python benchmarks/api_load.py --flood                     # 5,000 registrations, 1 address
    python benchmarks/api_load.py --flood --flood-addresses 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from corral.endpoint import Endpoint
from corral.store.base import BackendRecord, Store
from corral.store.sqlite import EmbeddedStore
from corral.types import Device, SourceName, Status
from corral.web.app import create_app
from corral.web.server import serve

PATH = "/api/rpc_backends"
FLOOD_TOKEN = "bench-flood"
TARGET_P99_MS = 10.0
TARGET_RSS_MB = 100.0


# ---- the server process ----------------------------------------------------------------------


def synthetic_backends(n: int, now: float) -> list[BackendRecord]:
    """N plausible records: mostly ready, some busy/offline, 1-2 devices each."""
    rng = random.Random(n)
    out = []
    for i in range(n):
        status = Status.READY if i % 5 else (Status.BUSY if i % 10 else Status.OFFLINE)
        devices = (
            tuple(Device(d, rng.randrange(1, 24) << 30, 24 << 30) for d in range(1 + i % 2))
            if status is Status.READY
            else ()
        )
        out.append(
            BackendRecord(
                Endpoint(f"198.18.{i // 250}.{i % 250 + 1}", 50052),
                status,
                "7.0.0" if status is Status.READY else None,
                devices,
                (SourceName.SCAN, SourceName.FILE) if i % 3 else (SourceName.REGISTRY,),
                round(rng.uniform(0.3, 3.0), 3) if status is not Status.OFFLINE else None,
                None if status is not Status.OFFLINE else "connection refused",
                last_seen=now,
            )
        )
    return out


async def run_server(port_file: Path, state_dir: Path, backends: int, churn_s: float) -> None:
    store = await EmbeddedStore.open(state_dir / "state.db")
    await store.put_backends(synthetic_backends(backends, time.time()))
    app = create_app(store, token="bench")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def churn() -> None:  # what a monitor does: rewrite the records, which notifies
        while True:
            await asyncio.sleep(churn_s)
            await store.put_backends(synthetic_backends(backends, time.time()))

    def ready(port: int) -> None:
        port_file.write_text(str(port))

    writer = asyncio.create_task(churn())
    try:
        await serve(app, "127.0.0.1", 0, stop=stop, handle_signals=False, on_ready=ready)
    finally:
        writer.cancel()
        await store.close()


async def run_plane_server(port_file: Path, state_dir: Path) -> None:
    """The whole control plane as `corral up` runs it without a model: dashboard + monitor,
    discovering from the registry (node heartbeats) and the cache."""
    from corral.plane.plane import PlaneConfig, WatchPlan, run_plane
    from corral.rpc.probe import Prober
    from corral.sources.chain import ChainOptions

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cfg = PlaneConfig(
        state=state_dir,
        watch=WatchPlan([SourceName.REGISTRY, SourceName.CACHE], ChainOptions()),
        host="127.0.0.1",
        port=0,
        token=FLOOD_TOKEN,
    )

    def ready(plane: Any) -> None:
        port_file.write_text(plane.dashboard_url.rsplit(":", 1)[1])

    def quiet(_: str) -> None:
        pass

    await run_plane(cfg, Prober(timeout=1.0), stop, say=quiet, warn=quiet, on_ready=ready)


# ---- the load generator process --------------------------------------------------------------


async def _client(
    host: str, port: int, interval: float, start: float, end: float, out: dict[str, Any]
) -> None:
    loop = asyncio.get_running_loop()
    request = f"GET {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection(host, port)
    due = start + random.random() * interval  # spread the clients over one interval
    try:
        while due < end:
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                match = re.search(rb"(?i)content-length:\s*(\d+)", head)
                await reader.readexactly(int(match.group(1)) if match else 0)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                out["errors"].append(f"{type(exc).__name__}: {exc}")
                return
            out["latencies"].append(loop.time() - due)
            if status != 200:
                out["errors"].append(f"HTTP {status}")
            due += interval
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def run_open_loop(host: str, port: int, clients: int, rate: float, duration: float) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.5
    out: dict[str, Any] = {"latencies": [], "errors": []}
    interval = clients / rate
    await asyncio.gather(
        *(_client(host, port, interval, start, start + duration, out) for _ in range(clients))
    )
    json.dump(out, sys.stdout)


def flood_body(n: int) -> dict[str, Any]:
    """Registration n: a new node whose backend is a refused port on its own loopback address."""
    return {
        "node_id": f"flood-{n}",
        "endpoint": f"127.1.{n // 250}.{n % 250 + 1}:50052",
        "hostname": f"flood-{n}",
        "status": "ready",
        "heartbeat_s": 2.0,
    }


async def run_flood(port: int, count: int, concurrency: int, addresses: int) -> None:
    """Send `count` registrations, at most `concurrency` at once, spread over `addresses`
    client addresses (127.0.0.1, 127.0.0.2, ...); print the tally as JSON."""
    url = f"http://127.0.0.1:{port}/api/nodes/heartbeat"
    headers = {"Authorization": f"Bearer {FLOOD_TOKEN}"}
    per = max(1, concurrency // addresses)
    clients = [
        httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(
                local_address=f"127.0.{i // 250}.{i % 250 + 1}",
                limits=httpx.Limits(max_connections=per, max_keepalive_connections=per),
            ),
            trust_env=False,
            timeout=60,
        )
        for i in range(addresses)
    ]
    gate = asyncio.Semaphore(concurrency)
    codes: dict[str, int] = {}
    errors: list[str] = []

    async def one(n: int) -> None:
        async with gate:
            try:
                r = await clients[n % addresses].post(url, json=flood_body(n), headers=headers)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1

    started = time.monotonic()
    try:
        await asyncio.gather(*(one(n) for n in range(count)))
    finally:
        for c in clients:
            await c.aclose()
    elapsed = time.monotonic() - started
    json.dump({"codes": codes, "errors": errors[:5], "seconds": round(elapsed, 2)}, sys.stdout)


async def _sampler(
    host: str, port: int, interval: float, phase: list[str], out: dict[str, list[float]]
) -> None:
    """Open-loop GETs of PATH every `interval`, latency from when each was due, filed under
    the phase current when it was due; until phase[0] is "done"."""
    loop = asyncio.get_running_loop()
    request = f"GET {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection(host, port)
    due = loop.time() + random.random() * interval
    try:
        while phase[0] != "done":
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now_phase = phase[0]
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            match = re.search(rb"(?i)content-length:\s*(\d+)", head)
            await reader.readexactly(int(match.group(1)) if match else 0)
            out.setdefault(now_phase, []).append(loop.time() - due)
            due += interval
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def flood(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="corral-flood-") as tmp:
        port_file = Path(tmp) / "port"
        server = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "_plane", "--port-file", str(port_file), "--state-dir", tmp
        )
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if server.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("the control plane did not start")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text())
        rss = RssSampler(server.pid)
        rss.start()
        results: dict[str, Any] = {}
        try:
            print(f"control plane pid {server.pid} on 127.0.0.1:{port} (registry + cache sources)")
            print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
            print(f"resident memory at start: {rss.sample() / 2**20:.1f} MB")
            phase = ["flood"]
            lat: dict[str, list[float]] = {}
            samplers = [
                asyncio.create_task(_sampler("127.0.0.1", port, 4 / args.flood_rate, phase, lat))
                for _ in range(4)
            ]
            server_proc = psutil.Process(server.pid)
            cpu_before = sum(server_proc.cpu_times()[:2])
            print(
                f"flood: {args.flood_count} registrations, {args.flood_concurrency} at once,"
                f" from {args.flood_addresses} address(es); reads at {args.flood_rate:g}/s ..."
            )
            gen = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "_flood",
                "--port",
                str(port),
                "--count",
                str(args.flood_count),
                "--concurrency",
                str(args.flood_concurrency),
                "--addresses",
                str(args.flood_addresses),
                stdout=asyncio.subprocess.PIPE,
            )
            if args.flood_pin and (os.cpu_count() or 1) >= 2:
                # The flood comes from other machines in life: here its sender gets a core of
                # its own, so what is measured is the server's answer, not a fight for one core.
                os.sched_setaffinity(server.pid, {0})
                os.sched_setaffinity(gen.pid, {1})
            raw, _ = await gen.communicate()
            tally = json.loads(raw)
            # The server's own CPU over the flood: what it costs, whatever else the machine runs.
            flood_cpu_s = sum(server_proc.cpu_times()[:2]) - cpu_before
            phase[0] = "settle"
            await asyncio.sleep(args.flood_settle)
            phase[0] = "done"
            await asyncio.gather(*samplers)
            async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
                listed = (await c.get(f"http://127.0.0.1:{port}{PATH}")).json()
                metrics = (await c.get(f"http://127.0.0.1:{port}/api/metrics")).json()
            codes = tally["codes"]
            results = {
                "sent": args.flood_count,
                "accepted": codes.get("200", 0),
                "refused_429": codes.get("429", 0),
                "other": {k: v for k, v in codes.items() if k not in ("200", "429")},
                "client_errors": tally["errors"],
                "flood_seconds": tally["seconds"],
                "server_cpu_s_during_flood": round(flood_cpu_s, 2),
                "reads_during_flood": percentiles_ms(lat.get("flood", [])),
                "reads_after_flood": percentiles_ms(lat.get("settle", [])),
                "backends_listed": len(listed),
                "nodes_live": metrics.get("nodes_live"),
                "rss_mb": {
                    "end": round(rss.sample() / 2**20, 1),
                    "peak": round(rss.peak / 2**20, 1),
                },
                "load_average_1m_end": round(os.getloadavg()[0], 2),
            }
            print("  ", json.dumps(results))
        finally:
            await rss.stop()
            server.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(server.wait(), 30)
            except TimeoutError:
                server.kill()
                await server.wait()
    during = results["reads_during_flood"].get("p99", 1e9)
    after = results["reads_after_flood"].get("p99", 1e9)
    print(
        f"registrations: {results['accepted']} accepted, {results['refused_429']} refused (429)"
        f" of {results['sent']} in {results['flood_seconds']} s"
    )
    busy = results["server_cpu_s_during_flood"] / max(results["flood_seconds"], 1e-9)
    print(
        f"server CPU during the flood: {results['server_cpu_s_during_flood']} s over"
        f" {results['flood_seconds']} s ({busy:.0%} of one core; load average at the end"
        f" {results['load_average_1m_end']} on {os.cpu_count()} cores)"
    )
    met = max(during, after) <= TARGET_P99_MS
    print(
        f"GET {PATH} p50/p99: {results['reads_during_flood'].get('p50')}/{during} ms during,"
        f" {results['reads_after_flood'].get('p50')}/{after} ms in the {args.flood_settle:g} s"
        f" after; target p99 <= {TARGET_P99_MS} ms: {'met' if met else 'MISSED'}"
    )
    if args.json:
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(results, indent=2))
    return 0 if met else 1


# ---- the driver ------------------------------------------------------------------------------


def percentiles_ms(latencies_s: list[float]) -> dict[str, float]:
    xs = sorted(latencies_s)
    if not xs:
        return {}

    def at(q: float) -> float:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 3)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(xs[-1] * 1000, 3)}


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> int:
        rss = int(self.proc.memory_info().rss)
        self.peak = max(self.peak, rss)
        return rss

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.5)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def start_server(
    args: argparse.Namespace, workdir: Path
) -> tuple[asyncio.subprocess.Process, int]:
    port_file = workdir / "port"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "_serve",
        "--port-file",
        str(port_file),
        "--state-dir",
        str(workdir),
        "--backends",
        str(args.backends),
        "--churn-s",
        str(args.churn_s),
    )
    deadline = time.monotonic() + 20
    while not port_file.exists() or not port_file.read_text():
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError("the dashboard server did not start")
        await asyncio.sleep(0.05)
    return proc, int(port_file.read_text())


async def open_loop(args: argparse.Namespace, port: int) -> dict[str, Any]:
    gen = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "_load",
        "--port",
        str(port),
        "--clients",
        str(args.clients),
        "--rate",
        str(args.rate),
        "--duration",
        str(args.duration),
        stdout=asyncio.subprocess.PIPE,
    )
    raw, _ = await asyncio.wait_for(gen.communicate(), args.duration + 60)
    data = json.loads(raw)
    lat: list[float] = data["latencies"]
    errors: list[str] = data["errors"]
    return {
        "requests": len(lat),
        "achieved_rate": round(len(lat) / args.duration, 1),
        "errors": len(errors),
        "error_kinds": sorted(set(errors))[:5],
        **percentiles_ms(lat),
    }


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(text)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]
    return round(float(m.group(1)) * scale, 3)


async def saturation(args: argparse.Namespace, port: int) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        return {"skipped": "wrk not installed (apt-get install wrk)"}
    proc = await asyncio.create_subprocess_exec(
        wrk,
        "-t1",
        f"-c{args.clients}",
        f"-d{int(args.duration)}s",
        "--latency",
        f"http://127.0.0.1:{port}{PATH}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    raw, _ = await asyncio.wait_for(proc.communicate(), args.duration + 60)
    text = raw.decode()
    out: dict[str, Any] = {}
    for q in ("50", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", text, re.M)
        if m:
            out[f"p{q}"] = _ms(m.group(1))
    m = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", text)
    if m:
        out["max"] = _ms(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["throughput"] = float(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors += sum(int(x) for x in m.groups())
    out["errors"] = errors
    return out


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        server, port = await start_server(args, Path(tmp))
        rss = RssSampler(server.pid)
        rss.start()
        try:
            async with httpx.AsyncClient(trust_env=False) as c:
                first = (await c.get(f"http://127.0.0.1:{port}{PATH}")).json()
            print(f"dashboard pid {server.pid} on 127.0.0.1:{port}; {len(first)} backends")
            # Other work on this machine shows up as latency: say how busy it was.
            print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
            print(f"resident memory at start: {rss.sample() / 2**20:.1f} MB")
            results: dict[str, Any] = {}
            if not args.no_open:
                print(
                    f"open loop: {args.clients} clients, {args.rate:g} req/s in all,"
                    f" {args.duration:g} s ..."
                )
                results["open_loop"] = await open_loop(args, port)
                print("  ", json.dumps(results["open_loop"]))
            if not args.no_saturation:
                print(f"saturation (wrk): {args.clients} connections, {args.duration:g} s ...")
                results["saturation"] = await saturation(args, port)
                print("  ", json.dumps(results["saturation"]))
            results["load_average_1m_end"] = round(os.getloadavg()[0], 2)
            results["rss_mb"] = {
                "end": round(rss.sample() / 2**20, 1),
                "peak": round(rss.peak / 2**20, 1),
            }
            print(f"resident memory: {json.dumps(results['rss_mb'])}")
        finally:
            await rss.stop()
            server.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(server.wait(), 10)
            except TimeoutError:
                server.kill()
                await server.wait()
    ok = True
    o = results.get("open_loop")
    if o is not None:
        met = o.get("p99", 1e9) <= TARGET_P99_MS and o["errors"] == 0
        ok &= met
        print(
            f"target open-loop p99 <= {TARGET_P99_MS} ms, no errors: {'met' if met else 'MISSED'}"
        )
    met = results["rss_mb"]["peak"] <= TARGET_RSS_MB
    ok &= met
    print(f"target resident memory <= {TARGET_RSS_MB:g} MB: {'met' if met else 'MISSED'}")
    if args.json:
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(results, indent=2))
    return 0 if ok else 1


# ---- time from a backend's death to `offline` in the API -------------------------------------

# start_monitor(store, endpoints) starts whatever keeps the store up to date (the monitor) and
# returns an async callable that stops it.
StartMonitor = Callable[[Store, list[Endpoint]], Awaitable[Callable[[], Awaitable[None]]]]


async def time_to_offline(
    start_monitor: StartMonitor, *, samples: int = 3, poll_s: float = 0.01
) -> list[float]:
    """Seconds from SIGKILL of a real ggml-rpc-server to `offline` in GET /api/rpc_backends.

    `start_monitor(store, endpoints)` starts whatever keeps the store true (file_monitor below:
    corral.monitor.Monitor) and returns an async callable that stops it. Everything is real:
    the backend, the store, the dashboard on its socket, the HTTP polling every `poll_s`.
    """
    from corral.llama.binaries import find_binaries

    bins = find_binaries()
    with tempfile.TemporaryDirectory(prefix="corral-offline-") as tmp:
        return [
            await _one_death(start_monitor, bins.rpc_server, Path(tmp), n, poll_s)
            for n in range(samples)
        ]


async def _one_death(
    start_monitor: StartMonitor, rpc_server: Path, tmp: Path, n: int, poll_s: float
) -> float:
    from corral.llama.supervisor import Child, rpc_server_argv

    host = "127.0.0.1"
    with socket.socket() as s:
        s.bind((host, 0))
        rpc_port = int(s.getsockname()[1])
    ep = Endpoint(host, rpc_port)
    child = Child(rpc_server_argv(rpc_server, host, rpc_port, threads=1), tmp / f"rpc-{n}.log")
    await child.start()
    store = await EmbeddedStore.open(tmp / f"state-{n}.db")
    app = create_app(store)
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop_web = asyncio.Event()
    web = asyncio.create_task(
        serve(app, host, 0, stop=stop_web, on_ready=ready.set_result, handle_signals=False)
    )
    stop_monitor = await start_monitor(store, [ep])
    try:
        url = f"http://{host}:{await ready}{PATH}"
        async with httpx.AsyncClient(trust_env=False) as c:

            async def status() -> str | None:
                for item in (await c.get(url)).json():
                    if item["host"] == host and item["port"] == rpc_port:
                        return str(item["status"])
                return None

            deadline = time.monotonic() + 30
            while await status() != "ready":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{ep} never showed ready in the API")
                await asyncio.sleep(poll_s)
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)  # the backend this function started
            killed = time.monotonic()
            while await status() != "offline":
                if time.monotonic() - killed > 60:
                    raise RuntimeError(f"{ep} never showed offline in the API")
                await asyncio.sleep(poll_s)
            return round(time.monotonic() - killed, 3)
    finally:
        await stop_monitor()
        stop_web.set()
        await web
        await store.close()
        await child.stop(grace=1)


def file_monitor(recheck_s: float, workdir: Path) -> StartMonitor:
    """The real Monitor (corral.monitor) over the real file source: the endpoints are written to
    an rpc_backends.conf, as a user would."""

    async def start(store: Store, endpoints: list[Endpoint]) -> Callable[[], Awaitable[None]]:
        from corral.discovery import Discovery
        from corral.monitor import Monitor
        from corral.rpc.held import HeldBackends
        from corral.rpc.probe import Prober
        from corral.sources.file import FileSource

        conf = workdir / f"rpc_backends-{time.monotonic_ns()}.conf"
        await asyncio.to_thread(conf.write_text, "".join(f"{ep}\n" for ep in endpoints))
        held = HeldBackends()
        prober = Prober(timeout=1.0, held=held)
        monitor = Monitor(
            store,
            prober,
            lambda: Discovery([FileSource(str(conf))], prober),
            recheck_s=recheck_s,
            held=held,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(monitor.run(stop))

        async def stopper() -> None:
            stop.set()
            await task

        return stopper

    return start


# ---- command line ----------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    ap.add_argument("--rate", type=float, default=2000.0, help="open loop: requests/s in all")
    ap.add_argument("--backends", type=int, default=20, help="records in the store")
    ap.add_argument("--churn-s", type=float, default=1.0, help="store rewrite period")
    ap.add_argument("--no-open", action="store_true")
    ap.add_argument("--no-saturation", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument(
        "--offline",
        action="store_true",
        help="only measure a backend's death to `offline` in the API (real monitor)",
    )
    ap.add_argument("--recheck-s", type=float, default=2.0, help="the monitor's recheck period")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument(
        "--flood", action="store_true", help="only the registration flood (real control plane)"
    )
    ap.add_argument("--flood-count", type=int, default=5000)
    ap.add_argument("--flood-concurrency", type=int, default=16, help="requests in flight")
    ap.add_argument("--flood-addresses", type=int, default=1, help="client addresses 127.0.0.x")
    ap.add_argument("--flood-rate", type=float, default=200.0, help="reads/s sampled meanwhile")
    ap.add_argument("--flood-settle", type=float, default=20.0, help="seconds sampled after")
    ap.add_argument(
        "--flood-pin",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="server on core 0, the flood's sender on core 1 (it is another machine in life)",
    )
    s = sub.add_parser("_serve")
    s.add_argument("--port-file", type=Path, required=True)
    s.add_argument("--state-dir", type=Path, required=True)
    s.add_argument("--backends", type=int, default=20)
    s.add_argument("--churn-s", type=float, default=1.0)
    pl = sub.add_parser("_plane")
    pl.add_argument("--port-file", type=Path, required=True)
    pl.add_argument("--state-dir", type=Path, required=True)
    f = sub.add_parser("_flood")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--count", type=int, required=True)
    f.add_argument("--concurrency", type=int, required=True)
    f.add_argument("--addresses", type=int, required=True)
    g = sub.add_parser("_load")
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--clients", type=int, required=True)
    g.add_argument("--rate", type=float, required=True)
    g.add_argument("--duration", type=float, required=True)
    return ap.parse_args(argv)


def cli(argv: list[str]) -> int:
    args = parse(argv)
    if args.cmd == "_serve":
        asyncio.run(run_server(args.port_file, args.state_dir, args.backends, args.churn_s))
        return 0
    if args.cmd == "_plane":
        asyncio.run(run_plane_server(args.port_file, args.state_dir))
        return 0
    if args.cmd == "_flood":
        asyncio.run(run_flood(args.port, args.count, args.concurrency, args.addresses))
        return 0
    if args.flood:
        return asyncio.run(flood(args))
    if args.cmd == "_load":
        asyncio.run(run_open_loop("127.0.0.1", args.port, args.clients, args.rate, args.duration))
        return 0
    if args.offline:
        with tempfile.TemporaryDirectory(prefix="corral-offline-") as tmp:
            start = file_monitor(args.recheck_s, Path(tmp))
            seconds = asyncio.run(time_to_offline(start, samples=args.samples))
        print(
            f"death -> offline in GET {PATH} (monitor recheck every {args.recheck_s:g} s):"
            f" {seconds} s; max {max(seconds):.3f} s"
        )
        return 0
    return asyncio.run(main(args))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(cli(sys.argv[1:]))
