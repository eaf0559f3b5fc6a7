"""One shared copy of each loaded model per server, and a lock that serialises its use.

Every page that runs a model gets it here, so the bundled model is loaded once however many
pages and sessions use it, and at most one Hub model is held beside it. Model code may register
hooks or switch the attention implementation for a moment (capturing queries, attention maps),
so every use holds the model's lock: sessions take turns instead of seeing each other's hooks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from kvcore.models.loader import load_model, model_name

BUNDLED = "bundled"


@dataclass(slots=True)
class SharedModel:
    """A loaded causal LM, its tokenizer, and the re-entrant lock every user of it holds."""

    name: str
    model: Any
    tokenizer: Any
    lock: threading.RLock = field(default_factory=threading.RLock)


@st.cache_resource(max_entries=1, show_spinner=False)
def _bundled() -> SharedModel:
    return SharedModel(BUNDLED, *load_model(None))


@st.cache_resource(max_entries=1, show_spinner=False)
def _hub(name: str) -> SharedModel:
    return SharedModel(name, *load_model(name))


def shared_model(name: str | None = None) -> SharedModel:
    """The bundled model (``None``, "" or "bundled") or one Hub model / local folder, loaded once.

    Raises what ``kvcore.models.load_model`` raises (ValueError for a bad name or a model too
    large, OSError without network): wrap the call in ``ui.guard.user_errors``.
    """
    key = model_name(name)
    return _bundled() if key == BUNDLED else _hub(key)
