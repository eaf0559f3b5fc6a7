"""Warm the heavy pages' default views in the background as soon as the server runs its first page.

A visitor usually lands on the home page and reads it for a few seconds; meanwhile one background thread imports
the model code (torch, transformers: seconds on a small CPU, so never on the first page's path), calibrates the
Serving engine's default view (a timing measurement: first, alone, at the server's own priority), loads the bundled
model and computes the default views of Eviction, Live model and Quantization, then the Eviction page's needle test
on SmolLM2 and, once the server has been quiet for a while, SmolLM2's default views (:mod:`ui.warm_defaults`, in the
order of :data:`ui.background.STEPS`; a page waiting for a step moves it to the front). After the calibration it
runs at a lower CPU priority than the pages and pauses while a page, a player step or a timing behind a page runs
(:mod:`ui.timings`), and every step computes on a copy of its model of its own, so a page never waits for the shared
model's lock behind it.

``KVLAB_WARMUP=0`` turns it off (the AppTest suite does, so that its counts see only the page under test): the
sections it would have filled then wait for a button.
"""

from __future__ import annotations

import contextlib
import os
import threading

import streamlit as st

from ui import background, timings

WARMUP_ENV = background.WARMUP_ENV
NICENESS = 10  # the warm-up runs behind any page a visitor is waiting for


def lower_priority() -> None:
    """Make the calling thread yield to the pages' work (Linux: a thread has its own niceness)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)


# Pages whose code imports no transformers (tests/app/test_warmup.py checks it): they need not wait for the model
# code's import. Keys: a page's url path ("" for the home page).
WITHOUT_TRANSFORMERS = ("", "paged_blocks", "continuous_batching", "memory_hierarchy")
_importing = threading.Lock()


def import_transformers() -> None:
    """Import torch and the parts of transformers the lab uses, once, one thread at a time. Two threads importing
    transformers' lazy modules at once can deadlock inside it, and Python then hands one of them a half-initialised
    module ("cannot import name 'DynamicCache' from 'transformers'": a model page as a fresh server's first page,
    beside the warm-up's thread). The lab's own modules import no module in a circle, so past this point threads
    may import them side by side."""
    with _importing:  # deferred: a page without a model never waits for them
        import torch  # noqa: F401
        import transformers.cache_utils
        import transformers.generation.streamers
        import transformers.integrations.sdpa_attention
        import transformers.masking_utils
        import transformers.modeling_utils
        import transformers.models.auto.modeling_auto
        import transformers.models.auto.tokenization_auto
        import transformers.models.llama.modeling_llama  # noqa: F401


def prepare(url_path: str) -> None:
    """Before a page runs: import transformers (or wait for the thread importing it) unless the page needs none."""
    if url_path not in WITHOUT_TRANSFORMERS:
        import_transformers()


def _run() -> None:
    timings.give_way_here()  # a timing measured behind a page runs without the warm-up beside it
    import_transformers()
    from ui import warm_defaults  # deferred: the thread, not the first page, waits for torch's import

    warm_defaults.warm(queue=background.WARMUP, lower_priority=lower_priority)


@st.cache_resource(show_spinner=False)
def _started() -> threading.Thread:
    background.WARMUP.fill(background.STEPS)  # known at once: a page opened now sees what is coming
    thread = threading.Thread(target=_run, name="kvlab-warmup", daemon=True)
    thread.start()
    return thread


def start() -> threading.Thread | None:
    """Start the warm-up once per server process (None when ``KVLAB_WARMUP=0``)."""
    if not background.enabled():
        return None
    return _started()
