"""`corral llama install|bin-dir` and `corral model tiny`: the llama.cpp binaries and a model."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from corral.cli.console import error, fail, stderr

if TYPE_CHECKING:
    from corral.llama.binaries import BinariesNotFound

llama_app = typer.Typer(help="The llama.cpp binaries Corral runs.", no_args_is_help=True)
model_app = typer.Typer(help="Models for tests and demos.", no_args_is_help=True)


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
def llama_install() -> None:
    """Build ggml-rpc-server and llama-server (cached by version) and print their directory."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from corral.llama.build import BuildError, install

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
            bin_dir = install(progress=report)
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
) -> None:
    """Write a tiny random-weight GGUF (~0.5 MB). It produces NONSENSE text: tests only."""
    from pathlib import Path

    try:
        from corral.llama.tiny_model import write_tiny_model

        out = write_tiny_model(Path(path), seed=seed)
    except ImportError as exc:
        fail(f"the tiny model needs the `gguf` package: {exc}")
    except OSError as exc:
        fail(f"cannot write {path}: {exc}")
    size_kib = out.stat().st_size / 1024
    print(f"wrote {out} ({size_kib:.0f} KiB)")
    print(
        "note: its weights are random, so it produces nonsense text. It exercises the machinery "
        "(offload over RPC, failover); it says nothing."
    )
