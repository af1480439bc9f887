"""The coordinator's state means the same in every process: what one writes, another shows.

A coordinator runs in one process (`corral coordinator run`) and a separate `corral dashboard`
shows it from the shared state file. Every state the runner publishes must read back as itself,
never as another (a waiting coordinator once read as "failed").
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from corral.store.codec import CodecError, coordinator_from_json
from corral.store.factory import open_store
from corral.types import CoordinatorState
from corral.web.schemas import CoordinatorOut, coordinator_from_record, endpoints_in_use

WRITER = """
import asyncio, sys
from pathlib import Path
from corral.endpoint import Endpoint
from corral.store.base import CoordinatorRecord
from corral.store.codec import CodecError, coordinator_from_json
from corral.store.factory import open_store
from corral.types import CoordinatorState

async def main() -> None:
    store = await open_store(None, Path(sys.argv[1]), environ={})
    state = CoordinatorState(sys.argv[2])
    await store.set_coordinator(
        CoordinatorRecord(state, (Endpoint("127.0.0.1", 50052),), pid=4242, port=18080)
    )
    await store.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("state", list(CoordinatorState))
async def test_a_state_written_by_one_process_reads_back_as_itself_in_another(
    tmp_path: Path, state: CoordinatorState
) -> None:
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(tmp_path), str(state)
    )
    assert await writer.wait() == 0
    store = await open_store(None, tmp_path, environ={})
    try:
        record = await store.coordinator()
    finally:
        await store.close()
    assert record is not None and record.state is state
    shown = coordinator_from_record(record, tps=None)
    assert shown["state"] == str(state)
    assert shown["tone"] == state.tone
    CoordinatorOut.model_validate(shown)  # the API's schema admits every state
    in_use = endpoints_in_use(shown)
    assert in_use == ({"127.0.0.1:50052"} if state.holds_backends else set())


def test_every_state_has_one_tone_the_page_knows() -> None:
    page = (Path(__file__).parents[1] / "src/corral/web/static/index.html").read_text()
    for state in CoordinatorState:
        assert f'data-tone="{state.tone}"' in page, f"the page has no colour for {state}"


def test_an_unknown_state_in_the_store_is_refused_with_where_and_why() -> None:
    with pytest.raises(CodecError, match=r"state.*not a coordinator state.*'sleeping'"):
        coordinator_from_json(
            {"state": "sleeping", "backends": [], "updated_at": 1.0}, "coordinator record"
        )
