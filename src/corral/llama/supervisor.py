"""Start and stop child processes (ggml-rpc-server, llama-server) without ever orphaning them.

Each child gets its own log file, is stopped with SIGTERM then SIGKILL after a grace period, and
asks the kernel to kill it if Corral itself dies (PR_SET_PDEATHSIG), so no exit path of Corral —
Ctrl-C, a crash, SIGKILL — leaves one running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    process: asyncio.subprocess.Process | None = field(default=None, init=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = await asyncio.to_thread(self.log_path.open, "ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()

    async def stop(self, grace: float = 5.0) -> int | None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc else None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return await proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def rpc_server_argv(
    binary: Path,
    host: str,
    port: int,
    threads: int | None = None,
    cache: bool = False,
    devices: str | None = None,
) -> list[str]:
    argv = [str(binary), "-H", host, "-p", str(port)]
    if threads:
        argv += ["-t", str(threads)]
    if devices:
        argv += ["-d", devices]
    if cache:
        argv.append("-c")
    return argv
