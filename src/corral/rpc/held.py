"""The backends our coordinator holds, with one owner and read-only views.

A ggml-rpc-server serves one client at a time: a prober must never connect to a backend our own
llama-server holds. Whoever knows the coordinator's set owns a `HeldBackends` and writes it (the
runner in the process that runs llama-server, else the monitor from the store's record); probers
get it at construction as a plain read-only `Set`, so nothing else can change it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Set

from corral.endpoint import Endpoint


class HeldBackends(Set[Endpoint]):
    """A set with one writer: `hold`, `release` and `replace` are for the owner only."""

    def __init__(self) -> None:
        self._held: frozenset[Endpoint] = frozenset()

    def __contains__(self, item: object) -> bool:
        return item in self._held

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)

    def __repr__(self) -> str:
        return f"HeldBackends({sorted(map(str, self._held))})"

    def snapshot(self) -> frozenset[Endpoint]:
        return self._held

    def hold(self, endpoints: Iterable[Endpoint]) -> None:
        self._held = self._held | frozenset(endpoints)

    def release(self, endpoints: Iterable[Endpoint]) -> None:
        self._held = self._held - frozenset(endpoints)

    def replace(self, endpoints: Iterable[Endpoint]) -> None:
        self._held = frozenset(endpoints)
