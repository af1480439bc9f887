"""Turn a model reference into a local file: resolve it (which files, how large), then download
them with huggingface_hub into its standard cache (resumable: a cut download leaves its
`.incomplete` file, and the next run asks for the rest with a Range request).

`resolve` and `download` block (network and disk); `resolve_async` and `download_async` run them
in a thread. `download` reports (bytes done, bytes in all) as it goes, from that thread, and
stops at the next chunk once its `cancel` event is set.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx

from corral.models import explain as ex
from corral.models.gguf_names import choose, gguf_name, is_model, quants, split_parts
from corral.models.hub import REVISION, HubSettings, list_cache, list_hub
from corral.models.reference import HubFile, HubQuant, LocalFile, ModelError, ModelRef
from corral.models.reference import parse_reference as _parse

Progress = Callable[[int, int | None], None]  # (bytes done, bytes in all if known)


class FetchCancelled(Exception):
    """The download was asked to stop; what it fetched so far stays for the next run."""


@dataclass(frozen=True, slots=True)
class Download:
    """What to fetch: the parts of one model in one repository, first part first."""

    repo: str
    files: tuple[str, ...]
    sizes: tuple[int | None, ...]
    settings: HubSettings
    cached_only: bool = False  # the Hub was not asked (offline) or not reachable
    note: str | None = None  # something the person should know (e.g. the Hub was unreachable)

    @property
    def what(self) -> str:
        more = f" (+{len(self.files) - 1} parts)" if len(self.files) > 1 else ""
        return f"{self.repo} {self.files[0]}{more}"

    @property
    def total(self) -> int | None:
        known = [s for s in self.sizes if s is not None]
        return sum(known) if len(known) == len(self.sizes) else None


def model_reference(text: str) -> ModelRef:
    """What `--model TEXT` names: a file that exists is always a local file."""
    if Path(text).is_file():
        return LocalFile(Path(text))
    return _parse(text)


def resolve(ref: HubFile | HubQuant, settings: HubSettings) -> Download:
    """Which files the reference means, checked against the Hub's list of the repository (or
    the cache's, offline or when the Hub cannot be reached). Raises ModelError."""
    files, note = _listing(ref, settings)
    if isinstance(ref, HubFile):
        first = split_parts(ref.filename)[0]
        if first not in files:
            ggufs = sorted(p for p in files if is_model(p) and _first_part(p))
            there = f"its .gguf files: {ex.listed(ggufs)}" if ggufs else "it has no .gguf files"
            where = "in the cache" if note is not None or settings.offline else ""
            raise ModelError(
                f"{ref.repo} has no file {ref.filename}{where and ' ' + where}; {there}"
            )
    else:
        chosen = choose(files, ref.quant)
        if chosen is None:
            tags = quants(files)
            there = f"quants there: {ex.listed(tags)}" if tags else "it has no .gguf model files"
            asked = f"quant {ref.quant}" if ref.quant else "any quant"
            raise ModelError(f"{ref.repo} has no .gguf file for {asked}; {there}")
        first = chosen
    parts = split_parts(first)
    missing = [p for p in parts if p not in files]
    if missing:
        raise ModelError(f"{ref.repo}: the split model {first} lacks {ex.listed(missing)}")
    cached = note is not None or settings.offline
    return Download(ref.repo, parts, tuple(files[p] for p in parts), settings, cached, note)


def _first_part(path: str) -> bool:
    name = gguf_name(path)
    return name is not None and name.index == 1


def _listing(
    ref: HubFile | HubQuant, settings: HubSettings
) -> tuple[dict[str, int | None], str | None]:
    if settings.offline:
        cached = list_cache(settings, ref.repo)
        if cached is None:
            raise ModelError(ex.not_cached(settings, ref.repo))
        return cached, None
    try:
        return list_hub(settings, ref.repo), None
    except (httpx.ConnectError, httpx.TimeoutException) as exc:
        cached = list_cache(settings, ref.repo)
        if cached is None:
            raise ModelError(ex.unreachable(settings, exc)) from None
        return cached, f"{ex.unreachable(settings, exc)}; using the cached copy"
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(ex.explain(exc, settings, ref.repo, str(ref))) from None


def download(
    plan: Download, progress: Progress | None = None, cancel: threading.Event | None = None
) -> Path:
    """Fetch every part (what the cache holds is not fetched again); the first part's path,
    which llama-server loads. Raises ModelError, or FetchCancelled once `cancel` is set."""
    from huggingface_hub import hf_hub_download

    report = progress or (lambda done, total: None)
    total, done, first = plan.total, 0, None
    for name in plan.files:

        def file_done(n: int, before: int = done) -> None:
            report(before + n, total)

        bar = _bar_class(file_done, cancel)
        try:
            path = hf_hub_download(
                plan.repo,
                name,
                revision=REVISION,
                cache_dir=plan.settings.cache_dir,
                endpoint=plan.settings.endpoint,
                token=plan.settings.token,
                local_files_only=plan.cached_only,
                tqdm_class=cast(Any, bar),
            )
        except FetchCancelled:
            raise
        except Exception as exc:
            what = f"{plan.repo} {name}"
            raise ModelError(ex.explain(exc, plan.settings, plan.repo, what)) from None
        done += Path(path).stat().st_size
        report(done, total)
        first = first or Path(path)
    assert first is not None  # a Download has at least one file
    return first


async def resolve_async(ref: HubFile | HubQuant, settings: HubSettings) -> Download:
    return await asyncio.to_thread(resolve, ref, settings)


async def download_async(plan: Download, progress: Progress | None = None) -> Path:
    """`download` in a thread; cancelling this stops the thread at its next chunk."""
    cancel = threading.Event()
    try:
        return await asyncio.to_thread(download, plan, progress, cancel)
    except asyncio.CancelledError:
        cancel.set()
        raise


def _bar_class(report: Callable[[int], None], cancel: threading.Event | None) -> type:
    """A stand-in for tqdm that huggingface_hub updates as bytes arrive (`initial` is what a
    resumed download already had)."""

    class Bar:
        def __init__(self, *_: object, initial: int = 0, **__: object) -> None:
            self.n = initial
            report(self.n)

        def update(self, n: float | None = 1) -> None:
            if cancel is not None and cancel.is_set():
                raise FetchCancelled("the download was stopped")
            self.n += int(n or 0)
            report(self.n)

        def close(self) -> None:
            pass

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    return Bar
