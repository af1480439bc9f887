"""Rows decoded once: a row whose stored text has not changed since the last read is not
decoded again.

Every reader of the store (the dashboard's live view after each change, the monitor, the
coordinator) reads whole tables, and checking each row through the codec (the endpoint gate
included) cost most of a busy dashboard's time. The text is the whole truth of a row, so the
value decoded from the same text is the same value.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class DecodedRows(Generic[K, T]):
    """One table's rows as last read. Not thread-safe: one reader (the store's worker thread).
    Holds only the rows of the last read, so it is bounded by the table."""

    def __init__(self) -> None:
        self._rows: dict[K, tuple[str, T]] = {}

    def read(
        self,
        rows: Iterable[tuple[K, str]],
        decode: Callable[[K, str], T],
        refused: Callable[[K, Exception], None],
        errors: type[Exception] | tuple[type[Exception], ...],
    ) -> list[T]:
        """The rows' values in order. `decode(key, text)` runs only for new or changed text;
        a row it refuses (raising one of `errors`) is left out and reported to `refused` at
        every read, as it would be without the memory."""
        kept: dict[K, tuple[str, T]] = {}
        out: list[T] = []
        for key, text in rows:
            hit = self._rows.get(key)
            if hit is not None and hit[0] == text:
                value = hit[1]
            else:
                try:
                    value = decode(key, text)
                except errors as exc:
                    refused(key, exc)
                    continue
            kept[key] = (text, value)
            out.append(value)
        self._rows = kept
        return out
