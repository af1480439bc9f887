"""Models by reference: parse, choose, resolve and download from a Hugging Face Hub; resume;
offline; what `corral model fetch`, `coordinator run` and the plane (`corral up`) make of it.

The Hub here is a FAKE (tests/support/fake_hub.py): this machine has no internet, and tests must
not reach one. It serves, on 127.0.0.1, only the routes huggingface_hub calls (the tree listing,
HEAD and GET of /{repo}/resolve/{rev}/{file} with ETag, X-Repo-Commit, Content-Length and Range),
and the tests point HF_ENDPOINT (or HubSettings.endpoint) at it. The downloading itself is the
real huggingface_hub into its real cache layout, and the bytes served are real GGUF files from
the tiny model writer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.coordinator.publish import Publisher
from corral.llama.tiny_model import write_tiny_model
from corral.models.fetch import Download, download_async, model_reference, resolve
from corral.models.gguf_names import choose, quants, split_parts
from corral.models.hub import HubSettings
from corral.models.progress import Speed, describe
from corral.models.reference import (
    BadReference,
    HubFile,
    HubQuant,
    LocalFile,
    ModelError,
    parse_reference,
)
from corral.plane.fetching import fetch_model
from corral.store.factory import open_store
from corral.types import CoordinatorState
from tests.support.corral_cli import corral, isolated_env
from tests.support.fake_hub import FakeHub, Repo, fake_hub
from tests.support.loopback import free_port
from tests.support.waiting import until

REPO = "owner/tiny-GGUF"
CHUNK = 10 * 1024 * 1024  # huggingface_hub writes what it receives in chunks of this size


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Two different real GGUF files (different seeds), as bytes."""
    out = tmp_path_factory.mktemp("gguf")
    return {
        "Q8_0": write_tiny_model(out / "a.gguf", seed=1).read_bytes(),
        "F32": write_tiny_model(out / "b.gguf", seed=2).read_bytes(),
    }


def thirds(data: bytes) -> list[bytes]:
    n = len(data) // 3
    return [data[:n], data[n : 2 * n], data[2 * n :]]


@pytest.fixture
async def hub(ggufs: dict[str, bytes]) -> AsyncIterator[FakeHub]:
    split = {
        f"split/tiny-Q4_K_M-{i:05d}-of-00003.gguf": part
        for i, part in enumerate(thirds(ggufs["F32"]), 1)
    }
    repos = {
        REPO: Repo(
            {
                "README.md": b"# tiny\n",
                "tiny-Q8_0.gguf": ggufs["Q8_0"],
                "tiny-F32.gguf": ggufs["F32"],
                "mmproj-tiny-Q8_0.gguf": b"not the model",
                **split,
            }
        ),
        "owner/private": Repo({"m-Q8_0.gguf": ggufs["Q8_0"]}, token="right-token"),
    }
    async with fake_hub(repos) as h:
        yield h


def settings(hub: FakeHub, tmp_path: Path, **change: object) -> HubSettings:
    base = {"endpoint": hub.url, "cache_dir": tmp_path / "hf", "token": None, "offline": False}
    return HubSettings(**(base | change))  # type: ignore[arg-type]


async def fetch(text: str, s: HubSettings) -> tuple[Download, Path, list[tuple[int, int | None]]]:
    ref = model_reference(text)
    assert isinstance(ref, HubFile | HubQuant)
    plan = await asyncio.to_thread(resolve, ref, s)
    seen: list[tuple[int, int | None]] = []
    path = await download_async(plan, lambda done, total: seen.append((done, total)))
    return plan, path, seen


# -- references and names (pure) ----------------------------------------------------------


