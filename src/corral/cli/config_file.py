"""Finding and reading corral.toml: bounded, parsed, every key's line known (no click here).

Looked up in order, the first that exists is the one (files are not merged):
`--config PATH` / `CORRAL_CONFIG` (then it must exist), `$XDG_CONFIG_HOME/corral/corral.toml`
(default ~/.config), `/etc/corral/corral.toml` (`CORRAL_SYSTEM_CONFIG_DIR` names another
directory than /etc/corral). What the keys mean is the command line's business
(`corral.cli.configured`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.cli.toml_lines import KeyPath, error_position, key_lines, key_on_line, line_of

FILE_NAME = "corral.toml"
MAX_BYTES = 1 << 20  # a configuration is a few hundred bytes; this bounds a wrong path's harm


class ConfigError(Exception):
    """One thing wrong with a configuration file: `path:line: what: why`."""

    def __init__(self, path: Path, message: str, line: int | None = None, what: str = "") -> None:
        self.path, self.line, self.what, self.message = path, line, what, message
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {what}: {message}" if what else f"{where}: {message}")


Origin = tuple[Path, int | None]  # a file, and the line of a key in it


@dataclass(frozen=True)
class Applied:
    """What a command took from a file: the file (None: none found), each parameter's line."""

    path: Path | None
    origins: Mapping[str, Origin]


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    data: dict[str, Any]
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line(self, *path: str) -> int | None:
        return line_of(self.lines, path)

    def error(self, path: KeyPath, message: str, what: str | None = None) -> ConfigError:
        """An error at `path` ((section, key) or (key,)), named `what` or as `[section] key`."""
        if what is None:
            what = f"[{path[0]}] {'.'.join(path[1:])}" if len(path) > 1 else path[0]
        return ConfigError(self.path, message, self.line(*path), what)


def default_locations() -> list[Path]:
    from corral.paths import config_dir, system_config_dir

    return [config_dir() / FILE_NAME, system_config_dir() / FILE_NAME]


def find_config(explicit: str | None, named_by: str) -> Path | None:
    """The file to read: `explicit` (which must exist; `named_by` says who gave it), else the
    first default location that exists (a broken link or a directory there counts: it is an
    error later, not silently skipped), else None."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not explicit or not os.path.lexists(path):
            raise ConfigError(path, f"no such file (given by {named_by})")
        return path
    return next((p for p in default_locations() if os.path.lexists(p)), None)


def read_config(path: Path) -> ConfigFile:
    """Parse `path`: a regular file of at most MAX_BYTES of UTF-8 TOML, else ConfigError."""
    import tomllib

    text = _read_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(path, text, str(exc)) from None
    except RecursionError:
        raise ConfigError(path, "nested too deeply") from None
    return ConfigFile(path, data, key_lines(text))


def _read_text(path: Path) -> str:
    try:
        # Non-blocking: opening a FIFO must not wait for a writer (it is refused just below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(path, f"cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(path, "not a regular file")
        if info.st_size > MAX_BYTES:
            raise ConfigError(path, f"{info.st_size} bytes: larger than {MAX_BYTES} bytes")
        raw = _read_at_most(fd, MAX_BYTES + 1)  # counted too: the file may grow meanwhile
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_BYTES:
        raise ConfigError(path, f"larger than {MAX_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        key = key_on_line(raw.decode("utf-8", "replace"), line)
        raise ConfigError(path, "not UTF-8 text", line, f"key {key!r}" if key else "") from None


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _syntax_error(path: Path, text: str, message: str) -> ConfigError:
    at = error_position(message)
    if at is None:
        return ConfigError(path, f"invalid TOML: {message}")
    line, _column = at
    key = key_on_line(text, line)
    return ConfigError(path, f"invalid TOML: {message}", line, f"key {key!r}" if key else "")
