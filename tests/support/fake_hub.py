"""A stand-in for the Hugging Face Hub on 127.0.0.1, serving only the routes huggingface_hub
(1.16) and Corral call to find and download a model file.

Why a fake: this machine has no internet, and a test must never reach one. Tests point
HF_ENDPOINT (or `HubSettings.endpoint`) at this server. The routes, as huggingface_hub's
file_download.py and hf_api.py call them:

- `GET /api/models/{owner}/{name}/tree/{revision}?recursive=true`: the JSON list of the
  repository's files (`type`, `path`, `size`, `oid`, `lfs`), one page;
- `HEAD /{owner}/{name}/resolve/{revision}/{path}`: the file's metadata in headers: `ETag` (the
  blob's name in the cache), `X-Repo-Commit` (the snapshot's), `Content-Length`;
- `GET` of the same: the bytes, honouring `Range: bytes=N-` with 206 (a resumed download).

Errors answer as the Hub does: 404 with `X-Error-Code: RepoNotFound` or `EntryNotFound`, 401
for a private repository (with `X-Error-Message: Invalid credentials in Authorization header`
when a wrong token was sent). Two faults can be asked for, on a file's first full GET: `cut`
(send that many bytes of the body, then close the connection) and `hold` (send that many, then
wait for an event before the rest). Every request is recorded. One request per connection, a
16 KiB request head at most, every connection closed when the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT_S = 10.0
SEND_CHUNK = 256 * 1024
_TREE = re.compile(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")
_RANGE = re.compile(r"bytes=(\d+)-")
INVALID_TOKEN = "Invalid credentials in Authorization header"


@dataclass
class Repo:
    files: dict[str, bytes]
    token: str | None = None  # private: only this bearer token may read it
    commit: str = "0123456789abcdef0123456789abcdef01234567"


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names


@dataclass
class FakeHub:
    repos: dict[str, Repo]
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    cut: dict[tuple[str, str], int] = field(default_factory=dict)  # (repo, path) -> bytes sent
    hold: dict[tuple[str, str], tuple[int, asyncio.Event]] = field(default_factory=dict)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _held: set[asyncio.Event] = field(default_factory=set)

    def gets(self, filename: str) -> list[Seen]:
        """The GETs of one file's bytes."""
        return [s for s in self.seen if s.method == "GET" and s.path.endswith("/" + filename)]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            path = unquote(urlsplit(target).path)
            self.seen.append(Seen(method, path, headers))
            await self._answer(writer, method, path, headers)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(
        self, writer: asyncio.StreamWriter, method: str, path: str, headers: dict[str, str]
    ) -> None:
        if (tree := _TREE.fullmatch(path)) and method == "GET":
            repo = self._repo(writer, tree[1], headers)
            if repo is not None:
                listing = [_entry(p, data) for p, data in sorted(repo.files.items())]
                body = json.dumps(listing).encode()
                _send(writer, 200, {"Content-Type": "application/json"}, body)
        elif (resolve := _RESOLVE.fullmatch(path)) and method in ("GET", "HEAD"):
            repo = self._repo(writer, resolve[1], headers)
            if repo is not None:
                await self._file(writer, method, resolve[1], repo, resolve[3], headers)
        else:
            _send(writer, 404, {}, b"no such route")
        await writer.drain()

    def _repo(
        self, writer: asyncio.StreamWriter, name: str, headers: dict[str, str]
    ) -> Repo | None:
        repo = self.repos.get(name)
        if repo is None:
            _send(writer, 404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found")
            return None
        if repo.token is not None and headers.get("authorization") != f"Bearer {repo.token}":
            sent = "authorization" in headers
            extra = {"X-Error-Message": INVALID_TOKEN} if sent else {}
            _send(writer, 401, extra, b"Unauthorized")
            return None
        return repo

    async def _file(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        name: str,
        repo: Repo,
        filename: str,
        headers: dict[str, str],
    ) -> None:
        data = repo.files.get(filename)
        if data is None:
            about = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit}
            _send(writer, 404, about, b"Entry not found")
            return
        meta = {
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "X-Repo-Commit": repo.commit,
            "Accept-Ranges": "bytes",
        }
        start = 0
        if (asked := _RANGE.fullmatch(headers.get("range", ""))) is not None:
            start = int(asked[1])
        if method == "HEAD":
            _send(writer, 200, meta | {"Content-Length": str(len(data))}, b"", head_only=True)
            return
        status = 206 if start else 200
        if start:
            meta["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        _send(writer, status, meta | {"Content-Length": str(len(data) - start)}, b"")
        body = data[start:]
        key = (name, filename)
        if not start and key in self.cut:
            await _send_body(writer, body[: self.cut.pop(key)])
            return  # and close: the client sees the body end before its Content-Length
        if not start and key in self.hold:
            sent, go_on = self.hold.pop(key)
            self._held.add(go_on)
            await _send_body(writer, body[:sent])
            await go_on.wait()
            body = body[sent:]
        await _send_body(writer, body)


def _entry(path: str, data: bytes) -> dict[str, object]:
    sha = hashlib.sha256(data).hexdigest()
    return {
        "type": "file",
        "path": path,
        "size": len(data),
        "oid": hashlib.sha1(data).hexdigest(),
        "lfs": {"oid": sha, "size": len(data), "pointerSize": 134},
    }


def _send(
    writer: asyncio.StreamWriter,
    status: int,
    headers: dict[str, str],
    body: bytes,
    head_only: bool = False,
) -> None:
    lines = [f"HTTP/1.1 {status} X", "Connection: close"]
    if "Content-Length" not in headers and not head_only:
        headers = headers | {"Content-Length": str(len(body))}
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


async def _send_body(writer: asyncio.StreamWriter, body: bytes) -> None:
    for i in range(0, len(body), SEND_CHUNK):
        writer.write(body[i : i + SEND_CHUNK])
        await writer.drain()


@contextlib.asynccontextmanager
async def fake_hub(repos: dict[str, Repo]) -> AsyncIterator[FakeHub]:
    hub = FakeHub(repos)
    server = await asyncio.start_server(hub.handle, "127.0.0.1", 0, limit=MAX_HEAD)
    port = server.sockets[0].getsockname()[1]
    hub.url = f"http://127.0.0.1:{port}"
    try:
        yield hub
    finally:
        server.close()
        for go_on in hub._held:
            go_on.set()
        for writer in list(hub._writers):
            writer.transport.abort()
        await server.wait_closed()
