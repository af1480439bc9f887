"""systemd's readiness protocol (sd_notify), spoken without a systemd library.

A service manager that starts a process as `Type=notify` sets NOTIFY_SOCKET to an AF_UNIX
datagram socket: a file path, or an abstract name written with a leading '@'. The process sends
newline-separated KEY=VALUE lines in one datagram: READY=1 once it serves, STOPPING=1 when it
begins to stop, STATUS=... one line for `systemctl status`. Without NOTIFY_SOCKET nothing is
sent, so the same code runs by hand and under systemd.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, one kept for the terminating NUL
STATUS_MAX = 200  # characters of a STATUS line: it is one line in `systemctl status`


class NotifyAddressError(ValueError):
    pass


def notify_address(value: str | None) -> str | None:
    """Pure: the socket address NOTIFY_SOCKET names (abstract names start with NUL), or None
    when it is unset. Raises NotifyAddressError for what this module cannot reach (systemd 254+
    also allows `vsock:` addresses, used by virtual machines, not by a service on the host)."""
    if not value:
        return None
    if value.startswith("@"):
        address = "\0" + value[1:]
    elif value.startswith("/"):
        address = value
    else:
        raise NotifyAddressError(
            f"{ENV}={value!r}: neither an absolute path nor an abstract '@' name"
        )
    if len(address.encode()) > SUN_PATH_MAX or "\0" in address[1:]:
        raise NotifyAddressError(f"{ENV}={value!r}: not a valid AF_UNIX socket address")
    return address


def one_line(text: str, limit: int = STATUS_MAX) -> str:
    """Pure: `text` as one bounded line (a newline would start another KEY=VALUE)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def encode(fields: Mapping[str, str]) -> bytes:
    """Pure: one notification datagram, e.g. b"READY=1\\nSTATUS=serving\\n"."""
    return "".join(f"{key}={one_line(value)}\n" for key, value in fields.items()).encode()


class Notifier:
    """Sends notifications to one socket. Never blocks (a full queue drops the datagram: the
    manager then only misses a STATUS line, or times the start out and restarts the service),
    and never raises: the service runs on whether or not anyone listens."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._ready = False
        self._stopping = False
        self._status: str | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier | None:
        """The notifier NOTIFY_SOCKET asks for; None when it is unset or unusable (logged)."""
        value = (os.environ if environ is None else environ).get(ENV)
        try:
            address = notify_address(value)
        except NotifyAddressError as exc:
            log.warning("service: %s; not notifying", exc)
            return None
        return cls(address) if address is not None else None

    def send(self, fields: Mapping[str, str]) -> bool:
        data = encode(fields)
        try:
            with socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            ) as sock:
                sock.sendto(data, self.address)
        except OSError as exc:
            if not self._failed:  # once: a manager that went away would flood the log
                log.warning("service: cannot notify %s: %s", self.address.lstrip("\0"), exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str) -> None:
        """READY=1, once; later calls only update the status."""
        if self._ready:
            self.status(status)
            return
        self._ready = True
        self._status = status
        self.send({"READY": "1", "STATUS": status})

    def status(self, status: str) -> None:
        """A STATUS line, sent only when it changed."""
        if status != self._status and not self._stopping:
            self._status = status
            self.send({"STATUS": status})

    def stopping(self, status: str = "stopping") -> None:
        """STOPPING=1, once."""
        if not self._stopping:
            self._stopping = True
            self._status = status
            self.send({"STOPPING": "1", "STATUS": status})