def test_references_parse_to_what_they_name() -> None:
    assert parse_reference("hf:a/b/dir/m-Q4_K_M.gguf") == HubFile("a/b", "dir/m-Q4_K_M.gguf")
    assert parse_reference("a/b-GGUF:q4_k_m") == HubQuant("a/b-GGUF", "q4_k_m")
    assert parse_reference("hf:a/b:Q8_0") == HubQuant("a/b", "Q8_0")
    assert parse_reference("hf:a/b") == HubQuant("a/b", None)
    assert parse_reference("models/m.gguf") == LocalFile(Path("models/m.gguf"))
    assert parse_reference("/abs/m.gguf") == LocalFile(Path("/abs/m.gguf"))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("hf:a", "expected hf:OWNER/REPO/FILE.gguf or hf:OWNER/REPO:QUANT"),
        ("hf:a/b/m.bin", "m.bin is not a .gguf file"),
        ("hf:a/m.gguf", "a file needs its repository: hf:OWNER/REPO/FILE.gguf"),
        ("hf:a/b/../m.gguf", "'..' part"),
        ("hf:a/b/x.gguf:Q4", "not both"),
        ("a/b:", "no quantisation tag after ':'"),
        ("a/b:Q4 K", "is not a quantisation tag"),
        ("-a/b:Q4", "'-a' is not a valid Hugging Face owner"),
        ("a/b..c:Q4", "'b..c' is not a valid Hugging Face repository name"),
        ("", "empty"),
        ("x" * 2000, "at most 1024 characters"),
    ],
)
def test_a_bad_reference_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(BadReference, match=None) as caught:
        parse_reference(text)
    assert says in str(caught.value)


def test_a_tag_picks_files_as_llama_server_does() -> None:
    files = [
        "README.md",
        "m-Q8_0.gguf",
        "mmproj-m-Q4_K_M.gguf",
        "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf",
        "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf",
        "m-F16.gguf",
    ]
    assert choose(files, "q4_k_m") == "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf"  # never part 2
    assert choose([*files, "m-Q4_K_M.gguf"], "Q4_K_M") == "m-Q4_K_M.gguf"  # single preferred
    assert choose(files, None) == "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf"  # the default order
    assert choose(["m-F16.gguf", "m-Q8_0.gguf"], None) == "m-Q8_0.gguf"
    assert choose(["m-F16.gguf"], None) == "m-F16.gguf"
    assert choose(files, "Q2_K") is None
    assert quants(files) == ["F16", "Q4_K_M", "Q8_0"]  # the projector's tag is not a quant
    assert split_parts("d/m-00002-of-00003.gguf") == tuple(
        f"d/m-{i:05d}-of-00003.gguf" for i in (1, 2, 3)
    )
    with pytest.raises(ModelError, match="not a valid split GGUF part"):
        split_parts("m-00004-of-00003.gguf")


def test_progress_reads_as_a_person_wants_it() -> None:
    speed = Speed()
    speed.add(0.0, 100_000_000)  # resumed at 100 MB: not counted as speed
    speed.add(2.0, 200_000_000)
    rate = speed.rate()
    assert rate == 50_000_000
    line = describe("o/r m.gguf", 1_200_000_000, 2_600_000_000, rate)
    assert line == "fetching o/r m.gguf: 46% (1.2 of 2.6 GB, 50.0 MB/s, 28 s left)"
    assert describe("o/r m.gguf", 5_000, None, None) == "fetching o/r m.gguf (5.0 kB)"


# -- fetching from the (fake) Hub ----------------------------------------------------------


async def test_fetch_by_hf_file_reference(
    hub: FakeHub, ggufs: dict[str, bytes], tmp_path: Path
) -> None:
    plan, path, seen = await fetch(f"hf:{REPO}/tiny-F32.gguf", settings(hub, tmp_path))
    assert path.read_bytes() == ggufs["F32"]
    assert path.name == "tiny-F32.gguf" and path.is_relative_to(tmp_path / "hf")
    assert plan.total == len(ggufs["F32"]) and seen[-1] == (plan.total, plan.total)
    assert [s.method for s in hub.seen if "/resolve/" in s.path] == ["HEAD", "GET"]


async def test_fetch_by_quant_takes_that_file_only(
    hub: FakeHub, ggufs: dict[str, bytes], tmp_path: Path
) -> None:
    plan, path, _ = await fetch(f"{REPO}:q8_0", settings(hub, tmp_path))
    assert plan.files == ("tiny-Q8_0.gguf",)  # not the projector with the same tag
    assert path.read_bytes() == ggufs["Q8_0"]
    assert not hub.gets("tiny-F32.gguf") and not hub.gets("mmproj-tiny-Q8_0.gguf")


