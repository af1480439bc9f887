"""Installing a unit (corral.service.unit) on this machine: the service user, the
environment file (root only, 0600) and the unit file (0644). Blocking; the command line calls it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

USERADD_TIMEOUT_S = 30.0
ENV_FILE_MAX = 64 * 1024  # an environment file we wrote is a few hundred bytes
SHEBANG_MAX = 512
# ProtectHome=yes hides these from the service, and a system user cannot enter /root anyway.
HOMES = (Path("/root"), Path("/home"), Path("/run/user"))


class InstallError(RuntimeError):
    pass


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _nologin() -> str:
    for shell in ("/usr/sbin/nologin", "/sbin/nologin"):
        if Path(shell).is_file():
            return shell
    return "/bin/false"


def ensure_user(name: str) -> bool:
    """Create the system user `name` unless it exists (no home, no login); True if created."""
    if user_exists(name):
        return False
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    argv = [useradd, "--system", "--no-create-home", "--shell", _nologin(), name]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=USERADD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"cannot create the user {name!r} ({' '.join(argv)}): {exc}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[:500]
        raise InstallError(f"{' '.join(argv)} exited {done.returncode}: {said}")
    return True


def write_file(path: Path, text: str, mode: int) -> None:
    """Write `path` whole or not at all (a temporary file renamed over it), with exactly
    `mode`: the secret never sits in a file anyone else may read, even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), mode)  # the umask may have taken bits away
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_small(path: Path, limit: int = ENV_FILE_MAX) -> str | None:
    """A regular file's text, or None when it does not exist; InstallError past `limit`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InstallError(f"{path}: cannot read it: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device would never end
            raise InstallError(f"{path}: not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise InstallError(f"{path}: larger than {limit} bytes; not an environment file of ours")
    return data.decode("utf-8", errors="replace")


def interpreter(program: Path) -> Path | None:
    """The interpreter a script's `#!` line names (the console script's Python), if any."""
    try:
        with program.open("rb") as handle:
            first = handle.read(SHEBANG_MAX).split(b"\n", 1)[0]
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return Path(words[0]) if words else None


def hidden_from_service(path: Path) -> bool:
    """Whether `path` (or what it links to) lies in a home directory, where the service
    cannot reach it."""
    for candidate in (path.absolute(), path.resolve()):
        if any(candidate.is_relative_to(home) for home in HOMES):
            return True
    return False
