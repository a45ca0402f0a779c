"""The trusted processes' own memory bound: the grading worker and the test runner T read data the
student controls, so each runs under an address-space limit. A bound that a bug lets through then
costs one submission (a MemoryError, reported as its result), never the machine."""

from __future__ import annotations

import os
import resource


def address_space() -> int:
    """This process's current virtual memory size, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def limit_address_space(extra_mb: int) -> None:
    """Let this process (and what it forks) map at most `extra_mb` MiB more than it has mapped now;
    0 leaves it unlimited. Never raises a limit already lower."""
    if extra_mb <= 0:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    wanted = address_space() + (extra_mb << 20)
    for current in (soft, hard):
        if current != resource.RLIM_INFINITY:
            wanted = min(wanted, current)
    resource.setrlimit(resource.RLIMIT_AS, (wanted, wanted if hard == resource.RLIM_INFINITY else hard))
