"""Eviction page, needle section: SmolLM2 by default, the full cache as the baseline, a window that cannot hold the
needle loses it, settings in the URL, and a grid too large for a page view refused with the command that runs it.

The section's default view is the background warm-up's work: opening the page never runs it (the grid and the
perplexity beside it are counted, not timed), the warm-up computes it on a copy of SmolLM2 of its own and keeps it
on disk, and while it runs the section follows it under a progress bar."""

from __future__ import annotations

import contextlib
import threading

import pytest

from kvcore.needle import NeedleConfig
from tests.app.conftest import Calls, assert_clean, open_page
from ui import background, disk_cache, needle_runs
from ui.needle_runs import NeedleSettings

# The page's own sweep and the needle grid kept to seconds: one 128-token haystack, the window against the full cache.
PAGE_SMALL = {"ntok": "64", "budgets": ["16"]}
SMALL = PAGE_SMALL | {"nd_lengths": ["128"], "nd_depths": ["0.5"], "nd_needles": "1",
                      "nd_methods": ["evict:sliding_window"], "nd_budgets": ["0.25"]}
# The same grid as settings: the default view in the tests that stand it in for the page's (seconds, not a minute).
SMALL_DEFAULT = NeedleSettings("smollm2-135m", NeedleConfig(methods=("evict:sliding_window",), budgets=(0.25,),
                                                            lengths=(128,), depths=(0.5,), needles=1))


def _summary(at):
    return next(frame.value for frame in at.dataframe if "verdict" in frame.value.columns)


def _has_section_tables(at) -> bool:
    return any({"depth", "answer"} <= set(frame.value.columns) for frame in at.dataframe)


@pytest.fixture
def work(monkeypatch, tmp_path) -> Calls:
    """Counted work on an empty results folder, with nothing in memory and no warm-up queue."""
    monkeypatch.setenv(disk_cache.CACHE_ENV, str(tmp_path / "results"))
    disk_cache.forget()
    background.WARMUP.fill([])
    yield Calls(monkeypatch, needle_runs, grids="run_needle", perplexities="perplexity_table")
    disk_cache.forget()
    background.WARMUP.fill([])


def test_section_shows_smollm2_retrieval_against_the_full_cache(page, smollm2, work):
    at = page("eviction", SMALL)  # settings other than the default: computed when picked
    assert (work.grids, work.perplexities) == (1, 1)
    assert any("needle in a haystack" in header.value.lower() for header in at.header)
    captions = " ".join(c.value for c in at.caption)
    assert "Model: SmolLM2-135M-Instruct" in captions
    assert "Baseline: the full cache retrieved 1 of 1 needles" in captions
    assert "python -m kvcore needle" in captions
    summary = _summary(at).set_index("method")
    assert list(summary.index) == ["full", "evict:sliding_window"]
    assert summary.loc["full", "retrieved"] == 1.0
    assert summary.loc["evict:sliding_window", "retrieved"] == 0.0
    assert summary.loc["evict:sliding_window", "budget"] == 0.25
    assert summary.loc["evict:sliding_window", "needle_kept"] == 0.0
    assert summary.loc["evict:sliding_window", "retrieved_low"] == 0.0
    assert summary.loc["evict:sliding_window", "retrieved_high"] > 0.5  # one haystack: a wide interval, said as such
    assert {"ppl_vs_full", "ppl_vs_full_low", "ppl_vs_full_high", "agreement"} <= set(summary.columns)
    cells = next(frame.value for frame in at.dataframe if {"depth", "answer"} <= set(frame.value.columns))
    assert cells["length"].tolist() == [128, 128]
    assert smollm2 is not None  # the fixture loaded (or skipped on) SmolLM2 before the page did


def test_a_grid_too_large_for_a_page_view_is_refused_with_the_command(page, work):
    at = page("eviction", SMALL | {"nd_lengths": ["1024"], "nd_depths": ["0.1", "0.5", "0.9"], "nd_needles": "4"})
    errors = [e.value for e in at.error]
    assert any("reads 12,288 haystack tokens" in e and "python -m kvcore needle" in e for e in errors), errors
    assert work.grids == 0


