"""`--model` as a reference: a local file stays as it is (no network); a Hugging Face reference
is resolved against the Hub before anything starts, and fetched with a progress bar on stderr
(or, in `corral up`, by the plane, with its progress on the page).

Exit codes: 2 for a local file that is not there (as before), 1 for a reference that cannot be
used (malformed, no such repository, file or quant, not authorised, no network).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from corral.cli.console import fail, stderr, warn
from corral.cli.options import check_model

if TYPE_CHECKING:
    from corral.models.fetch import Download


def model_option(
    model: Path | None, option: str = "--model"
) -> tuple[Path | None, Download | None]:
    """(a local file, None) or (None, what to fetch); (None, None) without a model."""
    if model is None:
        return None, None
    from corral.models.fetch import model_reference, resolve
    from corral.models.hub import HubSettings
    from corral.models.reference import LocalFile, ModelError

    text = str(model)
    try:
        ref = model_reference(text)
        if isinstance(ref, LocalFile):
            check_model(ref.path)
            return ref.path.resolve(), None
        plan = resolve(ref, HubSettings.from_environ())
    except ModelError as exc:
        fail(f"{option} {text}: {exc}" if option else f"{text}: {exc}")
    if plan.note:
        warn(plan.note)
    return None, plan


def fetch_with_bar(plan: Download, option: str = "--model") -> Path:
    """Fetch it (in this thread: no event loop runs yet), drawing a bar on stderr; the first
    part's path. Exit 1 saying why when it cannot."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from corral.models.fetch import download
    from corral.models.reference import ModelError

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr(),
        transient=True,
    ) as bar:
        task = bar.add_task(f"fetching {plan.what}", total=plan.total)

        def report(done: int, total: int | None) -> None:  # from huggingface_hub's thread
            bar.update(task, completed=done, total=total)

        try:
            return download(plan, report)
        except ModelError as exc:
            fail(f"{option}: {exc}" if option else str(exc))
        except KeyboardInterrupt:
            fail("stopped; run the same command again to resume the download", 130)


def local_model(model: Path | None, option: str = "--model") -> Path | None:
    """`--model` as a local path, fetching it first when it is a Hugging Face reference."""
    path, plan = model_option(model, option)
    return fetch_with_bar(plan, option) if plan is not None else path
