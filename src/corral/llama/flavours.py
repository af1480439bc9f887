"""The llama.cpp build flavours Corral can make (CPU, CUDA, Vulkan) and what each one needs.

Each flavour has its own build directory and manifest beside the others under the version's
cache, so building one never touches another; the CPU flavour keeps the original names
(`build/`, `corral-llama.json`) so caches made before flavours existed stay in use.

Whether a GPU toolkit is on this machine is decided here, before anything is downloaded or
configured, from where CMake itself would look (llama.cpp's `find_package(CUDAToolkit)` and
`find_package(Vulkan COMPONENTS glslc)` + `SPIRV-Headers`, see its docs/build.md). Looking is
injected (`ToolSearch`) so the decision is pure and testable on any machine.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

MANIFEST = "corral-llama.json"


class Flavour(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    VULKAN = "vulkan"


# Which build to run when several are installed: a GPU build was made on purpose.
PREFERENCE = (Flavour.CUDA, Flavour.VULKAN, Flavour.CPU)
GPU_FLAVOURS = (Flavour.CUDA, Flavour.VULKAN)


def build_dir_name(flavour: Flavour) -> str:
    return "build" if flavour is Flavour.CPU else f"build-{flavour.value}"


def manifest_name(flavour: Flavour) -> str:
    return MANIFEST if flavour is Flavour.CPU else f"corral-llama-{flavour.value}.json"


@dataclass(frozen=True, slots=True)
class ToolSearch:
    """Where to look for a toolkit: the environment, a `which` over its PATH, header roots."""

    env: Mapping[str, str]
    which: Callable[[str], str | None]
    include_dirs: tuple[Path, ...]  # the system's
    lib_dirs: tuple[Path, ...]  # the system's
    cuda_homes: tuple[Path, ...]

    @classmethod
    def this_machine(cls, env: Mapping[str, str] | None = None) -> ToolSearch:
        env = dict(os.environ) if env is None else env
        path = env.get("PATH", "")
        return cls(
            env=env,
            which=lambda name: shutil.which(name, path=path),
            include_dirs=(Path("/usr/include"), Path("/usr/local/include")),
            lib_dirs=(
                *sorted(Path("/usr/lib").glob("*-linux-gnu")),  # Debian's multiarch directories
                *(Path(d) for d in ("/usr/lib64", "/usr/lib", "/usr/local/lib")),
            ),
            cuda_homes=(Path("/usr/local/cuda"), Path("/opt/cuda")),
        )


@dataclass(frozen=True, slots=True)
class Toolkit:
    """What a flavour's configure step needs: found tools and the CMake options they give."""

    cmake_flags: tuple[str, ...]
    missing: tuple[tuple[str, str], ...]  # (what, Debian package) for each thing not found

    def problem(self, flavour: Flavour) -> str | None:
        """One message saying what is missing and what to install, or None when complete."""
        if not self.missing:
            return None
        what = ", ".join(item for item, _ in self.missing)
        packages = " ".join(dict.fromkeys(pkg for _, pkg in self.missing))
        return (
            f"the {flavour.value} build needs {what}: not found on this machine. Install it: "
            f"apt-get install {packages}{_ELSEWHERE[flavour]}. Then run this again."
        )


# Where else the toolkit comes from, after the Debian packages.
_ELSEWHERE = {
    Flavour.CPU: "",
    Flavour.CUDA: (
        " (Debian's non-free component), or NVIDIA's CUDA toolkit (then set CUDA_PATH or put "
        "nvcc on PATH)"
    ),
    Flavour.VULKAN: ", or the LunarG Vulkan SDK (source its setup-env.sh, which sets VULKAN_SDK)",
}


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _find_nvcc(search: ToolSearch) -> str | None:
    """nvcc where CMake's FindCUDAToolkit looks: CUDACXX, CUDA_PATH, PATH, the usual homes."""
    explicit = search.env.get("CUDACXX")
    if explicit:
        return explicit if _executable(Path(explicit)) else None
    cuda_path = search.env.get("CUDA_PATH")
    if cuda_path and _executable(Path(cuda_path) / "bin" / "nvcc"):
        return str(Path(cuda_path) / "bin" / "nvcc")
    on_path = search.which("nvcc")
    if on_path:
        return on_path
    homes = (home / "bin" / "nvcc" for home in search.cuda_homes)
    return next((str(nvcc) for nvcc in homes if _executable(nvcc)), None)


