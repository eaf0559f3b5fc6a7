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
    A URL value the widget cannot take is forgotten before the widget reads it: a non-finite number, and an empty
    value for a widget that always holds a choice (a required segmented control, a selectbox or radio with a
    default): Streamlit reads ``?key=`` there as "nothing chosen" and would hand the page None.
    """
    name = getattr(factory, "__name__", "")
    if name in NUMERIC_WIDGETS:
        _drop_url_value(key, _not_finite)
    required = _required_choice(name, kwargs)
    if required is not None:
        _drop_url_value(key, lambda raw: raw.strip() == "")
    value = factory(label, key=key, bind="query-params", **kwargs)
    return required.default if required is not None and value is None else value


NUMERIC_WIDGETS = {"number_input", "slider"}


@dataclasses.dataclass(slots=True, frozen=True)
class _Choice:
    default: Any


def _required_choice(name: str, kwargs: dict[str, Any]) -> _Choice | None:
    """The default of a single-choice widget that must always hold a value, or None for any other widget."""
    options = list(kwargs.get("options") or [])
    if name in ("segmented_control", "pills") and kwargs.get("required") and kwargs.get("selection_mode",
                                                                                         "single") == "single":
        return _Choice(kwargs.get("default", options[0] if options else None))
    if name in ("selectbox", "radio") and kwargs.get("index", 0) is not None and options:
        return _Choice(options[kwargs.get("index", 0)])
    return None


def _not_finite(raw: str) -> bool:
    try:
        return not math.isfinite(float(raw))
    except ValueError:
        return False  # not a number at all: Streamlit drops it


def model_preset(label: str, *, key: str, default: str = DEFAULT_MODEL) -> str:
    """A URL-bound selectbox over the model presets (:data:`kvcore.shapes.PRESETS`), ``default`` first shown."""
    return widget(st.selectbox, label, key=key, options=list(PRESETS), index=list(PRESETS).index(default))


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


def _drop_url_value(key: str, bad: Callable[[str], bool]) -> None:
    """Forget the URL's value of ``key`` before its widget reads it when ``bad`` holds for any of its values.

    Streamlit rejects out-of-range numbers itself, but converting an infinite value to an int raises
    OverflowError inside the widget, and an empty value makes a required choice None. A private API is
    unavoidable here: a bound widget reads the URL the session was opened with from the session's
    query-parameter store, and deleting the key through the public ``st.query_params`` does not clear that copy
    (tried: the widget still raises). Any change in that private structure is tolerated (the widget then sees the
    value as before); tests/app/test_url_fuzz.py opens every page with ``inf``, ``-1e400``, ``nan``, an empty value
    and a value outside the options in every key.
    """
    try:
        from streamlit.runtime.state.session_state_proxy import get_session_state

        store = get_session_state()._state.query_params
        raw = store.get_initial_value(key)
    except (AttributeError, RuntimeError):
        return
    if raw is None:
        return
    if any(bad(str(value)) for value in (raw if isinstance(raw, list) else [raw])):
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
