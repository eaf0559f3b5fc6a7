"""Warm the heavy pages' default views in the background as soon as the server runs its first page.

A visitor usually lands on the home page and reads it for a few seconds; meanwhile one background thread imports
the model code (torch, transformers: seconds on a small CPU, so never on the first page's path), loads the bundled
model and computes the default views of Eviction, Live model and Quantization (:mod:`ui.warm_defaults`). It runs at a
lower CPU priority than the pages, and its long measurements use a copy of the model of their own, so a page never
waits for the shared model's lock behind it.

``KVLAB_WARMUP=0`` turns it off (the AppTest suite does, so that its counts see only the page under test).
"""

from __future__ import annotations

import contextlib
import os
import threading

import streamlit as st

WARMUP_ENV = "KVLAB_WARMUP"
NICENESS = 10  # the warm-up runs behind any page a visitor is waiting for


def _run() -> None:
    with contextlib.suppress(AttributeError, OSError):  # Linux: the thread alone yields to the pages' work
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
    from ui import warm_defaults  # deferred: the thread, not the first page, waits for torch's import

    warm_defaults.warm()


@st.cache_resource(show_spinner=False)
def _started() -> threading.Thread:
    thread = threading.Thread(target=_run, name="kvlab-warmup", daemon=True)
    thread.start()
    return thread


def start() -> threading.Thread | None:
    """Start the warm-up once per server process (None when ``KVLAB_WARMUP=0``)."""
    if os.environ.get(WARMUP_ENV, "1").strip() == "0":
        return None
    return _started()
