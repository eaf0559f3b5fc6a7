"""The background warm-up gives way: to timings measured behind the pages, and to the pages themselves.

A timing (a calibration, an engine-vs-transformers comparison, a policy's decode steps) says what the machine did
while it ran, so on a 2-core machine it must not share the cores with the warm-up's long computations: with one
running, a SmolLM2 calibration took 220 s instead of about 40 s. Nor should a visitor's page or player step wait
behind work done for later visitors. A thread measuring a timing holds :func:`measuring`; other activity registers
a test of its own (:func:`give_way_to`, the pages' runs); a thread that gives way (:func:`give_way_here`, the
warm-up) waits at its next progress report (:func:`pause_point`, called by :mod:`ui.progress` and
:mod:`ui.disk_cache`) until none of them is busy. Nothing here imports streamlit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

MAX_PAUSE_S = 300.0  # a pause never lasts longer than this (a timing that hangs never stops the warm-up for good)
POLL_S = 0.05

_running = 0
_changed = threading.Condition()
_here = threading.local()
_busy: list[Callable[[], bool]] = []


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


def give_way_to(busy: Callable[[], bool]) -> None:
    """Also give way while ``busy()`` is true (checked at each pause point)."""
    _busy.append(busy)


def give_way_here() -> None:
    """Make the calling thread pause at its progress reports while a timing is measured."""
    _here.gives_way = True


def pause_point(max_pause_s: float = MAX_PAUSE_S) -> None:
    """In a thread that gives way: wait until no timing is measured and nothing registered is busy (at most
    ``max_pause_s``); elsewhere nothing."""
    if not getattr(_here, "gives_way", False):
        return
    deadline = time.monotonic() + max_pause_s
    while (running() or any(busy() for busy in _busy)) and time.monotonic() < deadline:
        time.sleep(POLL_S)