def test_the_widgets_default_to_the_view_the_warm_up_computes(page, work):
    at = page("eviction", PAGE_SMALL)
    default = needle_runs.DEFAULT.config
    assert at.selectbox(key="nd_model").value == needle_runs.DEFAULT.model
    assert tuple(at.multiselect(key="nd_methods").value) == default.methods[1:]  # full is always run
    assert tuple(at.multiselect(key="nd_budgets").value) == default.budgets
    assert tuple(at.multiselect(key="nd_lengths").value) == default.lengths
    assert tuple(at.multiselect(key="nd_depths").value) == default.depths
    assert at.selectbox(key="nd_needles").value == default.needles


def test_opening_the_page_leaves_the_default_grid_to_the_warm_up(page, work):
    # with the warm-up off (as in these tests) the section says so and waits for a button; nothing is computed
    at = page("eviction", PAGE_SMALL)
    assert (work.grids, work.perplexities) == (0, 0)
    assert any("background warm-up" in i.value and "KVLAB_WARMUP=0" in i.value for i in at.info)
    assert [b.label for b in at.button] == ["Run the needle test now (about 40 s)"]
    assert not _has_section_tables(at)
    assert results_of(at)  # the rest of the page is complete


def results_of(at) -> list:
    return [frame.value for frame in at.dataframe if "policy" in frame.value.columns]


def test_the_button_computes_the_default_view(page, smollm2, work, monkeypatch):
    monkeypatch.setattr(needle_runs, "DEFAULT", SMALL_DEFAULT)
    at = page("eviction", PAGE_SMALL)
    assert work.grids == 0
    at.button(key="nd_run").click().run()
    assert_clean(at)
    assert (work.grids, work.perplexities) == (1, 1)
    assert _summary(at).set_index("method").loc["full", "retrieved"] == 1.0


def test_the_warm_up_computes_the_default_on_its_own_copy_and_keeps_it_on_disk(smollm2, work, monkeypatch, tmp_path):
    monkeypatch.setattr(needle_runs, "DEFAULT", SMALL_DEFAULT)

    def no_shared_model(*_):
        raise AssertionError("the warm-up used the pages' shared model")

    with monkeypatch.context() as patch:
        patch.setattr(needle_runs, "shared_model", no_shared_model)
        needle_runs.warm_default()
    assert (work.grids, work.perplexities) == (1, 1)
    assert [p.name.split("-")[:2] for p in (tmp_path / "results").glob("*.pkl")] == [["needle", "view"]]
    for restarted in (False, True):  # the same server, then a restarted one reading the disk
        if restarted:
            disk_cache.forget()
        at = open_page("eviction", PAGE_SMALL)
        assert_clean(at)
        assert (work.grids, work.perplexities) == (1, 1)  # read back, never computed again
        assert _summary(at).set_index("method").loc["evict:sliding_window", "retrieved"] == 0.0


def test_while_the_background_computes_the_default_the_section_follows_it(page, work, monkeypatch):
    monkeypatch.setattr(needle_runs, "DEFAULT", SMALL_DEFAULT)
    background.WARMUP.fill([background.CALIBRATION, background.EVICTION, background.NEEDLE])
    at = page("eviction", PAGE_SMALL)  # queued: the page moves it up, behind the calibration
    assert background.WARMUP.queued == [background.CALIBRATION, background.NEEDLE, background.EVICTION]
    bars = [p.proto.text for p in at.get("progress")]
    assert bars == ["Needle test on smollm2-135m: queued in the background warm-up behind the Serving engine's "
                    "calibration..."]
    release, started = threading.Event(), threading.Event()

    def compute(report) -> None:
        report(0.5, "Needle test on smollm2-135m: 1 of 2 haystacks done")
        started.set()
        release.wait(60)
        raise OSError("stopped by the test")

    def run() -> None:
        with contextlib.suppress(OSError):
            disk_cache.computed("needle-view", SMALL_DEFAULT, needle_runs.MODULES, None, compute)

    monkeypatch.setattr(disk_cache, "weights_key", lambda model: None)  # the flight's key, kept in memory only
    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert started.wait(30)
        at = page("eviction", PAGE_SMALL)
        assert [p.proto.text for p in at.get("progress")] == ["Needle test on smollm2-135m: 1 of 2 haystacks done"]
        assert [p.proto.value for p in at.get("progress")] == [50]
        assert not at.button
        assert not _has_section_tables(at)
    finally:
        release.set()
        thread.join(30)
    assert (work.grids, work.perplexities) == (0, 0)
