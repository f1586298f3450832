"""The enclave runtime's heap trimming: when it trims, and that a trim really frees memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shieldtune.tee import heap
from shieldtune.tee.heap import HeapTrimmer, libc_malloc_trim


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_trims_at_most_every_interval_while_busy():
    clock, calls = _Clock(), []
    trimmer = HeapTrimmer(interval_s=30.0, trim=lambda pad: calls.append(pad) or 1, clock=clock)
    assert not trimmer.pending  # nothing served yet: the runtime blocks without trimming
    for _ in range(5):  # a burst of messages inside one interval
        clock.t += 5.0
        trimmer.served()
    assert calls == [] and trimmer.pending
    clock.t += 5.0  # 30 s since the start
    trimmer.served()
    assert calls == [0] and not trimmer.pending and trimmer.trims == 1
    clock.t += 29.0
    trimmer.served()
    assert calls == [0] and trimmer.pending  # the interval restarts at the trim


def test_idle_trim_clears_pending_and_restarts_the_interval():
    clock, calls = _Clock(), []
    trimmer = HeapTrimmer(interval_s=30.0, trim=lambda pad: calls.append(pad) or 1, clock=clock)
    clock.t += 20.0
    trimmer.served()
    trimmer.trim()  # what the runtime does after idle_s without a message
    assert calls == [0] and not trimmer.pending
    clock.t += 20.0
    trimmer.served()
    assert calls == [0]  # 20 s after the idle trim: not yet


def test_without_malloc_trim_nothing_is_pending(monkeypatch):
    monkeypatch.setattr(heap, "libc_malloc_trim", lambda: None)
    trimmer = HeapTrimmer(interval_s=0.0)
    trimmer.served()
    assert not trimmer.pending and trimmer.trims == 0  # the runtime never waits to trim
    trimmer.trim()  # harmless
    assert trimmer.trims == 0


_FRAGMENT = """
import gc, os
from shieldtune.tee.heap import libc_malloc_trim
def rss():  # resident pages (glibc, hence Linux: /proc is there)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
blocks = [bytearray(64 << 10) for _ in range(4096)]  # 256 MiB of heap (below mmap's threshold)
pin = bytearray(64 << 10)  # a live block at the top: free() alone cannot shrink the heap
del blocks; gc.collect()
before = rss()
libc_malloc_trim()(0)
print(before - rss())
"""


@pytest.mark.skipif(libc_malloc_trim() is None, reason="the C library has no malloc_trim")
def test_malloc_trim_returns_a_fragmented_heap_to_the_os():
    out = subprocess.run(
        [sys.executable, "-c", _FRAGMENT], capture_output=True, text=True, check=True, timeout=60
    )
    assert int(out.stdout) > 128 << 20  # most of the 256 MiB freed but still mapped came back
