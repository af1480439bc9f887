"""GPU builds of llama.cpp: `corral llama install --gpu cuda|vulkan`.

A GPU flavour passes its CMake option (`-DGGML_CUDA=ON`, `-DGGML_VULKAN=ON`, as llama.cpp's
docs/build.md says) and builds apart from the CPU one (`build-cuda/`, `build-vulkan/`), so the
CPU build keeps resolving to the existing cache (`<version>/build`). Without its toolkit a GPU
flavour fails at once, before anything is fetched or configured, saying what to install.

Only the CPU flavour can be built on this machine, so the toolkits are looked for in temporary
directories laid out like an installed toolkit (the lookup is injected: `ToolSearch`); the
command itself is run for real against this machine's own toolkits, with the cache in a
temporary directory that must stay empty.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from corral.llama.binaries import LlamaBinaries, bin_dir_of, build_root, find_binaries
from corral.llama.build import ToolkitMissing, install
from corral.llama.flavours import Flavour, ToolSearch, build_dir_name, manifest_name, toolkit
from tests.support.corral_cli import corral_script


def search_in(root: Path, env: dict[str, str] | None = None) -> ToolSearch:
    """Look only under `root`: its bin/ is PATH, its include/ and lib/ the system's."""
    bin_dir = root / "bin"

    def which(name: str) -> str | None:
        found = bin_dir / name
        return str(found) if found.is_file() and os.access(found, os.X_OK) else None

    return ToolSearch(
        env=env or {},
        which=which,
        include_dirs=(root / "include",),
        lib_dirs=(root / "lib",),
        cuda_homes=(root / "cuda",),
    )


