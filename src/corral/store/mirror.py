"""What an embedded store last wrote, kept in memory to write back when its file goes wrong.

Rows are kept as written (the codec's JSON), so writing them back is exact: the file holds what it
held before, with the same `written_at` stamps (staleness is judged as before). Only what this
process wrote is kept, never what it read: a read can come from a file already damaged or
replaced, which is exactly what the copy must not follow.

Bounded: the newest `MAX_BACKENDS` backends and `MAX_NODES` registrations (a cluster has tens;
a scan of a /16 that found thousands keeps the most recently written), the coordinator record,
and the last `MAX_EVENTS_KEPT` events (the history beyond them is lost with the file; the page
shows the last hundred). Touched only on the store's worker thread.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

MAX_BACKENDS = 4096
MAX_NODES = 1024
MAX_EVENTS_KEPT = 100


@dataclass(frozen=True, slots=True)
class Snapshot:
    backends: list[tuple[str, str]]  # (endpoint key, body)
    nodes: list[tuple[str, float, str]]  # (node id, expires_at, body), the live ones
    coordinator: str | None
    events: list[str]

    def describe(self) -> str:
        parts = [_count(len(self.backends), "backend"), _count(len(self.nodes), "live node")]
        if self.coordinator is not None:
            parts.append("the coordinator record")
        parts.append(_count(len(self.events), "recent event"))
        return ", ".join(parts)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


class Mirror:
    def __init__(self, max_events: int = MAX_EVENTS_KEPT) -> None:
        self._backends: OrderedDict[str, str] = OrderedDict()
        self._nodes: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._coordinator: str | None = None
        self._events: deque[str] = deque(maxlen=max(0, max_events))

    def put_backend(self, key: str, body: str) -> None:
        self._backends[key] = body
        self._backends.move_to_end(key)
        while len(self._backends) > MAX_BACKENDS:
            self._backends.popitem(last=False)

    def remove_backend(self, key: str) -> None:
        self._backends.pop(key, None)

    def register_node(self, node_id: str, expires_at: float, body: str) -> None:
        self._nodes[node_id] = (expires_at, body)
        self._nodes.move_to_end(node_id)
        while len(self._nodes) > MAX_NODES:
            self._nodes.popitem(last=False)

    def unregister_node(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    def set_coordinator(self, body: str) -> None:
        self._coordinator = body

    def add_events(self, bodies: list[str]) -> None:
        self._events.extend(bodies)

    def snapshot(self, now: float) -> Snapshot:
        """What to write back at `now`: registrations that expired meanwhile are dropped."""
        for node_id in [k for k, (expires_at, _) in self._nodes.items() if expires_at <= now]:
            del self._nodes[node_id]
        return Snapshot(
            list(self._backends.items()),
            [(k, expires_at, body) for k, (expires_at, body) in self._nodes.items()],
            self._coordinator,
            list(self._events),
        )
