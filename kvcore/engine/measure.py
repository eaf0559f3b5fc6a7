"""Peak memory of a block of work: GPU allocations on CUDA, resident-set growth on CPU.

On CUDA ``torch.cuda.max_memory_allocated`` after a reset is exact. On CPU there is no allocator
counter for everything torch and Python hold, so the resident set size is sampled every millisecond in
a thread while the block runs (Linux ``/proc/self/statm``; elsewhere the process's peak from
``getrusage``, which cannot be reset): the reported growth is the peak minus the size before the block.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The process's resident set size now (its peak so far where /proc is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@dataclass(slots=True)
class PeakMemory:
    """Filled when the block ends: ``bytes`` of peak growth and ``how`` it was measured."""

    bytes: int = 0
    how: str = ""


@contextmanager
def peak_memory(device: torch.device | str = "cpu", every_s: float = 0.001) -> Iterator[PeakMemory]:
    """Measure the peak memory growth of the block on ``device`` (see the module docstring)."""
    found = PeakMemory()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield found
        torch.cuda.synchronize(device)
        found.bytes, found.how = torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"
        return
    before, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(every_s)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        yield found
    finally:
        done.set()
        watcher.join()
        found.bytes, found.how = max(0, max(peak[0], rss_bytes()) - before), "RSS growth, sampled every ms"