async def test_a_split_model_is_fetched_whole_and_its_first_part_returned(
    hub: FakeHub, ggufs: dict[str, bytes], tmp_path: Path
) -> None:
    for text in (f"{REPO}:Q4_K_M", f"hf:{REPO}/split/tiny-Q4_K_M-00002-of-00003.gguf"):
        _, path, _ = await fetch(text, settings(hub, tmp_path))
        assert path.name == "tiny-Q4_K_M-00001-of-00003.gguf", text
        parts = [path.with_name(f"tiny-Q4_K_M-{i:05d}-of-00003.gguf") for i in (1, 2, 3)]
        assert b"".join(p.read_bytes() for p in parts) == ggufs["F32"]
    assert all(len(hub.gets(f"tiny-Q4_K_M-{i:05d}-of-00003.gguf")) == 1 for i in (1, 2, 3))


async def test_a_cut_download_resumes_with_a_range_request(
    hub: FakeHub, ggufs: dict[str, bytes], tmp_path: Path
) -> None:
    """The server closes the connection mid-body on the first GET; the next run asks for the
    rest. The file is a real GGUF padded past one chunk: huggingface_hub writes in 10 MiB
    chunks, so a cut must come after the first one for anything to be kept."""
    big = ggufs["F32"] + hashlib.sha256(b"pad").digest() * (CHUNK * 2 // 32)
    hub.repos[REPO].files["big-F16.gguf"] = big
    hub.cut[(REPO, "big-F16.gguf")] = CHUNK + CHUNK // 2
    s = settings(hub, tmp_path)
    plan = await asyncio.to_thread(resolve, HubFile(REPO, "big-F16.gguf"), s)
    with pytest.raises(ModelError, match=r"broke off .*run the same command again to resume"):
        await download_async(plan)
    kept = list((tmp_path / "hf").rglob("*.incomplete"))
    assert [p.stat().st_size for p in kept] == [CHUNK]
    path = await download_async(plan)
    first, second = hub.gets("big-F16.gguf")
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={CHUNK}-"
    assert path.read_bytes() == big
    assert not list((tmp_path / "hf").rglob("*.incomplete"))


async def test_offline_uses_the_cache_and_says_when_it_cannot(
    hub: FakeHub, ggufs: dict[str, bytes], tmp_path: Path
) -> None:
    _, online, _ = await fetch(f"{REPO}:Q8_0", settings(hub, tmp_path))
    asked = len(hub.seen)
    offline = settings(hub, tmp_path, offline=True)
    for text in (f"{REPO}:Q8_0", f"hf:{REPO}/tiny-Q8_0.gguf"):
        _, path, _ = await fetch(text, offline)
        assert path == online and path.read_bytes() == ggufs["Q8_0"]
    assert len(hub.seen) == asked  # not one request
    with pytest.raises(ModelError) as caught:
        await fetch(f"hf:{REPO}/tiny-F32.gguf", offline)
    assert "has no file tiny-F32.gguf in the cache" in str(caught.value)
    with pytest.raises(ModelError) as caught:
        await fetch("owner/other:Q8_0", offline)
    assert str(caught.value).startswith("owner/other is not in the cache (")
    assert "HF_HUB_OFFLINE is set" in str(caught.value)


async def test_no_network_says_what_to_do_and_falls_back_to_the_cache(
    hub: FakeHub, ggufs: dict[str, bytes], tmp_path: Path
) -> None:
    nowhere = f"http://127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there
    s = settings(hub, tmp_path, endpoint=nowhere)
    with pytest.raises(ModelError) as caught:
        await fetch(f"{REPO}:Q8_0", s)
    message = str(caught.value)
    assert f"cannot reach the Hugging Face Hub at {nowhere}" in message
    assert "HF_ENDPOINT" in message and "HF_HUB_OFFLINE=1" in message
    _, online, _ = await fetch(f"{REPO}:Q8_0", settings(hub, tmp_path))
    plan, path, _ = await fetch(f"{REPO}:Q8_0", s)
    assert path == online and plan.note is not None and "using the cached copy" in plan.note


@pytest.mark.parametrize(
    ("text", "token", "says"),
    [
        ("owner/nope:Q8_0", None, "no repository owner/nope on "),
        (f"hf:{REPO}/x.gguf", None, f"{REPO} has no file x.gguf; its .gguf files: "),
        (f"{REPO}:Q2_K", None, f"{REPO} has no .gguf file for quant Q2_K; quants there: "),
        ("owner/private:Q8_0", None, "set HF_TOKEN to"),
        ("owner/private:Q8_0", "wrong-token", "HF_TOKEN was refused"),
    ],
)
async def test_what_cannot_be_fetched_says_why(
    hub: FakeHub, tmp_path: Path, text: str, token: str | None, says: str
) -> None:
    with pytest.raises(ModelError) as caught:
        await fetch(text, settings(hub, tmp_path, token=token))
    message = str(caught.value)
    assert says in message and "\n" not in message
    if "files:" in says:
        assert message.endswith(
            "split/tiny-Q4_K_M-00001-of-00003.gguf, tiny-F32.gguf, tiny-Q8_0.gguf"
        )
    if "quants" in says:
        assert message.endswith("quants there: F32, Q4_K_M, Q8_0")


async def test_a_token_is_sent_and_opens_a_private_repository(
    hub: FakeHub, ggufs: dict[str, bytes], tmp_path: Path
) -> None:
    _, path, _ = await fetch("owner/private:Q8_0", settings(hub, tmp_path, token="right-token"))
    assert path.read_bytes() == ggufs["Q8_0"]
    assert all(s.headers.get("authorization") == "Bearer right-token" for s in hub.seen)


def test_settings_come_from_the_environment(tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://h:1/", "HF_TOKEN": "t"}
    s = HubSettings.from_environ(env | {"HF_HUB_OFFLINE": "1"})
    assert s == HubSettings("http://h:1", tmp_path / "hub", "t", True)
    assert HubSettings.from_environ({"HF_HUB_CACHE": "/c"}).cache_dir == Path("/c")
    assert not HubSettings.from_environ({}).offline


# -- the command line ------------------------------------------------------------------------


async def test_corral_model_fetch_prints_the_local_path(
    hub: FakeHub, ggufs: dict[str, bytes], tmp_path: Path
) -> None:
    env = isolated_env(tmp_path / "state") | {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path)}
    env.pop("HF_TOKEN", None)
    env.pop("HF_HUB_OFFLINE", None)
    run = await corral("model", "fetch", f"{REPO}:Q8_0", env=env)
    assert run.code == 0, run.err
    path = Path(run.out.strip())
    assert path.is_relative_to(tmp_path / "hub")
    assert await asyncio.to_thread(path.read_bytes) == ggufs["Q8_0"]
    run = await corral("model", "fetch", f"{REPO}:Q2_K", env=env)
    assert run.code == 1 and run.out == ""
    assert f"{REPO}:Q2_K: {REPO} has no .gguf file for quant Q2_K" in run.err
    run = await corral("model", "fetch", "hf:owner/x.gguf", env=env)
    assert run.code == 1 and "a file needs its repository" in run.err


async def test_coordinator_run_refuses_a_bad_reference_before_starting(
    hub: FakeHub, tmp_path: Path
) -> None:
    env = isolated_env(tmp_path / "state") | {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path)}
    run = await corral("coordinator", "run", "--model", "owner/nope:Q8_0", env=env)
    assert run.code == 1 and "--model owner/nope:Q8_0: no repository owner/nope" in run.err
    assert "llama-server log" not in run.err  # nothing started


