"""A prober never runs out of descriptors on the backends' account: with a low descriptor
limit (a real RLIMIT_NOFILE, set in a child process), many probes at once all get their true
status, never "Too many open files" dressed up as an offline backend."""

from __future__ import annotations

import asyncio
import json
import sys

from corral.rpc.probe import open_limit

CHILD = """
import asyncio, json, resource, socket
from corral.endpoint import Endpoint
from corral.rpc.probe import Prober

resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there

async def main() -> None:
    prober = Prober(timeout=5.0)
    ports = [refused_port() for _ in range(400)]
    results = await asyncio.gather(*(prober.probe(Endpoint("127.0.0.1", p)) for p in ports))
    print(json.dumps(sorted({r.error or "" for r in results})))

asyncio.run(main())
"""


def test_the_open_limit_keeps_room_below_the_descriptor_limit() -> None:
    assert open_limit(64) == 16 and open_limit(1024) == 896 and open_limit(1 << 20) == 1024


async def test_400_probes_under_a_64_descriptor_limit_all_read_refused() -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0
    assert json.loads(out) == ["connection refused"]
