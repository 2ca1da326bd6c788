"""What the kernel says about the server and the machine (Linux /proc)."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_kib(pids: Sequence[int]) -> int:
    """Resident set size of the processes together, in KiB (0 for one that is gone)."""
    return sum(_rss_kib(pid) for pid in pids)


def _rss_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # exited: a crashed server is reported as such, not here
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0  # a zombie has no VmRSS


def process_cpu(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes have used together (0 for one that is gone)."""
    return sum(_process_cpu(pid) for pid in pids)


def _process_cpu(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass(frozen=True)
class Usage:
    """CPU seconds used by the server (all its instances) and by the whole machine."""

    server: float = 0.0
    machine: float = 0.0


class Meter:
    """Counts the CPU the server's processes and the machine use from its creation on."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = pids
        self.server = process_cpu(pids)
        self.machine = machine_cpu()[0]

    def read(self) -> Usage:
        return Usage(process_cpu(self.pids) - self.server, machine_cpu()[0] - self.machine)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, summed over all cores."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / CLOCK_TICKS, sum(ticks) / CLOCK_TICKS


def background_load(seconds: float) -> float:
    """Cores busy on the machine over the next `seconds`."""
    busy, _ = machine_cpu()
    time.sleep(seconds)
    return (machine_cpu()[0] - busy) / seconds


def wait_quiet(limit: float, patience: float) -> float:
    """Wait up to `patience` seconds for the machine to use under `limit` cores; the last load."""
    deadline = time.monotonic() + patience
    while (load := background_load(0.5)) >= limit and time.monotonic() < deadline:
        pass
    return load


def own_cpu() -> float:
    """User + system CPU seconds this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one; children inherit it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
