"""Hostile URLs: every page, fed hypothesis-generated query strings, renders without an exception.

The bound widgets of each page are discovered from a default run. Each example sets some of them
(and some unknown keys) to values of the wrong type, huge or negative numbers, NaN, unicode, very
long strings, or repeated keys. Where a value is certainly invalid for its widget, the widget must
show its default. The number of cases run is printed (``-s``) and set by KVLAB_FUZZ_EXAMPLES.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from streamlit.testing.v1.element_tree import Button, DownloadButton, Widget

from tests.app.conftest import assert_clean, open_page

PAGES = ["home", "paged_blocks", "continuous_batching", "eviction", "quantization", "sharing",
         "memory_hierarchy", "live_model"]
EXAMPLES = int(os.environ.get("KVLAB_FUZZ_EXAMPLES", "10"))
CASES_RUN: dict[str, int] = {}

NASTY = st.one_of(
    st.sampled_from(["", " ", "abc", "NaN", "nan", "inf", "-inf", "-1", "-5", "0", "1e308", "-1e308",
                     "99999999999999999999", "1e400", "Infinity", "3.5", "true", "None", "null", "[]", "{}", "%00",
                     "../../etc/passwd",
                     "<script>alert(1)</script>", "😀" * 50, "x" * 5000]),
    st.text(max_size=30),
)


def bound_widgets(at) -> dict[str, Widget]:
    """Widgets with a user key on the rendered page (buttons and downloads carry no state)."""
    found: dict[str, Widget] = {}

    def walk(node) -> None:
        children = getattr(node, "children", None) or {}
        for child in children.values() if isinstance(children, dict) else children:
            walk(child)
        if isinstance(node, Widget) and not isinstance(node, Button | DownloadButton) and node.key:
            found[node.key] = node

    walk(at._tree)
    return found


def certainly_invalid(widget: Widget, raw: str) -> bool:
    """True when Streamlit must reject ``raw`` for this widget (so the default must show)."""
    lo, hi = getattr(widget, "min", None), getattr(widget, "max", None)
    if lo is not None and hi is not None:
        try:
            value = float(raw)
        except ValueError:
            return True
        return math.isnan(value) or not lo <= value <= hi
    options = getattr(widget, "options", None)
    if options is not None and hasattr(widget, "index"):  # single-choice widgets
        return raw not in [str(o) for o in options]
    return False


@pytest.fixture(scope="module")
def defaults() -> dict[str, dict[str, object]]:
    """Each page's bound widgets and their default values."""
    out = {}
    for name in PAGES:
        at = open_page(name)
        assert_clean(at)
        out[name] = {k: (w, w.value) for k, w in bound_widgets(at).items()}
    return out


@pytest.mark.parametrize("name", PAGES)
def test_hostile_query_strings_never_raise(name, defaults):
    widgets = defaults[name]
    keys = [*sorted(widgets), "zz_unknown", "page", "embed"]

    @settings(max_examples=EXAMPLES, database=None)
    @given(st.dictionaries(st.sampled_from(keys), st.one_of(NASTY, st.lists(NASTY, min_size=2, max_size=3)),
                           max_size=4))
    def run(query):
        at = open_page(name, query)
        assert_clean(at)
        shown = bound_widgets(at)
        for key, raw in query.items():
            if key in widgets and key in shown and isinstance(raw, str):
                widget, default = widgets[key]
                if certainly_invalid(widget, raw):
                    assert shown[key].value == default, (key, raw)
        CASES_RUN[name] = CASES_RUN.get(name, 0) + 1

    run()
    print(f"URL fuzz: {CASES_RUN.get(name, 0)} hostile query strings on page {name!r}")
    assert CASES_RUN.get(name, 0) >= 1


@pytest.mark.parametrize("name", PAGES)
@pytest.mark.parametrize("value", ["inf", "-1e400", "nan"])
def test_non_finite_numbers_fall_back_to_defaults(name, value, defaults):
    numeric = {k: w for k, (w, _) in defaults[name].items() if getattr(w, "max", None) is not None}
    at = open_page(name, dict.fromkeys(numeric, value))
    assert_clean(at)
    shown = bound_widgets(at)
    for key in numeric:
        if key in shown:
            assert shown[key].value == defaults[name][key][1], key
