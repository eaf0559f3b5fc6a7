"""One shared copy of each loaded model per server, and a lock that serialises its use.

Every page that runs a model gets it here, so the bundled model is loaded once however many
pages and sessions use it, and at most one other model (SmolLM2, a Hub model or a folder) is held
beside it. Loading shows a progress bar in the page that asked (a first fetch and conversion of
SmolLM2 report how far they are); a session that arrives meanwhile waits for that load. Model code
may register hooks or switch the attention implementation for a moment (capturing queries,
attention maps), so every use holds the model's lock: sessions take turns instead of seeing each
other's hooks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from kvcore.models.loader import HUB_MODELS, OFFLINE_MODELS, describe_model, load_model, model_name
from ui import params
from ui.background import PageFirstLock
from ui.progress import progress_bar

BUNDLED = "bundled"
OTHER = "other (type a Hub name)"
MODEL_CHOICES = (*OFFLINE_MODELS, *HUB_MODELS, OTHER)  # what loads offline first, then the Hub's, then any name
CHOICE_HELP = ("bundled: the 5.8M-parameter toy trained on Python's docs (fast; no attention sink); smollm2-135m: "
               "SmolLM2-135M-Instruct, a real pretrained model that loads with no model hub (token 0 is a sink); "
               "the Hub names and other need a network")


@dataclass(slots=True)
class SharedModel:
    """A loaded causal LM, its tokenizer, and the re-entrant lock every user of it holds (a page first:
    :class:`ui.background.PageFirstLock`)."""

    name: str
    model: Any
    tokenizer: Any
    lock: PageFirstLock = field(default_factory=PageFirstLock)


@dataclass(slots=True)
class _Loaded:
    """The models this server holds (the bundled one and at most one other), and the lock loads take turns on."""

    models: dict[str, SharedModel] = field(default_factory=dict)
    loading: threading.Lock = field(default_factory=threading.Lock)


@st.cache_resource(show_spinner=False)
def _loaded() -> _Loaded:
    return _Loaded()


def private_model(name: str | None = None) -> SharedModel:
    """A copy of a model of its own (loaded again, never shared): for background work that must not hold the
    shared copy's lock while pages wait for it. No progress bar: nobody waits for it."""
    key = model_name(name)
    return SharedModel(key, *load_model(None if key == BUNDLED else key))


def shared_model(name: str | None = None) -> SharedModel:
    """The bundled model (``None``, "" or "bundled") or one other model (SmolLM2, a Hub name, a folder), loaded
    once under a progress bar.

    Raises what ``kvcore.models.load_model`` raises (ValueError for a bad name or a model too
    large, OSError without network): wrap the call in ``ui.guard.user_errors``.
    """
    key = model_name(name)
    held = _loaded()
    if key in held.models:
        return held.models[key]
    with progress_bar(show_after_s=0.0) as bar:
        bar(0.0, f"Loading {describe_model(key)}...")
        with held.loading:
            if key not in held.models:
                model, tokenizer = load_model(None if key == BUNDLED else key, progress=lambda fraction, label: bar(
                    0.02 + 0.96 * fraction, f"{key}: {label}"))
                for other in [k for k in held.models if k != BUNDLED and key != BUNDLED]:
                    del held.models[other]  # one model beside the bundled one
                held.models[key] = SharedModel(key, model, tokenizer)
    return held.models[key]


def choose_model(label: str, *, key: str, hub_key: str, hub_label: str = "Hub name", container=st,
                 typed_links: bool = False) -> str | None:
    """A URL-bound model selectbox over :data:`MODEL_CHOICES`, whose last choice, "other", opens a text box bound to
    ``hub_key``; returns the model's name, or None while "other" has no name typed.

    typed_links: the page's ``key`` once took a typed name, so an old link may carry any name (a Hub name, a
    folder): a URL value that is no choice joins the choices for the session and opens as chosen.
    """
    options = list(MODEL_CHOICES)
    if typed_links:
        kept, raw = f"_typed_{key}", st.query_params.get(key)
        if kept not in st.session_state:
            st.session_state[kept] = raw.strip() if raw and raw.strip() and raw not in options else None
        options[-1:-1] = [st.session_state[kept]] if st.session_state[kept] else []
    choice = params.widget(container.selectbox, label, key=key, options=options, help=CHOICE_HELP)
    if choice != OTHER:
        return choice
    hub = params.widget(container.text_input, hub_label, key=hub_key, value="", max_chars=96)
    return hub.strip() or None
