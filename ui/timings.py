"""Timings measured behind the pages get the CPU without the background warm-up beside them.

A timing (a calibration, an engine-vs-transformers comparison, a policy's decode steps) says what the machine did
while it ran, so on a 2-core machine it must not share the cores with the warm-up's long computations: with one
running, a SmolLM2 calibration took 220 s instead of about 40 s. A thread measuring one holds :func:`measuring`; a
thread that has said it gives way (:func:`give_way_here`, the warm-up) waits at its next progress report
(:func:`pause_point`, called by :mod:`ui.progress` and :mod:`ui.disk_cache`) until no timing runs. Nothing here
imports streamlit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

MAX_PAUSE_S = 300.0  # a pause never lasts longer than this (a timing that hangs never stops the warm-up for good)

_running = 0
_changed = threading.Condition()
_here = threading.local()


@contextmanager
def measuring() -> Iterator[None]:
    """Count the block as a timing being measured."""
    global _running
    with _changed:
        _running += 1
    try:
        yield
    finally:
        with _changed:
            _running -= 1
            _changed.notify_all()


def running() -> int:
    """How many timings are being measured now."""
    with _changed:
        return _running


def give_way_here() -> None:
    """Make the calling thread pause at its progress reports while a timing is measured."""
    _here.gives_way = True


def pause_point(max_pause_s: float = MAX_PAUSE_S) -> None:
    """In a thread that gives way: wait until no timing is measured (at most ``max_pause_s``); elsewhere nothing."""
    if getattr(_here, "gives_way", False):
        with _changed:
            _changed.wait_for(lambda: _running == 0, timeout=max_pause_s)
