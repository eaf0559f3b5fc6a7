"""Hostile URLs: every page, fed hypothesis-generated query strings, renders without an exception.

The bound widgets of each page are discovered from a default run (and a run of each URL-bound tab).
Each example sets some of them (and some unknown keys) to values of the wrong type, huge or negative
numbers, NaN, unicode, very long strings, or repeated keys. Where a value is certainly invalid for
its widget, the widget must show its default. The number of cases run is printed (``-s``) and set by
KVLAB_FUZZ_EXAMPLES. Besides the random draws, every key of every page (every tab) is given an empty
value (``?key=``) and a value outside its options, the values a random draw is likely to miss
(``/sharing?sh_bits=`` once stopped the page with a TypeError).
"""

from __future__ import annotations

import math
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from streamlit.testing.v1.element_tree import Button, ButtonGroup, DownloadButton, Widget

from tests.app.conftest import assert_clean, open_page
from tests.conftest import ROOT

PAGES = ["home", "paged_blocks", "continuous_batching", "serving_engine", "eviction", "quantization", "sharing",
         "memory_hierarchy", "live_model"]
EXAMPLES = int(os.environ.get("KVLAB_FUZZ_EXAMPLES", "10"))
CASES_RUN: dict[str, int] = {}
# Keys that once took a typed name (ui.models.choose_model(typed_links=True)): an old link may carry any model name,
# which joins the choices and opens chosen (an unknown one then says why it cannot load), so no value is invalid.
TYPED_LINKS = {("eviction", "model")}

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
    if isinstance(widget, ButtonGroup) and widget.proto.required and widget.proto.click_mode == 0:
        # a required single-choice segmented control or pills: the value must be one of the options
        return raw not in [str(o) for o in widget.options]
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
            if key in widgets and key in shown and isinstance(raw, str) and (name, key) not in TYPED_LINKS:
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


EMPTY, OUTSIDE = "", "zz-not-an-option"


def tab_views(name: str) -> list[dict[str, str]]:
    """The URL of each tab of a page whose tabs are URL-bound (``params.widget(st.tabs, ..., key=...)``), or [{}]."""
    source = (ROOT / "app_pages" / f"{name}.py").read_text()
    found = re.search(r"widget\(st\.tabs,[^)]*key=\"(\w+)\"", source)
    if not found:
        return [{}]
    at = open_page(name)
    labels = [node.label for node in walk_blocks(at._tree) if type(node).__name__ == "Tab"]
    return [{found.group(1): label} for label in labels]


def walk_blocks(node):
    yield node
    children = getattr(node, "children", None) or {}
    for child in children.values() if isinstance(children, dict) else children:
        yield from walk_blocks(child)


def fills_the_page(at, reference) -> bool:
    """The run drew what the reference run drew (no early stop or error that hides later widgets)."""
    return (not at.error and len(at.get("plotly_chart")) >= len(reference.get("plotly_chart"))
            and len(at.dataframe) >= len(reference.dataframe))


def check_defaults_shown(name: str, at, widgets: dict[str, tuple[Widget, object]], query: dict[str, str]) -> None:
    shown = bound_widgets(at)
    for key, raw in query.items():
        if (name, key) in TYPED_LINKS and key in shown and raw.strip():
            assert shown[key].value == raw.strip(), (key, raw, shown[key].value)  # an old link's name opens chosen
        elif key in widgets and key in shown and certainly_invalid(widgets[key][0], raw):
            assert shown[key].value == widgets[key][1], (key, raw, shown[key].value)


def probe(name: str, tab: dict[str, str], keys: list[str], value: str, reference, widgets) -> int:
    """Open the view with ``value`` in every key of ``keys``; where the run stops early or shows an error (an empty
    multiselect asks for a choice), which could hide another key's crash, probe each half of the keys again.
    Returns the number of runs."""
    query = dict.fromkeys(keys, value)
    at = open_page(name, query | tab)
    assert_clean(at)
    check_defaults_shown(name, at, widgets, query)
    if fills_the_page(at, reference) or len(keys) == 1:
        return 1
    half = len(keys) // 2
    return 1 + probe(name, tab, keys[:half], value, reference, widgets) + probe(name, tab, keys[half:], value,
                                                                                 reference, widgets)


@pytest.mark.parametrize("name", PAGES)
@pytest.mark.parametrize("value", [EMPTY, OUTSIDE], ids=["empty", "outside"])
def test_every_key_with_an_empty_or_unknown_value(name, value):
    for tab in tab_views(name):
        reference = open_page(name, tab)
        assert_clean(reference)
        widgets = {k: (w, w.value) for k, w in bound_widgets(reference).items() if k not in tab}
        assert widgets, f"no URL-bound widget found on {name} {tab}"
        runs = probe(name, tab, sorted(widgets), value, reference, widgets)
        print(f"{name} {tab}: {len(widgets)} keys set to {value!r} in {runs} run(s)")


@pytest.mark.parametrize("name", ["sharing", "memory_hierarchy"])
@pytest.mark.parametrize("value", [EMPTY, OUTSIDE], ids=["empty", "outside"])
def test_a_bad_tab_value_opens_the_first_tab(name, value):
    (key, _first), = tab_views(name)[0].items()
    at = open_page(name, {key: value})
    assert_clean(at)
    reference = open_page(name)
    assert [c.proto.spec for c in at.get("plotly_chart")] == [c.proto.spec for c in reference.get("plotly_chart")]


@pytest.mark.parametrize(("name", "key", "raw", "allowed"), [
    ("home", "batch", "99999999999", "a whole number from 1 to 4,096"),
    ("home", "gpu", "foo", "one of H100 80GB"),
    ("home", "bits", "", "one of 16, 8, 4, 2"),
    ("home", "tokens", "inf", "a whole number from 1 to 10,000,000"),
    ("quantization", "qtokens", "1e9", "one of 64, 128, 192, 256, 384"),
    ("sharing", "sh_kv", "7", "one of 32, 16, 8, 4, 2, 1"),
    ("live_model", "lm_step", "-5", "a whole number from 0 to"),
])
def test_a_dropped_url_value_is_named_once(name, key, raw, allowed):
    # Streamlit drops a value its widget cannot take and shows the default without a word; the page says which
    # value was ignored and what the widget takes, in one warning, and the value leaves the URL (no repeat).
    at = open_page(name, {key: raw})
    assert_clean(at)
    named = [w.value for w in at.warning if f"`{key}={raw}` was ignored" in w.value]
    assert len(named) == 1, [w.value for w in at.warning]
    assert f"expected {allowed}" in named[0]
    assert key not in at.query_params
    at.run()
    assert not [w.value for w in at.warning if f"`{key}=" in w.value]


def test_a_url_value_that_is_used_brings_no_warning():
    # the default written out (collapsed from the URL), a value in range, a multiselect with one unknown entry
    at = open_page("home", {"batch": "1", "tokens": "4096", "bits": "8", "models": ["llama-3-8b", "nope"]})
    assert_clean(at)
    assert [w.value.split(":")[0] for w in at.warning] == ["URL parameter `models=nope` was ignored"]
    assert at.dataframe[0].value["model"].tolist() == ["llama-3-8b"]
    assert at.number_input(key="tokens").value == 4096