def put(path: Path, executable: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n" if executable else "")
    if executable:
        path.chmod(0o755)
    return path


def test_flavours_build_apart_and_cpu_keeps_the_original_names() -> None:
    assert (build_dir_name(Flavour.CPU), manifest_name(Flavour.CPU)) == (
        "build",
        "corral-llama.json",
    )
    names = {build_dir_name(f) for f in Flavour} | {manifest_name(f) for f in Flavour}
    assert len(names) == 2 * len(Flavour)
    assert bin_dir_of(Flavour.CUDA) == build_root() / "build-cuda" / "bin"


def test_cuda_without_nvcc_fails_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stages: list[str] = []
    with pytest.raises(ToolkitMissing) as caught:
        install(
            flavour=Flavour.CUDA,
            search=search_in(tmp_path / "machine"),
            progress=lambda stage, pct: stages.append(stage),
        )
    message = str(caught.value)
    assert "the CUDA compiler nvcc" in message
    assert "apt-get install nvidia-cuda-toolkit" in message
    assert stages == []  # nothing downloaded, unpacked or configured
    assert not (tmp_path / "cache").exists()


def test_cuda_compiler_without_cublas_is_not_a_toolkit(tmp_path: Path) -> None:
    """As on this machine: nvcc and the runtime from PyPI wheels, no cuBLAS (configure fails)."""
    put(tmp_path / "cuda" / "bin" / "nvcc", executable=True)
    put(tmp_path / "cuda" / "include" / "cuda_runtime.h")
    put(tmp_path / "cuda" / "lib" / "libcudart.so.13")
    found = toolkit(Flavour.CUDA, search_in(tmp_path))
    problem = found.problem(Flavour.CUDA)
    assert problem is not None
    assert "cuBLAS" in problem and "CUDA runtime" not in problem
    assert "apt-get install nvidia-cuda-toolkit" in problem


def test_a_complete_cuda_toolkit_gives_its_cmake_options(tmp_path: Path) -> None:
    nvcc = put(tmp_path / "opt" / "cuda-12" / "bin" / "nvcc", executable=True)
    put(tmp_path / "opt" / "cuda-12" / "targets" / "x86_64-linux" / "include" / "cuda_runtime.h")
    put(tmp_path / "opt" / "cuda-12" / "targets" / "x86_64-linux" / "include" / "cublas_v2.h")
    put(tmp_path / "opt" / "cuda-12" / "lib64" / "libcudart.so")
    put(tmp_path / "opt" / "cuda-12" / "lib64" / "libcublas.so.12")
    found = toolkit(Flavour.CUDA, search_in(tmp_path, {"CUDA_PATH": str(nvcc.parent.parent)}))
    assert found.problem(Flavour.CUDA) is None
    assert found.cmake_flags == ("-DGGML_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}")


def test_cudacxx_that_is_no_compiler_is_named(tmp_path: Path) -> None:
    put(tmp_path / "bin" / "nvcc", executable=True)
    search = search_in(tmp_path, {"CUDACXX": str(tmp_path / "nope" / "nvcc")})
    problem = toolkit(Flavour.CUDA, search).problem(Flavour.CUDA)
    assert problem is not None and f"CUDACXX={tmp_path / 'nope' / 'nvcc'}" in problem


def test_vulkan_without_anything_names_every_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(ToolkitMissing) as caught:
        install(flavour=Flavour.VULKAN, search=search_in(tmp_path / "machine"))
    message = str(caught.value)
    assert "apt-get install libvulkan-dev glslc spirv-headers" in message
    assert "vulkan/vulkan.h" in message and "glslc" in message
    assert not (tmp_path / "cache").exists()


def test_vulkan_names_only_what_is_missing(tmp_path: Path) -> None:
    put(tmp_path / "include" / "vulkan" / "vulkan.h")
    put(tmp_path / "include" / "spirv" / "unified1" / "spirv.hpp")
    problem = toolkit(Flavour.VULKAN, search_in(tmp_path)).problem(Flavour.VULKAN)
    assert problem is not None
    assert "apt-get install glslc, or" in problem and "libvulkan-dev" not in problem


def test_a_complete_vulkan_sdk_gives_its_cmake_option(tmp_path: Path) -> None:
    sdk = tmp_path / "VulkanSDK" / "x86_64"
    put(sdk / "bin" / "glslc", executable=True)
    put(sdk / "include" / "vulkan" / "vulkan.h")
    put(sdk / "include" / "spirv" / "unified1" / "spirv.hpp")
    found = toolkit(Flavour.VULKAN, search_in(tmp_path, {"VULKAN_SDK": str(sdk)}))
    assert found.problem(Flavour.VULKAN) is None
    assert found.cmake_flags == ("-DGGML_VULKAN=ON",)


@pytest.mark.parametrize(
    ("gpu", "install_hint"),
    [
        ("cuda", "apt-get install nvidia-cuda-toolkit"),
        ("vulkan", "apt-get install libvulkan-dev glslc spirv-headers"),
    ],
)
def test_install_gpu_on_this_machine_fails_at_once(
    gpu: str, install_hint: str, tmp_path: Path
) -> None:
    """The real command, this machine's own toolkits; the cache is a fresh directory."""
    needs = toolkit(Flavour(gpu), ToolSearch.this_machine())
    if not needs.missing:
        pytest.skip(f"this machine has the {gpu} toolkit: the command would build")
    if gpu == "vulkan":
        assert len(needs.missing) == 3, needs.missing  # the whole hint applies here
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_LLAMA_BIN_DIR"}
    done = subprocess.run(
        [corral_script(), "llama", "install", "--gpu", gpu],
        env=env | {"XDG_CACHE_HOME": str(cache), "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"the {gpu} build needs" in done.stderr and install_hint in done.stderr
    assert done.stdout == ""
    assert not cache.exists()  # no download, no source tree, no build directory


def test_cpu_install_resolves_to_the_existing_cache(llama_bins: LlamaBinaries) -> None:
    if llama_bins.flavour is not Flavour.CPU:
        pytest.skip(f"the binaries in use ({llama_bins.bin_dir}) are not Corral's CPU build")
    stages: list[str] = []
    bin_dir = install(progress=lambda stage, pct: stages.append(stage))
    assert bin_dir == bin_dir_of(Flavour.CPU) == build_root() / "build" / "bin"
    assert bin_dir == llama_bins.bin_dir
    assert stages == []  # reused: nothing rebuilt


def fake_build(flavour: Flavour) -> Path:
    """A complete build of `flavour` in the cache: manifest and binaries (files, never run)."""
    bin_dir = bin_dir_of(flavour)
    for name in ("ggml-rpc-server", "llama-server"):
        put(bin_dir / name, executable=True)
    manifest = f'{{"bin_dir": "{bin_dir}", "rpc_proto_major": 7, "rpc_proto_minor": 0}}'
    (build_root() / manifest_name(flavour)).write_text(manifest)
    return bin_dir


def test_a_gpu_build_is_preferred_once_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    env = {"PATH": str(tmp_path / "empty")}
    cpu = fake_build(Flavour.CPU)
    assert (find_binaries(env).bin_dir, find_binaries(env).flavour) == (cpu, Flavour.CPU)
    vulkan = fake_build(Flavour.VULKAN)
    assert (find_binaries(env).bin_dir, find_binaries(env).flavour) == (vulkan, Flavour.VULKAN)
    explicit = {**env, "CORRAL_LLAMA_BIN_DIR": str(cpu)}
    assert find_binaries(explicit).bin_dir == cpu