def _cuda_dirs(search: ToolSearch, nvcc: str) -> tuple[list[Path], list[Path]]:
    """Include and library directories of every CUDA toolkit root in sight, then the system's."""
    roots = [Path(search.env["CUDA_PATH"])] if search.env.get("CUDA_PATH") else []
    roots += [Path(nvcc).resolve().parent.parent, *search.cuda_homes]
    includes = [d for r in roots for d in (r / "include", *r.glob("targets/*/include"))]
    libs = [d for r in roots for d in (r / "lib64", r / "lib", *r.glob("targets/*/lib"))]
    return [*includes, *search.include_dirs], [*libs, *search.lib_dirs]


def _cuda_missing(search: ToolSearch, nvcc: str) -> list[tuple[str, str]]:
    """What ggml-cuda links besides the compiler: the runtime and cuBLAS, header and library."""
    includes, libs = _cuda_dirs(search, nvcc)
    missing = []
    for what, header, library in (
        ("the CUDA runtime (cuda_runtime.h, libcudart)", "cuda_runtime.h", "libcudart.so"),
        ("cuBLAS (cublas_v2.h, libcublas)", "cublas_v2.h", "libcublas.so"),
    ):
        has_header = any((d / header).is_file() for d in includes)
        has_library = any(next(d.glob(f"{library}*"), None) for d in libs)
        if not (has_header and has_library):
            missing.append((what, "nvidia-cuda-toolkit"))
    return missing


def _header(search: ToolSearch, relative: str) -> bool:
    roots = list(search.include_dirs)
    sdk = search.env.get("VULKAN_SDK")
    if sdk:
        roots.insert(0, Path(sdk) / "include")
    return any((root / relative).is_file() for root in roots)


def _find_glslc(search: ToolSearch) -> str | None:
    sdk = search.env.get("VULKAN_SDK")
    if sdk and _executable(Path(sdk) / "bin" / "glslc"):
        return str(Path(sdk) / "bin" / "glslc")
    return search.which("glslc")


def toolkit(flavour: Flavour, search: ToolSearch) -> Toolkit:
    """The CMake options for `flavour` and whatever its toolkit lacks here."""
    if flavour is Flavour.CPU:
        return Toolkit((), ())
    if flavour is Flavour.CUDA:
        nvcc = _find_nvcc(search)
        if nvcc is None:
            named = search.env.get("CUDACXX")
            what = f"the CUDA compiler nvcc (CUDACXX={named} is no executable)" if named else ""
            return Toolkit((), ((what or "the CUDA compiler nvcc", "nvidia-cuda-toolkit"),))
        # The compiler found here, so CMake uses the same one whatever its own search finds.
        flags = ("-DGGML_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}")
        return Toolkit(flags, tuple(_cuda_missing(search, nvcc)))
    missing: list[tuple[str, str]] = []
    if not _header(search, "vulkan/vulkan.h"):
        missing.append(("the Vulkan headers (vulkan/vulkan.h)", "libvulkan-dev"))
    if _find_glslc(search) is None:
        missing.append(("the shader compiler glslc", "glslc"))
    if not _header(search, "spirv/unified1/spirv.hpp"):
        missing.append(("the SPIR-V headers (spirv/unified1/spirv.hpp)", "spirv-headers"))
    return Toolkit(("-DGGML_VULKAN=ON",), tuple(missing))
