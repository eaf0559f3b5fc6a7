"""Progress bars that long work moves: what is being computed and how far, never a spinner alone."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from ui import timings

T = TypeVar("T")
Progress = Callable[[float, str], None]


def with_progress(text: str, run: Callable[[Progress], T]) -> T:
    """Call ``run(callback)`` under a progress bar the callback moves (``callback(fraction, label)``), then clear it.

    Meant for ``st.cache_data`` functions: the bar is created inside, so a cached result replays it too.
    """
    bar = st.progress(0.0, text=text)
    try:
        return run(lambda fraction, label: bar.progress(min(max(fraction, 0.0), 1.0), text=label))
    finally:
        bar.empty()


SHOW_AFTER_S = 0.3  # work that ends sooner (a cache hit) draws no bar


@contextmanager
def progress_bar(show_after_s: float = SHOW_AFTER_S) -> Iterator[Progress]:
    """A callback ``(fraction, label)`` that moves a progress bar drawn here, once the block has run
    ``show_after_s`` seconds (work served from a cache shows none); call it when a step starts, saying what
    it does. The bar goes when the block ends. Outside a page's run (a background thread warming caches) it
    draws nothing.

    On a page the bar's place is held from the start (an empty element, which draws nothing) whether or not the
    bar shows: the elements below keep their places between a run that computes and one served from a cache
    (why: :mod:`ui.params`)."""
    on_page = get_script_run_ctx(suppress_warning=True) is not None
    slot = st.empty() if on_page else None
    shown = False
    start = time.monotonic()

    def update(fraction: float, label: str) -> None:
        nonlocal shown
        fraction = min(max(float(fraction), 0.0), 1.0)
        if not on_page:
            timings.pause_point()  # the warm-up gives way to a timing measured behind a page
            return
        if time.monotonic() - start < show_after_s:
            return
        slot.progress(fraction, text=label)
        shown = True

    try:
        yield update
    finally:
        if shown:
            slot.empty()


def steps(progress: Progress, start: float, stop: float) -> Progress:
    """The part ``[start, stop]`` of a bar: ``steps(bar, 0.5, 1.0)(0.5, label)`` moves ``bar`` to 0.75."""
    return lambda fraction, label: progress(start + (stop - start) * min(max(fraction, 0.0), 1.0), label)
