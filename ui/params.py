"""Widgets bound two-way to the URL, and the one parser for URL state that is not a widget.

Every widget goes through :func:`widget` so that it carries ``bind="query-params"``: its key is
the query parameter, Streamlit validates the value and drops a bad one, and the default is left
out of the URL. State that is not a widget (a list of actions, say) is read with
:func:`query_value`, which warns and falls back to the default on a bad value.

A bound widget must never move up the page between two runs of one view. Streamlit's browser side writes a
widget's value to the URL through a binding that the widget registers when it mounts and drops when it unmounts,
keyed by the widget's id: a widget that moves up mounts at its new place while its old copy below is still
shown, and when the run ends the old copy unmounts and drops the binding they share. From then on that widget no
longer reaches the URL. So whatever comes and goes above a widget holds its place: a progress bar
(:func:`ui.progress.progress_bar`), a section computed behind the page (:func:`ui.background.computed_behind`), the
warning beside a widget (:func:`widget`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import streamlit as st

from kvcore.shapes import PRESETS

T = TypeVar("T")
DEFAULT_MODEL = "llama-3-8b"  # the model preset a page shows first


def widget(factory: Callable[..., T], label: Any, *, key: str, **kwargs: Any) -> T:
    """Call a Streamlit widget factory (``st.slider``, ``st.sidebar.selectbox``...) bound to the URL.

    key: the query-parameter name, short and unique on its page.
    A URL value the widget cannot take is forgotten before the widget reads it: a non-finite number, and an empty
    value for a widget that always holds a choice (a required segmented control, a selectbox or radio with a
    default): Streamlit reads ``?key=`` there as "nothing chosen" and would hand the page None. Any URL value that
    is not used (those, and the ones Streamlit itself drops: out of range, not an option, not a number) is named in
    one warning beside the widget, with what the widget takes; the value leaves the URL, so the warning shows once.
    """
    name = getattr(factory, "__name__", "")
    raw = _url_value(key)
    dropped = name in NUMERIC_WIDGETS and _drop_url_value(key, _not_finite)
    required = _required_choice(name, kwargs)
    if required is not None:
        dropped = _drop_url_value(key, lambda text: text.strip() == "") or dropped
    value = factory(label, key=key, bind="query-params", **kwargs)
    value = required.default if required is not None and value is None else value
    ignored = _ignored(raw, value, name, label, kwargs, dropped=dropped or key not in st.query_params)
    warning = getattr(factory, "__self__", st).empty()  # held in every run (see the module's note)
    if ignored is not None:
        warning.warning(
            f"URL parameter `{key}={_shown(ignored)}` was ignored: expected {allowed_values(name, label, kwargs)}. "
            f"Using {_shown(_as_text(value, name, label, kwargs))}.")
    return value


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


def _query_store() -> Any:
    """The session's query-parameter store (private: see :func:`_drop_url_value`), or None where it is missing."""
    try:
        from streamlit.runtime.state.session_state_proxy import get_session_state

        return get_session_state()._state.query_params
    except (AttributeError, RuntimeError):
        return None


def _url_value(key: str) -> str | list[str] | None:
    """The value the URL gives ``key`` when its widget is about to be seeded from it (its first run on the page),
    else None: later runs keep the widget's own value, whatever the URL says."""
    store = _query_store()
    if store is None or key not in st.query_params or key in st.session_state:
        return None
    try:
        return store.get_initial_value(key)
    except AttributeError:
        return None


def _drop_url_value(key: str, bad: Callable[[str], bool]) -> bool:
    """Forget the URL's value of ``key`` before its widget reads it when ``bad`` holds for any of its values;
    True when it did.

    Streamlit rejects out-of-range numbers itself, but converting an infinite value to an int raises
    OverflowError inside the widget, and an empty value makes a required choice None. A private API is
    unavoidable here: a bound widget reads the URL the session was opened with from the session's
    query-parameter store, and deleting the key through the public ``st.query_params`` does not clear that copy
    (tried: the widget still raises). Any change in that private structure is tolerated (the widget then sees the
    value as before); tests/app/test_url_fuzz.py opens every page with ``inf``, ``-1e400``, ``nan``, an empty value
    and a value outside the options in every key. The value also leaves the browser's URL, as one that Streamlit
    drops itself does.
    """
    store = _query_store()
    try:
        raw = None if store is None else store.get_initial_value(key)
        if raw is None or not any(bad(str(value)) for value in (raw if isinstance(raw, list) else [raw])):
            return False
        store._initial_query_params.pop(key, None)
        store.remove_param(key)
    except AttributeError:
        return False
    return True


