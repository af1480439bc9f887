"""The one error a command shows when the state file cannot be used, and nothing else.

Kept apart from `sqlite.py` so that the command line can name it without importing SQLite.
"""

from __future__ import annotations


class StateFileError(OSError):
    """The state database cannot be used now: locked by another process past the wait, damaged
    while another process holds it, or not openable at all. The message is one line that names
    the file and says what to do; commands print it as it is and exit 1."""
