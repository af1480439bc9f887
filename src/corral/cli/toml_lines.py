"""Where each key of a TOML document is set: its line, for error messages (pure).

tomllib gives values but no positions. This scanner runs only over text tomllib has already
accepted, so it can be small: it follows table headers, key/value pairs (dotted keys included)
and skips values, multi-line strings and arrays that span lines included, so that nothing inside
a value is taken for a key. Keys inside inline tables are not recorded: a caller looks up the
longest recorded prefix of a key (`line_of`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

KeyPath = tuple[str, ...]

_AT = re.compile(r"\(at line (\d+), column (\d+)\)")
_PART = r"""(?:[A-Za-z0-9_-]+|"[^"\n]*"|'[^'\n]*')"""
_KEY_AT_START = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=")


def key_lines(text: str) -> dict[KeyPath, int]:
    """Each table header and each key set outside inline tables -> its 1-based line."""
    return _Scanner(text).run()


def line_of(lines: Mapping[KeyPath, int], path: KeyPath) -> int | None:
    """The line of `path`, or of its longest recorded prefix (a key in an inline table)."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def error_position(message: str) -> tuple[int, int] | None:
    """(line, column) from a tomllib.TOMLDecodeError message: '... (at line 3, column 7)'."""
    found = _AT.search(message)
    return (int(found.group(1)), int(found.group(2))) if found else None


def key_on_line(text: str, line: int) -> str | None:
    """The key a `key = value` line sets, if that line of `text` looks like one."""
    rows = text.splitlines()
    if not 1 <= line <= len(rows):
        return None
    found = _KEY_AT_START.match(rows[line - 1])
    return found.group(1).strip() if found else None


def split_key(text: str) -> KeyPath:
    """`a."b.c".d` -> ('a', 'b.c', 'd'): dots inside quotes belong to the key."""
    parts: list[str] = []
    current: list[str] = []
    quote = ""
    for char in text:
        if quote:
            if char == quote:
                quote = ""
            else:
                current.append(char)
        elif char in "\"'":
            quote = char
        elif char == ".":
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return tuple(parts)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.line = 1
        self.table: KeyPath = ()
        self.found: dict[KeyPath, int] = {}

    def run(self) -> dict[KeyPath, int]:
        text = self.text
        while self.i < len(text):
            char = text[self.i]
            if char == "\n":
                self.line += 1
                self.i += 1
            elif char in " \t\r":
                self.i += 1
            elif char == "#":
                self._to_end_of_line()
            elif char == "[":
                self._header()
            else:
                self._pair()
        return self.found

    def _to_end_of_line(self) -> None:
        end = self.text.find("\n", self.i)
        self.i = len(self.text) if end < 0 else end

    def _header(self) -> None:
        double = self.text.startswith("[[", self.i)
        start = self.i + (2 if double else 1)
        end = self._until("]", start)
        self.table = split_key(self.text[start:end])
        self.found.setdefault(self.table, self.line)
        self.i = end
        self._to_end_of_line()  # the closing bracket(s) and any comment

    def _pair(self) -> None:
        end = self._until("=", self.i)
        path = self.table + split_key(self.text[self.i : end])
        self.found.setdefault(path, self.line)
        self.i = end + 1
        self._value()

    def _until(self, stop: str, start: int) -> int:
        """The index of `stop` at or after `start`, outside quoted key parts."""
        quote = ""
        i = start
        while i < len(self.text):
            char = self.text[i]
            if quote:
                if char == quote:
                    quote = ""
            elif char in "\"'":
                quote = char
            elif char == stop:
                return i
            i += 1
        return i

    def _value(self) -> None:
        """Skip one value, up to the end of its (last) line."""
        text = self.text
        depth = 0
        while self.i < len(text):
            char = text[self.i]
            if char == "\n":
                if depth == 0:
                    return
                self.line += 1
                self.i += 1
            elif text.startswith('"""', self.i) or text.startswith("'''", self.i):
                self._multiline_string(text[self.i : self.i + 3])
            elif char in "\"'":
                self._string(char)
            elif char == "#":
                self._to_end_of_line()
            else:
                depth += (char in "[{") - (char in "]}")
                self.i += 1

    def _string(self, quote: str) -> None:
        i = self.i + 1
        while i < len(self.text) and self.text[i] != quote:
            i += 2 if quote == '"' and self.text[i] == "\\" else 1
        self.i = i + 1

    def _multiline_string(self, delimiter: str) -> None:
        i = self.i + 3
        while i < len(self.text) and not self.text.startswith(delimiter, i):
            if delimiter == '"""' and self.text[i] == "\\":
                i += 1  # an escaped character (a quote, or the newline of a line-ending \)
            if i < len(self.text) and self.text[i] == "\n":
                self.line += 1
            i += 1
        i += 3
        while i < len(self.text) and self.text[i] == delimiter[0]:
            i += 1  # up to two quotes more belong to the content: """a"""""
        self.i = i
