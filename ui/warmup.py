"""Warm the heavy pages' default views in the background as soon as the server runs its first page.

A visitor usually lands on the home page and reads it for a few seconds; meanwhile one background thread imports
the model code (torch, transformers: seconds on a small CPU, so never on the first page's path), loads the bundled
model and computes the default views of Eviction, Quantization and Live model (:mod:`ui.warm_defaults`).

``KVLAB_WARMUP=0`` turns it off (the AppTest suite does, so that its counts see only the page under test).
"""

from __future__ import annotations

import os
import threading

import streamlit as st

WARMUP_ENV = "KVLAB_WARMUP"


def _run() -> None:
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