CHOICE_WIDGETS = {"selectbox", "radio", "segmented_control", "pills", "select_slider", "multiselect"}
SHOWN_OPTIONS = 8  # a warning lists at most this many of a widget's options


def allowed_values(name: str, label: Any, kwargs: dict[str, Any]) -> str:
    """What a widget made by the factory ``name`` takes from the URL, in words: "a whole number from 1 to 4096",
    "one of A100 80GB, H100 80GB, ...", "true or false"."""
    if name in NUMERIC_WIDGETS:
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, kwargs.get("value"))
                    if v is not None)
        kind = "a whole number" if whole else "a number"
        return f"{kind} from {low:,} to {high:,}" if low is not None and high is not None else kind
    if name in ("toggle", "checkbox"):
        return "true or false"
    options = list(label) if name == "tabs" else [_format(o, kwargs) for o in kwargs.get("options") or []]
    if options:
        more = ", ..." if len(options) > SHOWN_OPTIONS else ""
        return f"{'any' if name == 'multiselect' else 'one'} of {', '.join(options[:SHOWN_OPTIONS])}{more}"
    return "a value this setting takes"


def _format(option: Any, kwargs: dict[str, Any]) -> str:
    fmt = kwargs.get("format_func")
    return str(fmt(option)) if fmt is not None else str(option)


def _texts(value: Any, name: str, label: Any, kwargs: dict[str, Any]) -> list[str]:
    """A widget's value as the URL writes it (one string per chosen item)."""
    if name == "tabs":
        opened = [text for text, tab in zip(label, value, strict=False) if getattr(tab, "open", False)]
        return opened[:1] or [str(kwargs.get("default") or next(iter(label)))]
    if isinstance(value, list | tuple):
        return [_format(v, kwargs) for v in value]
    if isinstance(value, bool):
        return [str(value).lower()]
    return [] if value is None else [_format(value, kwargs)]


def _as_text(value: Any, name: str, label: Any, kwargs: dict[str, Any]) -> str:
    return ", ".join(_texts(value, name, label, kwargs)) or "nothing"


def _same(raw: str, text: str) -> bool:
    """Whether a URL value and a widget's value in URL form mean the same (1.0 and 1, TRUE and true)."""
    if raw.strip().lower() == text.lower():
        return True
    try:
        return float(raw) == float(text.replace(",", ""))
    except ValueError:
        return False


def _ignored(raw: str | list[str] | None, value: Any, name: str, label: Any, kwargs: dict[str, Any], *,
             dropped: bool) -> str | None:
    """The part of the URL value ``raw`` that the widget did not take (None: all of it was used, or it only said
    the default). dropped: the value left the URL (Streamlit, or :func:`_drop_url_value`, refused it, or it was
    the default)."""
    if raw is None:
        return None
    texts = _texts(value, name, label, kwargs)
    if isinstance(value, list):  # a multiselect takes the options it knows and drops the rest
        unused = [item for item in (raw if isinstance(raw, list) else [raw])
                  if item.strip() and not any(_same(item, text) for text in texts)]
        return ",".join(unused) if unused else None
    if not dropped:
        return None  # kept as it was, or corrected by Streamlit into a value it holds
    text = ",".join(raw) if isinstance(raw, list) else raw
    return None if any(_same(text, t) for t in texts) else text


def _shown(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


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


def hold_choice(key: str, options: Sequence[Any]) -> None:
    """Before a URL-bound select whose options change (requests that come and go): keep its choice when it is
    still an option (from this session or the URL), else choose the first option, or nothing when there is none.

    The choice is written to session state, so the browser's select shows it: a select keeps its identity when its
    options change, and one first drawn with no options kept "Choose an option" while the page used the first.
    """
    current = st.session_state.get(key, st.query_params.get(key))
    if current in options:
        return
    if options:
        st.session_state[key] = options[0]
    else:
        st.session_state.pop(key, None)


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
