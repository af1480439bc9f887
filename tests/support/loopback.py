"""Loopback addresses and free ports: each test gets its own 127.x address, so none collide."""

from __future__ import annotations

import itertools
import socket

# 127.0.0.0/8 is all ours; a counter hands out a fresh address to each caller.
_addresses = itertools.count(10)


def next_loopback() -> str:
    n = next(_addresses)
    return f"127.0.{(n // 250) % 250 + 1}.{n % 250 + 2}"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
