"""Widgets bound two-way to the URL, and the one parser for URL state that is not a widget.

Every widget goes through :func:`widget` so that it carries ``bind="query-params"``: its key is
the query parameter, Streamlit validates the value and drops a bad one, and the default is left
out of the URL. State that is not a widget (a list of actions, say) is read with
:func:`query_value`, which warns and falls back to the default on a bad value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st

from kvcore.shapes import PRESETS

T = TypeVar("T")
DEFAULT_MODEL = "llama-3-8b"  # the model preset a page shows first


def widget(factory: Callable[..., T], label: str, *, key: str, **kwargs: Any) -> T:
    """Call a Streamlit widget factory (``st.slider``, ``st.sidebar.selectbox``...) bound to the URL.

    key: the query-parameter name, short and unique on its page.
    """
    if getattr(factory, "__name__", "") in NUMERIC_WIDGETS:
        _drop_non_finite(key)
    return factory(label, key=key, bind="query-params", **kwargs)


NUMERIC_WIDGETS = {"number_input", "slider"}


def model_preset(label: str, *, key: str) -> str:
    """A URL-bound selectbox over the model presets (:data:`kvcore.shapes.PRESETS`), :data:`DEFAULT_MODEL` first."""
    return widget(st.selectbox, label, key=key, options=list(PRESETS), index=list(PRESETS).index(DEFAULT_MODEL))


def dataclass_widgets(cls: type, prefix: str, container: Any = st) -> dict[str, Any]:
    """One URL-bound widget per field of a settings dataclass (keys ``<prefix>_<field>``); returns the values.

    Uses each field's default and its metadata (``min``, ``max``, ``step``, ``options``, ``help``): a toggle for
    a bool, a selectbox for a field with options, a number input otherwise.
    """
    values = {}
    for f in dataclasses.fields(cls):
        meta, key, label = f.metadata, f"{prefix}_{f.name}", f"{prefix}: {f.name}"
        if isinstance(f.default, bool):
            values[f.name] = widget(container.toggle, label, key=key, value=f.default, help=meta.get("help"))
        elif "options" in meta:
            values[f.name] = widget(container.selectbox, label, key=key, options=list(meta["options"]),
                                    index=list(meta["options"]).index(f.default), help=meta.get("help"))
        else:
            kind = type(f.default)
            values[f.name] = widget(container.number_input, label, key=key, value=f.default,
                                    min_value=kind(meta.get("min", 0)), max_value=kind(meta.get("max", 10**9)),
                                    step=kind(meta.get("step", 1)), help=meta.get("help"))
    return values


def _drop_non_finite(key: str) -> None:
    """Forget a URL value like ``inf`` or ``1e400`` before a numeric widget reads it.

    Streamlit rejects out-of-range numbers itself, but converting an infinite value to an int raises
    OverflowError inside the widget. A private API is unavoidable here: a bound widget reads the URL the
    session was opened with from the session's query-parameter store, and deleting the key through the
    public ``st.query_params`` does not clear that copy (tried: the widget still raises). Any change in
    that private structure is tolerated (the widget then sees the value as before); tests/app/test_url_fuzz.py
    opens every page with ``inf``, ``-1e400`` and ``nan`` in every numeric key.
    """
    try:
        from streamlit.runtime.state.session_state_proxy import get_session_state

        store = get_session_state()._state.query_params
        raw = store.get_initial_value(key)
    except (AttributeError, RuntimeError):
        return
    if raw is None:
        return
    finite = True
    for value in raw if isinstance(raw, list) else [raw]:
        try:
            finite &= math.isfinite(float(value))
        except ValueError:
            continue  # not a number at all: Streamlit drops it
    if not finite:
        store._initial_query_params.pop(key, None)


def query_value(name: str, default: T, parse: Callable[[str], T], allowed: str) -> T:
    """Read a non-widget query parameter; on a bad value warn (naming it and what is allowed) and
    return ``default``. Never raises.

    parse: turns the raw string into a value, raising ValueError (or TypeError) when it is bad.
    allowed: a short human description of the valid values, shown in the warning.
    """
    raw = st.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except (ValueError, TypeError, OverflowError):
        shown = raw if len(raw) <= 40 else raw[:37] + "..."
        st.warning(f"URL parameter `{name}={shown}` was ignored: expected {allowed}. Using the default.")
        return default


def set_query_value(name: str, value: str | None) -> None:
    """Write (or with None, remove) a non-widget query parameter so the URL keeps the view."""
    if value is None or value == "":
        st.query_params.pop(name, None)
    else:
        st.query_params[name] = value


PAGE_KEY = "_kvlab_page"


def forget_other_pages(url_path: str) -> None:
    """On a page switch, drop the previous page's widget state.

    Pages reuse short keys (``model``, ``gpu``) for widgets with different options; session state
    is shared across pages, so a stale value would leak into the new page. Every setting lives in
    the URL, so nothing is lost: bound widgets restore from the query string or their default.
    Keys starting with ``_`` (caches a page keeps on purpose) survive.
    """
    if st.session_state.get(PAGE_KEY) == url_path:
        return
    for key in list(st.session_state.keys()):
        if not str(key).startswith("_"):
            del st.session_state[key]
    st.session_state[PAGE_KEY] = url_path
