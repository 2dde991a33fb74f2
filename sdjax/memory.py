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


def rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


TRIM_GROWTH = 64 << 20   # release_if_grown: RSS growth since the last trim that makes the next one worth it
_last_trim_rss = [0]


def release_if_grown():
    """``release_freed_memory`` when RSS grew by ``TRIM_GROWTH`` or more since the last call that trimmed
    (a compilation's leftovers, typically), else nothing. ``malloc_trim`` walks the whole heap: called after
    the first step of every generation it took 53 of the 760 s of an ``sdjax eval`` (thousands of one-step
    sweep measurements, each reusing a compiled program); reading RSS takes microseconds."""
    now = rss_bytes()
    if now and now < _last_trim_rss[0] + TRIM_GROWTH:
        return False
    release_freed_memory()
    _last_trim_rss[0] = rss_bytes()
    return True


def release_freed_memory():
    """Return the C heap's freed pages to the OS (glibc ``malloc_trim``).

    XLA's compiler frees ~0.4 GB after compiling a full-size UNet, but glibc keeps those
    pages mapped; without this, that memory stays in the process's RSS for its whole life.
    A no-op where glibc is not the allocator."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
