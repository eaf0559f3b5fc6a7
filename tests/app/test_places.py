"""A URL-bound widget keeps its place on the page between the run that computes a view and the runs that read it
back. Streamlit's browser side ties a widget to its URL parameter when the widget mounts and unties it when it
unmounts; a widget that moves up mounts at its new place before its old copy goes, and the old copy's going unties
the pair, after which the widget no longer writes the URL (``ui.params`` says more). A bar drawn while a result is
computed, or replayed by a cached function that drew one, must therefore never shift what follows it."""

from __future__ import annotations

import pytest
import streamlit as st

from tests.app.conftest import assert_clean, bound_places, open_page
from ui import disk_cache, eviction_runs

PAGES = ["home", "paged_blocks", "continuous_batching", "serving_engine", "eviction", "quantization", "sharing",
         "memory_hierarchy", "live_model"]


@pytest.fixture
def nothing_kept(tmp_path, monkeypatch):
    """An empty results folder and every in-process cache emptied, the loaded models too: the next view computes
    everything, under its progress bars."""
    monkeypatch.setenv(disk_cache.CACHE_ENV, str(tmp_path / "results"))
    disk_cache.forget()
    st.cache_data.clear()
    st.cache_resource.clear()
    eviction_runs.forget_times()


@pytest.mark.parametrize("name", PAGES)
def test_every_bound_widget_is_where_it_was_when_the_view_is_read_back(name, nothing_kept):
    at = open_page(name)
    assert_clean(at)
    computed = bound_places(at)
    assert computed
    at.run()  # the same view again: every result now comes from a cache, no bar is drawn
    assert_clean(at)
    assert bound_places(at) == computed
