"""What our coordinator holds has one owner: probers read it, only the owner writes it.

A prober must never connect to a backend our llama-server holds (it serves one client at a
time), so the prober and the object that knows the set must be the same one.
"""

from __future__ import annotations

from collections.abc import Set
from pathlib import Path

import pytest

from corral.discovery import Discovery
from corral.endpoint import Endpoint
from corral.monitor import Monitor
from corral.rpc.held import HeldBackends
from corral.rpc.probe import Prober
from corral.store.sqlite import EmbeddedStore
from corral.types import Status

A, B = Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2)


async def test_a_prober_reads_what_the_owner_writes_and_never_connects_to_it() -> None:
    held = HeldBackends()
    prober = Prober(timeout=0.2).reading(held)
    held.hold([A])
    result = await prober.probe(A)
    assert result.status is Status.BUSY and result.error == "in use by the coordinator (not probed)"
    held.release([A])
    assert (await prober.probe(A)).status is Status.OFFLINE  # nothing listens on port 1


def test_the_view_a_prober_gets_offers_no_way_to_write() -> None:
    prober = Prober(held=HeldBackends())
    assert isinstance(prober.held, Set)
    for name in ("add", "update", "clear", "discard", "difference_update"):
        assert not hasattr(prober.held, name), name


async def test_a_monitor_refuses_a_prober_that_reads_another_held_set(tmp_path: Path) -> None:
    store = await EmbeddedStore.open(tmp_path / "state.db")
    try:
        prober = Prober(held=HeldBackends())
        with pytest.raises(ValueError, match="held set"):
            Monitor(store, prober, lambda: Discovery([], prober), held=HeldBackends())
        held = HeldBackends()
        Monitor(store, prober.reading(held), lambda: Discovery([], prober), held=held)
    finally:
        await store.close()


def test_replace_gives_exactly_the_new_set() -> None:
    held = HeldBackends()
    held.hold([A, B])
    held.replace([B])
    assert set(held) == {B} and A not in held and len(held) == 1
