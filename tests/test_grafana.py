"""The Grafana dashboard in deploy/grafana/ queries only metrics that exist: every metric name in
every panel's query is in a live `/metrics` (Corral's dashboard, or the llama-server it runs),
and every `{{label}}` a legend names is a label of that panel's series.

Real `corral up` on two real ggml-rpc-servers with the tiny model, one chat request through the
dashboard's /v1 proxy so the request and generation counters exist. The backends in use are not
probed (so have no probe latency); a third backend that is listed, answers probes and is never
used shows that panel: an RPC server of another protocol version, which no build here can be, so
it is a protocol-speaking fake (tests/support/fake_servers.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.corral_up import Up, corral_up
from tests.support.fake_servers import fake_server, rpc
from tests.support.rpc_backends import StartRpc
from tests.support.waiting import until

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "corral.json"
TOKEN = "grafana-test-token-0123456789"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True}
METRIC = re.compile(r"\b(corral_[a-z0-9_]+|llamacpp:[a-z0-9_:]+)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def _panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return panels


def test_the_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    names = {v["name"] for v in dash["templating"]["list"]}
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}" and "datasource" in names
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert METRIC.search(target["expr"]), f"{panel['title']!r}: no metric in its query"


def _series(text: str) -> dict[str, set[str]]:
    """Sample name -> the label names it is exposed with."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


async def test_every_queried_metric_exists_in_a_live_metrics(
    rpc_server: StartRpc, tiny_model: Path, tmp_path: Path
) -> None:
    (a, _), (b, _) = await rpc_server(), await rpc_server()
    async with (
        fake_server(rpc(version=(6, 0, 0))) as other,
        corral_up(
            tmp_path, [a, b, other.endpoint], tiny_model, "--tensor-split", "1,1", token=TOKEN
        ) as up,
    ):
        await up.wait_serving({a, b})
        async with up.client() as c:
            reply = await c.post(
                "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert reply.status_code == 200, reply.text
        wanted = {
            name for p in _panels() for t in p["targets"] for name in METRIC.findall(t["expr"])
        }
        series: dict[str, set[str]] = {}

        async def all_exposed() -> bool:
            series.clear()
            series.update(await _live_series(up))
            return wanted <= series.keys()

        try:
            await until(all_exposed, 20, "every metric the dashboard queries")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; missing: {sorted(wanted - series.keys())}") from None
        for panel in _panels():
            for target in panel["targets"]:
                labels = set().union(*(series[n] for n in METRIC.findall(target["expr"])))
                labels |= set(re.findall(r"by \(([\w, ]+)\)", target["expr"]))
                for label in LEGEND_LABEL.findall(target["legendFormat"]):
                    assert label in labels, (
                        f"panel {panel['title']!r}: legend names {{{{{label}}}}}, but its series"
                        f" carry only {sorted(labels)}"
                    )


async def _live_series(up: Up) -> dict[str, set[str]]:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
        corral = (await c.get(f"{up.base}/metrics")).text
        llama = (await c.get(f"http://127.0.0.1:{up.coordinator_port}/metrics")).text
    return {**_series(llama), **_series(corral)}
