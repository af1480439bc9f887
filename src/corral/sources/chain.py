"""Build the discovery chain from source names: adding a source is one entry in FACTORIES."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from corral.endpoint import DEFAULT_RPC_PORT
from corral.rpc.probe import Prober
from corral.sources.base import Source
from corral.sources.cache import CacheSource
from corral.sources.file import FileSource
from corral.sources.mdns import MdnsSource
from corral.sources.process import ProcessSource
from corral.sources.registry import RegistrySource
from corral.sources.scan import ScanSource
from corral.store.base import Store
from corral.types import SourceName

DEFAULT_ORDER = (
    SourceName.PROCESS,
    SourceName.FILE,
    SourceName.REGISTRY,
    SourceName.MDNS,
    SourceName.SCAN,
    SourceName.CACHE,
)


class ChainError(ValueError):
    pass


@dataclass
class ChainOptions:
    backends_file: str | None = None
    cidrs: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=lambda: [DEFAULT_RPC_PORT])
    scan_timeout: float = 0.4
    include_loopback: bool = False
    allow_large: bool = False
    concurrency: int = 500
    mdns_seconds: float = 2.0
    store: Store | None = None


def _scan(o: ChainOptions, prober: Prober) -> Source:
    scan_prober = prober.derived(o.scan_timeout, host_up_means_busy=False)
    return ScanSource(
        cidrs=o.cidrs,
        ports=o.ports,
        timeout=o.scan_timeout,
        include_loopback=o.include_loopback,
        allow_large=o.allow_large,
        concurrency=o.concurrency,
        prober=scan_prober,
    )


def _needs_store(o: ChainOptions, name: SourceName) -> Store:
    if o.store is None:
        raise ChainError(f"source {name} needs a store")
    return o.store


FACTORIES: dict[SourceName, Callable[[ChainOptions, Prober], Source]] = {
    SourceName.PROCESS: lambda o, p: ProcessSource(),
    SourceName.FILE: lambda o, p: FileSource(o.backends_file),
    SourceName.REGISTRY: lambda o, p: RegistrySource(_needs_store(o, SourceName.REGISTRY)),
    SourceName.MDNS: lambda o, p: MdnsSource(o.mdns_seconds),
    SourceName.SCAN: _scan,
    SourceName.CACHE: lambda o, p: CacheSource(_needs_store(o, SourceName.CACHE)),
}


def parse_source_names(text: str | None) -> list[SourceName]:
    if text is None:
        return list(DEFAULT_ORDER)
    if not text.strip():
        raise ChainError("--sources: empty; name at least one source, e.g. file,scan")
    names: list[SourceName] = []
    for raw in text.split(","):
        item = raw.strip()
        try:
            name = SourceName(item)
        except ValueError:
            known = ", ".join(s.value for s in FACTORIES)
            raise ChainError(f"--sources: unknown source {item!r} (known: {known})") from None
        if name not in FACTORIES:
            raise ChainError(f"--sources: source {item!r} is not available in this build")
        if name in names:
            raise ChainError(f"--sources: {item!r} given twice")
        names.append(name)
    return names


def build_chain(names: list[SourceName], options: ChainOptions, prober: Prober) -> list[Source]:
    """Sources that need a store are left out when there is none (said by the caller)."""
    needs_store = {SourceName.REGISTRY, SourceName.CACHE}
    return [
        FACTORIES[name](options, prober)
        for name in names
        if options.store is not None or name not in needs_store
    ]
