"""Running code that may hang or eat memory, in a child process that cannot harm the test run.

`run_bounded(code, *args)` runs `python -c code args...` with its address space capped (a read
of /dev/zero fails with MemoryError instead of taking the machine's memory) and a bound on how
long it may run (it is killed by its PID past it: a read of a FIFO cannot hang the test run).
The result has the exit status, the output, whether it had to be killed, and the child's peak
resident memory as the kernel counted it (wait4's rusage).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ADDRESS_SPACE = 2 << 30  # bytes of virtual memory the child may map


@dataclass
class ChildRun:
    code: int | None  # None: killed for overstaying
    out: str
    err: str
    maxrss_mb: float
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.code is None


def _limits(address_space: int) -> None:  # in the child, before exec
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))


def run_bounded(
    code: str, *args: str, timeout_s: float = 15.0, address_space: int = ADDRESS_SPACE
) -> ChildRun:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            preexec_fn=lambda: _limits(address_space),
        )
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if not killed and time.monotonic() - start > timeout_s:
                proc.kill()  # the child this helper started, by its PID
                killed = True
            time.sleep(0.01)
        seconds = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return ChildRun(
            None if killed else proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            usage.ru_maxrss / 1024,
            seconds,
        )
