"""`--tensor-split`: weights that stay with their backends when the backend set changes.

llama-server's `--tensor-split` is positional: one proportion per device, in `--rpc` order.
Corral changes that set whenever a backend leaves or joins, so positional numbers would slide
onto other machines after a failover. Entries written `host:port=weight` stay with their
backend: for every start they are turned into llama-server's positional list for the set in
use. A backend with several devices shares its weight evenly among them; a backend not named
weighs 1. Plain numbers (`3,1`) are passed through as given, for a set that does not change.

Pure: parsing and arithmetic only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from corral.endpoint import Endpoint, parse_endpoint

UNNAMED_WEIGHT = 1.0


@dataclass(frozen=True, slots=True)
class TensorSplit:
    text: str  # as given, for messages and the positional form
    weights: tuple[tuple[Endpoint, float], ...] = ()  # empty: positional

    @property
    def named(self) -> bool:
        return bool(self.weights)

    def argument(self, backends: Sequence[Endpoint], devices: Mapping[Endpoint, int]) -> str | None:
        """llama-server's `--tensor-split` value for this `--rpc` set, or None for none.

        devices: how many devices each backend has (from its probe); 1 when unknown.
        """
        if not self.named:
            return self.text
        if not backends:
            return None  # local devices only: the named backends are all gone
        weights = dict(self.weights)
        out: list[float] = []
        for backend in backends:
            count = max(1, devices.get(backend, 1))
            share = weights.get(backend, UNNAMED_WEIGHT) / count
            out += [share] * count
        if not any(out):
            return None  # every backend in use was weighted 0: let llama-server decide
        return ",".join(f"{v:g}" for v in out)


def parse_tensor_split(text: str | None) -> TensorSplit | None:
    """`3,1` or `10.0.0.5:50052=3,10.0.0.6:50052=1`; raises ValueError saying which entry."""
    if text is None:
        return None
    where = f"--tensor-split {text!r}"
    entries = [e.strip() for e in text.split(",")]
    if "=" not in text:
        values = [_weight(e, where, i) for i, e in enumerate(entries, 1)]
        if not any(values):
            raise ValueError(f"{where}: the numbers are all zero")
        return TensorSplit(text)
    weights: dict[Endpoint, float] = {}
    for i, entry in enumerate(entries, 1):
        name, eq, value = entry.rpartition("=")
        if not eq:
            raise ValueError(
                f"{where}: entry {i} ({entry!r}) has no 'host:port=' but others do;"
                " write every entry the same way"
            )
        endpoint = parse_endpoint(name, where=f"{where}, entry {i}")  # EndpointError: ValueError
        if endpoint in weights:
            raise ValueError(f"{where}: {endpoint} is named twice")
        weights[endpoint] = _weight(value, where, i)
    return TensorSplit(text, tuple(weights.items()))


def _weight(value: str, where: str, index: int) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(
            f"{where}: entry {index} ({value!r}) is not a number; expected numbers like 3,1"
            " or host:port=weight entries"
        ) from None
    if number < 0 or not math.isfinite(number):
        raise ValueError(f"{where}: entry {index} ({value!r}) must be a finite number >= 0")
    return number
