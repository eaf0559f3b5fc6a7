"""A progress bar that a long experiment moves, made to be cached with the result it belongs to."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import streamlit as st

T = TypeVar("T")


def with_progress(text: str, run: Callable[[Callable[[float, str], None]], T]) -> T:
    """Call ``run(callback)`` under a progress bar the callback moves (``callback(fraction, label)``), then clear it.

    Meant for ``st.cache_data`` functions: the bar is created inside, so a cached result replays it too.
    """
    bar = st.progress(0.0, text=text)
    try:
        return run(lambda fraction, label: bar.progress(min(max(fraction, 0.0), 1.0), text=label))
    finally:
        bar.empty()
