"""Process memory readings for benchmarks and memory bounds."""

from __future__ import annotations

import resource


def _status_field(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; unlike ru_maxrss it does not carry over across exec)."""
    return _status_field("VmHWM")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_field("VmRSS")
