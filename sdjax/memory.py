"""Peak resident memory of this process, for the memory measurements the project reports."""
from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """High-water mark of this process's RSS.

    Reads VmHWM from /proc (Linux) because ``ru_maxrss`` survives ``exec``: a child started
    by a process that once held 4 GB would report 4 GB before doing anything."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if r > 1 << 32 else r * 1024  # bytes on macOS, KiB on Linux
