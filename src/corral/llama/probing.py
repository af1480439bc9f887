"""A Prober that judges compatibility against the llama-server that will use the backends.

The installed build's protocol version is in its manifest; without one, the version Corral
itself speaks is assumed.
"""

from __future__ import annotations

from corral.llama.binaries import BinariesNotFound, LlamaBinaries, find_binaries
from corral.rpc import protocol
from corral.rpc.probe import Prober


def prober_for(binaries: LlamaBinaries | None, timeout: float = 1.0) -> Prober:
    major, minor = protocol.CLIENT_PROTO_MAJOR, protocol.CLIENT_PROTO_MINOR
    if binaries and binaries.rpc_proto_major is not None and binaries.rpc_proto_minor is not None:
        major, minor = binaries.rpc_proto_major, binaries.rpc_proto_minor
    return Prober(timeout=timeout, client_major=major, client_minor=minor)


def installed_prober(timeout: float) -> Prober:
    try:
        binaries: LlamaBinaries | None = find_binaries()
    except BinariesNotFound:
        binaries = None
    return prober_for(binaries, timeout)
