"""`corral llama install|bin-dir` and `corral model tiny`: the llama.cpp binaries and a model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn

import typer

from corral.cli.console import bad_input, error, fail, stderr

if TYPE_CHECKING:
    from corral.llama.binaries import BinariesNotFound
    from corral.llama.model_shape import ModelShape

llama_app = typer.Typer(help="The llama.cpp binaries Corral runs.", no_args_is_help=True)
GpuName = Literal["cuda", "vulkan"]  # corral.llama.flavours.GPU_FLAVOURS' values
model_app = typer.Typer(
    help="Models: fetch one from Hugging Face, or write a tiny one for tests.",
    no_args_is_help=True,
)


def binaries_missing(exc: BinariesNotFound) -> NoReturn:
    """Exit 1 saying how to get the binaries (and about CORRAL_LLAMA_BIN_DIR when it is set)."""
    message = str(exc)
    if os.environ.get("CORRAL_LLAMA_BIN_DIR"):
        message += (
            "; point CORRAL_LLAMA_BIN_DIR at the directory that holds them, or unset it to use "
            "`corral llama install`'s build"
        )
    fail(message)


@llama_app.command("install")
def llama_install(
    gpu: Annotated[
        GpuName | None,
        typer.Option(
            help="Build with this GPU backend (needs its toolkit; cached apart from the CPU "
            "build, and preferred to it once built)."
        ),
    ] = None,
) -> None:
    """Build ggml-rpc-server and llama-server (cached by version) and print their directory."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from corral.llama.build import BuildError, install
    from corral.llama.flavours import Flavour

    flavour = Flavour(gpu) if gpu else Flavour.CPU

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=stderr(),
        transient=True,
    ) as bar:
        task = bar.add_task("preparing", total=100)

        def report(stage: str, pct: int | None) -> None:
            bar.update(task, description=stage, completed=pct if pct is not None else 0)

        try:
            bin_dir = install(progress=report, flavour=flavour)
        except (BuildError, OSError) as exc:
            error(str(exc))
            raise typer.Exit(1) from None
    print(bin_dir)


@llama_app.command("bin-dir")
def llama_bin_dir() -> None:
    """Print the directory holding the binaries, or exit 1 saying how to get them."""
    from corral.llama.binaries import BinariesNotFound, find_binaries

    try:
        print(find_binaries().bin_dir)
    except BinariesNotFound as exc:
        binaries_missing(exc)


@model_app.command("tiny")
def model_tiny(
    path: Annotated[str, typer.Argument(help="Where to write the .gguf file.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    size: Annotated[
        str | None,
        typer.Option(
            help="Scale the same architecture to about this size (512MiB, 1GiB, 1.5GB; at most"
            " 64GiB), with weights larger than rpc-server's 10 MiB cache threshold."
        ),
    ] = None,
) -> None:
    """Write a random-weight GGUF (tiny: ~0.5 MB). It produces NONSENSE text: tests only."""
    from corral.llama.model_shape import (
        TINY,
        ModelSizeError,
        cacheable_bytes,
        parse_size,
        shape_for_size,
        tensor_bytes,
    )

    try:
        shape = TINY if size is None else shape_for_size(parse_size(size))
    except ModelSizeError as exc:
        bad_input(f"--size: {exc}")
    try:
        from corral.llama.tiny_model import write_tiny_model

        out = _write_with_progress(write_tiny_model, Path(path), seed, shape, size is not None)
    except ImportError as exc:
        fail(f"the tiny model needs the `gguf` package: {exc}")
    except OSError as exc:
        fail(f"cannot write {path}: {exc}")
    size_mib = out.stat().st_size / 1024**2
    print(
        f"wrote {out} ({size_mib:.1f} MiB: {shape.layers} layers, {shape.embd} wide, "
        f"feed-forward {shape.ff}, F32)"
    )
    share = cacheable_bytes(shape) / tensor_bytes(shape)
    print(f"{share:.0%} of its bytes are in tensors rpc-server's cache (-c) keeps (> 10 MiB)")
    print(
        "note: its weights are random, so it produces nonsense text. It exercises the machinery "
        "(offload over RPC, failover); it says nothing."
    )


def _write_with_progress(
    write: Callable[..., Path], path: Path, seed: int, shape: ModelShape, show: bool
) -> Path:
    """Write the model, with a progress bar on stderr for the larger ones."""
    if not show:
        return write(path, seed=seed, shape=shape)
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    with Progress(
        BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=stderr(), transient=True
    ) as bar:
        task = bar.add_task("writing", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return write(path, seed=seed, shape=shape, progress=report)


@model_app.command("fetch")
def model_fetch(
    reference: Annotated[
        str,
        typer.Argument(help="hf:OWNER/REPO/FILE.gguf, OWNER/REPO:QUANT, or hf:OWNER/REPO."),
    ],
) -> None:
    """Fetch a GGUF model from Hugging Face into its cache (resumable) and print its path.

    OWNER/REPO:QUANT picks the file as llama-server's -hf does; a split model's parts are all
    fetched and the first part's path printed. HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME
    apply as in huggingface_hub.
    """
    from corral.cli.model_ref import fetch_with_bar, model_option

    path, plan = model_option(Path(reference), option="")
    print(fetch_with_bar(plan, option="") if plan is not None else path)
