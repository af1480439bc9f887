"""What went wrong while looking up or fetching a model, in one sentence a person can act on.
Pure: maps huggingface_hub's and httpx's exceptions (and the disk's) to the message."""

from __future__ import annotations

import httpx
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from corral.models.hub import REVISION, HubSettings

MAX_LISTED = 12  # files or quants named in one message


def listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def unreachable(settings: HubSettings, exc: BaseException) -> str:
    return (
        f"cannot reach the Hugging Face Hub at {settings.endpoint} ({_reason(exc)}): check the"
        " network, set HF_ENDPOINT to a mirror you can reach, or set HF_HUB_OFFLINE=1 to use"
        " only what is already in the cache"
    )


def not_cached(settings: HubSettings, what: str) -> str:
    return (
        f"{what} is not in the cache ({settings.cache_dir}) and HF_HUB_OFFLINE is set: fetch it"
        " once with the network on, or unset HF_HUB_OFFLINE"
    )


def explain(exc: BaseException, settings: HubSettings, repo: str, what: str) -> str:
    """`what` names the file(s) being fetched, e.g. "owner/repo model-Q4_K_M.gguf"."""
    token = "HF_TOKEN was refused; set it to" if settings.token else "set HF_TOKEN to"
    if isinstance(exc, GatedRepoError):
        return (
            f"{repo} is gated: accept its conditions at {settings.endpoint}/{repo} and {token}"
            " a token of that account"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"no repository {repo} on {settings.endpoint} (if it is private or gated, {token} a"
            " token that can read it)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo} has no branch {REVISION!r} on {settings.endpoint}"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"{repo} has no file {what.removeprefix(repo).strip()} on {settings.endpoint}"
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return (
                f"not authorised to read {repo} on {settings.endpoint} ({status}): {token} a"
                " token with read access"
            )
        return f"the Hub at {settings.endpoint} answered {status} for {what}"
    if isinstance(exc, LocalEntryNotFoundError | OfflineModeIsEnabled):
        cause = exc.__cause__ or exc.__context__
        if settings.offline or cause is None or isinstance(cause, OfflineModeIsEnabled):
            return not_cached(settings, what)
        return explain(cause, settings, repo, what)
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return unreachable(settings, exc)
    if isinstance(exc, httpx.TransportError):
        return (
            f"the download of {what} from {settings.endpoint} broke off ({_reason(exc)}): run"
            " the same command again to resume it"
        )
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"cannot write the model into {exc.filename}: {exc.strerror or exc}"
    return f"fetching {what} failed: {_reason(exc)}"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text and text[0] else type(exc).__name__
