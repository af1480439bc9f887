#!/usr/bin/env python3
"""Benchmark: how long a `corral` command takes as a whole process, start-up included.

Each command is run as a fresh subprocess (the installed `corral` console script, as a user runs
it) `--runs` times, round-robin with the others so that noise from a shared machine falls on all
of them alike, after one untimed warm-up run each:

- `python -c pass`: bare interpreter start-up, the baseline;
- `corral --help`;
- `corral --version` (reads the build cache's manifests);
- `corral probe 127.0.0.1:<port>` on a port nobody listens on (refused at once);
- `corral discover --cidr 127.0.0.1/32 --port <that port>` (informational: the store is opened).

Printed: min / median / max wall time of each, each command's median minus bare Python's, and
the median CPU time (user + system) of the process: on a shared machine the wall time includes
waiting for a core, the CPU time does not. The load average is printed before and after, and a
CPU reference (a fixed pure-Python loop in this process), since a virtual machine's speed can
vary from one minute to the next.
Target: `corral --help`, `corral --version` and `corral probe` at most 0.3 s above bare Python
(median wall time).

    python3 benchmarks/startup.py            # about 10 s
    python3 benchmarks/startup.py --runs 30

State and config go to a temporary directory; CORRAL_* variables are not passed on.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

TARGET_ABOVE_BARE_S = 0.3


def corral_script() -> str:
    beside = Path(sys.executable).parent / "corral"
    found = str(beside) if beside.is_file() else shutil.which("corral")
    if not found:
        raise SystemExit("the `corral` console script is not installed (pip install -e .)")
    return found


def refused_port() -> int:
    """A loopback port nobody listens on (bound, then closed: connects to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(argv: Sequence[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall time and CPU time of one whole process."""
    cpu = cpu_of_children()
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()}")
    return seconds, cpu_of_children() - cpu


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_reference_ms() -> float:
    """The fastest of three runs of a fixed loop, in milliseconds."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        sum(range(10**7))
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Whole-process start-up time of `corral`.")
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each command")
    args = parser.parse_args(argv)
    corral = corral_script()
    port = refused_port()
    commands: dict[str, list[str]] = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "corral --help": [corral, "--help"],
        "corral --version": [corral, "--version"],
        f"corral probe 127.0.0.1:{port}": [corral, "probe", f"127.0.0.1:{port}"],
        f"corral discover --cidr 127.0.0.1/32 --port {port}": [
            corral, "discover", "--cidr", "127.0.0.1/32", "--port", str(port),
        ],
    }  # fmt: skip
    targeted = list(commands)[1:4]
    with tempfile.TemporaryDirectory(prefix="corral-startup-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "SOLLOL_"))}
        env |= {"XDG_STATE_HOME": f"{tmp}/state", "XDG_CONFIG_HOME": f"{tmp}/config"}
        env["COLUMNS"] = "100"
        load_before = load()
        for cmd in commands.values():
            run(cmd, env)  # warm-up: page cache, .pyc files, the store's first open
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, cmd in commands.items():
                seconds, used = run(cmd, env)
                times[name].append(seconds)
                cpu[name].append(used)
    bare = statistics.median(times["python -c pass"])
    print(
        f"Whole-process wall time, {args.runs} runs each (Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs; load average {load_before} before, {load()} after)"
    )
    width = max(map(len, commands))
    print(
        f"  {'command':<{width}}  {'min':>7}  {'median':>7}  {'max':>7}  {'median - bare':>13}"
        f"  {'cpu':>7}"
    )
    passed = True
    for name, got in times.items():
        median = statistics.median(got)
        above = median - bare
        verdict = ""
        if name in targeted:
            ok = above <= TARGET_ABOVE_BARE_S
            passed &= ok
            verdict = f"  {'PASS' if ok else 'FAIL'} (target <= {TARGET_ABOVE_BARE_S:g} s)"
        print(
            f"  {name:<{width}}  {min(got):7.3f}  {median:7.3f}  {max(got):7.3f}"
            f"  {above:+13.3f}  {statistics.median(cpu[name]):7.3f}{verdict}"
        )
    print(f"CPU reference: sum(range(10**7)) in {cpu_reference_ms():.0f} ms (lower is faster)")
    print(f"\nOVERALL: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
