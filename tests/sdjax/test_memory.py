"""sdjax.memory: RSS readings, and the heap trim generations call only when memory grew."""
import numpy as np

from sdjax import memory


def test_rss_reads_this_process_and_sees_an_allocation():
    before = memory.rss_bytes()
    block = np.ones(64 << 20, np.uint8)   # 64 MiB, touched
    assert before > 0 and memory.rss_bytes() >= before + (48 << 20)
    assert memory.peak_rss_bytes() >= memory.rss_bytes() - (1 << 20)
    del block


def test_release_if_grown_trims_only_after_growth(monkeypatch):
    rss, trims = [1000 << 20], []
    monkeypatch.setattr(memory, "rss_bytes", lambda: rss[0])
    monkeypatch.setattr(memory, "release_freed_memory", lambda: trims.append(rss[0]))
    monkeypatch.setattr(memory, "_last_trim_rss", [0])
    assert memory.release_if_grown() and len(trims) == 1          # the first call: nothing trimmed yet
    assert not memory.release_if_grown() and len(trims) == 1      # nothing grew
    rss[0] += memory.TRIM_GROWTH - 1
    assert not memory.release_if_grown()
    rss[0] += 1                                                   # a compilation's leftovers
    assert memory.release_if_grown() and len(trims) == 2
    rss[0] = 0                                                    # RSS unreadable: always trim
    assert memory.release_if_grown() and len(trims) == 3


def test_release_freed_memory_runs_here():
    memory.release_freed_memory()   # glibc: malloc_trim; elsewhere a no-op, never an error
