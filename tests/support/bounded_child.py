"""Running code that may hang or eat memory, in a child process that cannot harm the test run.

`run_bounded(code, *args)` runs `python -c code args...` with its address space capped (a read
of /dev/zero fails with MemoryError instead of taking the machine's memory) and a bound on how
long it may run (it is killed by its PID past it: a read of a FIFO cannot hang the test run).
The result has the exit status, the output, whether it had to be killed, and the child's peak
resident memory since its exec (VmHWM): wait4's ru_maxrss is no use here, because a forked child
starts with the parent's high-water mark (a pytest process deep into the suite: 200 MB).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ADDRESS_SPACE = 2 << 30  # bytes of virtual memory the child may map
# Run in the child: the code given, then its own peak memory to a file (also after an error).
_WRAPPER = """
import atexit, sys
def _peak(path=sys.argv[1]):
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(path, "w").write(line.split()[1])
atexit.register(_peak)
code = sys.argv[2]
sys.argv = [sys.argv[0], *sys.argv[3:]]
exec(compile(code, "<bounded>", "exec"), {"__name__": "__main__"})
"""


def _hwm_kb(pid: int) -> int:
    """The running child's peak resident memory (kB), 0 if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


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
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile() as peak,
    ):
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, peak.name, code, *args],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            preexec_fn=lambda: _limits(address_space),
        )
        killed = False
        hwm_kb = 0
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            hwm_kb = _hwm_kb(proc.pid)  # the atexit record will not be written: read it now
            proc.kill()  # the child this helper started, by its PID
            proc.wait()
            killed = True
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return ChildRun(
            None if killed else proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            max(hwm_kb, int(peak.read() or 0)) / 1024,
            seconds,
        )
