"""Source `file`: rpc_backends.conf, where it is looked for, and how bad lines are reported."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.endpoint import Endpoint
from corral.sources.file import (
    FILE_NAME,
    MAX_FILE_BYTES,
    FileSource,
    candidate_paths,
    parse_backends_file,
    read_backends_file,
)
from corral.types import Sighting, SourceName

SAMPLE = """\
# GPU boxes in the rack
10.0.0.5:50052

gpu-node-2:50052   # the big one
   [fe80::1]:50053#no space before the comment
coordinator:0
10.0.0.6:0
10.0.0.7 :50052
[::1]:50054
10.0.0.5:50052
not an endpoint at all
\t# indented comment
"""


def test_parse_keeps_good_lines_and_reports_bad_ones_with_file_line_reason() -> None:
    good, errors = parse_backends_file(SAMPLE, "/cfg/rpc_backends.conf")
    assert good == [
        (2, Endpoint("10.0.0.5", 50052)),
        (4, Endpoint("gpu-node-2", 50052)),
        (5, Endpoint("fe80::1", 50053)),
        (9, Endpoint("::1", 50054)),
    ]
    assert errors == [
        "/cfg/rpc_backends.conf:6: placeholder host, not a backend: 'coordinator:0'",
        "/cfg/rpc_backends.conf:7: port 0 is a placeholder, not a listening port: '10.0.0.6:0'",
        "/cfg/rpc_backends.conf:8: whitespace inside endpoint: '10.0.0.7 :50052'",
        "/cfg/rpc_backends.conf:10: duplicate of an earlier line: '10.0.0.5:50052'",
        "/cfg/rpc_backends.conf:11: whitespace inside endpoint: 'not an endpoint at all'",
    ]


def test_parse_handles_crlf_and_no_final_newline() -> None:
    good, errors = parse_backends_file("a1:1\r\n# c\r\nb1:2", "f")
    assert good == [(1, Endpoint("a1", 1)), (3, Endpoint("b1", 2))]
    assert errors == []


def test_empty_and_comment_only_files_have_nothing_and_no_errors() -> None:
    assert parse_backends_file("", "f") == ([], [])
    assert parse_backends_file("# nothing\n\n   \n#x:1\n", "f") == ([], [])


def test_candidate_paths_order() -> None:
    cwd = Path("/work/here")
    env = {"HOME": "/home/u", "XDG_CONFIG_HOME": "/xdg"}
    assert candidate_paths(None, env, cwd) == [
        cwd / FILE_NAME,
        Path("/xdg/corral") / FILE_NAME,
        Path("/etc/corral") / FILE_NAME,
    ]
    # Without XDG_CONFIG_HOME, the XDG default under $HOME.
    assert candidate_paths(None, {"HOME": "/home/u"}, cwd)[1] == Path(
        "/home/u/.config/corral/rpc_backends.conf"
    )
    # An explicit file (flag, then environment) is the only place looked at.
    with_env = {**env, "CORRAL_BACKENDS_FILE": "/env/b.conf"}
    assert candidate_paths(None, with_env, cwd) == [Path("/env/b.conf")]
    assert candidate_paths("/flag/b.conf", with_env, cwd) == [Path("/flag/b.conf")]


def test_first_existing_file_wins_and_sightings_say_file_and_line(tmp_path: Path) -> None:
    here, xdg = tmp_path / "cwd" / FILE_NAME, tmp_path / "xdg" / "corral" / FILE_NAME
    xdg.parent.mkdir(parents=True)
    xdg.write_text("10.9.9.9:50052\n")
    report = read_backends_file([here, xdg], explicit=False)
    assert report.sightings == [Sighting(Endpoint("10.9.9.9", 50052), SourceName.FILE, f"{xdg}:1")]
    here.parent.mkdir()
    here.write_text("# mine\n10.1.1.1:50052\n")
    report = read_backends_file([here, xdg], explicit=False)
    assert report.sightings == [Sighting(Endpoint("10.1.1.1", 50052), SourceName.FILE, f"{here}:2")]
    assert report.warnings == []


def test_no_file_anywhere_is_quiet_unless_one_was_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    assert read_backends_file([missing], explicit=False).warnings == []
    report = read_backends_file([missing], explicit=True)
    assert report.sightings == []
    assert report.warnings == [f"{missing}: backends file not found"]


def test_unreadable_files_are_reported_not_raised(tmp_path: Path) -> None:
    binary = tmp_path / "bin.conf"
    binary.write_bytes(b"10.0.0.1:1\n\xff\xfe\x00junk\n")
    report = read_backends_file([binary], explicit=True)
    assert report.sightings == []
    assert len(report.warnings) == 1 and report.warnings[0].startswith(f"{binary}: cannot read")

    directory = tmp_path / "dir.conf"
    directory.mkdir()
    report = read_backends_file([directory], explicit=True)
    assert report.warnings and report.warnings[0].startswith(f"{directory}: cannot read")

    huge = tmp_path / "huge.conf"
    huge.write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    report = read_backends_file([huge], explicit=True)
    assert report.warnings == [f"{huge}: larger than {MAX_FILE_BYTES} bytes, not read"]


def test_byte_order_mark_is_not_part_of_line_one(tmp_path: Path) -> None:
    conf = tmp_path / FILE_NAME
    conf.write_bytes("\ufeff10.0.0.1:50052\n".encode())
    report = read_backends_file([conf], explicit=True)
    assert [s.endpoint for s in report.sightings] == [Endpoint("10.0.0.1", 50052)]
    assert report.warnings == []


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A cwd and XDG dir of our own, and no CORRAL_BACKENDS_FILE from the outside world."""
    monkeypatch.delenv("CORRAL_BACKENDS_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path


async def test_file_source_finds_cwd_then_xdg(isolated: Path) -> None:
    xdg = isolated / "xdg" / "corral" / FILE_NAME
    xdg.parent.mkdir(parents=True)
    xdg.write_text("10.2.2.2:50052\n")
    report = await FileSource().collect()
    assert report.source is SourceName.FILE
    assert [s.endpoint for s in report.sightings] == [Endpoint("10.2.2.2", 50052)]
    (isolated / "cwd" / FILE_NAME).write_text("10.3.3.3:50052\n")
    report = await FileSource().collect()
    assert [s.endpoint for s in report.sightings] == [Endpoint("10.3.3.3", 50052)]


async def test_env_then_flag_take_precedence(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (isolated / "cwd" / FILE_NAME).write_text("10.3.3.3:50052\n")
    env_file, flag_file = isolated / "env.conf", isolated / "flag.conf"
    env_file.write_text("10.4.4.4:50052\n")
    flag_file.write_text("10.5.5.5:50052\ncoordinator:0\n")
    monkeypatch.setenv("CORRAL_BACKENDS_FILE", str(env_file))
    report = await FileSource().collect()
    assert [s.endpoint for s in report.sightings] == [Endpoint("10.4.4.4", 50052)]
    report = await FileSource(str(flag_file)).collect()
    assert [s.endpoint for s in report.sightings] == [Endpoint("10.5.5.5", 50052)]
    assert report.warnings == [f"{flag_file}:2: placeholder host, not a backend: 'coordinator:0'"]


async def test_named_file_missing_does_not_fall_back(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (isolated / "cwd" / FILE_NAME).write_text("10.3.3.3:50052\n")
    monkeypatch.setenv("CORRAL_BACKENDS_FILE", str(isolated / "missing.conf"))
    report = await FileSource().collect()
    assert report.sightings == []
    assert report.warnings == [f"{isolated / 'missing.conf'}: backends file not found"]


line = st.one_of(
    st.just(""),
    st.just("# comment"),
    st.sampled_from(["10.0.0.1:1", "[::1]:2", "gpu:3", "coordinator:0", "x:0", "a b"]),
    st.text(alphabet=" #:[]abc019\t", max_size=12),
)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(line, max_size=12))
def test_every_meaningful_line_is_used_or_reported_exactly_once(lines: list[str]) -> None:
    good, errors = parse_backends_file("\n".join(lines), "f")
    meaningful = [i for i, raw in enumerate(lines, 1) if raw.split("#", 1)[0].strip()]
    reported = [int(e.split(":", 2)[1]) for e in errors]
    assert sorted([n for n, _ in good] + reported) == meaningful
    assert len({ep for _, ep in good}) == len(good)  # no endpoint twice
