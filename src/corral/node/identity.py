"""A node's identity, kept in the state directory so it survives restarts."""

from __future__ import annotations

import uuid
from pathlib import Path


def node_id(state_dir: Path, host: str, port: int) -> str:
    """A node identity that stays the same across restarts (kept in the state directory)."""
    path = state_dir / f"node-id-{host.replace(':', '_')}-{port}"
    try:
        value = path.read_text().strip()
        uuid.UUID(value)
        return value
    except (OSError, ValueError):
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    value = str(uuid.uuid4())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    tmp.replace(path)
    return value
