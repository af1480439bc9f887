"""Figures the dashboard counts itself, the `/api/metrics` summary and the Prometheus exposition.

The Prometheus collector reads only the in-memory view (LiveView) and these counters, so a
scrape never touches the store. Each app has its own CollectorRegistry: nothing global.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from corral.types import CoordinatorState, Status
from corral.web.live import LiveView
from corral.web.schemas import is_serving


@dataclass
class Figures:
    scans_requested: int = 0
    scans_completed: int = 0
    scans_failed: int = 0
    scan_running: bool = False
    last_scan_started: float | None = None
    last_scan_duration_s: float | None = None
    last_scan_error: str | None = None
    proxy_total: int = 0
    proxy_failed: int = 0
    proxy_in_flight: int = 0
    proxy_seconds_total: float = 0.0
    proxy_last_s: float | None = None


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def latency_summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "min": None, "p50": None, "p90": None, "max": None, "mean": None}
    return {
        "count": len(values),
        "min": min(values),
        "p50": _pct(values, 0.5),
        "p90": _pct(values, 0.9),
        "max": max(values),
        "mean": round(statistics.fmean(values), 3),
    }


def metrics_json(live: LiveView, figures: Figures) -> dict[str, Any]:
    by_status = {str(s): 0 for s in Status}
    latencies: list[float] = []
    in_use = serving = 0
    for item in live.backends_items:
        by_status[item["status"]] = by_status.get(item["status"], 0) + 1
        if item["latency_ms"] is not None:
            latencies.append(float(item["latency_ms"]))
        in_use += bool(item["in_use"])
        serving += is_serving(item)
    coordinator = live.coordinator()
    return {
        "backends": {
            "total": len(live.backends_items),
            "by_status": by_status,
            "in_use": in_use,
            "serving": serving,
        },
        "nodes_live": live.nodes_live,
        "scans": {
            "requested": figures.scans_requested,
            "completed": figures.scans_completed,
            "failed": figures.scans_failed,
            "running": figures.scan_running,
            "last_started": figures.last_scan_started,
            "last_duration_s": figures.last_scan_duration_s,
            "last_error": figures.last_scan_error,
        },
        "probe_latency_ms": latency_summary(latencies),
        "coordinator": {
            "state": coordinator["state"],
            "restarts": coordinator["restarts"],
            "tokens_per_second": coordinator["tokens_per_second"],
            "requests_total": figures.proxy_total,
            "requests_failed": figures.proxy_failed,
            "requests_in_flight": figures.proxy_in_flight,
            "request_seconds_total": round(figures.proxy_seconds_total, 6),
            "last_request_s": figures.proxy_last_s,
        },
        "stream_clients": live.listener_count,
        "snapshot_age_s": live.snapshot_age_s(),
    }


class CorralCollector(Collector):
    def __init__(self, live: LiveView, figures: Figures) -> None:
        self.live = live
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        live, fig = self.live, self.figures
        labels = ["endpoint", "host", "port"]
        status = GaugeMetricFamily(
            "corral_backend_status",
            "1 for the backend's current status, 0 for the others",
            labels=[*labels, "status"],
        )
        free = GaugeMetricFamily(
            "corral_backend_device_free_bytes",
            "Free memory of each device of a backend",
            labels=[*labels, "device"],
        )
        total = GaugeMetricFamily(
            "corral_backend_device_total_bytes",
            "Total memory of each device of a backend",
            labels=[*labels, "device"],
        )
        latency = GaugeMetricFamily(
            "corral_backend_probe_latency_seconds",
            "Round trip of the last RPC probe",
            labels=labels,
        )
        last_seen = GaugeMetricFamily(
            "corral_backend_last_seen_timestamp_seconds",
            "Unix time the backend was last seen",
            labels=labels,
        )
        in_use = GaugeMetricFamily(
            "corral_backend_in_use",
            "1 if the coordinator's llama-server uses this backend",
            labels=labels,
        )
        counts = GaugeMetricFamily(
            "corral_backends", "Backends in the store by status", labels=["status"]
        )
        serving = GaugeMetricFamily(
            "corral_backends_serving",
            "Backends the coordinator's llama-server holds and serves on (a held backend cannot"
            ' be probed: corral_backends{status="busy"} counts these too)',
        )
        per_status = {str(s): 0 for s in Status}
        n_serving = 0
        for item in live.backends_items:
            ep = f"[{item['host']}]" if ":" in item["host"] else item["host"]
            values = [f"{ep}:{item['port']}", item["host"], str(item["port"])]
            per_status[item["status"]] = per_status.get(item["status"], 0) + 1
            for s in Status:
                status.add_metric([*values, str(s)], 1.0 if item["status"] == str(s) else 0.0)
            for dev in item["devices"]:
                free.add_metric([*values, str(dev["index"])], float(dev["free_bytes"]))
                total.add_metric([*values, str(dev["index"])], float(dev["total_bytes"]))
            if item["latency_ms"] is not None:
                latency.add_metric(values, float(item["latency_ms"]) / 1000.0)
            last_seen.add_metric(values, float(item["last_seen"]))
            in_use.add_metric(values, 1.0 if item["in_use"] else 0.0)
            n_serving += is_serving(item)
        for name, n in per_status.items():
            counts.add_metric([name], float(n))
        serving.add_metric([], float(n_serving))
        yield from (status, free, total, latency, last_seen, in_use, counts, serving)

        nodes = GaugeMetricFamily("corral_nodes_live", "Node agents with a live registration")
        nodes.add_metric([], float(live.nodes_live))
        yield nodes

        coordinator = live.coordinator()
        state = GaugeMetricFamily(
            "corral_coordinator_state",
            "1 for the coordinator's current state, 0 for the others",
            labels=["state"],
        )
        for name in CoordinatorState:
            state.add_metric([str(name)], 1.0 if coordinator["state"] == name else 0.0)
        yield state
        restarts = CounterMetricFamily(
            "corral_coordinator_restarts", "Restarts of the coordinator's llama-server"
        )
        restarts.add_metric([], float(coordinator["restarts"]))
        yield restarts
        backends = GaugeMetricFamily(
            "corral_coordinator_backends", "Backends the coordinator's llama-server uses"
        )
        backends.add_metric([], float(len(coordinator["backends"])))
        yield backends
        if coordinator["uptime_s"] is not None:
            uptime = GaugeMetricFamily(
                "corral_coordinator_uptime_seconds", "Seconds since llama-server started"
            )
            uptime.add_metric([], float(coordinator["uptime_s"]))
            yield uptime
        yield from _memory_metrics(coordinator["memory"])
        if coordinator["tokens_per_second"] is not None:
            tps = GaugeMetricFamily(
                "corral_coordinator_tokens_per_second", "Generation speed, when known"
            )
            tps.add_metric([], float(coordinator["tokens_per_second"]))
            yield tps

        requests = CounterMetricFamily(
            "corral_coordinator_requests",
            "Requests forwarded to the coordinator through /v1",
            labels=["outcome"],
        )
        requests.add_metric(["ok"], float(fig.proxy_total - fig.proxy_failed))
        requests.add_metric(["failed"], float(fig.proxy_failed))
        yield requests
        seconds = CounterMetricFamily(
            "corral_coordinator_request_seconds", "Time spent in forwarded requests"
        )
        seconds.add_metric([], fig.proxy_seconds_total)
        yield seconds
        in_flight = GaugeMetricFamily(
            "corral_coordinator_requests_in_flight", "Forwarded requests not yet finished"
        )
        in_flight.add_metric([], float(fig.proxy_in_flight))
        yield in_flight

        scans = CounterMetricFamily(
            "corral_scans", "Discovery runs asked through the API", labels=["outcome"]
        )
        scans.add_metric(["completed"], float(fig.scans_completed))
        scans.add_metric(["failed"], float(fig.scans_failed))
        yield scans
        age = live.snapshot_age_s()
        if age is not None:
            snap = GaugeMetricFamily(
                "corral_dashboard_snapshot_age_seconds", "Age of the dashboard's view of the store"
            )
            snap.add_metric([], age)
            yield snap


def _memory_metrics(memory: list[dict[str, Any]]) -> Iterator[Metric]:
    """Per backend ("local": llama-server's own machine) and device, from /api/coordinator's
    `memory`: what llama-server allocated, by kind, and what was planned."""
    used = GaugeMetricFamily(
        "corral_device_used_bytes",
        "Bytes the coordinator's llama-server allocated on a device (its log, to 5 KiB)",
        labels=["backend", "device", "kind"],
    )
    planned = GaugeMetricFamily(
        "corral_device_planned_bytes",
        "Bytes planned for a device before the coordinator's llama-server started",
        labels=["backend", "device"],
    )
    for m in memory:
        where = [m["backend"], m["device"]]
        if m["used_bytes"] is not None:
            for kind in ("model", "kv", "compute"):
                used.add_metric([*where, kind], float(m[f"{kind}_bytes"]))
        if m["planned_bytes"] is not None:
            planned.add_metric(where, float(m["planned_bytes"]))
    yield from (used, planned)


def make_registry(live: LiveView, figures: Figures) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CorralCollector(live, figures))
    return registry
