"""Where the Hugging Face Hub is and what a repository holds: on the Hub (its tree API, read with
bounds) or in huggingface_hub's cache (for offline use).

The settings come from the environment the way huggingface_hub reads it, but read when asked
(huggingface_hub reads its own at import): HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE, HF_HUB_CACHE,
HF_HOME. They are handed to every call explicitly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx

DEFAULT_ENDPOINT = "https://huggingface.co"
REVISION = "main"
CONNECT_S = 10.0  # as huggingface_hub's HEAD and GET (HF_HUB_ETAG_TIMEOUT, _DOWNLOAD_TIMEOUT)
READ_S = 10.0
MAX_PAGES = 100  # the tree API pages by 1,000 entries
MAX_PAGE_BYTES = 16 * 1024 * 1024
MAX_FILES = 100_000
MAX_CACHED_FILES = 10_000


@dataclass(frozen=True, slots=True)
class HubSettings:
    endpoint: str
    cache_dir: Path  # huggingface_hub's cache: models--OWNER--NAME/{blobs,refs,snapshots}
    token: str | None  # None: huggingface_hub's saved login, if any
    offline: bool

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> HubSettings:
        env = os.environ if environ is None else environ
        home = env.get("HF_HOME") or str(
            Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
        )
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or f"{home}/hub"
        return cls(
            endpoint=(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            cache_dir=Path(os.path.expandvars(cache)).expanduser(),
            token=env.get("HF_TOKEN") or None,
            offline=env.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"),
        )

    def repo_dir(self, repo: str) -> Path:
        return self.cache_dir / ("models--" + repo.replace("/", "--"))


def list_hub(settings: HubSettings, repo: str) -> dict[str, int | None]:
    """Every file of the repository at `main` with its size, from the Hub's tree API.

    Raises huggingface_hub's own errors (RepositoryNotFoundError, GatedRepoError, ...: read by
    its `hf_raise_for_status`) and httpx's transport errors; ValueError past a bound."""
    from huggingface_hub import get_token, hf_raise_for_status

    url: str | None = f"{settings.endpoint}/api/models/{repo}/tree/{quote(REVISION, safe='')}"
    params: dict[str, str] | None = {"recursive": "true", "expand": "false"}
    token = settings.token or get_token()  # get_token: HF_TOKEN, else the saved login
    headers = {"user-agent": "corral"} | ({"authorization": f"Bearer {token}"} if token else {})
    files: dict[str, int | None] = {}
    timeout = httpx.Timeout(READ_S, connect=CONNECT_S)
    with httpx.Client(timeout=timeout, headers=headers, follow_redirects=True) as client:
        for _ in range(MAX_PAGES):
            if url is None:
                return files
            with client.stream("GET", url, params=params) as reply:
                body = _read_bounded(reply.iter_bytes())
                if reply.is_error:  # read whole, so that the error can quote the Hub's words
                    hf_raise_for_status(
                        httpx.Response(
                            reply.status_code,
                            headers=reply.headers,
                            content=body,
                            request=reply.request,
                        )
                    )
                files.update(_entries(json.loads(body)))
                url, params = reply.links.get("next", {}).get("url"), None
            if len(files) > MAX_FILES:
                raise ValueError(f"{repo} lists more than {MAX_FILES} files")
    raise ValueError(f"{repo}'s file list has more than {MAX_PAGES} pages")


def list_cache(settings: HubSettings, repo: str) -> dict[str, int | None] | None:
    """The repository's files at `main` as last fetched into the cache; None if it never was."""
    ref = settings.repo_dir(repo) / "refs" / REVISION
    try:
        commit = ref.read_text(encoding="ascii").strip()[:64]
    except (OSError, UnicodeDecodeError):
        return None
    snapshot = settings.repo_dir(repo) / "snapshots" / commit
    if not commit or not snapshot.is_dir():
        return None
    files: dict[str, int | None] = {}
    for path in _walk(snapshot):
        files[path.relative_to(snapshot).as_posix()] = None  # a cached file needs no size
        if len(files) >= MAX_CACHED_FILES:
            break
    return files


def _walk(top: Path) -> Iterator[Path]:
    for root, _dirs, names in os.walk(top):
        for name in names:
            yield Path(root) / name


def _read_bounded(chunks: Iterator[bytes]) -> bytes:
    body = bytearray()
    for chunk in chunks:
        body += chunk
        if len(body) > MAX_PAGE_BYTES:
            raise ValueError(f"a page of the file list is larger than {MAX_PAGE_BYTES} bytes")
    return bytes(body)


def _entries(data: object) -> Iterator[tuple[str, int | None]]:
    if not isinstance(data, list):
        raise ValueError("the Hub's file list is not a JSON list")
    for item in data:
        if isinstance(item, dict) and item.get("type") == "file":
            path, size, lfs = item.get("path"), item.get("size"), item.get("lfs")
            if isinstance(lfs, dict) and isinstance(lfs.get("size"), int):
                size = lfs["size"]
            if isinstance(path, str):
                yield path, size if isinstance(size, int) and size >= 0 else None