# -- corral up: the plane publishes the download's progress ----------------------------------


async def test_the_plane_publishes_progress_while_it_fetches(
    hub: FakeHub, ggufs: dict[str, bytes], tmp_path: Path
) -> None:
    """What `corral up` does with a reference: the coordinator is `waiting`, its reason the
    download's progress, read back from the store the page reads. The server holds the body
    after one and a half chunks, so a progress line short of 100% must be seen."""
    big = ggufs["F32"] + hashlib.sha256(b"pad").digest() * (CHUNK * 2 // 32)
    hub.repos[REPO].files["big-F16.gguf"] = big
    go_on = asyncio.Event()
    hub.hold[(REPO, "big-F16.gguf")] = (CHUNK + CHUNK // 2, go_on)
    plan = await asyncio.to_thread(resolve, HubFile(REPO, "big-F16.gguf"), settings(hub, tmp_path))
    store = await open_store(None, tmp_path / "state")
    said: list[str] = []
    try:
        publish = Publisher(store, 18080, said.append, said.append)
        fetching = asyncio.create_task(fetch_model(plan, publish, asyncio.Event(), said.append))
        percent = CHUNK * 100 // len(big)

        async def partway() -> bool:
            rec = await store.coordinator()
            return rec is not None and f"{REPO} big-F16.gguf: {percent}% (" in (
                rec.last_reason or ""
            )

        await until(partway, 30, "a progress line short of 100% in the store")
        rec = await store.coordinator()
        assert rec is not None and rec.state is CoordinatorState.WAITING and rec.backends == ()
        assert f"of {len(big) / 1e6:.1f} MB" in (rec.last_reason or "")
        go_on.set()
        path = await asyncio.wait_for(fetching, 30)
        assert path is not None and path.read_bytes() == big
        assert said[-1] == f"model: {path}"
    finally:
        await store.close()


async def test_stopping_the_plane_stops_the_fetch_and_keeps_what_came(
    hub: FakeHub, ggufs: dict[str, bytes], tmp_path: Path
) -> None:
    big = ggufs["F32"] + hashlib.sha256(b"pad").digest() * (CHUNK * 2 // 32)
    hub.repos[REPO].files["big-F16.gguf"] = big
    hub.hold[(REPO, "big-F16.gguf")] = (CHUNK + CHUNK // 2, asyncio.Event())
    plan = await asyncio.to_thread(resolve, HubFile(REPO, "big-F16.gguf"), settings(hub, tmp_path))
    store = await open_store(None, tmp_path / "state")
    stop = asyncio.Event()
    try:
        publish = Publisher(store, 18080, lambda _: None, lambda _: None)
        fetching = asyncio.create_task(fetch_model(plan, publish, stop, lambda _: None))

        def kept() -> bool:
            return [p.stat().st_size for p in (tmp_path / "hf").rglob("*.incomplete")] == [CHUNK]

        await until(kept, 30, "the first chunk on disk")
        stop.set()
        assert await asyncio.wait_for(fetching, 5) is None
    finally:
        await store.close()


async def test_corral_plan_takes_a_reference(
    hub: FakeHub, ggufs: dict[str, bytes], tmp_path: Path
) -> None:
    """`corral plan --model OWNER/REPO:QUANT` fetches it (into the cache `corral up` reuses) and
    plans it: here on this machine's memory alone (no backend given is ready)."""
    env = isolated_env(tmp_path / "state") | {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path)}
    env.pop("HF_TOKEN", None)
    env.pop("HF_HUB_OFFLINE", None)
    run = await corral(
        "plan", "--model", f"{REPO}:Q8_0", "--when-short", "cpu", "--json", "--timeout", "0.5",
        env=env,
    )  # fmt: skip
    assert run.code == 0, run.err
    made = json.loads(run.out)
    assert made["fits"] is True and made["devices"], made
    assert sum(d["weights_bytes"] for d in made["devices"]) > 0, made
    cached = list((tmp_path / "hub").rglob("*Q8_0*.gguf"))
    assert cached and await asyncio.to_thread(cached[0].read_bytes) == ggufs["Q8_0"]
    run = await corral("plan", "--model", f"{REPO}:Q2_K", env=env)
    assert run.code == 1 and f"{REPO} has no .gguf file for quant Q2_K" in run.err
